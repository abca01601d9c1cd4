"""Composite layers of the YOLOv6 family built from the 3x3 blocks of ``repquant.models.blocks``: stages
(RepBlock, BepC3), the BiFusion neck join, the upsampling transpose and the SPPF variants (facts from
YOLOv6 ``yolov6/layers/common.py``; code our own). Tensors are ``(B, C, H, W)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repquant.models.blocks import BlockFactory, ConvBNAct


class BottleRep(nn.Module):
    """Two basic blocks with an (optionally learnable-weight) residual: ``conv2(conv1(x)) + alpha * x``."""

    def __init__(
        self, in_channels: int, out_channels: int, block: BlockFactory, weight: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = block(in_channels, out_channels, 1)
        self.conv2 = block(out_channels, out_channels, 1)
        self.shortcut = in_channels == out_channels
        # YOLOv6 keeps a learnable scalar alpha in the deployed model too (one parameter per block).
        self.alpha = nn.Parameter(torch.ones(1)) if weight else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        if not self.shortcut:
            return out
        return out + (x if self.alpha is None else self.alpha * x)


class RepBlock(nn.Module):
    """A stage of ``n`` blocks; with ``bottle=True``, of ``n // 2`` weighted BottleReps (CSPStackRep)."""

    def __init__(
        self, in_channels: int, out_channels: int, n: int, block: BlockFactory, bottle: bool = False
    ) -> None:
        super().__init__()
        if bottle:
            n = max(n // 2, 1)

            def make(cin: int, cout: int) -> nn.Module:
                return BottleRep(cin, cout, block, weight=True)
        else:

            def make(cin: int, cout: int) -> nn.Module:
                return block(cin, cout, 1)

        self.conv1 = make(in_channels, out_channels)
        self.block = (
            nn.Sequential(*(make(out_channels, out_channels) for _ in range(n - 1))) if n > 1 else None
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return x if self.block is None else self.block(x)


class BepC3(nn.Module):
    """CSPStackRep: ``cv3(cat(m(cv1(x)), cv2(x)))`` with hidden width ``int(out_channels * e)``."""

    def __init__(
        self, in_channels: int, out_channels: int, n: int, e: float, block: BlockFactory, act: str = "relu"
    ) -> None:
        super().__init__()
        hidden = int(out_channels * e)
        self.cv1 = ConvBNAct(in_channels, hidden, 1, 1, act=act)
        self.cv2 = ConvBNAct(in_channels, hidden, 1, 1, act=act)
        self.cv3 = ConvBNAct(2 * hidden, out_channels, 1, 1, act=act)
        self.m = RepBlock(hidden, hidden, n, block, bottle=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class Transpose(nn.Module):
    """2x upsampling by ConvTranspose2d(k=2, s=2) with bias, as YOLOv6 (not nearest interpolation)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample_transpose = nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample_transpose(x)


class BiFusion(nn.Module):
    """BiC (YOLOv6 v3 Sec. 2.1): fuse the upsampled top feature with this level and the level below.

    ``forward([top, current, below])``: ``top`` has ``out_channels`` channels at half resolution,
    ``current`` has ``in_channels[0]``, ``below`` has ``in_channels[1]`` at twice the resolution.
    """

    def __init__(self, in_channels: tuple[int, int], out_channels: int) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(in_channels[0], out_channels, 1, 1)
        self.cv2 = ConvBNAct(in_channels[1], out_channels, 1, 1)
        self.cv3 = ConvBNAct(out_channels * 3, out_channels, 1, 1)
        self.upsample = Transpose(out_channels, out_channels)
        self.downsample = ConvBNAct(out_channels, out_channels, 3, 2)

    def forward(self, x: list[Tensor]) -> Tensor:
        top = self.upsample(x[0])
        current = self.cv1(x[1])
        below = self.downsample(self.cv2(x[2]))
        return self.cv3(torch.cat((top, current, below), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools (SPPF with SiLU, SimSPPF with ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, act: str = "silu") -> None:
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBNAct(in_channels, hidden, 1, 1, act=act)
        self.cv2 = ConvBNAct(hidden * 4, out_channels, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), dim=1))


class SimSPPF(SPPF):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5) -> None:
        super().__init__(in_channels, out_channels, kernel_size, act="relu")


class CSPSPPF(nn.Module):
    """CSP version of SPPF (YOLOv6 v3): pooled path cv1-cv3-cv4-pool-cv5-cv6, bypass cv2, merge cv7."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 5, e: float = 0.5, act: str = "silu"
    ) -> None:
        super().__init__()
        hidden = int(out_channels * e)
        self.cv1 = ConvBNAct(in_channels, hidden, 1, 1, act=act)
        self.cv2 = ConvBNAct(in_channels, hidden, 1, 1, act=act)
        self.cv3 = ConvBNAct(hidden, hidden, 3, 1, act=act)
        self.cv4 = ConvBNAct(hidden, hidden, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)
        self.cv5 = ConvBNAct(4 * hidden, hidden, 1, 1, act=act)
        self.cv6 = ConvBNAct(hidden, hidden, 3, 1, act=act)
        self.cv7 = ConvBNAct(2 * hidden, out_channels, 1, 1, act=act)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y0 = self.cv2(x)
        y1 = self.m(x1)
        y2 = self.m(y1)
        y3 = self.cv6(self.cv5(torch.cat((x1, y1, y2, self.m(y2)), dim=1)))
        return self.cv7(torch.cat((y0, y3), dim=1))


class SimCSPSPPF(CSPSPPF):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, e: float = 0.5) -> None:
        super().__init__(in_channels, out_channels, kernel_size, e, act="relu")
