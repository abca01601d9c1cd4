"""Building blocks of the YOLOv6 family (facts from YOLOv6 ``yolov6/layers/common.py``; code our own).

Every block that can collapse for deployment implements the protocol method ``reparameterize()``
(in place, idempotent) and exposes ``deployed: bool``. RepVGG-style blocks (all four training forms)
deploy to the SAME module layout: ``rbr_reparam`` (3x3 conv with bias) followed by ReLU, so a model
deploys to one graph whatever its ``block_mode``.

Tensors are ``(B, C, H, W)``. BN uses eps 1e-3, momentum 0.03 as YOLOv6 ``initialize_weights``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from repquant.errors import ModelError
from repquant.reparam import fuse_conv_bn, identity_kernel, merge_branches, pad_kernel

BN_EPS = 1e-3
BN_MOMENTUM = 0.03
BLOCK_MODES = ("repvgg", "qarepvgg", "repopt", "hyper_search", "conv_silu")

BlockFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> block


def make_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def make_act(act: str) -> nn.Module:
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "silu":
        return nn.SiLU(inplace=True)
    if act == "none":
        return nn.Identity()
    raise ModelError(f"activation {act!r}: expected one of relu, silu, none")


def _bn_fold(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    assert bn.running_mean is not None and bn.running_var is not None
    return fuse_conv_bn(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _new_conv(src: nn.Conv2d, kernel: Tensor, bias: Tensor) -> nn.Conv2d:
    """A conv with ``src``'s geometry (and the kernel's size), holding ``kernel`` and ``bias``."""
    k = kernel.shape[-1]
    # Built on meta then materialized empty: skips a throwaway random init of large kernels.
    conv = nn.Conv2d(
        src.in_channels,
        src.out_channels,
        k,
        src.stride,
        k // 2,
        groups=src.groups,
        bias=True,
        device="meta",
        dtype=kernel.dtype,
    ).to_empty(device=kernel.device)
    conv.weight.copy_(kernel)
    conv.bias.copy_(bias)
    return conv


class ConvBNAct(nn.Module):
    """Conv (no bias) + BN + activation; ``reparameterize()`` folds the BN into the conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        self.bn: nn.BatchNorm2d | None = make_bn(out_channels)
        self.act = make_act(act)

    @property
    def deployed(self) -> bool:
        return self.bn is None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.bn is None:
            return
        kernel, bias = _bn_fold(self.conv.weight, self.conv.bias, self.bn)
        self.conv = _new_conv(self.conv, kernel, bias)
        self.bn = None


class _RepStyleBlock(nn.Module):
    """Shared deployed form of the RepVGG-style blocks: ``rbr_reparam`` 3x3 conv with bias + ReLU.

    Subclasses build their training branches, implement ``_forward_train`` and
    ``_equivalent_kernel_bias`` and list their training-only attributes in ``_train_attrs``.
    """

    _train_attrs: tuple[str, ...] = ()

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ModelError(
                f"{type(self).__name__}: channels {in_channels}->{out_channels} "
                f"not divisible by groups={groups}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.groups = stride, groups
        self.has_identity = in_channels == out_channels and stride == 1
        self.act = nn.ReLU(inplace=True)
        self.rbr_reparam: nn.Conv2d | None = None

    @property
    def deployed(self) -> bool:
        return self.rbr_reparam is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.rbr_reparam is not None:
            return self.act(self.rbr_reparam(x))
        return self.act(self._forward_train(x))

    def _forward_train(self, x: Tensor) -> Tensor:  # pre-activation output
        raise NotImplementedError

    def _equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _identity(self, like: Tensor) -> Tensor:
        return identity_kernel(self.in_channels, self.groups, 3, dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.rbr_reparam is not None:
            return
        kernel, bias = self._equivalent_kernel_bias()
        geometry = nn.Conv2d(
            self.in_channels, self.out_channels, 3, self.stride, 1, groups=self.groups, device="meta"
        )
        self.rbr_reparam = _new_conv(geometry, kernel, bias)
        for name in self._train_attrs:
            delattr(self, name)


class RepVGGBlock(_RepStyleBlock):
    """ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)); the identity branch only when in == out, stride 1."""

    _train_attrs = ("conv3x3", "bn3x3", "conv1x1", "bn1x1", "bn_identity")

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride, groups)
        self.conv3x3 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=False)
        self.bn3x3 = make_bn(out_channels)
        self.conv1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups, bias=False)
        self.bn1x1 = make_bn(out_channels)
        self.bn_identity = make_bn(in_channels) if self.has_identity else None

    def _forward_train(self, x: Tensor) -> Tensor:
        out = self.bn3x3(self.conv3x3(x)) + self.bn1x1(self.conv1x1(x))
        if self.bn_identity is not None:
            out = out + self.bn_identity(x)
        return out

    def _equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        branches = [
            _bn_fold(self.conv3x3.weight, None, self.bn3x3),
            _bn_fold(self.conv1x1.weight, None, self.bn1x1),
        ]
        if self.bn_identity is not None:
            branches.append(_bn_fold(self._identity(self.conv3x3.weight), None, self.bn_identity))
        return merge_branches(branches)


