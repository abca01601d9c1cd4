"""Training configuration: frozen dataclasses whose defaults are YOLOv6 v3's (``configs/yolov6*.py``,
``tools/train.py``); recipe YAMLs (``recipes/*.yaml``) hold only what differs.

Paths in a recipe: ``data`` (a dataset YAML shipped beside the recipes) is relative to the recipe file;
``output_dir``, ``distill.teacher`` and ``repopt_scales`` (artifacts of runs) are relative to the working
directory.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from repquant.data import AugmentConfig
from repquant.errors import RecipeError
from repquant.recipe import load_recipe, recipe_from_dict, recipe_to_dict, suggest

IouType = Literal["giou", "siou", "ciou", "diou", "iou"]
# YOLOv6 v3 trains N (and v2 N/T) with SIoU, the larger models with GIoU.
_SIOU_MODELS = ("yolov6n", "yolov6t")


@dataclass(frozen=True)
class DistillConfig:
    """Self-distillation (YOLOv6 v3 ``--distill``): a trained teacher of the same family guides the student.

    The distillation loss is multiplied by ``weight * cosine_decay(epoch / epochs, final_factor)``:
    1 -> ``final_factor`` (0.01) over training, as YOLOv6's ``distill_weightdecay``.
    """

    teacher: Path | None = None
    temperature: float = 20.0
    weight: float = 1.0
    final_factor: float = 0.01

    @property
    def enabled(self) -> bool:
        return self.teacher is not None


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. ``num_classes`` is read from the dataset YAML.

    Optimizer fields follow YOLOv6 (SGD Nesterov, cosine LR, 3 warm-up epochs of at least
    ``min_warmup_iters`` iterations, accumulation to ``nominal_batch``). ``batch_size`` is the total over
    all DDP processes. ``amp`` only takes effect on CUDA.
    """

    model: str = "yolov6n"
    block_mode: str | None = None
    data: Path = Path("recipes/data/coco128.yaml")
    img_size: int = 640
    epochs: int = 300
    batch_size: int = 32
    nominal_batch: int = 64
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 3.0
    min_warmup_iters: int = 1000
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    ema: bool = True
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    iou_type: IouType | None = None  # None: the variant's own (siou for N/T, giou otherwise)
    atss_warmup_epochs: int = 0  # v3 default; v1/v2 used 4
    close_mosaic_epochs: int = 15
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    deterministic: bool = True  # cuDNN without autotuning: bit-reproducible runs, somewhat slower on GPU
    workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True
    eval_interval: int = 10
    eval_batch_size: int | None = None  # None: 2 * per-process batch, as YOLOv6
    conf_thres: float = 0.03
    iou_thres: float = 0.65
    distill: DistillConfig = field(default_factory=DistillConfig)
    # RepOpt stage 2 (block_mode 'repopt'): per-channel scales from a 'hyper_search' run
    # (weights/scales.safetensors); they initialise the convs and become the RepOptimizer's gradient masks.
    repopt_scales: Path | None = None
    # Fine-tuning: initial weights from an official YOLOv6 .pt or a repquant checkpoint (train form); tensors
    # whose name and shape fit are loaded, the class predictions re-initialised when the class count differs.
    weights: Path | None = None
    output_dir: Path = Path("runs/train/exp")
    exist_ok: bool = False  # replace a finished run in output_dir (otherwise refused; resume continues one)

    def __post_init__(self) -> None:
        problems = []
        if self.img_size <= 0 or self.img_size % 32:
            problems.append(f"img_size must be a positive multiple of 32, got {self.img_size}")
        for name in ("epochs", "batch_size", "nominal_batch", "eval_interval"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.close_mosaic_epochs < 0:
            problems.append(f"close_mosaic_epochs must be >= 0, got {self.close_mosaic_epochs}")
        if self.repopt_scales is not None and self.block_mode != "repopt":
            problems.append(f"repopt_scales needs block_mode 'repopt', got {self.block_mode!r}")
        if self.block_mode == "repopt" and self.repopt_scales is None:
            problems.append("block_mode 'repopt' needs repopt_scales (from a block_mode 'hyper_search' run)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def resolved_iou_type(self) -> str:
        if self.iou_type is not None:
            return self.iou_type
        return default_iou_type(self.model)

    @property
    def close_mosaic_at(self) -> int:
        """First epoch trained without mosaic/mixup: the last ``min(close_mosaic_epochs, epochs)``."""
        return self.epochs - min(self.close_mosaic_epochs, self.epochs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML data (paths as strings); stored in checkpoints and exported metadata."""
        return recipe_to_dict(self)


def load_train_config(path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """Read a training recipe; ``data`` is resolved against the recipe's folder.

    ``overrides`` replace fields after loading (``epochs=1``, ``output_dir=...``); unknown names raise
    :class:`RecipeError`.
    """
    path = Path(path)
    config = load_recipe(path, TrainConfig)
    if not config.data.is_absolute():
        config = dataclasses.replace(config, data=(path.parent / config.data).resolve())
    return override(config, **overrides)


def override(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """``dataclasses.replace`` with a one-line error naming an unknown field."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        close = suggest(unknown[0], names)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise RecipeError(f"TrainConfig: unknown field {unknown[0]!r}{hint}")
    if not overrides:
        return config
    # Through the recipe converter so command-line strings become Paths/nested dataclasses, type-checked.
    merged = {**recipe_to_dict(config), **overrides}
    return recipe_from_dict(merged, TrainConfig, source="TrainConfig override")


def default_iou_type(model_name: str) -> str:
    """YOLOv6's box loss for a variant: SIoU for N and T, GIoU for the others."""
    return "siou" if model_name.split("-")[0] in _SIOU_MODELS else "giou"
