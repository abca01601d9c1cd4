"""Building blocks of the YOLOv6 family (facts from YOLOv6 ``yolov6/layers/common.py``; code our own).

Every block that can collapse for deployment implements the protocol method ``reparameterize()``
(in place, idempotent) and exposes ``deployed: bool``. RepVGG-style blocks (all four training forms)
deploy to the SAME module layout: ``rbr_reparam`` (3x3 conv with bias) followed by ReLU, so a model
deploys to one graph whatever its ``block_mode``.

Tensors are ``(B, C, H, W)``. BN uses eps 1e-3, momentum 0.03 as YOLOv6 ``initialize_weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

from repquant.errors import ModelError
from repquant.reparam import avg_pool_kernel, fuse_conv_bn, identity_kernel, merge_branches, pad_kernel

BN_EPS = 1e-3
BN_MOMENTUM = 0.03

BlockFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> block
# (in_channels, out_channels, stride, groups) -> block: a block mode's constructor
BlockMaker = Callable[[int, int, int, int], nn.Module]
_Maker = TypeVar("_Maker", bound=BlockMaker)
_BLOCK_MODES: dict[str, BlockMaker] = {}


def register_block_mode(name: str) -> Callable[[_Maker], _Maker]:
    """Decorator: make ``maker(in_channels, out_channels, stride, groups)`` the 3x3 block of ``block_mode``
    ``name`` (also add the name to ``repquant.vocab.BLOCK_MODES``, the CLI's list)."""

    def add(maker: _Maker) -> _Maker:
        if name in _BLOCK_MODES:
            raise ModelError(f"block mode registry: {name!r} is registered twice")
        _BLOCK_MODES[name] = maker
        return maker

    return add


def block_mode_names() -> tuple[str, ...]:
    """Registered block modes, in registration order."""
    return tuple(_BLOCK_MODES)


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
        src.stride,  # type: ignore[arg-type]  # Conv2d stores the tuple it was given
        k // 2,
        groups=src.groups,
        bias=True,
        device="meta",
        dtype=kernel.dtype,
    ).to_empty(device=kernel.device)
    conv.weight.copy_(kernel)
    assert conv.bias is not None  # built with bias=True
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


@register_block_mode("repvgg")
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


@register_block_mode("qarepvgg")
class QARepVGGBlock(_RepStyleBlock):
    """Quantization-aware RepVGG (Chu et al. 2022, arXiv 2212.01593; YOLOv6 v3 ``QARepVGGBlock``).

    ReLU(BN(BN3(conv3x3(x)) + conv1x1(x) + x)): the 1x1 and identity branches carry no BN, one BN
    after the sum, which keeps the fused weight distribution quantization friendly.
    """

    _train_attrs: tuple[str, ...] = ("conv3x3", "bn3x3", "conv1x1", "bn")

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


@register_block_mode("qarepvggv2")
class QARepVGGBlockV2(QARepVGGBlock):
    """QARepVGG with a 3x3 average-pool branch wherever the identity branch exists (the block of YOLOv6's
    ``configs/qarepvgg`` models, ``training_mode='qarepvggv2'``): ReLU(BN(BN3(conv3x3(x)) + conv1x1(x) + x +
    avgpool3x3(x))). The pool has no weights, so the state dict equals ``qarepvgg``'s: only the block mode
    tells the two apart."""

    _train_attrs = ("conv3x3", "bn3x3", "conv1x1", "bn", "avg")

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride, groups)
        self.avg = nn.AvgPool2d(3, 1, 1) if self.has_identity else None

    def _forward_train(self, x: Tensor) -> Tensor:
        out = self.bn3x3(self.conv3x3(x)) + self.conv1x1(x)
        if self.avg is not None:
            out = out + x + self.avg(x)
        return self.bn(out)

    def _equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        branches = [_bn_fold(self.conv3x3.weight, None, self.bn3x3), (self.conv1x1.weight, None)]
        if self.has_identity:
            like = self.conv3x3.weight
            branches.append((self._identity(like), None))
            branches.append((avg_pool_kernel(self.in_channels, self.groups, 3, like.dtype, like.device), None))
        kernel, bias = merge_branches(branches)
        return _bn_fold(kernel, bias, self.bn)


@register_block_mode("repopt")
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


@register_block_mode("hyper_search")
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


@register_block_mode("conv_silu")
def conv_silu_block(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Module:
    """The plain Conv+BN+SiLU 3x3 block of YOLOv6-L (official ``training_mode conv_silu``)."""
    return ConvBNAct(in_channels, out_channels, 3, stride, groups, act="silu")


def block_factory(block_mode: str, groups: int = 1) -> BlockFactory:
    """The 3x3 building block for ``block_mode`` (YOLOv6 ``get_block(training_mode)``)."""
    if block_mode not in _BLOCK_MODES:
        raise ModelError(f"block_mode {block_mode!r}: expected one of {', '.join(_BLOCK_MODES)}")
    maker = _BLOCK_MODES[block_mode]

    def make(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
        return maker(in_channels, out_channels, stride, groups)

    return make
