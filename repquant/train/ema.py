"""Exponential moving average of model weights (YOLOv6 ``yolov6/utils/ema.py``, from timm/YOLOv5).

``decay(n) = 0.9999 * (1 - exp(-n / 2000))`` after ``n`` updates: tiny at first so the average follows
the fast-changing early weights, approaching 0.9999 later. Every floating-point entry of the state dict
is averaged, parameters and buffers (BN running statistics) alike; integer buffers are copied.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a ``DistributedDataParallel``/``DataParallel`` wrapper."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model


class ModelEMA:
    """Keeps ``self.ema``, an eval-mode, gradient-free copy of the model averaged over updates."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0,
                 updates: int = 0) -> None:
        self.ema = copy.deepcopy(unwrap(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.max_decay = decay
        self.tau = tau
        self.updates = updates

    def decay(self, updates: int) -> float:
        """Decay used at the ``updates``-th update (1-based)."""
        return self.max_decay * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = d * ema + (1 - d) * model`` for every floating-point tensor of the state dict."""
        self.updates += 1
        d = self.decay(self.updates)
        source = unwrap(model).state_dict()
        for name, item in self.ema.state_dict().items():
            if item.dtype.is_floating_point:
                item.mul_(d).add_(source[name].detach(), alpha=1 - d)
            else:
                item.copy_(source[name])

    def state_dict(self) -> dict:
        """``{"ema": state dict, "updates": int}``: tensors and ints only (``weights_only`` loadable)."""
        return {"ema": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.updates = int(state["updates"])
