"""``train(config)``: the parts of a YOLOv6 training run (model, YOLOv6 loss with optional
self-distillation, SGD or RepOptimizer, EMA, datasets, evaluation) handed to the shared
:class:`~repquant.train.trainer.Trainer`.

Files under ``config.output_dir``:
- ``weights/last.pt``: the resumable state after each completed epoch (``torch.save`` of tensors and
  plain values; read back with ``weights_only=True``), written atomically;
- ``weights/best.safetensors``: the EMA model of the epoch with the best val mAP@.5:.95
  (``repquant.checkpoint`` format, metadata: mAP, epoch, recipe); for ``block_mode='hyper_search'``
  also ``weights/scales.safetensors``, the RepOpt scales of that model (``repopt_scales`` of stage 2);
- ``train_config.yaml``: the configuration of the run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from repquant.checkpoint import load_model, save_checkpoint
from repquant.data import DataConfig, DetectionDataset, load_data_config
from repquant.errors import CheckpointError
from repquant.eval.predict import evaluate
from repquant.io import atomic_write_text
from repquant.models import YOLOv6, create_model
from repquant.models.head import DecodedDetector
from repquant.outputs import check_run_folder
from repquant.train import ddp, repopt, schedule
from repquant.train.config import TrainConfig
from repquant.train.distill import SelfDistillLoss
from repquant.train.ema import ModelEMA
from repquant.train.losses import ComputeLoss
from repquant.train.pretrained import load_pretrained
from repquant.train.trainer import Hook, LoopConfig, Trainer, TrainParts, check_run_slot

RUN_ARTEFACTS = ("weights/best.safetensors", "weights/last.pt")
LOGGER = logging.getLogger("repquant.train")


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`. ``final_metrics`` is the last evaluation (EMA model)."""

    last_checkpoint: Path
    best_checkpoint: Path
    final_metrics: dict[str, float]
    best_map50_95: float
    best_epoch: int
    epochs_run: int
    wall_time_s: float
    images_per_s: float


class DetectionObjective:
    """YOLOv6's loss, plus self-distillation from a frozen eval-mode teacher when configured: its term is
    scaled by ``weight * cosine_decay(epoch / epochs, final_factor)`` (1 -> 0.01, ``distill_weightdecay``)."""

    def __init__(self, config: TrainConfig, num_classes: int, student_config: object, device: torch.device) -> None:
        self.config = config
        reg_max, strides = student_config.reg_max, student_config.strides  # type: ignore[attr-defined]
        self.compute_loss = ComputeLoss(num_classes, reg_max, strides, config.resolved_iou_type,
                                        warmup_epoch=config.atss_warmup_epochs)
        self.teacher: nn.Module | None = None
        self.distill_loss: SelfDistillLoss | None = None
        distill = config.distill
        if distill.teacher is not None:
            teacher = load_model(distill.teacher, expected_num_classes=num_classes).to(device).eval()
            if teacher.config.reg_max != reg_max:
                raise CheckpointError(f"{distill.teacher}: teacher has reg_max {teacher.config.reg_max}, the "
                                      f"student {reg_max}; self-distillation needs matching outputs")
            self.teacher = teacher.requires_grad_(False)
            self.distill_loss = SelfDistillLoss(num_classes, reg_max, temperature=distill.temperature)
            LOGGER.info("self-distillation from %s (temperature %g, weight %g)", distill.teacher,
                        distill.temperature, distill.weight)

    def __call__(self, outputs: tuple[Tensor, Tensor], targets: Tensor, images: Tensor,
                 epoch: int) -> tuple[Tensor, dict[str, float]]:
        img_hw = (images.shape[2], images.shape[3])
        result = self.compute_loss.compute(outputs, targets, img_hw, epoch)
        if self.teacher is None or self.distill_loss is None:
            return result.loss, result.components
        distill = self.config.distill
        use_amp = self.config.amp and images.device.type == "cuda"
        with torch.no_grad(), torch.autocast(images.device.type, enabled=use_amp):
            teacher_out = self.teacher(images)
        teacher_out = (teacher_out[0].float(), teacher_out[1].float())
        weight = distill.weight * schedule.cosine_decay(epoch / self.config.epochs, distill.final_factor)
        d_loss = self.distill_loss(outputs, teacher_out, result.assignment.fg_mask) * weight
        total = result.loss + d_loss
        return total, {**result.components, "distill": float(d_loss.detach()), "total": float(total.detach())}


