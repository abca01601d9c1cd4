"""The configuration of every command, as frozen dataclasses (torch-free: the CLI reads their defaults).

Each ``XConfig`` is what ``repquant.tasks.x.run`` takes; a recipe YAML holding only what differs from the
defaults loads into it (``load_task_config``), and the CLI fills it from flags and ``--set`` overrides.
Training's config is ``repquant.train.config.TrainConfig`` (the training recipe).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from repquant import vocab
from repquant.errors import RecipeError
from repquant.recipe import recipe_from_dict
from repquant.vocab import CALIBRATORS, FLOAT_DTYPES, LAYOUTS, METRICS, MODES, PRECISIONS

T = TypeVar("T")
MAX_STRIDE = 32


class Auto:
    """"Choose automatically" as a type (``keep_float: int | Auto``); spelled ``auto`` in recipes and flags.
    One instance, ``AUTO``."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Auto)

    def __hash__(self) -> int:
        return hash("auto")

    def __repr__(self) -> str:
        return "AUTO"

    @classmethod
    def from_recipe(cls, value: Any) -> Auto:
        if value == "auto":
            return AUTO
        raise ValueError(f"expected a count or 'auto', got {value!r}")

    def to_recipe(self) -> str:
        return "auto"

    def __str__(self) -> str:
        return "auto"


AUTO = Auto()


