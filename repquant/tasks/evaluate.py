"""``repquant eval``: COCO mAP (pycocotools) of any model spec on a dataset split, through one postprocess.

Every engine feeds the same letterboxed images to the same :func:`repquant.eval.evaluate`, so torch, ONNX
Runtime (and any other backend) numbers are directly comparable. The image size defaults to the one
recorded with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repquant.data import DetectionDataset, load_data_config
from repquant.deploy.backends import RunnerOptions
from repquant.deploy.onnx_export import onnx_has_qdq
from repquant.deploy.resolve import ModelHandle, open_model, open_runner
from repquant.errors import CheckpointError
from repquant.eval import EvalResult, evaluate
from repquant.modelfile import ModelKind
from repquant.tasks.config import EvalConfig

__all__ = ["EvalConfig", "EvalReport", "run"]


@dataclass(frozen=True)
class EvalReport:
    """The evaluation, the image size and backend used."""

    config: EvalConfig
    result: EvalResult
    img_size: int
    backend: str

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"model": self.config.model, "split": self.config.split, "img_size": self.img_size,
                "backend": self.backend, "map50_95": round(r.map50_95, 5), "map50": round(r.map50, 5),
                "num_images": r.num_images,
                "per_class_ap50_95": {k: round(v, 5) for k, v in r.per_class_ap50_95.items()}}


def _backend(cfg: EvalConfig, handle: ModelHandle) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return {ModelKind.ONNX: "ort", ModelKind.ENGINE: "tensorrt"}.get(handle.kind, "torch")


def _img_size(cfg: EvalConfig, handle: ModelHandle, runner: Any) -> int:
    fixed = runner.img_size
    if cfg.img_size is not None:
        if fixed is not None and fixed != (cfg.img_size, cfg.img_size):
            raise CheckpointError(f"{handle.spec}: exported for {fixed[0]}x{fixed[1]}, not {cfg.img_size}")
        return cfg.img_size
    if fixed is not None:
        return int(fixed[0])
    raise CheckpointError(f"{handle.spec}: the model records no image size; pass --img-size")


def run(cfg: EvalConfig, progress: bool = True) -> EvalReport:
    """mAP of ``cfg.model`` on ``cfg.split`` of ``cfg.data``."""
    handle = open_model(cfg.model)
    backend = _backend(cfg, handle)
    size = cfg.img_size or (handle.recorded_img_size() or 640 if handle.spec.is_torch else None)
    options = RunnerOptions(precision=_precision(handle), threads=cfg.threads, img_size=size, device="cpu")
    runner = open_runner(handle, backend, options, deployed=False)  # torch: evaluate the model as stored
    img_size = _img_size(cfg, handle, runner)
    data = load_data_config(cfg.data)
    _check_classes(handle, runner, data.nc, cfg.data)
    dataset = DetectionDataset(data, cfg.split, img_size=img_size, augment=False)
    batch_size = runner.batch_size or cfg.batch_size
    result = evaluate(runner, dataset, batch_size=batch_size, conf_thres=cfg.conf_thres, iou_thres=cfg.iou_thres,
                      progress=progress)
    return EvalReport(cfg, result, img_size, backend)


def _check_classes(handle: ModelHandle, runner: Any, data_classes: int, data_yaml: Any) -> None:
    """A model scored against a dataset with another class count gives a meaningless mAP: refuse it (a registry
    name is a fresh model, checked by the caller's intent, not by a file)."""
    model_classes = getattr(runner, "num_classes", None)
    if handle.kind is ModelKind.REGISTRY or model_classes is None or model_classes == data_classes:
        return
    raise CheckpointError(f"{handle.spec}: predicts {model_classes} classes but {data_yaml} has {data_classes}; "
                          "evaluate it on a dataset with the same classes")


def _precision(handle: ModelHandle) -> str:
    """INT8 for a Q/DQ ONNX file (the engine decides from the file); torch models run their own way."""
    if handle.kind is ModelKind.ONNX:
        return "int8" if onnx_has_qdq(handle.path) else "fp32"  # type: ignore[arg-type]
    return "fp32"
