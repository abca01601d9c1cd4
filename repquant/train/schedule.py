"""Optimizer, learning-rate and momentum schedule of YOLOv6 (``yolov6/solver/build.py``, ``core/engine.py``).

- SGD with Nesterov momentum over three parameter groups, in YOLOv6's order:
  0 = BatchNorm weights (no weight decay), 1 = other weights (weight decay), 2 = all biases (no decay).
- Per epoch: ``lr = lr0 * lf(epoch)`` with the cosine factor ``lf`` from 1 down to ``lrf``.
- Warm-up over ``max(round(warmup_epochs * iters_per_epoch), min_warmup_iters)`` iterations: the bias
  group's LR falls linearly from ``warmup_bias_lr``, the others rise from 0, momentum rises from
  ``warmup_momentum``, all towards the epoch's values; gradient accumulation rises from 1 to
  ``nominal_batch / batch_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

BN_GROUP, WEIGHT_GROUP, BIAS_GROUP = 0, 1, 2


def cosine_lr_factor(epochs: int, lrf: float) -> Callable[[float], float]:
    """YOLOv6's cosine LR factor ``lf(x) = (1 - cos(pi x / epochs)) / 2 * (lrf - 1) + 1``.

    ``lf(0) = 1`` and ``lf(epochs) = lrf``; the trainer uses ``lr = lr0 * lf(epoch)`` for the whole epoch.
    """

    def lf(x: float) -> float:
        return ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1

    return lf


def cosine_decay(progress: float, final: float) -> float:
    """Cosine from 1 at ``progress=0`` to ``final`` at ``progress=1`` (distillation weight decay)."""
    return ((1 - math.cos(progress * math.pi)) / 2) * (final - 1) + 1


def accumulate_steps(batch_size: int, nominal_batch: int = 64) -> int:
    """Batches whose gradients are summed before one optimizer step: ``max(round(64 / batch), 1)``."""
    return max(round(nominal_batch / batch_size), 1)


def scaled_weight_decay(weight_decay: float, batch_size: int, nominal_batch: int = 64) -> float:
    """Weight decay scaled by the effective batch (``batch * accumulate / 64``) as YOLOv6 does."""
    return weight_decay * batch_size * accumulate_steps(batch_size, nominal_batch) / nominal_batch


def warmup_iterations(warmup_epochs: float, iters_per_epoch: int, min_iters: int = 1000) -> int:
    """Length of the warm-up in iterations (batches): at least ``min_iters`` as in YOLOv6."""
    return max(round(warmup_epochs * iters_per_epoch), min_iters)


def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (BN weights, other weights, biases), YOLOv6's three groups.

    Like ``build_optimizer`` it looks at each module's ``weight`` and ``bias`` attributes; trainable
    parameters held under other names (e.g. scale vectors) join the no-decay BN group so that no
    trainable tensor is silently left out of the optimizer. Frozen parameters are skipped.
    """
    bn_w: list[nn.Parameter] = []
    w: list[nn.Parameter] = []
    b: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter) and bias.requires_grad and id(bias) not in seen:
            b.append(bias)
            seen.add(id(bias))
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.requires_grad and id(weight) not in seen:
            (bn_w if isinstance(module, nn.modules.batchnorm._BatchNorm) else w).append(weight)
            seen.add(id(weight))
    bn_w.extend(p for p in model.parameters() if p.requires_grad and id(p) not in seen)
    return bn_w, w, b


def build_optimizer(model: nn.Module, lr0: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD (Nesterov) with YOLOv6's three groups; weight decay only on group 1 (conv/linear weights).

    Every group records ``initial_lr = lr0``, the base that the epoch schedule multiplies.
    """
    bn_w, w, b = param_groups(model)
    optimizer = torch.optim.SGD(
        [
            {"params": bn_w, "weight_decay": 0.0},
            {"params": w, "weight_decay": weight_decay},
            {"params": b, "weight_decay": 0.0},
        ],
        lr=lr0,
        momentum=momentum,
        nesterov=True,
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = lr0
    return optimizer


def set_epoch_lr(optimizer: torch.optim.Optimizer, lr_factor: float) -> None:
    """Post-warm-up LR of an epoch: ``initial_lr * lf(epoch)`` for every group (LambdaLR's effect)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor


def apply_warmup(
    optimizer: torch.optim.Optimizer,
    iteration: int,
    warmup_iters: int,
    lr_factor: float,
    warmup_bias_lr: float,
    warmup_momentum: float,
    momentum: float,
) -> None:
    """Set LR and momentum for ``iteration <= warmup_iters`` by linear interpolation (YOLOv6).

    ``iteration`` counts batches from the start of training. The bias group goes from
    ``warmup_bias_lr`` down to ``initial_lr * lr_factor``, the others from 0 up to it.
    """
    xp = [0, warmup_iters]
    for k, group in enumerate(optimizer.param_groups):
        start = warmup_bias_lr if k == BIAS_GROUP else 0.0
        group["lr"] = float(np.interp(iteration, xp, [start, group["initial_lr"] * lr_factor]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(iteration, xp, [warmup_momentum, momentum]))


def accumulate_at(iteration: int, warmup_iters: int, batch_size: int, nominal_batch: int = 64) -> int:
    """Accumulation at ``iteration``: rises from 1 to ``nominal_batch / batch_size`` over the warm-up."""
    if iteration <= warmup_iters:
        ramp = np.interp(iteration, [0, warmup_iters], [1, nominal_batch / batch_size])
        return max(1, int(np.round(ramp)))
    return accumulate_steps(batch_size, nominal_batch)
