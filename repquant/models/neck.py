"""Necks: RepPAN / CSPRepPAN (YOLOv6 v2) and RepBiFPAN / CSPRepBiFPAN (v3, BiC fusion).

Indices into ``channels`` (11 scaled entries) and ``repeats`` (9) follow YOLOv6 ``build_network``:
backbone C2..C5 are ``channels[1..4]``, neck widths ``channels[5..10]``, neck repeats ``repeats[5..8]``.
``forward(features)`` returns the tuple ``(P3, P4, P5)`` with ``channels[6], channels[8],
channels[10]`` channels at strides 8, 16, 32: the hook point for channel-wise distillation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from repquant.models.blocks import BlockFactory, ConvBNAct
from repquant.models.layers import BepC3, BiFusion, RepBlock, Transpose


def _stage_factory(block: BlockFactory, csp_e: float | None, conv_silu: bool):
    """RepBlock stages, or BepC3 stages when ``csp_e`` is given (the CSP necks)."""

    def make(cin: int, cout: int, n: int) -> nn.Module:
        if csp_e is None:
            return RepBlock(cin, cout, n, block)
        return BepC3(cin, cout, n, csp_e, block, act="silu" if conv_silu else "relu")

    return make


class RepPANNeck(nn.Module):
    """PAN with transposed-conv upsampling (YOLOv6 ``RepPANNeck``; ``CSPRepPANNeck`` with ``csp_e``)."""

    def __init__(
        self,
        channels: Sequence[int],
        repeats: Sequence[int],
        block: BlockFactory,
        csp_e: float | None = None,
        conv_silu: bool = False,
    ) -> None:
        super().__init__()
        ch, n = channels, repeats
        stage = _stage_factory(block, csp_e, conv_silu)
        self.reduce_layer0 = ConvBNAct(ch[4], ch[5], 1, 1)
        self.upsample0 = Transpose(ch[5], ch[5])
        self.Rep_p4 = stage(ch[3] + ch[5], ch[5], n[5])
        self.reduce_layer1 = ConvBNAct(ch[5], ch[6], 1, 1)
        self.upsample1 = Transpose(ch[6], ch[6])
        self.Rep_p3 = stage(ch[2] + ch[6], ch[6], n[6])
        self.downsample2 = ConvBNAct(ch[6], ch[7], 3, 2)
        self.Rep_n3 = stage(ch[6] + ch[7], ch[8], n[7])
        self.downsample1 = ConvBNAct(ch[8], ch[9], 3, 2)
        self.Rep_n4 = stage(ch[5] + ch[9], ch[10], n[8])

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``features = (C3, C4, C5)`` -> ``(P3, P4, P5)``."""
        x2, x1, x0 = features
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(torch.cat((self.upsample0(fpn_out0), x1), dim=1))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(torch.cat((self.upsample1(fpn_out1), x2), dim=1))
        pan_out1 = self.Rep_n3(torch.cat((self.downsample2(pan_out2), fpn_out1), dim=1))
        pan_out0 = self.Rep_n4(torch.cat((self.downsample1(pan_out1), fpn_out0), dim=1))
        return pan_out2, pan_out1, pan_out0


class CSPRepPANNeck(RepPANNeck):
    """RepPAN with BepC3 stages (YOLOv6 v2 M/L)."""

    def __init__(
        self,
        channels: Sequence[int],
        repeats: Sequence[int],
        block: BlockFactory,
        csp_e: float,
        conv_silu: bool = False,
    ) -> None:
        super().__init__(channels, repeats, block, csp_e, conv_silu)


class RepBiFPANNeck(nn.Module):
    """PAN whose top-down fusions are BiC blocks that also see the next finer backbone level (v3)."""

    def __init__(
        self,
        channels: Sequence[int],
        repeats: Sequence[int],
        block: BlockFactory,
        csp_e: float | None = None,
        conv_silu: bool = False,
    ) -> None:
        super().__init__()
        ch, n = channels, repeats
        stage = _stage_factory(block, csp_e, conv_silu)
        self.reduce_layer0 = ConvBNAct(ch[4], ch[5], 1, 1)
        self.Bifusion0 = BiFusion((ch[3], ch[2]), ch[5])
        self.Rep_p4 = stage(ch[5], ch[5], n[5])
        self.reduce_layer1 = ConvBNAct(ch[5], ch[6], 1, 1)
        self.Bifusion1 = BiFusion((ch[2], ch[1]), ch[6])
        self.Rep_p3 = stage(ch[6], ch[6], n[6])
        self.downsample2 = ConvBNAct(ch[6], ch[7], 3, 2)
        self.Rep_n3 = stage(ch[6] + ch[7], ch[8], n[7])
        self.downsample1 = ConvBNAct(ch[8], ch[9], 3, 2)
        self.Rep_n4 = stage(ch[5] + ch[9], ch[10], n[8])

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``features = (C2, C3, C4, C5)`` -> ``(P3, P4, P5)``."""
        x3, x2, x1, x0 = features
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(self.Bifusion0([fpn_out0, x1, x2]))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(self.Bifusion1([fpn_out1, x2, x3]))
        pan_out1 = self.Rep_n3(torch.cat((self.downsample2(pan_out2), fpn_out1), dim=1))
        pan_out0 = self.Rep_n4(torch.cat((self.downsample1(pan_out1), fpn_out0), dim=1))
        return pan_out2, pan_out1, pan_out0


class CSPRepBiFPANNeck(RepBiFPANNeck):
    """RepBiFPAN with BepC3 stages (YOLOv6 v3 M/L)."""

    def __init__(
        self,
        channels: Sequence[int],
        repeats: Sequence[int],
        block: BlockFactory,
        csp_e: float,
        conv_silu: bool = False,
    ) -> None:
        super().__init__(channels, repeats, block, csp_e, conv_silu)