class QARepVGGBlock(_RepStyleBlock):
    """Quantization-aware RepVGG (Chu et al. 2022, arXiv 2212.01593; YOLOv6 v3 ``QARepVGGBlock``).

    ReLU(BN(BN3(conv3x3(x)) + conv1x1(x) + x)): the 1x1 and identity branches carry no BN, one BN
    after the sum, which keeps the fused weight distribution quantization friendly.
    """

    _train_attrs = ("conv3x3", "bn3x3", "conv1x1", "bn")

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride, groups)
        self.conv3x3 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=False)
        self.bn3x3 = make_bn(out_channels)
        self.conv1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups, bias=False)
        self.bn = make_bn(out_channels)

    def _forward_train(self, x: Tensor) -> Tensor:
        out = self.bn3x3(self.conv3x3(x)) + self.conv1x1(x)
        if self.has_identity:
            out = out + x
        return self.bn(out)

    def _equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        branches = [_bn_fold(self.conv3x3.weight, None, self.bn3x3), (self.conv1x1.weight, None)]
        if self.has_identity:
            branches.append((self._identity(self.conv3x3.weight), None))
        kernel, bias = merge_branches(branches)
        return _bn_fold(kernel, bias, self.bn)


class RealVGGBlock(_RepStyleBlock):
    """ReLU(BN(conv3x3(x))): the plain block trained by RepOptimizer (Ding et al. 2022, 2205.15242)."""

    _train_attrs = ("conv", "bn")

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride, groups)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=False)
        self.bn = make_bn(out_channels)

    def _forward_train(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def _equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        return _bn_fold(self.conv.weight, None, self.bn)


class ScaleLayer(nn.Module):
    """Per-channel trainable scale ``x * weight[c]`` (no bias), as YOLOv6 ``ScaleLayer(use_bias=False)``."""

    def __init__(self, channels: int, init: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1)


class LinearAddBlock(_RepStyleBlock):
    """RepOpt hyper-search block: ReLU(BN(s_conv*conv3x3(x) + s_1x1*conv1x1(x) [+ s_id*x])).

    The trained scales become the RepOptimizer gradient masks (REFERENCE.md, RepOpt section).
    Parameter names follow YOLOv6 (``scale_conv``, ``scale_1x1``, ``scale_identity``) so scales can
    be matched to RealVGGBlock layers by name.
    """

    _train_attrs = ("conv", "scale_conv", "conv_1x1", "scale_1x1", "scale_identity", "bn")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        conv_scale_init: float = 1.0,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, groups)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=False)
        self.scale_conv = ScaleLayer(out_channels, conv_scale_init)
        self.conv_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups, bias=False)
        self.scale_1x1 = ScaleLayer(out_channels, conv_scale_init)
        self.scale_identity = ScaleLayer(out_channels, 1.0) if self.has_identity else None
        self.bn = make_bn(out_channels)

    def _forward_train(self, x: Tensor) -> Tensor:
        out = self.scale_conv(self.conv(x)) + self.scale_1x1(self.conv_1x1(x))
        if self.scale_identity is not None:
            out = out + self.scale_identity(x)
        return self.bn(out)

    def _equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        def scaled(kernel: Tensor, scale: ScaleLayer) -> Tensor:
            return kernel * scale.weight.view(-1, 1, 1, 1)

        branches: list[tuple[Tensor, Tensor | None]] = [
            (scaled(self.conv.weight, self.scale_conv), None),
            (scaled(pad_kernel(self.conv_1x1.weight), self.scale_1x1), None),
        ]
        if self.scale_identity is not None:
            branches.append((scaled(self._identity(self.conv.weight), self.scale_identity), None))
        kernel, bias = merge_branches(branches)
        return _bn_fold(kernel, bias, self.bn)


def block_factory(block_mode: str, groups: int = 1) -> BlockFactory:
    """The 3x3 building block for ``block_mode`` (YOLOv6 ``get_block(training_mode)``).

    ``conv_silu`` is the plain Conv+BN+SiLU used by YOLOv6-L ("training_mode conv_silu").
    """
    classes: dict[str, type[_RepStyleBlock]] = {
        "repvgg": RepVGGBlock,
        "qarepvgg": QARepVGGBlock,
        "repopt": RealVGGBlock,
        "hyper_search": LinearAddBlock,
    }
    if block_mode == "conv_silu":
        return lambda cin, cout, stride=1: ConvBNAct(cin, cout, 3, stride, groups, act="silu")
    if block_mode not in classes:
        raise ModelError(f"block_mode {block_mode!r}: expected one of {', '.join(BLOCK_MODES)}")
    cls = classes[block_mode]
    return lambda cin, cout, stride=1: cls(cin, cout, stride, groups)


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
