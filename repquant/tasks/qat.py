"""``repquant qat``: partial quantization-aware training with channel-wise self-distillation (YOLOv6's QAT
recipe), built as parts for the one training loop (``repquant.train.trainer.Trainer``).

Start from the calibrated PTQ model (re-parameterized, BN folded: the scales trained are the deployed
ones), leave the ``keep_float`` most sensitive layers without quantizers ("partial QAT"), and fine-tune
the weights with the detection loss plus, optionally,
- CWD (``cw_distill``): channel-wise distillation on the three neck outputs from the frozen FP32 model in
  eval mode (the official code ran its teacher in train mode, so its BN statistics moved),
  ``cw_weight * cosine_decay(epoch / epochs, cw_final_factor) * cwd_loss(student, teacher, tau)``;
- class-logit distillation (``kd_cls``) from the same teacher.
Quantizer scales (``amax``) stay frozen by default (the exported Q/DQ scales are the calibrated ones);
``learn_scales`` trains ``log(amax)`` with LSQ gradients (Adam at ``scale_lr``, shared-scale groups tied;
``repquant.quant.learnable_scales``). A RepOptimizer-trained model (``block_mode='repopt'``) is fine-tuned
with its gradient masks, rescaled for the BN-folded weights (``repquant.train.repopt.folded_gradient_masks``).

Files: ``output`` (a quantized checkpoint, ``repquant.quant.checkpoint``) from the epoch with the best
fake-quant val mAP@.5:.95, and ``<output>.state.pt`` (the resumable state of the loop).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repquant.checkpoint import read_checkpoint_metadata
from repquant.data import DetectionDataset
from repquant.deploy.resolve import ModelHandle
from repquant.errors import CheckpointError, RecipeError
from repquant.eval import evaluate
from repquant.modelfile import ModelKind
from repquant.models import YOLOv6
from repquant.models.head import DecodedDetector
from repquant.outputs import check_output_file
from repquant.quant.checkpoint import save_quantized_checkpoint
from repquant.quant.config import QuantConfig, quant_info
from repquant.quant.learnable_scales import LearnableScales, scale_drift
from repquant.quant.ranking import rank_keep_float
from repquant.quant.sensitivity import quantized_copy
from repquant.recipe import recipe_to_dict
from repquant.reparam import is_deployed
from repquant.tasks.config import QATConfig
from repquant.tasks.inputs import QuantInputs, load_quant_inputs, quant_config_of, ranking_of
from repquant.train import ddp, repopt, schedule
from repquant.train.config import default_iou_type
from repquant.train.distill import cwd_loss, distill_cls_loss
from repquant.train.losses import ComputeLoss
from repquant.train.trainer import LoopConfig, Trainer, TrainParts, check_run_slot

__all__ = ["QATConfig", "QATResult", "run"]

logger = logging.getLogger(__name__)


@dataclass
class QATResult:
    """What ``run`` wrote and measured (fake-quant val mAP per epoch in ``history``)."""

    checkpoint: Path
    keep_float_layers: tuple[str, ...]
    best_map50_95: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0


class _FeatureTap:
    """Keeps the latest output of ``module`` (the neck: a sequence of P3, P4, P5 maps)."""

    def __init__(self, module: nn.Module) -> None:
        self.features: Sequence[Tensor] = ()
        self.handle = module.register_forward_hook(self._store)

    def _store(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.features = tuple(output)


class QATObjective:
    """Detection loss (TAL, no ATSS warm-up) plus the configured distillation terms from the frozen teacher."""

    def __init__(self, cfg: QATConfig, num_classes: int, student: YOLOv6, teacher: YOLOv6) -> None:
        mcfg = student.config
        self.cfg, self.teacher = cfg, teacher
        self.compute_loss = ComputeLoss(num_classes, mcfg.reg_max, mcfg.strides, default_iou_type(mcfg.name),
                                        warmup_epoch=0)
        self.student_neck, self.teacher_neck = _FeatureTap(student.neck), _FeatureTap(teacher.neck)

    def __call__(self, outputs: tuple[Tensor, Tensor], targets: Tensor, images: Tensor,
                 epoch: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        result = self.compute_loss.compute(outputs, targets, (images.shape[2], images.shape[3]), epoch)
        loss, components = result.loss, dict(result.components)
        if cfg.cw_distill or cfg.kd_cls:
            with torch.no_grad():
                teacher_out = self.teacher(images)
            if cfg.cw_distill:
                weight = cfg.cw_weight * schedule.cosine_decay(epoch / cfg.epochs, cfg.cw_final_factor)
                cwd = cwd_loss(self.student_neck.features, self.teacher_neck.features, cfg.cw_tau) * weight
                loss, components["cwd"] = loss + cwd, float(cwd.detach())
            if cfg.kd_cls:
                kd = distill_cls_loss(outputs[0], teacher_out[0], cfg.kd_temperature) * cfg.kd_weight
                loss, components["kd_cls"] = loss + kd, float(kd.detach())
        components["total"] = float(loss.detach())
        return loss, components


class _ScaleState:
    """The learned scales as extra loop state: restoring them also rewrites the quantizers' ``amax``."""

    def __init__(self, scales: LearnableScales) -> None:
        self.scales = scales

    def state_dict(self) -> dict[str, Any]:
        return self.scales.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scales.load_state_dict(state)
        self.scales.sync()


