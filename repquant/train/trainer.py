"""The one training loop, shared by training, RepOpt training and QAT: YOLOv6's engine
(``yolov6/core/engine.py``) as a short loop with named hooks and an explicit, checkpointed state.

The loop builds nothing model-specific: it receives its parts (:class:`TrainParts`: model, loss
function, optimizers, dataset, evaluate/save callbacks, extra state) and its schedule
(:class:`LoopConfig`), and owns what every run needs once: seeding of the loader per epoch, warm-up,
gradient accumulation, AMP on CUDA, EMA updates, DDP (loss scaling, sampler), the non-finite loss check,
evaluation every ``eval_interval`` epochs with the best epoch kept, and a resumable state file written
atomically after every epoch (a SIGKILL at any moment leaves the previous or the new file, never a torn
one; ``run(resume=True)`` continues from it bit for bit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from repquant.errors import CheckpointError, RepquantError
from repquant.io import atomic_torch_save, torch_load_weights_only
from repquant.train import ddp, schedule
from repquant.train.ema import ModelEMA, unwrap

LOGGER = logging.getLogger("repquant.train")
STATE_FORMAT = 2
HOOKS = ("on_train_start", "on_epoch_start", "on_batch_end", "on_before_optimizer_step",
         "on_after_optimizer_step", "on_epoch_end", "on_train_end")
Hook = Callable[["Trainer"], None]
# ((cls_logits, reg_dist), targets (N, 6), images, epoch) -> (loss to backpropagate, loss components for the log)
LossFn = Callable[[tuple[Tensor, Tensor], Tensor, Tensor, int], tuple[Tensor, dict[str, float]]]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainParts:
    """What one run trains, built by its task (``repquant.train.fit`` for training, the QAT task for QAT).

    ``model`` is trained in place (wrapped in DDP by the loop when distributed); ``optimizer`` gets the
    warm-up (YOLOv6's three groups) and the epoch LR factor; ``extra_optimizers`` are stepped with it and
    follow the epoch LR factor only. ``evaluate(model) -> metrics`` runs on the evaluation model (EMA if
    any) every ``eval_interval`` epochs; ``metrics["map50_95"]`` picks the best epoch, whose model goes
    to ``save_best(model, epoch, metrics)``. ``extra_state`` objects are saved in and restored from the
    resumable state; ``identity`` must match on resume (variant, keep-float layers, ...).
    """

    model: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    train_set: Dataset
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    save_best: Callable[[nn.Module, int, dict[str, float]], None] | None = None
    ema: ModelEMA | None = None
    extra_optimizers: tuple[torch.optim.Optimizer, ...] = ()
    extra_state: dict[str, Stateful] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoopConfig:
    """The schedule of one run. ``batch_size`` is the total over all DDP processes; gradients accumulate to
    ``nominal_batch`` images per optimizer step (ramped up over the warm-up, YOLOv6); the warm-up lasts
    ``max(round(warmup_epochs * iters_per_epoch), min_warmup_iters)`` iterations (0: none); ``lr`` is
    ``initial_lr * cosine(epoch)`` from 1 to ``lrf``. ``record`` (the run's settings) is saved with the
    state and compared on resume; ``kind`` names the run in messages (``training``, ``QAT``), ``what`` in
    logs (``training yolov6n``)."""

    epochs: int
    batch_size: int
    state_path: Path
    kind: str = "training"
    what: str = "training"
    nominal_batch: int | None = None
    lrf: float = 0.01
    momentum: float = 0.937
    warmup_epochs: float = 0.0
    min_warmup_iters: int = 0
    warmup_bias_lr: float = 0.0
    warmup_momentum: float = 0.8
    amp: bool = False
    seed: int = 0
    workers: int = 0
    eval_interval: int = 1
    record: Mapping[str, Any] = field(default_factory=dict)

    @property
    def accumulate_to(self) -> int:
        return self.nominal_batch or self.batch_size


@dataclass
class TrainState:
    """Counters of a run (``epoch``: last completed, -1 none; ``last_opt_step``: iteration of the last
    optimizer step) and its history of per-epoch records."""

    epoch: int = -1
    last_opt_step: int = -1
    best_map50_95: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class LoopResult:
    """Outcome of :meth:`Trainer.run`; ``final_metrics`` is the last evaluation."""

    final_metrics: dict[str, float]
    best_map50_95: float
    best_epoch: int
    epochs_run: int
    wall_time_s: float
    images_per_s: float
    history: list[dict[str, float]]


def _hook_table(callbacks: Mapping[str, Hook | Sequence[Hook]] | None) -> dict[str, list[Hook]]:
    table: dict[str, list[Hook]] = {name: [] for name in HOOKS}
    for name, fns in (callbacks or {}).items():
        if name not in table:
            raise RepquantError(f"train callbacks: unknown hook {name!r}; valid hooks: {', '.join(HOOKS)}")
        table[name].extend([fns] if callable(fns) else fns)
    return table


def check_run_slot(state_path: Path, resume: bool, what: str) -> None:
    """Refuse to resume without a state, and to start over an existing run."""
    if resume and not state_path.is_file():
        raise CheckpointError(f"{state_path}: no {what} state to resume from")
    if not resume and state_path.is_file():
        raise CheckpointError(f"{state_path}: a {what} run is already there; resume it or choose another output")


class Trainer:
    """One run over ``parts`` with ``loop``. Hooks receive the trainer and may read ``parts``, ``state``,
    ``epoch``, ``step``, ``iters_per_epoch``, ``warmup_iters``, ``loss_items`` (running means of this
    epoch), ``last_eval`` (the latest metrics) and ``train_set``."""

    def __init__(self, parts: TrainParts, loop: LoopConfig, dist: ddp.DistInfo, device: torch.device,
                 callbacks: Mapping[str, Hook | Sequence[Hook]] | None = None) -> None:
        self.parts, self.loop, self.dist, self.device = parts, loop, dist, device
        self.hooks = _hook_table(callbacks)
        self.main = dist.is_main
        self.use_amp = loop.amp and device.type == "cuda"
        self.state_path = loop.state_path
        self.train_set = parts.train_set
        self.epoch, self.step = 0, 0
        self.loss_items: dict[str, float] = {}
        self.last_eval: dict[str, float] | None = None
        self.state = TrainState()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.loader, self.sampler, self.generator = self._make_loader()
        self.iters_per_epoch = len(self.loader)
        self.warmup_iters = schedule.warmup_iterations(loop.warmup_epochs, self.iters_per_epoch,
                                                       loop.min_warmup_iters)
        self.lf = schedule.cosine_lr_factor(loop.epochs, loop.lrf)
        self.net: nn.Module = parts.model

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.parts.optimizer, *self.parts.extra_optimizers)

    def _make_loader(self) -> tuple[DataLoader, DistributedSampler | None, torch.Generator]:
        per_rank = max(self.loop.batch_size // self.dist.world_size, 1)
        generator = torch.Generator()
        sampler: DistributedSampler | None = None
        if self.dist.distributed:
            sampler = DistributedSampler(self.train_set, self.dist.world_size, self.dist.rank, shuffle=True,
                                         seed=self.loop.seed)
        collate = getattr(self.train_set, "collate_fn", None)
        loader = DataLoader(self.train_set, batch_size=per_rank, shuffle=sampler is None, sampler=sampler,
                            num_workers=self.loop.workers, collate_fn=collate,
                            pin_memory=self.device.type == "cuda", drop_last=False, generator=generator,
                            worker_init_fn=ddp.seed_worker)
        return loader, sampler, generator

    # --- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: loadable with ``torch.load(weights_only=True)``."""
        st, parts = self.state, self.parts
        return {
            "format": STATE_FORMAT, "epoch": st.epoch, "last_opt_step": st.last_opt_step,
            "best_map50_95": st.best_map50_95, "best_epoch": st.best_epoch, "history": st.history,
            "model": unwrap(parts.model).state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "scaler": self.scaler.state_dict(), "ema": parts.ema.state_dict() if parts.ema else None,
            "extra": {name: obj.state_dict() for name, obj in parts.extra_state.items()},
            "rng": ddp.rng_state(), "config": dict(self.loop.record), "identity": parts.identity,
        }

    def _load_state(self) -> None:
        path = self.state_path
        try:
            # CPU: RNG states must stay CPU tensors; model/optimizer loading moves tensors to their params.
            state = torch_load_weights_only(path)
        except Exception as err:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f"{path}: unreadable {self.loop.kind} state ({type(err).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: not a repquant {self.loop.kind} state (or one of an older version)")
        self._check_identity(state)
        changed = sorted(k for k, v in self.loop.record.items() if state["config"].get(k) != v)
        if changed:
            LOGGER.warning("resuming with changed settings: %s", ", ".join(changed))
        unwrap(self.parts.model).load_state_dict(state["model"])
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])
        if self.parts.ema is not None and state["ema"] is not None:
            self.parts.ema.load_state_dict(state["ema"])
        for name, obj in self.parts.extra_state.items():
            obj.load_state_dict(state["extra"][name])
        for name in ("epoch", "last_opt_step", "best_map50_95", "best_epoch", "history"):
            setattr(self.state, name, state[name])
        ddp.set_rng_state(state["rng"])
        LOGGER.info("resumed from %s after epoch %d", path, self.state.epoch)

    def _check_identity(self, state: dict[str, Any]) -> None:
        saved: dict[str, Any] = state.get("identity") or {}
        for key, value in self.parts.identity.items():
            if saved.get(key) != value:
                raise CheckpointError(f"{self.state_path}: the state has {key}={saved.get(key)!r}, this run "
                                      f"{value!r}; resume with the same settings")
        if len(self.optimizers) != len(state["optimizers"]):
            raise CheckpointError(f"{self.state_path}: the state has {len(state['optimizers'])} optimizers, this "
                                  f"run {len(self.optimizers)}; resume with the same settings")
        missing = sorted(set(self.parts.extra_state) ^ set(state["extra"]))
        if missing:
            raise CheckpointError(f"{self.state_path}: the state and this run differ in {missing[0]!r}; resume "
                                  "with the same settings")

    # --- loop --------------------------------------------------------------------------------------

    def _call(self, hook: str) -> None:
        for fn in self.hooks[hook]:
            fn(self)

    def run(self, resume: bool = False) -> LoopResult:
        """Train from the epoch after the last completed one (resume) or from scratch."""
        start = time.perf_counter()
        if resume:
            self._load_state()
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.parts.model, device_ids=ids)
        first_epoch = self.state.epoch + 1
        train_seconds, images_seen = 0.0, 0
        self._call("on_train_start")
        epochs = self.loop.epochs
        for self.epoch in range(first_epoch, epochs):
            t0 = time.perf_counter()
            images_seen += self._train_epoch()
            train_seconds += time.perf_counter() - t0
            self._end_epoch()
        self._call("on_train_end")
        ddp.cleanup(self.dist)
        evaluated = [r for r in self.state.history if "map50_95" in r]
        return LoopResult(
            final_metrics={k: v for k, v in evaluated[-1].items() if k.startswith("map")} if evaluated else {},
            best_map50_95=self.state.best_map50_95, best_epoch=self.state.best_epoch,
            epochs_run=max(self.loop.epochs - first_epoch, 0), wall_time_s=time.perf_counter() - start,
            images_per_s=images_seen * self.dist.world_size / train_seconds if train_seconds else 0.0,
            history=self.state.history,
        )

    def _begin_epoch(self) -> None:
        epoch = self.epoch
        set_epoch = getattr(self.train_set, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        # The loader's shuffle order and worker seeds come from this generator: seeding it per epoch makes
        # each epoch a function of (seed, epoch), the same in a resumed run as in an uninterrupted one.
        self.generator.manual_seed(self.loop.seed * 1_000_003 + epoch)
        for opt in self.optimizers:
            schedule.set_epoch_lr(opt, self.lf(epoch))
        self.net.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.loss_items = {}
        self._call("on_epoch_start")

    def _train_epoch(self) -> int:
        self._begin_epoch()
        seen = 0
        bar = tqdm(self.loader, total=self.iters_per_epoch, disable=not self.main, leave=False,
                   desc=f"{self.loop.what} epoch {self.epoch}/{self.loop.epochs - 1}")
        for self.step, (images, targets, _metas) in enumerate(bar):
            components = self._train_step(images, targets)
            seen += images.shape[0]
            n = self.step
            self.loss_items = {k: (self.loss_items.get(k, 0.0) * n + v) / (n + 1) for k, v in components.items()}
            bar.set_postfix({k: f"{v:.4g}" for k, v in self.loss_items.items()}, refresh=False)
            self._call("on_batch_end")
        return seen

    def _train_step(self, images: Tensor, targets: Tensor) -> dict[str, float]:
        loop = self.loop
        iteration = self.step + self.iters_per_epoch * self.epoch
        if 0 < self.warmup_iters and iteration <= self.warmup_iters:
            schedule.apply_warmup(self.parts.optimizer, iteration, self.warmup_iters, self.lf(self.epoch),
                                  loop.warmup_bias_lr, loop.warmup_momentum, loop.momentum)
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            cls_logits, reg_dist = self.net(images)
        # The loss runs in float32: the assigners' IoU and the log terms are fragile in float16.
        outputs = (cls_logits.float(), reg_dist.float())
        loss, components = self.parts.loss_fn(outputs, targets, images, self.epoch)
        if not torch.isfinite(loss):
            raise RepquantError(f"{loop.what}: loss is {loss.item()} at epoch {self.epoch} step {self.step}")
        if self.dist.distributed:
            loss = loss * self.dist.world_size  # DDP averages gradients; YOLOv6 sums them over processes
        self.scaler.scale(loss).backward()
        accumulate = schedule.accumulate_at(iteration, self.warmup_iters, loop.batch_size, loop.accumulate_to)
        if iteration - self.state.last_opt_step >= accumulate:
            self._optimizer_step()
            self.state.last_opt_step = iteration
        return components

    def _optimizer_step(self) -> None:
        self._call("on_before_optimizer_step")
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.parts.ema is not None:
            self.parts.ema.update(self.net)
        self._call("on_after_optimizer_step")

    def eval_model(self) -> nn.Module:
        """The model that is evaluated and saved: the EMA when there is one, else the trained model."""
        return self.parts.ema.ema if self.parts.ema is not None else unwrap(self.parts.model)

    def _is_eval_epoch(self) -> bool:
        last = self.epoch == self.loop.epochs - 1
        return last or (self.epoch + 1) % self.loop.eval_interval == 0

    def _end_epoch(self) -> None:
        st = self.state
        st.epoch = self.epoch
        if self.main:
            record = {"epoch": float(self.epoch), **self.loss_items}
            if self.parts.evaluate is not None and self._is_eval_epoch():
                self.last_eval = self._evaluate()
                record.update(self.last_eval)
                self._keep_best(self.last_eval)
            st.history.append(record)
            atomic_torch_save(self.state_dict(), self.state_path)
        ddp.barrier(self.dist)
        self._call("on_epoch_end")

    def _evaluate(self) -> dict[str, float]:
        assert self.parts.evaluate is not None
        model = self.eval_model()
        was_training = model.training
        metrics = self.parts.evaluate(model.eval())
        model.train(was_training)
        LOGGER.info("%s epoch %d: mAP@.5:.95 %.4f  mAP@.5 %.4f  loss %s", self.loop.what, self.epoch,
                    metrics.get("map50_95", float("nan")), metrics.get("map50", float("nan")),
                    {k: round(v, 4) for k, v in self.loss_items.items()})
        return metrics

    def _keep_best(self, metrics: dict[str, float]) -> None:
        st = self.state
        if metrics["map50_95"] > st.best_map50_95:
            st.best_map50_95, st.best_epoch = metrics["map50_95"], self.epoch
            if self.parts.save_best is not None:
                self.parts.save_best(self.eval_model(), self.epoch, metrics)
