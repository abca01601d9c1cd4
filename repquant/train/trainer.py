"""The training loop: YOLOv6's engine (``yolov6/core/engine.py``) as a short loop with named hooks and an
explicit, checkpointed :class:`TrainState`.

Files under ``config.output_dir``:
- ``weights/last.pt``: the whole state after each completed epoch (``torch.save`` of tensors and plain
  values; read back with ``weights_only=True``), written atomically, so a SIGKILL at any moment leaves
  the previous or the new file, never a torn one; ``train(config, resume=True)`` continues from it;
- ``weights/best.safetensors``: the EMA model of the epoch with the best val mAP@.5:.95
  (``repquant.checkpoint`` format, metadata: mAP, epoch, recipe); for ``block_mode='hyper_search'``
  also ``weights/scales.safetensors``, the RepOpt scales of that model (``repopt_scales`` of stage 2);
- ``train_config.yaml``: the configuration of the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from repquant.checkpoint import load_model, save_checkpoint
from repquant.data import DetectionDataset, load_data_config
from repquant.errors import CheckpointError, RepquantError
from repquant.eval.predict import EvalResult, evaluate
from repquant.io import atomic_torch_save, atomic_write_text, torch_load_weights_only
from repquant.models import create_model
from repquant.models.head import DecodedDetector
from repquant.train import ddp, repopt, schedule
from repquant.train.config import TrainConfig
from repquant.train.distill import SelfDistillLoss
from repquant.train.ema import ModelEMA, unwrap
from repquant.train.losses import ComputeLoss

LOGGER = logging.getLogger("repquant.train")
STATE_FORMAT = 1
HOOKS = ("on_train_start", "on_epoch_start", "on_batch_end", "on_epoch_end", "on_train_end")
Hook = Callable[["Trainer"], None]


@dataclass
class TrainState:
    """Everything a resumed run needs. ``epoch`` is the last completed epoch (-1: none yet);
    ``last_opt_step`` the iteration of the last optimizer step (accumulation bookkeeping)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    epoch: int = -1
    last_opt_step: int = -1
    best_map50_95: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self, config: TrainConfig) -> dict[str, Any]:
        """Tensors and plain values only: loadable with ``torch.load(weights_only=True)``."""
        return {
            "format": STATE_FORMAT, "epoch": self.epoch, "last_opt_step": self.last_opt_step,
            "best_map50_95": self.best_map50_95, "best_epoch": self.best_epoch, "history": self.history,
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "rng": ddp.rng_state(), "config": config.to_dict(),
            "model_config": unwrap(self.model).config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        for name in ("epoch", "last_opt_step", "best_map50_95", "best_epoch", "history"):
            setattr(self, name, state[name])
        ddp.set_rng_state(state["rng"])


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


def _hook_table(callbacks: Mapping[str, Hook | Sequence[Hook]] | None) -> dict[str, list[Hook]]:
    table: dict[str, list[Hook]] = {name: [] for name in HOOKS}
    for name, fns in (callbacks or {}).items():
        if name not in table:
            raise RepquantError(f"train callbacks: unknown hook {name!r}; valid hooks: {', '.join(HOOKS)}")
        table[name].extend([fns] if callable(fns) else fns)
    return table


class Trainer:
    """One training run. Hooks receive the trainer and may read ``state``, ``epoch``, ``step``,
    ``loss_items`` (running means of this epoch) and ``last_eval``."""

    def __init__(self, config: TrainConfig, resume: bool = False,
                 callbacks: Mapping[str, Hook | Sequence[Hook]] | None = None) -> None:
        self.config = config
        self.hooks = _hook_table(callbacks)
        self.dist, self.device = ddp.init_distributed(config.device)
        self.main = self.dist.is_main
        self.use_amp = config.amp and self.device.type == "cuda"
        self.out_dir = Path(config.output_dir)
        self.last_path = self.out_dir / "weights" / "last.pt"
        self.best_path = self.out_dir / "weights" / "best.safetensors"
        self.scales_path = self.out_dir / "weights" / "scales.safetensors"
        self.epoch, self.step = 0, 0
        self.loss_items: dict[str, float] = {}
        self.last_eval: EvalResult | None = None
        self._check_output_dir(resume)
        ddp.seed_everything(config.seed)
        if self.device.type == "cuda":
            # cuDNN autotuning picks kernels per run: reproducible runs need it off (slower).
            torch.backends.cudnn.benchmark = not config.deterministic
            torch.backends.cudnn.deterministic = config.deterministic
        self._build(resume)

    # --- setup -------------------------------------------------------------------------------------

    def _check_output_dir(self, resume: bool) -> None:
        if resume and not self.last_path.is_file():
            raise CheckpointError(f"{self.last_path}: no checkpoint to resume from")
        if not resume and self.last_path.is_file():
            raise CheckpointError(f"{self.last_path}: output_dir already holds a run; resume it or choose "
                                  "another output_dir")

    def _build(self, resume: bool) -> None:
        cfg = self.config
        self.data_config = load_data_config(cfg.data)
        self.num_classes = self.data_config.nc
        model = create_model(cfg.model, num_classes=self.num_classes, block_mode=cfg.block_mode)
        model = model.to(self.device)
        self.train_set = DetectionDataset(self.data_config, "train", cfg.img_size, augment=True,
                                          aug=cfg.augment, seed=cfg.seed)
        self.val_set = DetectionDataset(self.data_config, "val", cfg.img_size) if self.main else None
        self.loader, self.sampler, self.generator = self._make_loader()
        self.iters_per_epoch = len(self.loader)
        self.warmup_iters = schedule.warmup_iterations(cfg.warmup_epochs, self.iters_per_epoch,
                                                       cfg.min_warmup_iters)
        self.lf = schedule.cosine_lr_factor(cfg.epochs, cfg.lrf)
        weight_decay = schedule.scaled_weight_decay(cfg.weight_decay, cfg.batch_size, cfg.nominal_batch)
        optimizer = self._make_optimizer(model, weight_decay)
        ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau) if cfg.ema and self.main else None
        scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        if self.main:
            LOGGER.info("SGD lr0 %g momentum %g, weight decay %g (scaled) on %d weights; %d BN weights and "
                        "%d biases without decay; accumulate to %d images", cfg.lr0, cfg.momentum,
                        weight_decay,
                        len(optimizer.param_groups[1]["params"]), len(optimizer.param_groups[0]["params"]),
                        len(optimizer.param_groups[2]["params"]), cfg.nominal_batch)
        self.state = TrainState(model, optimizer, scaler, ema)
        if resume:
            self._resume()
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.state.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        mcfg = model.config
        self.compute_loss = ComputeLoss(self.num_classes, mcfg.reg_max, mcfg.strides, cfg.resolved_iou_type,
                                        warmup_epoch=cfg.atss_warmup_epochs)
        self.teacher, self.distill_loss = self._make_teacher()

    def _make_loader(self) -> tuple[DataLoader, DistributedSampler | None, torch.Generator]:
        cfg = self.config
        per_rank = max(cfg.batch_size // self.dist.world_size, 1)
        generator = torch.Generator()
        sampler = None
        if self.dist.distributed:
            sampler = DistributedSampler(self.train_set, self.dist.world_size, self.dist.rank, shuffle=True,
                                         seed=cfg.seed)
        loader = DataLoader(self.train_set, batch_size=per_rank, shuffle=sampler is None, sampler=sampler,
                            num_workers=cfg.workers, collate_fn=self.train_set.collate_fn,
                            pin_memory=self.device.type == "cuda", drop_last=False, generator=generator,
                            worker_init_fn=ddp.seed_worker)
        return loader, sampler, generator

    def _make_optimizer(self, model: nn.Module, weight_decay: float) -> torch.optim.Optimizer:
        """SGD with YOLOv6's groups; for ``block_mode='repopt'`` the RepOptimizer, with the convs
        initialised from the hyper-search scales (YOLOv6 ``RepVGGOptimizer(reinit=True)``)."""
        cfg = self.config
        if model.config.block_mode != "repopt":
            return schedule.build_optimizer(model, cfg.lr0, cfg.momentum, weight_decay)
        source = str(cfg.repopt_scales)
        scales, scales_model = repopt.load_scales(cfg.repopt_scales)
        repopt.init_from_scales(model, scales, seed=cfg.seed, source=source)
        masks = repopt.match_scales(model, scales, source=source)
        LOGGER.info("RepOptimizer: %d masked convs, scales from %s (%s)", len(masks), source, scales_model)
        return repopt.build_repopt_optimizer(model, masks, cfg.lr0, cfg.momentum, weight_decay)

    def _make_teacher(self) -> tuple[nn.Module | None, Any]:
        distill = self.config.distill
        if not distill.enabled:
            return None, None
        teacher = load_model(distill.teacher, expected_num_classes=self.num_classes).to(self.device).eval()
        reg_max = unwrap(self.state.model).config.reg_max
        if teacher.config.reg_max != reg_max:
            raise CheckpointError(f"{distill.teacher}: teacher has reg_max {teacher.config.reg_max}, the "
                                  f"student {reg_max}; self-distillation needs matching outputs")
        for p in teacher.parameters():
            p.requires_grad_(False)
        LOGGER.info("self-distillation from %s (temperature %g, weight %g)", distill.teacher,
                    distill.temperature, distill.weight)
        return teacher, SelfDistillLoss(self.num_classes, reg_max, temperature=distill.temperature)

    def _resume(self) -> None:
        try:
            # CPU: RNG states must stay CPU tensors; model/optimizer loading moves tensors to their params.
            state = torch_load_weights_only(self.last_path)
        except Exception as err:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f"{self.last_path}: unreadable training state "
                                  f"({type(err).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{self.last_path}: not a repquant training state")
        saved = state["model_config"]
        current = unwrap(self.state.model).config.to_dict()
        for key in ("name", "num_classes", "block_mode", "reg_max"):
            if saved.get(key) != current.get(key):
                raise CheckpointError(f"{self.last_path}: state has {key}={saved.get(key)!r}, "
                                      f"config gives {current.get(key)!r}")
        now = self.config.to_dict()
        changed = sorted(k for k in now if state["config"].get(k) != now[k])
        if changed:
            LOGGER.warning("resuming with changed settings: %s", ", ".join(changed))
        self.state.load_state_dict(state)
        LOGGER.info("resumed from %s after epoch %d", self.last_path, self.state.epoch)

    # --- loop --------------------------------------------------------------------------------------

    def _call(self, hook: str) -> None:
        for fn in self.hooks[hook]:
            fn(self)

    def run(self) -> TrainResult:
        cfg = self.config
        start = time.perf_counter()
        train_seconds, images_seen = 0.0, 0
        if self.main:
            config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            atomic_write_text(self.out_dir / "train_config.yaml", config_yaml)
            LOGGER.info("training %s on %s: %d classes, %d images, %d epochs from epoch %d, %d iters/epoch, "
                        "warm-up %d iters, device %s%s", cfg.model, cfg.data, self.num_classes,
                        len(self.train_set), cfg.epochs, self.state.epoch + 1, self.iters_per_epoch,
                        self.warmup_iters, self.device, " (AMP)" if self.use_amp else "")
        first_epoch = self.state.epoch + 1
        self._call("on_train_start")
        for self.epoch in range(first_epoch, cfg.epochs):
            t0 = time.perf_counter()
            images_seen += self._train_epoch()
            train_seconds += time.perf_counter() - t0
            self._end_epoch()
        self._call("on_train_end")
        ddp.cleanup(self.dist)
        evaluated = [r for r in self.state.history if "map50_95" in r]
        final = {"map50_95": evaluated[-1]["map50_95"], "map50": evaluated[-1]["map50"]} if evaluated else {}
        return TrainResult(
            last_checkpoint=self.last_path, best_checkpoint=self.best_path, final_metrics=final,
            best_map50_95=self.state.best_map50_95, best_epoch=self.state.best_epoch,
            epochs_run=max(cfg.epochs - first_epoch, 0), wall_time_s=time.perf_counter() - start,
            images_per_s=images_seen * self.dist.world_size / train_seconds if train_seconds else 0.0,
        )

    def _begin_epoch(self) -> None:
        cfg, epoch = self.config, self.epoch
        if epoch >= cfg.close_mosaic_at and self.train_set.mosaic_enabled:
            self.train_set.set_mosaic(False)
            LOGGER.info("epoch %d: mosaic and mixup off for the last %d epochs", epoch, cfg.epochs - epoch)
        self.train_set.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        # The loader's shuffle order and worker seeds come from this generator: seeding it per epoch makes
        # each epoch a function of (seed, epoch), the same in a resumed run as in an uninterrupted one.
        self.generator.manual_seed(cfg.seed * 1_000_003 + epoch)
        schedule.set_epoch_lr(self.state.optimizer, self.lf(epoch))
        self.state.model.train()
        self.state.optimizer.zero_grad(set_to_none=True)
        self.loss_items = {}
        self._call("on_epoch_start")

    def _train_epoch(self) -> int:
        self._begin_epoch()
        seen = 0
        bar = tqdm(self.loader, total=self.iters_per_epoch, disable=not self.main, leave=False,
                   desc=f"epoch {self.epoch}/{self.config.epochs - 1}")
        for self.step, (images, targets, _metas) in enumerate(bar):
            components = self._train_step(images, targets)
            seen += images.shape[0]
            n = self.step
            self.loss_items = {k: (self.loss_items.get(k, 0.0) * n + v) / (n + 1)
                               for k, v in components.items()}
            bar.set_postfix({k: f"{v:.4g}" for k, v in self.loss_items.items()}, refresh=False)
            self._call("on_batch_end")
        return seen

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        cfg, st = self.config, self.state
        iteration = self.step + self.iters_per_epoch * self.epoch
        if iteration <= self.warmup_iters:
            schedule.apply_warmup(st.optimizer, iteration, self.warmup_iters, self.lf(self.epoch),
                                  cfg.warmup_bias_lr, cfg.warmup_momentum, cfg.momentum)
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device)
        img_hw = (images.shape[2], images.shape[3])
        with torch.autocast(self.device.type, enabled=self.use_amp):
            outputs = st.model(images)
        # The loss runs in float32: the assigners' IoU and the log terms are fragile in float16.
        outputs = tuple(o.float() for o in outputs)
        result = self.compute_loss.compute(outputs, targets, img_hw, self.epoch)
        loss, components = result.loss, result.components
        if self.teacher is not None:
            loss, components = self._add_distill(images, outputs, result.assignment.fg_mask, loss, components)
        if not torch.isfinite(loss):
            raise RepquantError(f"training {self.config.model}: loss is {loss.item()} at epoch {self.epoch} "
                                f"step {self.step}")
        if self.dist.distributed:
            loss = loss * self.dist.world_size  # DDP averages gradients; YOLOv6 sums them over processes
        st.scaler.scale(loss).backward()
        accumulate = schedule.accumulate_at(iteration, self.warmup_iters, cfg.batch_size, cfg.nominal_batch)
        if iteration - st.last_opt_step >= accumulate:
            st.scaler.step(st.optimizer)
            st.scaler.update()
            st.optimizer.zero_grad(set_to_none=True)
            if st.ema is not None:
                st.ema.update(st.model)
            st.last_opt_step = iteration
        return components

    def _add_distill(self, images: torch.Tensor, outputs: tuple, fg_mask: torch.Tensor, loss: torch.Tensor,
                     components: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """YOLOv6 self-distillation: the frozen eval-mode teacher sees the same batch; its term is scaled
        by ``weight * cosine_decay(epoch / epochs, final_factor)``: 1 -> 0.01, YOLOv6's
        ``distill_weightdecay``."""
        distill = self.config.distill
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.use_amp):
            teacher_out = self.teacher(images)
        teacher_out = tuple(o.float() for o in teacher_out)
        weight = distill.weight * schedule.cosine_decay(self.epoch / self.config.epochs, distill.final_factor)
        d_loss = self.distill_loss(outputs, teacher_out, fg_mask) * weight
        total = loss + d_loss
        return total, {**components, "distill": float(d_loss.detach()), "total": float(total.detach())}

    def _is_eval_epoch(self) -> bool:
        last = self.epoch == self.config.epochs - 1
        return last or (self.epoch + 1) % self.config.eval_interval == 0

    def _end_epoch(self) -> None:
        st = self.state
        st.epoch = self.epoch
        if self.main:
            record = {"epoch": float(self.epoch), **self.loss_items}
            if self._is_eval_epoch():
                self.last_eval = self._evaluate()
                record.update(map50_95=self.last_eval.map50_95, map50=self.last_eval.map50)
                LOGGER.info("epoch %d: mAP@.5:.95 %.4f  mAP@.5 %.4f  loss %s", self.epoch,
                            self.last_eval.map50_95, self.last_eval.map50,
                            {k: round(v, 4) for k, v in self.loss_items.items()})
                if self.last_eval.map50_95 > st.best_map50_95:
                    st.best_map50_95, st.best_epoch = self.last_eval.map50_95, self.epoch
                    self._export(self.best_path)
            st.history.append(record)
            atomic_torch_save(st.state_dict(self.config), self.last_path)
        ddp.barrier(self.dist)
        self._call("on_epoch_end")

    def eval_model(self) -> nn.Module:
        """The model that is evaluated and exported: the EMA when enabled, else the trained model."""
        return self.state.ema.ema if self.state.ema is not None else unwrap(self.state.model)

    def _evaluate(self) -> EvalResult:
        cfg = self.config
        model = self.eval_model()
        was_training = model.training
        detector = DecodedDetector(model.eval(), (cfg.img_size, cfg.img_size))
        batch = cfg.eval_batch_size or 2 * max(cfg.batch_size // self.dist.world_size, 1)
        result = evaluate(detector, self.val_set, batch_size=batch, conf_thres=cfg.conf_thres,
                          iou_thres=cfg.iou_thres, progress=False)
        model.train(was_training)
        return result

    def _export(self, path: Path) -> None:
        metadata = {"map50_95": self.state.best_map50_95, "epoch": self.epoch, "epochs": self.config.epochs,
                    "ema": self.state.ema is not None, "recipe": self.config.to_dict()}
        model = self.eval_model()
        save_checkpoint(path, model, extra_metadata=metadata)
        if model.config.block_mode == "hyper_search":  # RepOpt stage 1 -> the scales stage 2 needs
            repopt.save_scales(self.scales_path, repopt.extract_scales(model), self.config.model)
        LOGGER.info("epoch %d: new best mAP@.5:.95 %.4f -> %s", self.epoch, self.state.best_map50_95, path)


def train(config: TrainConfig, resume: bool = False,
          callbacks: Mapping[str, Hook | Sequence[Hook]] | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.data``; see the module docstring for the files written.

    ``resume=True`` continues the run in ``config.output_dir`` from the epoch after the last completed
    one, with model, EMA, optimizer, scaler, counters and RNG states restored. ``callbacks`` maps hook
    names (``on_train_start``, ``on_epoch_start``, ``on_batch_end``, ``on_epoch_end``, ``on_train_end``)
    to functions of the :class:`Trainer`.
    """
    return Trainer(config, resume=resume, callbacks=callbacks).run()