class _ScaleHooks:
    """Loop hooks of learned scales: they live outside DDP, so their gradients are averaged by hand before
    the step; after it the trained values are written into the ``amax`` buffers that export reads."""

    def __init__(self, scales: LearnableScales, dist: ddp.DistInfo) -> None:
        self.scales, self.dist = scales, dist

    def before_step(self, trainer: Trainer) -> None:
        if not self.dist.distributed:
            return
        for p in self.scales.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.dist.world_size

    def after_step(self, trainer: Trainer) -> None:
        self.scales.sync()


class _Evaluator:
    def __init__(self, cfg: QATConfig, val_set: DetectionDataset, scales: LearnableScales | None) -> None:
        self.cfg, self.val_set, self.scales = cfg, val_set, scales
        self.initial_amax = scales.amax() if scales is not None else {}

    def __call__(self, qmodel: nn.Module) -> dict[str, float]:
        detector = DecodedDetector(qmodel, (self.cfg.img_size, self.cfg.img_size))
        result = evaluate(detector, self.val_set, batch_size=2 * self.cfg.batch_size, progress=False)
        metrics = {"map50_95": result.map50_95, "map50": result.map50}
        if self.scales is not None:
            drift = scale_drift(self.initial_amax, self.scales.amax())
            metrics.update({f"scale_{k}": v for k, v in drift.items()})
        return metrics


class _Saver:
    def __init__(self, cfg: QATConfig, qconfig: QuantConfig) -> None:
        self.cfg = cfg
        self.info = quant_info(qconfig, cfg.layout, calib_seed=cfg.seed,
                               qat={k: v for k, v in recipe_to_dict(cfg).items() if k != "output"})

    def __call__(self, qmodel: nn.Module, epoch: int, metrics: dict[str, float]) -> None:
        save_quantized_checkpoint(self.cfg.output, qmodel, self.info, extra_metadata={
            "map50_95": metrics["map50_95"], "epoch": epoch, "img_size": self.cfg.img_size,
            "map_note": "fake-quant torch model on the val split"})


def _recipe_scales_path(handle: ModelHandle) -> str | None:
    """The ``repopt_scales`` file a checkpoint's training recipe names, if it still exists."""
    if handle.kind is not ModelKind.CHECKPOINT or handle.path is None or handle.path.suffix != ".safetensors":
        return None
    recipe = read_checkpoint_metadata(handle.path).get("recipe")
    path = recipe.get("repopt_scales") if isinstance(recipe, dict) else None
    return path if path and Path(path).is_file() else None


