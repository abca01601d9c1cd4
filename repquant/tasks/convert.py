"""``repquant convert``: an official meituan/YOLOv6 ``.pt`` (read without running pickled code) written as a
repquant checkpoint whose metadata records where it came from: the source file and its sha256, the release
naming detected, the head kind, how every tensor was mapped, and the official epoch / results / class names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from repquant.checkpoint import save_checkpoint
from repquant.errors import CheckpointError
from repquant.modelfile import ModelKind, identify
from repquant.official import MappingReport, convert_official
from repquant.outputs import check_output_file
from repquant.tasks.config import ConvertConfig

__all__ = ["ConvertConfig", "ConvertResult", "run"]


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    report: MappingReport
    sha256: str


def run(cfg: ConvertConfig) -> ConvertResult:
    """Convert ``cfg.model`` (an official ``.pt``) to ``cfg.output``."""
    spec = identify(cfg.model)
    if spec.kind is not ModelKind.OFFICIAL:
        raise CheckpointError(f"{cfg.model}: a {spec.kind.value}, not an official YOLOv6 checkpoint")
    check_output_file(cfg.output, [cfg.model], cfg.overwrite)
    converted = convert_official(cfg.model)
    report, official = converted.report, converted.official
    metadata = {
        "source": {"file": str(cfg.model), "sha256": official.sha256, "format": "official YOLOv6 .pt",
                   "naming": report.naming, "entry": official.source, "head": report.head},
        "official": official.info,
        "mapping": {"mapped": report.mapped, "folded": report.folded, "training_only": report.training_only,
                    "constants": report.constants, "notes": report.notes},
    }
    path = save_checkpoint(cfg.output, converted.model, extra_metadata=metadata)
    return ConvertResult(path, report, official.sha256)