class _Problems(list[str]):
    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)

    def choice(self, name: str, value: object, allowed: tuple[str, ...]) -> None:
        self.check(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    def img_size(self, value: int | None) -> None:
        self.check(value is None or (value > 0 and value % MAX_STRIDE == 0),
                   f"img_size must be a positive multiple of {MAX_STRIDE}, got {value}")

    def raise_for(self, what: str) -> None:
        if self:
            raise RecipeError(f"{what}: " + "; ".join(self))


def _check_calibration(p: _Problems, cfg: Any) -> None:
    """The calibration fields shared by sensitivity, ptq and qat: the seeded calibration subset of the train
    split (``calib_images``, ``seed``, letterboxed at ``img_size``, never augmented) and ``calib_method``."""
    p.check(cfg.calib_images >= 1, f"calib_images must be >= 1, got {cfg.calib_images}")
    p.choice("calib_method", cfg.calib_method, CALIBRATORS)
    p.check(0.0 < cfg.percentile <= 100.0, f"percentile must be in (0, 100], got {cfg.percentile}")
    p.img_size(cfg.img_size)


def _check_ranking(p: _Problems, cfg: Any) -> None:
    """The keep-float ranking fields of ptq and qat: a sensitivity JSON, or measured now in mode/metric."""
    p.choice("ranking_metric", cfg.ranking_metric, METRICS)
    p.choice("ranking_mode", cfg.ranking_mode, MODES)
    p.check(cfg.isolated_images >= 0, f"isolated_images must be >= 0, got {cfg.isolated_images}")


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
        p = _Problems()
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

    def __post_init__(self) -> None:
        p = _Problems()
        p.img_size(self.img_size)
        p.check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        p.check(self.opset >= 11, f"opset must be >= 11, got {self.opset}")
        p.raise_for("export")


@dataclass(frozen=True)
class SensitivityConfig:
    """``repquant sensitivity``: per-layer INT8 error in every mode, reports ranked by ``mode`` for each of
    ``metrics``; the isolated mode runs on the first ``isolated_images`` calibration images (0: all);
    ``map_check_top_k`` > 0 measures the val mAP drop of each metric's top layers quantized alone."""

    model: str
    data: Path
    output_dir: Path = Path("runs/sensitivity")
    metrics: tuple[str, ...] = METRICS
    mode: str = "isolated"
    isolated_images: int = 32
    batch_size: int = 2
    map_check_top_k: int = 0
    top_k: int = 10
    calib_images: int = 128
    calib_method: str = "max"
    percentile: float = 99.99
    img_size: int = 640
    seed: int = 0

    def __post_init__(self) -> None:
        p = _Problems()
        _check_calibration(p, self)
        p.check(bool(self.metrics) and all(m in METRICS for m in self.metrics),
                f"metrics must be a non-empty subset of {', '.join(METRICS)}, got {self.metrics}")
        p.choice("mode", self.mode, MODES)
        p.check(self.isolated_images >= 0 and self.map_check_top_k >= 0 and self.top_k >= 1,
                "isolated_images and map_check_top_k must be >= 0, top_k >= 1")
        p.raise_for("sensitivity")


@dataclass(frozen=True)
class PTQConfig:
    """``repquant ptq``: INT8 except the ``keep_float`` most sensitive layers (``auto``: the smallest count
    <= ``max_keep_float`` within ``max_ap_drop`` mAP of FP32 on val), exported as QDQ ONNX in ``layout``."""

    model: str
    data: Path
    output: Path
    keep_float: int | Auto = 6
    max_ap_drop: float = 0.005
    max_keep_float: int = 12
    layout: str = "tensorrt"
    float_dtype: str = "fp32"
    batch_size: int = 2
    sensitivity_json: Path | None = None
    ranking_metric: str = "mse"
    ranking_mode: str = "isolated"
    isolated_images: int = 32
    calib_images: int = 128
    calib_method: str = "max"
    percentile: float = 99.99
    img_size: int = 640
    seed: int = 0

    def __post_init__(self) -> None:
        p = _Problems()
        _check_calibration(p, self)
        _check_ranking(p, self)
        p.check(isinstance(self.keep_float, Auto) or self.keep_float >= 0,
                f"keep_float must be a count >= 0 or auto, got {self.keep_float}")
        p.check(self.max_keep_float >= 0, f"max_keep_float must be >= 0, got {self.max_keep_float}")
        p.choice("layout", self.layout, LAYOUTS)
        p.choice("float_dtype", self.float_dtype, FLOAT_DTYPES)
        p.raise_for("ptq")


@dataclass(frozen=True)
class QATConfig:
    """``repquant qat``: partial QAT from the calibrated PTQ model (``keep_float`` layers without quantizers),
    detection loss plus optional CWD on the neck and class KD from the FP32 model, on the shared training
    loop (warm-up, accumulation to ``nominal_batch``, AMP on CUDA, DDP, resume)."""

    model: str
    data: Path
    output: Path
    keep_float: int = 6
    cw_distill: bool = False
    cw_tau: float = 1.0
    cw_weight: float = 10.0
    cw_final_factor: float = 0.01
    kd_cls: bool = False
    kd_weight: float = 1.0
    kd_temperature: float = 20.0
    learn_scales: bool = False
    scale_lr: float = 1e-3
    repopt_scales: Path | None = None
    repopt_masks: bool = True
    epochs: int = 10
    lr: float = 1e-5
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    nominal_batch: int | None = None
    amp: bool = True
    batch_size: int = 16
    layout: str = "tensorrt"
    device: str = "auto"
    workers: int = 0
    sensitivity_json: Path | None = None
    ranking_metric: str = "mse"
    ranking_mode: str = "isolated"
    isolated_images: int = 32
    calib_images: int = 128
    calib_method: str = "max"
    percentile: float = 99.99
    img_size: int = 640
    seed: int = 0

    def __post_init__(self) -> None:
        p = _Problems()
        _check_calibration(p, self)
        _check_ranking(p, self)
        p.check(str(self.output).endswith(".safetensors"), f"output must end in .safetensors, got {self.output}")
        p.check(self.keep_float >= 0, f"keep_float must be >= 0, got {self.keep_float}")
        p.check(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        p.check(min(self.lr, self.scale_lr, self.cw_tau, self.kd_temperature) > 0,
                "lr, scale_lr, cw_tau and kd_temperature must be > 0")
        p.check(self.cw_weight >= 0 and self.kd_weight >= 0, "cw_weight and kd_weight must be >= 0")
        p.choice("layout", self.layout, LAYOUTS)
        p.check(self.repopt_scales is None or self.repopt_masks,
                f"repopt_scales {self.repopt_scales} given with the RepOpt masks switched off (--no-repopt-masks): "
                "drop one of the two")
        p.raise_for("qat")

    @property
    def state_path(self) -> Path:
        return Path(f"{self.output}.state.pt")


@dataclass(frozen=True)
class ActStatsConfig:
    """``repquant act-stats``: per-layer weight/activation ranges and INT8 weight SNR of the deployed model."""

    model: str
    data: Path
    split: str = "val"
    num_images: int = 32
    img_size: int = 640
    output_dir: Path = Path("runs/act_stats")

    def __post_init__(self) -> None:
        p = _Problems()
        p.img_size(self.img_size)
        p.check(self.num_images >= 1, f"num_images must be >= 1, got {self.num_images}")
        p.raise_for("act-stats")


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
    compare_train_form: bool = False
    output_json: Path | None = None
    output_md: Path | None = None

    def __post_init__(self) -> None:
        p = _Problems()
        p.img_size(self.img_size)
        p.choice("backend", self.backend, vocab.BACKENDS)
        p.choice("precision", self.precision, PRECISIONS)
        p.check(bool(self.batch_sizes) and min(self.batch_sizes) >= 1,
                f"batch sizes must be >= 1, got {self.batch_sizes}")
        p.check(self.warmup >= 0 and self.iters >= 1, "warmup must be >= 0 and iters >= 1")
        p.raise_for("bench")


@dataclass(frozen=True)
class DemoConfig:
    """``repquant demo``: the README's main job (train -> evaluate -> export -> ONNX Runtime evaluate)."""

    output_dir: Path = Path("runs/demo")
    data: Path | None = None
    model: str = "yolov6n"
    img_size: int = 160
    epochs: int = 30
    batch_size: int = 16
    seed: int = 0
    workers: int = 2
    synthetic_images: tuple[int, int] = (96, 24)

    def __post_init__(self) -> None:
        p = _Problems()
        p.img_size(self.img_size)
        p.check(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        p.raise_for("demo")


def load_task_config(path: str | os.PathLike | None, schema: type[T], overrides: dict[str, Any] | None = None,
                     source: str = "command line") -> T:
    """``schema`` from a recipe YAML (optional; only what differs from the defaults) with ``overrides`` on
    top; unknown keys and mistyped values are refused naming the key."""
    data = _recipe_mapping(path) if path is not None else {}
    merged = {**data, **(overrides or {})}
    where = f"{path} + {source}" if path is not None and overrides else str(path) if path is not None else source
    return recipe_from_dict(merged, schema, source=where)


def _recipe_mapping(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RecipeError(f"{path}: cannot read recipe ({type(err).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class InfoConfig:
    """``repquant info``: parameters, GFLOPs and layer count of the deployed model."""

    model: str
    img_size: int = 640
    num_classes: int | None = None

    def __post_init__(self) -> None:
        p = _Problems()
        p.img_size(self.img_size)
        p.raise_for("info")


@dataclass(frozen=True)
class ConvertConfig:
    """``repquant convert``: an official YOLOv6 ``.pt`` as a repquant checkpoint (safetensors)."""

    model: str
    output: Path

    def __post_init__(self) -> None:
        p = _Problems()
        p.check(str(self.output).endswith(".safetensors"), f"output must end in .safetensors, got {self.output}")
        p.raise_for("convert")
