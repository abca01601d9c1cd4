"""Initial weights for fine-tuning (``TrainConfig.weights``): an official YOLOv6 ``.pt`` or a repquant
checkpoint, in training form. Every tensor whose name and shape fit the new model is loaded; the class
prediction convs are re-initialised (kept as the model initialised them) when the class count differs; the
rest is skipped. One log line gives the counts, the skipped names are logged at debug level."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from repquant.checkpoint import load_checkpoint
from repquant.errors import CheckpointError
from repquant.modelfile import ModelKind, identify
from repquant.official import convert_official

LOGGER = logging.getLogger("repquant.train")
CLASS_PREDICTIONS = "head.cls_preds."


@dataclass
class PretrainedReport:
    """Tensors of the new model ``loaded`` from the file, ``reinitialized`` (class predictions of another class
    count), and file tensors ``skipped`` (no tensor of that name and shape in the model)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def pretrained_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """The training-form state dict of a weights file and what it was (for the log)."""
    spec = identify(path)
    if spec.kind is ModelKind.OFFICIAL:
        converted = convert_official(path)
        if converted.report.deployed:
            raise CheckpointError(f"{path}: a deployed (re-parameterized) official checkpoint cannot start a training "
                                  "run; use the training-form file")
        return converted.model.state_dict(), f"official {converted.report.variant} ({converted.report.naming} naming)"
    if spec.kind is ModelKind.CHECKPOINT:
        state, metadata = load_checkpoint(path)
        if metadata.get("deployed"):
            raise CheckpointError(f"{path}: a deployed checkpoint cannot start a training run; use a training-form one")
        return state, f"repquant {metadata['repquant_config'].get('name')}"
    raise CheckpointError(f"{path}: a {spec.kind.value} cannot initialise training; pass an official YOLOv6 .pt or a "
                          "repquant checkpoint")


@torch.no_grad()
def load_pretrained(model: nn.Module, path: str | os.PathLike) -> PretrainedReport:
    """Copy the fitting tensors of ``path`` into ``model`` (in place); see the module docstring."""
    state, source = pretrained_state(path)
    report = PretrainedReport(source)
    own = model.state_dict()
    for name, tensor in state.items():
        target = own.get(name)
        if target is not None and target.shape == tensor.shape:
            target.copy_(tensor)
            report.loaded.append(name)
        elif target is not None and name.startswith(CLASS_PREDICTIONS):
            report.reinitialized.append(name)
        else:
            report.skipped.append(name)
    LOGGER.info("weights %s (%s): loaded %d tensors, re-initialised %d (class predictions), skipped %d; %d model "
                "tensors not in the file", Path(path).name, source, len(report.loaded), len(report.reinitialized),
                len(report.skipped), len(own) - len(report.loaded) - len(report.reinitialized))
    if report.skipped:
        LOGGER.debug("weights %s: skipped %s", path, ", ".join(report.skipped))
    return report