def repopt_masks(cfg: QATConfig, inputs: QuantInputs, qmodel: nn.Module) -> dict[nn.Parameter, Tensor]:
    """Folded RepOptimizer masks for the quantized model's convs when ``cfg.model`` is RepOpt-trained."""
    block_mode = inputs.model.config.block_mode
    if block_mode != "repopt":
        if cfg.repopt_scales is not None:
            raise RecipeError(f"qat: --repopt-scales given, but {cfg.model} was not trained with RepOptimizer "
                              f"(block_mode {block_mode})")
        return {}
    if not cfg.repopt_masks:
        logger.warning("QAT: %s was trained with RepOptimizer; fine-tuning it with plain SGD (masks off)", cfg.model)
        return {}
    scales_path = cfg.repopt_scales or _recipe_scales_path(inputs.handle)
    if scales_path is None:
        raise RecipeError(f"qat: {cfg.model} was trained with RepOptimizer; pass --repopt-scales (the scales file "
                          "of its train-repopt run) so QAT keeps its gradient masks")
    scales, _ = repopt.load_scales(scales_path)
    train_form = inputs.handle.float_model(num_classes=inputs.data.nc)
    if is_deployed(train_form):
        raise CheckpointError(f"{cfg.model}: a deployed RepOpt checkpoint; the QAT masks need the BN statistics "
                              "of the train-form checkpoint that train-repopt wrote")
    folded = repopt.folded_gradient_masks(train_form, scales, source=str(scales_path))
    params = dict(qmodel.named_parameters())
    missing = [name for name in folded if name not in params]
    if missing:
        raise CheckpointError(f"{cfg.model}: deployed model has no parameter {missing[0]} for a RepOpt mask")
    logger.info("QAT: RepOptimizer masks on %d folded convs (scales %s)", len(folded), scales_path)
    return {params[name]: mask for name, mask in folded.items()}


def _keep_float(cfg: QATConfig, inputs: QuantInputs, dist: ddp.DistInfo, progress: bool) -> tuple[str, ...]:
    keep = rank_keep_float(inputs.model, inputs.batches, quant_config_of(cfg), cfg.keep_float, ranking_of(cfg),
                           progress=progress and dist.is_main)
    if dist.distributed:  # every rank must train the same partial model: rank 0's ranking wins
        chosen = [keep]
        torch.distributed.broadcast_object_list(chosen, src=0)
        keep = tuple(chosen[0])
    return keep


