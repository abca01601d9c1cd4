"""What an artefact was made from, recorded when it is written and checked when it is read.

``model_identity(model)`` names a model by what it computes: its variant, class count and a sha256 of its
deployed weights, so the same network read from an official ``.pt``, a repquant checkpoint or a converted
copy is recognised, and a different one with the same layer names (yolov6n vs yolov6s are not; two
fine-tunes of one variant are) is not.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from repquant.errors import RepquantError

logger = logging.getLogger(__name__)


def model_identity(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """``{"variant", "num_classes", "weights_sha256", "img_size"}`` of a (deployed) model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not tensor.is_floating_point():
            continue  # counters (BN num_batches_tracked) say nothing about what the model computes
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    config = getattr(model, "config", None)
    return {"variant": getattr(config, "name", None), "num_classes": getattr(config, "num_classes", None),
            "weights_sha256": digest.hexdigest(), "img_size": img_size}


def check_identity(recorded: dict[str, Any] | None, actual: dict[str, Any], source: str, what: str) -> None:
    """Refuse an artefact (``source``, e.g. a sensitivity JSON) recorded for another model or image size than
    the one it is used with; one made before identities were recorded is accepted with a warning."""
    if recorded is None:
        logger.warning("%s records no model identity (written by an older repquant): cannot check that it was "
                       "measured on this model", source)
        return
    for key in ("variant", "num_classes", "weights_sha256", "img_size"):
        if recorded.get(key) is not None and actual.get(key) is not None and recorded[key] != actual[key]:
            mine, theirs = actual[key], recorded[key]
            if key == "weights_sha256":
                mine, theirs = mine[:12], theirs[:12]
            raise RepquantError(f"{source}: {what} was measured on a different model ({key} {theirs}, this model "
                                f"has {mine}); measure it again for this model")