def _optimizer(config: TrainConfig, model: YOLOv6, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with YOLOv6's groups; for ``block_mode='repopt'`` the RepOptimizer, with the convs initialised
    from the hyper-search scales (YOLOv6 ``RepVGGOptimizer(reinit=True)``) unless pretrained weights start the run."""
    if model.config.block_mode != "repopt" or config.repopt_scales is None:
        return schedule.build_optimizer(model, config.lr0, config.momentum, weight_decay)
    source = str(config.repopt_scales)
    scales, scales_model = repopt.load_scales(config.repopt_scales)
    if config.weights is None:
        repopt.init_from_scales(model, scales, seed=config.seed, source=source)
    masks = repopt.match_scales(model, scales, source=source)
    LOGGER.info("RepOptimizer: %d masked convs, scales from %s (%s)", len(masks), source, scales_model)
    return repopt.build_repopt_optimizer(model, masks, config.lr0, config.momentum, weight_decay)


class _Evaluator:
    def __init__(self, config: TrainConfig, val_set: DetectionDataset, per_rank_batch: int) -> None:
        self.config, self.val_set = config, val_set
        self.batch = config.eval_batch_size or 2 * per_rank_batch

    def __call__(self, model: nn.Module) -> dict[str, float]:
        cfg = self.config
        detector = DecodedDetector(model, (cfg.img_size, cfg.img_size))
        result = evaluate(detector, self.val_set, batch_size=self.batch, conf_thres=cfg.conf_thres,
                          iou_thres=cfg.iou_thres, progress=False)
        return {"map50_95": result.map50_95, "map50": result.map50}


class _BestSaver:
    def __init__(self, config: TrainConfig, out_dir: Path) -> None:
        self.config = config
        self.best_path = out_dir / "weights" / "best.safetensors"
        self.scales_path = out_dir / "weights" / "scales.safetensors"

    def __call__(self, model: Any, epoch: int, metrics: dict[str, float]) -> None:
        metadata = {"map50_95": metrics["map50_95"], "epoch": epoch, "epochs": self.config.epochs,
                    "ema": self.config.ema, "recipe": self.config.to_dict()}
        save_checkpoint(self.best_path, model, extra_metadata=metadata)
        if model.config.block_mode == "hyper_search":  # RepOpt stage 1 -> the scales stage 2 needs
            repopt.save_scales(self.scales_path, repopt.extract_scales(model), self.config.model)
        LOGGER.info("epoch %d: new best mAP@.5:.95 %.4f -> %s", epoch, metrics["map50_95"], self.best_path)


class _MosaicCloser:
    """Hook: YOLOv6 turns mosaic and mixup off for the last ``close_mosaic_epochs`` epochs."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def __call__(self, trainer: Trainer) -> None:
        dataset = trainer.train_set
        if trainer.epoch >= self.config.close_mosaic_at and dataset.mosaic_enabled:  # type: ignore[attr-defined]
            dataset.set_mosaic(False)  # type: ignore[attr-defined]
            LOGGER.info("epoch %d: mosaic and mixup off for the last %d epochs", trainer.epoch,
                        self.config.epochs - trainer.epoch)


def training_parts(config: TrainConfig, data: DataConfig, device: torch.device, is_main: bool,
                   world_size: int) -> TrainParts:
    """Model, loss, optimizer, EMA, datasets and callbacks of a training run on ``device``."""
    model = create_model(config.model, num_classes=data.nc, block_mode=config.block_mode)
    if config.weights is not None:
        load_pretrained(model, config.weights)
    model = model.to(device)
    train_set = DetectionDataset(data, "train", config.img_size, augment=True, aug=config.augment, seed=config.seed)
    val_set = DetectionDataset(data, "val", config.img_size) if is_main else None
    weight_decay = schedule.scaled_weight_decay(config.weight_decay, config.batch_size, config.nominal_batch)
    optimizer = _optimizer(config, model, weight_decay)
    ema = ModelEMA(model, config.ema_decay, config.ema_tau) if config.ema and is_main else None
    if is_main:
        groups = optimizer.param_groups
        LOGGER.info("SGD lr0 %g momentum %g, weight decay %g (scaled) on %d weights; %d BN weights and %d biases "
                    "without decay; accumulate to %d images", config.lr0, config.momentum, weight_decay,
                    len(groups[1]["params"]), len(groups[0]["params"]), len(groups[2]["params"]),
                    config.nominal_batch)
    per_rank = max(config.batch_size // world_size, 1)
    mcfg = model.config
    return TrainParts(
        model=model, loss_fn=DetectionObjective(config, data.nc, mcfg, device), optimizer=optimizer,
        train_set=train_set, evaluate=_Evaluator(config, val_set, per_rank) if val_set is not None else None,
        save_best=_BestSaver(config, Path(config.output_dir)), ema=ema,
        identity={"name": mcfg.name, "num_classes": mcfg.num_classes, "block_mode": mcfg.block_mode,
                  "reg_max": mcfg.reg_max},
    )


def loop_config(config: TrainConfig) -> LoopConfig:
    """The loop schedule of a training recipe."""
    return LoopConfig(
        epochs=config.epochs, batch_size=config.batch_size, state_path=Path(config.output_dir) / "weights" / "last.pt",
        what=f"training {config.model}", nominal_batch=config.nominal_batch, lrf=config.lrf,
        momentum=config.momentum, warmup_epochs=config.warmup_epochs, min_warmup_iters=config.min_warmup_iters,
        warmup_bias_lr=config.warmup_bias_lr, warmup_momentum=config.warmup_momentum, amp=config.amp,
        seed=config.seed, workers=config.workers, eval_interval=config.eval_interval,
        record=config.to_dict(),
    )


def make_trainer(config: TrainConfig, resume: bool = False,
                 callbacks: Mapping[str, Hook | Sequence[Hook]] | None = None) -> Trainer:
    """The :class:`Trainer` of a training run, its parts built (``run(resume)`` trains)."""
    loop = loop_config(config)
    check_run_folder(config.output_dir, RUN_ARTEFACTS, config.exist_ok, resume,
                     inputs=(config.weights, config.repopt_scales, config.distill.teacher if config.distill else None))
    if resume or not config.exist_ok:
        check_run_slot(loop.state_path, resume, "training")
    dist, device = ddp.init_distributed(config.device)
    if config.exist_ok and not resume and dist.is_main:
        for name in RUN_ARTEFACTS:  # asked to replace the previous run: none of its files may pass as this one's
            (Path(config.output_dir) / name).unlink(missing_ok=True)
    ddp.seed_everything(config.seed)
    if device.type == "cuda":
        # cuDNN autotuning picks kernels per run: reproducible runs need it off (slower).
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cudnn.deterministic = config.deterministic
    data = load_data_config(config.data)
    parts = training_parts(config, data, device, dist.is_main, dist.world_size)
    hooks: dict[str, list[Hook]] = {"on_epoch_start": [_MosaicCloser(config)]}
    for name, fns in (callbacks or {}).items():
        hooks.setdefault(name, []).extend([fns] if callable(fns) else fns)
    trainer = Trainer(parts, loop, dist, device, hooks)
    if dist.is_main:
        LOGGER.info("training %s on %s: %d classes, %d images, %d epochs, %d iters/epoch, warm-up %d iters, "
                    "device %s%s", config.model, config.data, data.nc, len(parts.train_set),  # type: ignore[arg-type]
                    config.epochs,
                    trainer.iters_per_epoch, trainer.warmup_iters, device, " (AMP)" if trainer.use_amp else "")
    return trainer


def train(config: TrainConfig, resume: bool = False,
          callbacks: Mapping[str, Hook | Sequence[Hook]] | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.data``; see the module docstring for the files written.

    ``resume=True`` continues the run in ``config.output_dir`` from the epoch after the last completed
    one, with model, EMA, optimizer, scaler, counters and RNG states restored. ``callbacks`` maps hook
    names (``repquant.train.trainer.HOOKS``) to functions of the :class:`Trainer`.
    """
    trainer = make_trainer(config, resume, callbacks)
    if trainer.main:
        config_yaml = yaml.safe_dump(config.to_dict(), sort_keys=False)
        atomic_write_text(Path(config.output_dir) / "train_config.yaml", config_yaml)
    result = trainer.run(resume)
    return TrainResult(
        last_checkpoint=trainer.state_path, best_checkpoint=Path(config.output_dir) / "weights" / "best.safetensors",
        final_metrics=result.final_metrics, best_map50_95=result.best_map50_95, best_epoch=result.best_epoch,
        epochs_run=result.epochs_run, wall_time_s=result.wall_time_s, images_per_s=result.images_per_s,
    )
