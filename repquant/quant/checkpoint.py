"""Quantized checkpoints: a fake-quant model saved as safetensors with a ``repquant_quant`` record.

The tensors are the model's state dict, quantizer ``amax`` buffers included (``<quantizer>._amax``); the
record (``quant_info``: keep-float layers, layout, calibration, and how it was made) is what
:func:`load_quantized_model` needs to insert the same quantizers again, so ``repquant export`` writes the
same QDQ graph as PTQ and ``repquant eval`` runs the same fake-quant model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from repquant.checkpoint import load_checkpoint, model_from_state, save_checkpoint
from repquant.errors import CheckpointError
from repquant.io import read_safetensors_metadata
from repquant.models.yolov6 import YOLOv6
from repquant.quant.calibrate import insert_quantizers, restore_amax
from repquant.quant.config import QuantConfig, with_layout
from repquant.quant.placement import find_placement

QUANT_METADATA_KEY = "repquant_quant"


def save_quantized_checkpoint(path: str | os.PathLike, qmodel: nn.Module, info: dict[str, Any],
                              extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write the fake-quant ``qmodel`` (weights and ``amax``) with its ``repquant_quant`` record ``info``."""
    return save_checkpoint(path, qmodel, extra_metadata={QUANT_METADATA_KEY: info, **(extra_metadata or {})})


def load_quantized_model(path: str | os.PathLike) -> tuple[YOLOv6, dict[str, Any]]:
    """A fake-quant model saved by ``save_quantized_checkpoint`` (quantizers, keep-float layers and ``amax``
    restored), in eval mode, and its ``repquant_quant`` record. A float checkpoint raises ``CheckpointError``."""
    state, metadata = load_checkpoint(path)
    info = metadata.get(QUANT_METADATA_KEY)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: not a quantized checkpoint (no {QUANT_METADATA_KEY} metadata)")
    float_state = {k: v for k, v in state.items() if "_quantizer." not in k}
    model = model_from_state(path, float_state, metadata)
    config = with_layout(QuantConfig(keep_float_layers=tuple(info["keep_float_layers"])), info.get("layout"),
                         int(info.get("ort_placement", 1)))
    insert_quantizers(model, find_placement(model), config)
    restore_amax(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: quantizers do not match the checkpoint ({str(err).splitlines()[0]})") from None
    return model.eval(), info


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` checkpoint carrying ``repquant_quant`` metadata (cheap: header only)."""
    if not Path(path).is_file():
        return False
    try:
        return QUANT_METADATA_KEY in read_safetensors_metadata(path)
    except Exception:  # not safetensors, or unreadable: the loader that follows reports it with its reason
        return False
