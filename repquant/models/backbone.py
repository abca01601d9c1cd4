"""Backbones: EfficientRep (YOLOv6 N/T/S) and CSPBepBackbone (M/L).

``channels`` and ``repeats`` are the scaled lists of YOLOv6 ``build_network``: 11 channels
(5 backbone + 6 neck) and 9 repeat counts (5 backbone + 4 neck); backbones read indices 0..4.
Forward returns a tuple of feature maps, finest first: ``(C2, C3, C4, C5)`` when ``fuse_p2``
(the BiFPAN necks also take the stride-4 map), else ``(C3, C4, C5)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from repquant.models.blocks import BlockFactory
from repquant.models.layers import CSPSPPF, SPPF, BepC3, RepBlock, SimCSPSPPF, SimSPPF


def _pool_layer(channels: int, conv_silu: bool, cspsppf: bool) -> nn.Module:
    # YOLOv6: SiLU variants with Conv+SiLU blocks (L), ReLU "Sim" variants otherwise.
    if cspsppf:
        return CSPSPPF(channels, channels, 5) if conv_silu else SimCSPSPPF(channels, channels, 5)
    return SPPF(channels, channels, 5) if conv_silu else SimSPPF(channels, channels, 5)


class _Backbone(nn.Module):
    """stem (stride 2) then four stages ``ERBlock_2..5`` of (stride-2 block, stage); SPPF closes stage 5."""

    def __init__(
        self,
        channels: Sequence[int],
        repeats: Sequence[int],
        block: BlockFactory,
        fuse_p2: bool,
        cspsppf: bool,
        conv_silu: bool,
        csp_e: float | None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.fuse_p2 = fuse_p2
        self.stem = block(in_channels, channels[0], 2)
        stages = []
        for i in range(1, 5):
            if csp_e is None:
                body: nn.Module = RepBlock(channels[i], channels[i], repeats[i], block)
            else:
                body = BepC3(
                    channels[i], channels[i], repeats[i], csp_e, block, act="silu" if conv_silu else "relu"
                )
            layers = [block(channels[i - 1], channels[i], 2), body]
            if i == 4:
                layers.append(_pool_layer(channels[4], conv_silu, cspsppf))
            stages.append(nn.Sequential(*layers))
        self.ERBlock_2, self.ERBlock_3, self.ERBlock_4, self.ERBlock_5 = stages

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x: (B, 3, H, W)`` -> feature maps at strides (4,) 8, 16, 32."""
        x = self.ERBlock_2(self.stem(x))
        outputs = [x] if self.fuse_p2 else []
        x = self.ERBlock_3(x)
        outputs.append(x)
        x = self.ERBlock_4(x)
        outputs.append(x)
        outputs.append(self.ERBlock_5(x))
        return tuple(outputs)


class EfficientRep(_Backbone):
    """RepBlock stages (YOLOv6 ``EfficientRep``)."""

    def __init__(
        self,
        channels: Sequence[int],
        repeats: Sequence[int],
        block: BlockFactory,
        fuse_p2: bool = False,
        cspsppf: bool = False,
        conv_silu: bool = False,
    ) -> None:
        super().__init__(channels, repeats, block, fuse_p2, cspsppf, conv_silu, csp_e=None)


class CSPBepBackbone(_Backbone):
    """BepC3 (CSPStackRep) stages with hidden ratio ``csp_e`` (YOLOv6 ``CSPBepBackbone``)."""

    def __init__(
        self,
        channels: Sequence[int],
        repeats: Sequence[int],
        block: BlockFactory,
        csp_e: float,
        fuse_p2: bool = False,
        cspsppf: bool = False,
        conv_silu: bool = False,
    ) -> None:
        super().__init__(channels, repeats, block, fuse_p2, cspsppf, conv_silu, csp_e=csp_e)