def qat_parts(cfg: QATConfig, dist: ddp.DistInfo, device: torch.device,
              progress: bool) -> tuple[TrainParts, dict[str, list[Any]], tuple[str, ...]]:
    """The quantized model and everything the loop needs to fine-tune it, its hooks, the keep-float layers."""
    inputs = load_quant_inputs(cfg)
    keep = _keep_float(cfg, inputs, dist, progress)
    qconfig = quant_config_of(cfg, keep, cfg.layout)
    qmodel, placement = quantized_copy(inputs.model, inputs.batches, qconfig)
    logger.info("QAT: %d of %d layers quantized; float: %s", len(placement.layers) - len(keep),
                len(placement.layers), ", ".join(keep) or "none")
    qmodel = qmodel.to(device).train()
    hooks: dict[str, list[Any]] = {}
    extra_optimizers: tuple[torch.optim.Optimizer, ...] = ()
    extra_state: dict[str, Any] = {}
    scales = None
    if cfg.learn_scales:
        scales = LearnableScales(qmodel, placement.shared_groups).to(device)
        scale_optimizer = torch.optim.Adam(scales.parameters(), lr=cfg.scale_lr)
        scale_optimizer.param_groups[0]["initial_lr"] = cfg.scale_lr
        extra_optimizers, extra_state = (scale_optimizer,), {"scales": _ScaleState(scales)}
        scale_hooks = _ScaleHooks(scales, dist)
        hooks = {"on_before_optimizer_step": [scale_hooks.before_step],
                 "on_after_optimizer_step": [scale_hooks.after_step]}
        logger.info("QAT: learning %d scales (%d quantizers, shared groups tied), Adam lr %g on log(amax)",
                    len(scales.log_amax), sum(map(len, scales.members.values())), cfg.scale_lr)
    teacher = inputs.model.to(device).eval().requires_grad_(False)
    train_set = DetectionDataset(inputs.data, "train", cfg.img_size, augment=True, seed=cfg.seed)
    train_set.set_mosaic(False)  # fine-tuning: whole images, as deployed (flips, HSV, affine stay)
    val_set = DetectionDataset(inputs.data, "val", cfg.img_size) if dist.is_main else None
    masks = repopt_masks(cfg, inputs, qmodel)
    weight_decay = schedule.scaled_weight_decay(cfg.weight_decay, cfg.batch_size, cfg.nominal_batch or cfg.batch_size)
    optimizer: torch.optim.Optimizer
    if masks:
        optimizer = repopt.build_repopt_optimizer(qmodel, masks, cfg.lr, cfg.momentum, weight_decay)
    else:
        optimizer = schedule.build_optimizer(qmodel, cfg.lr, cfg.momentum, weight_decay)
    parts = TrainParts(
        model=qmodel, loss_fn=QATObjective(cfg, inputs.data.nc, qmodel, teacher), optimizer=optimizer,
        train_set=train_set, evaluate=_Evaluator(cfg, val_set, scales) if val_set is not None else None,
        save_best=_Saver(cfg, qconfig), extra_optimizers=extra_optimizers, extra_state=extra_state,
        identity={"keep_float_layers": list(keep), "learn_scales": cfg.learn_scales, "layout": cfg.layout},
    )
    return parts, hooks, keep


def loop_config(cfg: QATConfig) -> LoopConfig:
    """QAT's schedule: SGD at ``lr`` with the cosine factor to ``lrf``, no warm-up and no accumulation unless
    asked (``warmup_epochs``, ``nominal_batch``), evaluation every epoch."""
    return LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, state_path=cfg.state_path, kind="QAT", what="QAT",
                      nominal_batch=cfg.nominal_batch, lrf=cfg.lrf, momentum=cfg.momentum,
                      warmup_epochs=cfg.warmup_epochs, amp=cfg.amp, seed=cfg.seed, workers=cfg.workers,
                      eval_interval=1, record=recipe_to_dict(cfg))


def run(cfg: QATConfig, resume: bool = False, progress: bool = True) -> QATResult:
    """Partial QAT of ``cfg.model`` on ``cfg.data``; see the module docstring."""
    loop = loop_config(cfg)
    check_run_slot(loop.state_path, resume, "QAT")
    if not resume:
        check_output_file(cfg.output, [cfg.model, cfg.data, cfg.sensitivity_json, cfg.repopt_scales], cfg.overwrite)
    dist, device = ddp.init_distributed(cfg.device)
    ddp.seed_everything(cfg.seed)
    parts, hooks, keep = qat_parts(cfg, dist, device, progress)
    trainer = Trainer(parts, loop, dist, device, hooks)
    if dist.is_main:
        logger.info("QAT %s on %s: %d epochs, lr %g, CWD %s, KD-cls %s, layout %s, device %s", cfg.model, cfg.data,
                    cfg.epochs, cfg.lr, f"on (tau {cfg.cw_tau}, weight {cfg.cw_weight})" if cfg.cw_distill else "off",
                    "on" if cfg.kd_cls else "off", cfg.layout, device)
    result = trainer.run(resume)
    return QATResult(Path(cfg.output), keep, result.best_map50_95, result.best_epoch, result.history,
                     result.wall_time_s)
