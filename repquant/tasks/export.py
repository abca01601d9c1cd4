"""``repquant export``: re-parameterize and write ONNX (``images -> boxes, scores``); a quantized checkpoint
becomes the same QDQ graph ``repquant ptq`` writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from repquant.deploy.onnx_export import export_onnx
from repquant.deploy.qdq import export_quantized_checkpoint
from repquant.deploy.resolve import open_model
from repquant.errors import RecipeError
from repquant.modelfile import ModelKind
from repquant.outputs import check_output_file
from repquant.tasks.config import ExportConfig

__all__ = ["ExportConfig", "ExportResult", "run"]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    model_name: str
    img_size: int
    quantized: bool

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6


def run(cfg: ExportConfig) -> ExportResult:
    """Export ``cfg.model`` to ``cfg.output``."""
    check_output_file(cfg.output, [cfg.model], cfg.overwrite)
    handle = open_model(cfg.model)
    if handle.kind is ModelKind.QUANTIZED:
        if cfg.raw or cfg.batch_size != 1 or cfg.opset != 17:
            raise RecipeError("export: a quantized checkpoint exports decoded outputs at opset 17 with a dynamic or "
                              "static-1 batch; drop --raw / --batch-size / --opset")
        path = export_quantized_checkpoint(handle.path, cfg.output, cfg.img_size,  # type: ignore[arg-type]
                                           dynamic_batch=cfg.dynamic_batch)
        return ExportResult(path, str(cfg.model), cfg.img_size, True)
    model = handle.float_model(cfg.num_classes)
    path = export_onnx(model, cfg.output, img_size=cfg.img_size, batch_size=cfg.batch_size,
                       dynamic_batch=cfg.dynamic_batch, opset=cfg.opset, decoded=not cfg.raw)
    return ExportResult(path, model.config.name, cfg.img_size, False)
