"""Small stand-in modules shared by the quantization tests."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """conv-relu-conv-relu plus a scaled skip: the residual add a skip quantizer is placed on."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.alpha = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x)))) + self.alpha * x
