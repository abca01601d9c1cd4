"""Partial quantization-aware training (QAT) with channel-wise self-distillation (YOLOv6's QAT recipe).

``qat_train`` (behind ``repquant qat``): start from the calibrated PTQ model (re-parameterized, BN
folded: the scales trained are the deployed ones), leave the ``keep_float_layers`` without quantizers
("partial QAT"), and fine-tune the weights with the detection loss plus, optionally,

- CWD (``cw_distill``): channel-wise distillation on the three neck outputs from the frozen FP32
  model in eval mode (the official code ran its teacher in train mode, so its BN statistics moved),
  ``cw_weight * cosine_decay(epoch / epochs, 0.01) * cwd_loss(student, teacher, tau)``;
- class-logit distillation (``kd_cls``) from the same teacher.

Quantizer scales (``amax``) stay frozen by default (modelopt buffers: the exported Q/DQ scales are the
calibrated ones); ``learn_scales`` trains them with LSQ gradients (``repquant.quant.learnable_scales``:
``log(amax)`` by Adam at ``scale_lr``, shared-scale groups tied) and the trained ones are saved and exported.
A RepOptimizer-trained model (``block_mode='repopt'``) is fine-tuned with its gradient masks, rescaled for
the BN-folded weights (``repquant.train.repopt.folded_gradient_masks``), from ``repopt_scales`` or the
scales file its training recipe names. Runs under ``torchrun`` with DDP.

Files: ``output`` (safetensors: the fake-quant model's weights and ``amax`` buffers; metadata
``repquant_quant`` records the keep-float layers, layout and calibration so that ``load_quantized_model``
rebuilds the same quantizers and ``repquant export`` writes the same QDQ graph as PTQ) from the epoch
with the best fake-quant val mAP@.5:.95, and ``<output>.state.pt`` (the resumable training state).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from repquant.errors import CheckpointError, RecipeError, RepquantError
from repquant.quant.config import CALIB_METHODS, LAYOUTS, QuantConfig, quant_info

logger = logging.getLogger(__name__)

QUANT_METADATA_KEY = "repquant_quant"
STATE_FORMAT = 1


@dataclass(frozen=True)
class QATConfig:
    """Settings of one QAT run (the ``repquant qat`` options)."""

    model: str
    data: str
    output: str
    keep_float: int = 0
    sensitivity_json: str | None = None
    ranking_mode: str = "isolated"
    ranking_metric: str = "mse"
    cw_distill: bool = False
    cw_tau: float = 1.0
    cw_weight: float = 10.0
    cw_final_factor: float = 0.01
    kd_cls: bool = False
    kd_weight: float = 1.0
    kd_temperature: float = 20.0
    learn_scales: bool = False
    scale_lr: float = 1e-3
    repopt_scales: str | None = None
    repopt_masks: bool = True
    epochs: int = 10
    lr: float = 1e-5
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    batch_size: int = 16
    img_size: int = 640
    calib_images: int = 128
    calib_method: str = "max"
    percentile: float = 99.99
    layout: str = "tensorrt"
    seed: int = 0
    device: str = "auto"
    workers: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.keep_float < 0:
            problems.append(f"keep_float must be >= 0, got {self.keep_float}")
        if self.epochs < 1 or self.batch_size < 1 or self.calib_images < 1:
            problems.append("epochs, batch_size and calib_images must be >= 1")
        if self.lr <= 0 or self.scale_lr <= 0 or self.cw_tau <= 0 or self.kd_temperature <= 0:
            problems.append("lr, scale_lr, cw_tau and kd_temperature must be > 0")
        if self.cw_weight < 0 or self.kd_weight < 0:
            problems.append("cw_weight and kd_weight must be >= 0")
        if self.layout not in LAYOUTS:
            problems.append(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.calib_method not in CALIB_METHODS:
            problems.append(f"calib_method must be one of {CALIB_METHODS}, got {self.calib_method!r}")
        if self.img_size % 32:
            problems.append(f"img_size must be a multiple of 32, got {self.img_size}")
        if self.repopt_scales is not None and not self.repopt_masks:
            problems.append(f"repopt_scales {self.repopt_scales} given with the RepOpt masks switched off "
                            "(--no-repopt-masks): drop one of the two")
        if problems:
            raise RecipeError("qat: " + "; ".join(problems))

    @property
    def state_path(self) -> Path:
        return Path(f"{self.output}.state.pt")


@dataclass
class QATResult:
    """What ``qat_train`` wrote and measured (fake-quant val mAP per epoch in ``history``)."""

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


def load_quantized_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A fake-quant model saved by ``qat_train`` (quantizers, keep-float layers and ``amax`` restored),
    in eval mode, and its ``repquant_quant`` record. A float checkpoint raises ``CheckpointError``."""
    from repquant.checkpoint import load_checkpoint, model_from_state
    from repquant.quant.calibrate import insert_quantizers, restore_amax
    from repquant.quant.placement import find_placement

    state, metadata = load_checkpoint(path)
    info = metadata.get(QUANT_METADATA_KEY)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: not a quantized checkpoint (no {QUANT_METADATA_KEY} metadata)")
    float_state = {k: v for k, v in state.items() if "_quantizer." not in k}
    model = model_from_state(path, float_state, metadata)
    config = QuantConfig(keep_float_layers=tuple(info["keep_float_layers"]),
                         quantize_conv_outputs=info.get("layout") == "ort")
    insert_quantizers(model, find_placement(model), config)
    restore_amax(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: quantizers do not match the checkpoint ({str(err).splitlines()[0]})") from None
    return model.eval(), info


def _recipe_scales_path(model_path: str) -> str | None:
    """The ``repopt_scales`` file a checkpoint's training recipe names, if it still exists."""
    from repquant.checkpoint import read_checkpoint_metadata

    if not str(model_path).endswith(".safetensors") or not Path(model_path).is_file():
        return None
    recipe = read_checkpoint_metadata(model_path).get("recipe")
    path = recipe.get("repopt_scales") if isinstance(recipe, dict) else None
    return path if path and Path(path).is_file() else None


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` checkpoint carrying ``repquant_quant`` metadata (cheap: header only)."""
    from repquant.io import read_safetensors_metadata

    if not str(path).endswith(".safetensors") or not Path(path).is_file():
        return False
    try:
        return QUANT_METADATA_KEY in read_safetensors_metadata(path)
    except Exception:  # an unreadable file is reported by the loader that follows, with its reason
        return False


def qat_train(config: QATConfig, resume: bool = False, progress: bool = True) -> QATResult:
    """Partial QAT of ``config.model`` on ``config.data``; see the module docstring."""
    return _QATRun(config, resume, progress).run()


class _QATRun:
    def __init__(self, config: QATConfig, resume: bool, progress: bool) -> None:
        from repquant.train import ddp

        self.cfg, self.progress = config, progress
        self.dist, self.device = ddp.init_distributed(config.device)
        self.main = self.dist.is_main
        if resume and not config.state_path.is_file():
            raise CheckpointError(f"{config.state_path}: no QAT state to resume from")
        if not resume and config.state_path.is_file():
            raise CheckpointError(f"{config.state_path}: a QAT run is already there; resume it or choose another "
                                  "--output")
        ddp.seed_everything(config.seed)
        self._build()
        self.epoch, self.best_map, self.best_epoch, self.history = -1, -1.0, -1, []
        if resume:
            self._resume()

    def _build(self) -> None:
        from repquant.data import DetectionDataset
        from repquant.quant.report import load_for_quantization, rank_keep_float
        from repquant.quant.sensitivity import quantized_copy
        from repquant.train import schedule
        from repquant.train.config import default_iou_type
        from repquant.train.losses import ComputeLoss

        cfg = self.cfg
        model, data_config, batches, self.calibration = load_for_quantization(
            cfg.model, cfg.data, cfg.calib_images, cfg.img_size, cfg.seed)
        base = QuantConfig(calib_method=cfg.calib_method, percentile=cfg.percentile,
                           num_calib_images=cfg.calib_images)
        self.keep = rank_keep_float(model, batches, base, cfg.keep_float, cfg.sensitivity_json, cfg.ranking_mode,
                                    cfg.ranking_metric, progress=self.progress and self.main)
        if self.dist.distributed:  # every rank must train the same partial model: rank 0's ranking wins
            chosen = [self.keep]
            torch.distributed.broadcast_object_list(chosen, src=0)
            self.keep = tuple(chosen[0])
        self.qconfig = QuantConfig(calib_method=cfg.calib_method, percentile=cfg.percentile,
                                   num_calib_images=cfg.calib_images, keep_float_layers=self.keep,
                                   quantize_conv_outputs=cfg.layout == "ort")
        qmodel, placement = quantized_copy(model, batches, self.qconfig)
        logger.info("QAT: %d of %d layers quantized; float: %s", len(placement.layers) - len(self.keep),
                    len(placement.layers), ", ".join(self.keep) or "none")
        self.qmodel = qmodel.to(self.device).train()
        self.scales, self.scale_optimizer, self.initial_amax = None, None, {}
        if cfg.learn_scales:
            from repquant.quant.learnable_scales import LearnableScales

            self.scales = LearnableScales(self.qmodel, placement.shared_groups).to(self.device)
            self.scale_optimizer = torch.optim.Adam(self.scales.parameters(), lr=cfg.scale_lr)
            self.scale_optimizer.param_groups[0]["initial_lr"] = cfg.scale_lr
            self.initial_amax = self.scales.amax()
            logger.info("QAT: learning %d scales (%d quantizers, shared groups tied), Adam lr %g on log(amax)",
                        len(self.scales.log_amax), sum(map(len, self.scales.members.values())), cfg.scale_lr)
        self.teacher = model.to(self.device).eval().requires_grad_(False)
        self.train_set = DetectionDataset(data_config, "train", cfg.img_size, augment=True, seed=cfg.seed)
        self.train_set.set_mosaic(False)  # fine-tuning: whole images, as deployed (flips, HSV, affine stay)
        self.val_set = DetectionDataset(data_config, "val", cfg.img_size) if self.main else None
        self.loader, self.sampler, self.generator = self._make_loader()
        masks = self._repopt_masks(model)
        if masks:
            from repquant.train.repopt import build_repopt_optimizer

            self.optimizer = build_repopt_optimizer(self.qmodel, masks, cfg.lr, cfg.momentum, cfg.weight_decay)
        else:
            self.optimizer = schedule.build_optimizer(self.qmodel, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.lf = schedule.cosine_lr_factor(cfg.epochs, cfg.lrf)
        mcfg = self.qmodel.config
        self.compute_loss = ComputeLoss(data_config.nc, mcfg.reg_max, mcfg.strides, default_iou_type(mcfg.name),
                                        warmup_epoch=0)
        self.student_neck = _FeatureTap(self.qmodel.neck)
        self.teacher_neck = _FeatureTap(self.teacher.neck)
        self.net: nn.Module = self.qmodel
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.qmodel, device_ids=ids)

    def _repopt_masks(self, deployed: nn.Module) -> dict[nn.Parameter, Tensor]:
        """Folded RepOptimizer masks for the quantized model's convs when ``cfg.model`` is RepOpt-trained."""
        from repquant.checkpoint import resolve_model
        from repquant.reparam import is_deployed
        from repquant.train import repopt

        cfg = self.cfg
        block_mode = deployed.config.block_mode
        if block_mode == "repopt" and not cfg.repopt_masks:
            logger.warning("QAT: %s was trained with RepOptimizer; fine-tuning it with plain SGD (masks off)",
                           cfg.model)
            return {}
        if block_mode != "repopt":
            if cfg.repopt_scales is not None:
                raise RecipeError(f"qat: --repopt-scales given, but {cfg.model} was not trained with RepOptimizer "
                                  f"(block_mode {block_mode})")
            return {}
        scales_path = cfg.repopt_scales or _recipe_scales_path(cfg.model)
        if scales_path is None:
            raise RecipeError(f"qat: {cfg.model} was trained with RepOptimizer; pass --repopt-scales (the scales "
                              "file of its train-repopt run) so QAT keeps its gradient masks")
        scales, _ = repopt.load_scales(scales_path)
        train_form = resolve_model(cfg.model, num_classes=deployed.config.num_classes)
        if is_deployed(train_form):
            raise CheckpointError(f"{cfg.model}: a deployed RepOpt checkpoint; the QAT masks need the BN statistics "
                                  "of the train-form checkpoint that train-repopt wrote")
        folded = repopt.folded_gradient_masks(train_form, scales, source=str(scales_path))
        params = dict(self.qmodel.named_parameters())
        missing = [name for name in folded if name not in params]
        if missing:
            raise CheckpointError(f"{cfg.model}: deployed model has no parameter {missing[0]} for a RepOpt mask")
        logger.info("QAT: RepOptimizer masks on %d folded convs (scales %s)", len(folded), scales_path)
        return {params[name]: mask for name, mask in folded.items()}

    def _make_loader(self) -> tuple[DataLoader, DistributedSampler | None, torch.Generator]:
        from repquant.train import ddp

        cfg = self.cfg
        generator = torch.Generator()
        sampler = None
        if self.dist.distributed:
            sampler = DistributedSampler(self.train_set, self.dist.world_size, self.dist.rank, shuffle=True,
                                         seed=cfg.seed)
        loader = DataLoader(self.train_set, batch_size=max(cfg.batch_size // self.dist.world_size, 1),
                            shuffle=sampler is None, sampler=sampler, num_workers=cfg.workers,
                            collate_fn=self.train_set.collate_fn, generator=generator,
                            worker_init_fn=ddp.seed_worker)
        return loader, sampler, generator

    # --- loop ----------------------------------------------------------------------------------------

    def run(self) -> QATResult:
        from repquant.train import ddp

        start = time.perf_counter()
        cfg = self.cfg
        if self.main:
            logger.info("QAT %s on %s: %d epochs from epoch %d, lr %g, CWD %s, KD-cls %s, layout %s, device %s",
                        cfg.model, cfg.data, cfg.epochs, self.epoch + 1, cfg.lr,
                        f"on (tau {cfg.cw_tau}, weight {cfg.cw_weight})" if cfg.cw_distill else "off",
                        "on" if cfg.kd_cls else "off", cfg.layout, self.device)
        for epoch in range(self.epoch + 1, cfg.epochs):
            self.epoch = epoch
            losses = self._train_epoch()
            self._end_epoch(losses)
        ddp.cleanup(self.dist)
        return QATResult(Path(cfg.output), self.keep, self.best_map, self.best_epoch, self.history,
                         time.perf_counter() - start)

    def _train_epoch(self) -> dict[str, float]:
        from repquant.train import schedule

        cfg, epoch = self.cfg, self.epoch
        self.train_set.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(cfg.seed * 1_000_003 + epoch)
        schedule.set_epoch_lr(self.optimizer, self.lf(epoch))
        if self.scale_optimizer is not None:
            schedule.set_epoch_lr(self.scale_optimizer, self.lf(epoch))
        self.net.train()
        means: dict[str, float] = {}
        bar = tqdm(self.loader, disable=not (self.progress and self.main), leave=False,
                   desc=f"qat epoch {epoch}/{cfg.epochs - 1}")
        for step, (images, targets, _metas) in enumerate(bar):
            components = self._train_step(images.to(self.device), targets.to(self.device))
            means = {k: (means.get(k, 0.0) * step + v) / (step + 1) for k, v in components.items()}
            bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)
        return means

    def _train_step(self, images: Tensor, targets: Tensor) -> dict[str, float]:
        from repquant.train import schedule
        from repquant.train.distill import cwd_loss, distill_cls_loss

        cfg = self.cfg
        outputs = self.net(images)
        result = self.compute_loss.compute(outputs, targets, (images.shape[2], images.shape[3]), self.epoch)
        loss, components = result.loss, dict(result.components)
        if cfg.cw_distill or cfg.kd_cls:
            with torch.no_grad():
                teacher_out = self.teacher(images)
            if cfg.cw_distill:
                weight = cfg.cw_weight * schedule.cosine_decay(self.epoch / cfg.epochs, cfg.cw_final_factor)
                cwd = cwd_loss(self.student_neck.features, self.teacher_neck.features, cfg.cw_tau) * weight
                loss, components["cwd"] = loss + cwd, float(cwd.detach())
            if cfg.kd_cls:
                kd = distill_cls_loss(outputs[0], teacher_out[0], cfg.kd_temperature) * cfg.kd_weight
                loss, components["kd_cls"] = loss + kd, float(kd.detach())
        components["total"] = float(loss.detach())
        if not torch.isfinite(loss):
            raise RepquantError(f"qat {cfg.model}: loss is {loss.item()} at epoch {self.epoch}")
        if self.dist.distributed:
            loss = loss * self.dist.world_size  # DDP averages gradients; YOLOv6 sums them over processes
        loss.backward()
        if self.scales is not None:
            self._step_scales()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return components

    def _step_scales(self) -> None:
        if self.dist.distributed:  # the scales live outside DDP: average their gradients by hand
            for p in self.scales.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.dist.world_size
        self.scale_optimizer.step()
        self.scale_optimizer.zero_grad(set_to_none=True)
        self.scales.sync()

    def _end_epoch(self, losses: dict[str, float]) -> None:
        from repquant.io import atomic_torch_save
        from repquant.train import ddp

        if self.main:
            result = self._evaluate()
            record = {"epoch": float(self.epoch), **losses, "map50_95": result.map50_95, "map50": result.map50}
            if self.scales is not None:
                from repquant.quant.learnable_scales import scale_drift

                record.update({f"scale_{k}": v for k, v in scale_drift(self.initial_amax, self.scales.amax()).items()})
            self.history.append(record)
            logger.info("qat epoch %d: fake-quant mAP@.5:.95 %.4f  mAP@.5 %.4f  loss %s", self.epoch,
                        result.map50_95, result.map50, {k: round(v, 4) for k, v in losses.items()})
            if result.map50_95 > self.best_map:
                self.best_map, self.best_epoch = result.map50_95, self.epoch
                self._save_checkpoint()
            atomic_torch_save(self._state(), self.cfg.state_path)
        ddp.barrier(self.dist)

    def _evaluate(self) -> Any:
        from repquant.eval import evaluate
        from repquant.models.head import DecodedDetector

        self.qmodel.eval()
        detector = DecodedDetector(self.qmodel, (self.cfg.img_size, self.cfg.img_size))
        result = evaluate(detector, self.val_set, batch_size=2 * self.cfg.batch_size, progress=False)
        self.qmodel.train()
        return result

    def _save_checkpoint(self) -> None:
        from repquant.checkpoint import save_checkpoint

        info = quant_info(self.qconfig, self.cfg.layout, calib_seed=self.cfg.seed,
                          qat={k: v for k, v in asdict(self.cfg).items() if k not in ("output",)})
        save_checkpoint(self.cfg.output, self.qmodel, extra_metadata={
            QUANT_METADATA_KEY: info, "map50_95": self.best_map, "epoch": self.epoch, "img_size": self.cfg.img_size,
            "map_note": "fake-quant torch model on the val split"})

    def _state(self) -> dict[str, Any]:
        from repquant.train import ddp

        return {"format": STATE_FORMAT, "epoch": self.epoch, "best_map50_95": self.best_map,
                "best_epoch": self.best_epoch, "history": self.history, "model": self.qmodel.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": ddp.rng_state(), "config": asdict(self.cfg),
                "keep_float_layers": list(self.keep),
                "scales": None if self.scales is None else self.scales.state_dict(),
                "scale_optimizer": None if self.scale_optimizer is None else self.scale_optimizer.state_dict()}

    def _resume(self) -> None:
        from repquant.io import torch_load_weights_only
        from repquant.train import ddp

        path = self.cfg.state_path
        try:
            state = torch_load_weights_only(path)
        except Exception as err:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f"{path}: unreadable QAT state ({type(err).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: not a repquant QAT state")
        if tuple(state["keep_float_layers"]) != self.keep:
            raise CheckpointError(f"{path}: the state keeps {state['keep_float_layers']} float, this run "
                                  f"{list(self.keep)}; resume with the same --keep-float / --sensitivity")
        self.qmodel.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (state.get("scales") is None) != (self.scales is None):
            raise CheckpointError(f"{path}: the state was trained with learn_scales={state.get('scales') is not None}; "
                                  "resume with the same --learn-scales setting")
        if self.scales is not None:
            self.scales.load_state_dict(state["scales"])
            self.scale_optimizer.load_state_dict(state["scale_optimizer"])
            self.scales.sync()
        self.epoch, self.best_map, self.best_epoch = state["epoch"], state["best_map50_95"], state["best_epoch"]
        self.history = state["history"]
        ddp.set_rng_state(state["rng"])
        logger.info("QAT: resumed from %s after epoch %d", path, self.epoch)
