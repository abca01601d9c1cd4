"""The configuration of every command, as frozen dataclasses (torch-free: the CLI reads their defaults).

Each ``XConfig`` is what ``repquant.tasks.x.run`` takes; a recipe YAML holding only what differs from the
defaults loads into it (``load_task_config``), and the CLI fills it from flags and ``--set`` overrides.
Training's config is ``repquant.train.config.TrainConfig`` (the training recipe); the quantization commands'
configs live in ``repquant.tasks.quant_config`` and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from repquant import vocab
from repquant.tasks.config_base import AUTO, MAX_STRIDE, Auto, Problems, load_task_config
from repquant.tasks.quant_config import (
    QAT_WHEN,
    ActStatsConfig,
    PTQConfig,
    QATConfig,
    QuantizeConfig,
    SensitivityConfig,
)
from repquant.vocab import PRECISIONS

__all__ = ["AUTO", "MAX_STRIDE", "QAT_WHEN", "ActStatsConfig", "Auto", "BenchConfig", "ConvertConfig", "DemoConfig",
           "EvalConfig", "ExportConfig", "InfoConfig", "PTQConfig", "QATConfig", "QuantizeConfig", "SensitivityConfig",
           "load_task_config"]


@dataclass(frozen=True)
class EvalConfig:
    """``repquant eval``: COCO mAP of ``model`` on a split, through the one postprocess. ``backend`` auto is
    torch for checkpoints (the fake-quant model for a quantized one) and ort for ONNX files."""

    model: str
    data: Path
    split: str = "val"
    img_size: int | None = None
    batch_size: int = 8
    conf_thres: float = 0.03
    iou_thres: float = 0.65
    backend: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        p = Problems()
        p.img_size(self.img_size)
        p.check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        p.check(0.0 <= self.conf_thres < 1.0, f"conf_thres must be in [0, 1), got {self.conf_thres}")
        p.check(0.0 < self.iou_thres <= 1.0, f"iou_thres must be in (0, 1], got {self.iou_thres}")
        p.choice("backend", self.backend, ("auto", *vocab.BACKENDS))
        p.raise_for("eval")


@dataclass(frozen=True)
class ExportConfig:
    """``repquant export``: the deployed model to ONNX (a quantized checkpoint: its QDQ graph)."""

    model: str
    output: Path
    img_size: int = 640
    batch_size: int = 1
    dynamic_batch: bool = False
    opset: int = 17
    num_classes: int | None = None
    raw: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        p = Problems()
        p.img_size(self.img_size)
        p.check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        p.check(self.opset >= 11, f"opset must be >= 11, got {self.opset}")
        p.raise_for("export")


@dataclass(frozen=True)
class BenchConfig:
    """``repquant bench``: latency and throughput of the forward pass incl. decode (no NMS) on one backend."""

    model: str
    backend: str = "ort"
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1, 32)
    img_size: int = 640
    warmup: int = 10
    iters: int = 50
    min_seconds: float = 0.0
    threads: int | None = None
    cuda_graphs: bool = False
    hint: str = "latency"
    compare_train_form: bool = False
    output_json: Path | None = None
    output_md: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        p = Problems()
        p.img_size(self.img_size)
        p.choice("backend", self.backend, vocab.BACKENDS)
        p.choice("precision", self.precision, PRECISIONS)
        p.check(bool(self.batch_sizes) and min(self.batch_sizes) >= 1,
                f"batch sizes must be >= 1, got {self.batch_sizes}")
        p.check(self.warmup >= 0 and self.iters >= 1, "warmup must be >= 0 and iters >= 1")
        p.raise_for("bench")


@dataclass(frozen=True)
class DemoConfig:
    """``repquant demo``, the README's main job: ``repquant quantize`` of ``model`` (default: the committed
    ``yolov6n_bccd`` checkpoint) on ``data`` (default: the embedded BCCD sample) into ``output_dir``. With
    ``train``: the training demo instead (train ``model``, default yolov6n, from scratch on ``data`` or
    generated synthetic data for ``epochs``, evaluate, export ONNX, evaluate in ONNX Runtime)."""

    output_dir: Path = Path("runs/demo")
    train: bool = False
    model: str | None = None
    data: Path | None = None
    img_size: int | None = None
    max_ap_drop: float = 0.005
    epochs: int = 30
    batch_size: int = 16
    seed: int = 0
    workers: int = 2
    synthetic_images: tuple[int, int] = (96, 24)

    def __post_init__(self) -> None:
        p = Problems()
        if self.img_size is not None:
            p.img_size(self.img_size)
        p.check(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        p.check(0 <= self.max_ap_drop < 1, f"max_ap_drop must be in [0, 1), got {self.max_ap_drop}")
        p.raise_for("demo")


@dataclass(frozen=True)
class InfoConfig:
    """``repquant info``: parameters, GFLOPs and layer count of the deployed model."""

    model: str
    img_size: int = 640
    num_classes: int | None = None

    def __post_init__(self) -> None:
        p = Problems()
        p.img_size(self.img_size)
        p.raise_for("info")


@dataclass(frozen=True)
class ConvertConfig:
    """``repquant convert``: an official YOLOv6 ``.pt`` as a repquant checkpoint (safetensors)."""

    model: str
    output: Path
    overwrite: bool = False

    def __post_init__(self) -> None:
        p = Problems()
        p.check(str(self.output).endswith(".safetensors"), f"output must end in .safetensors, got {self.output}")
        p.raise_for("convert")
