"""Configs of the quantization commands (sensitivity, ptq, qat, act-stats, quantize). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from repquant.tasks.config_base import Auto, Problems, check_calibration, check_ranking
from repquant.vocab import FLOAT_DTYPES, LAYOUTS, METRICS, MODES

QAT_WHEN = ("auto", "always", "never")
QUANTIZE_ENGINES = ("ort", "openvino")  # CPU engines quantize evaluates and times the files in
ENGINE_NAMES = {"ort": "ONNX Runtime", "openvino": "OpenVINO"}


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
    exist_ok: bool = False

    def __post_init__(self) -> None:
        p = Problems()
        check_calibration(p, self)
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
    overwrite: bool = False
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
        p = Problems()
        check_calibration(p, self)
        check_ranking(p, self)
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
    overwrite: bool = False
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
        p = Problems()
        check_calibration(p, self)
        check_ranking(p, self)
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
    exist_ok: bool = False

    def __post_init__(self) -> None:
        p = Problems()
        p.img_size(self.img_size)
        p.check(self.num_images >= 1, f"num_images must be >= 1, got {self.num_images}")
        p.raise_for("act-stats")


@dataclass(frozen=True)
class QuantizeConfig:
    """``repquant quantize``: sensitivity -> PTQ with the fewest float layers meeting ``max_ap_drop`` (mAP@.5:.95
    of the exported file in its engine, against FP32 in the same engine) -> partial QAT + CWD when PTQ misses
    the budget (``qat auto``; ``always`` / ``never``) -> the final INT8 file, speed, and a report in ``output``.
    ``img_size`` None: the size recorded with the model (else 640)."""

    model: str
    data: Path
    output: Path
    max_ap_drop: float = 0.005
    max_keep_float: int = 12
    layout: str = "ort"
    qat: str = "auto"
    qat_epochs: int = 3
    qat_lr: float = 1e-5
    qat_batch_size: int = 16
    img_size: int | None = None
    calib_images: int = 128
    calib_method: str = "max"
    percentile: float = 99.99
    seed: int = 0
    ranking_mode: str = "isolated"
    ranking_metric: str = "mse"
    isolated_images: int = 32
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    bench_warmup: int = 2
    bench_iters: int = 10
    bench_min_seconds: float = 1.0
    backend: str = "ort"
    threads: int | None = None
    exist_ok: bool = False

    def __post_init__(self) -> None:
        p = Problems()
        check_calibration(p, self, img_size_optional=True)
        check_ranking(p, self)
        p.choice("layout", self.layout, LAYOUTS)
        p.choice("qat", self.qat, QAT_WHEN)
        p.choice("backend", self.backend, QUANTIZE_ENGINES)
        p.check(self.max_keep_float >= 0 and self.qat_epochs >= 1 and self.qat_batch_size >= 1,
                "max_keep_float must be >= 0, qat_epochs and qat_batch_size >= 1")
        p.check(bool(self.batch_sizes) and min(self.batch_sizes) >= 1,
                f"batch sizes must be >= 1, got {self.batch_sizes}")
        p.check(self.bench_iters >= 1 and self.bench_warmup >= 0 and self.bench_min_seconds >= 0,
                "bench_iters must be >= 1, bench_warmup and bench_min_seconds >= 0")
        p.check(0 <= self.max_ap_drop < 1, f"max_ap_drop must be in [0, 1) (0.005 = 0.5 AP), got {self.max_ap_drop}")
        p.check(self.qat_lr > 0, f"qat_lr must be > 0, got {self.qat_lr}")
        p.raise_for("quantize")
