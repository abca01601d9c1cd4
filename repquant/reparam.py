"""Structural re-parameterization: the math once, as pure tensor functions, plus the model walk.

A RepVGG-style block trains several linear branches (3x3 conv+BN, 1x1 conv+BN, identity BN) whose
sum is itself one 3x3 convolution with bias (RepVGG, Ding et al. 2021, Sec. 3.3). Every block that
can collapse implements ONE protocol method, ``reparameterize()``, which rewrites it in place using
the functions below. ``reparameterize(model)`` only walks the modules and calls that method.

Kernels are ``(out_channels, in_channels // groups, k, k)`` tensors; biases ``(out_channels,)``.
All functions keep the dtype and device of their inputs, so float64 checks are exact to ~1e-12.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

_M = TypeVar("_M", bound=nn.Module)

__all__ = [
    "fuse_conv_bn",
    "pad_kernel",
    "identity_kernel",
    "avg_pool_kernel",
    "merge_branches",
    "reparameterize",
    "is_deployed",
]


def fuse_conv_bn(
    weight: Tensor,
    bias: Tensor | None,
    bn_mean: Tensor,
    bn_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it.

    ``BN(conv(x)) = t * (W x + b - mean) + beta`` with ``t = gamma / sqrt(var + eps)``, so the fused
    conv has ``W' = t * W`` (per output channel) and ``b' = beta + t * (b - mean)``.

    Args:
        weight: conv kernel ``(C_out, C_in/g, k, k)``.
        bias: conv bias ``(C_out,)`` or None (treated as zero).
        bn_mean, bn_var: running statistics ``(C_out,)``.
        bn_weight, bn_bias: affine gamma/beta ``(C_out,)``, None for a non-affine BN (1 and 0).
        eps: the BN epsilon.

    Returns:
        ``(kernel, bias)`` of the equivalent conv.
    """
    gamma = torch.ones_like(bn_mean) if bn_weight is None else bn_weight
    beta = torch.zeros_like(bn_mean) if bn_bias is None else bn_bias
    t = gamma / torch.sqrt(bn_var + eps)
    conv_bias = torch.zeros_like(bn_mean) if bias is None else bias
    fused_weight = weight * t.reshape(-1, *([1] * (weight.dim() - 1)))
    fused_bias = beta + (conv_bias - bn_mean) * t
    return fused_weight, fused_bias


def pad_kernel(kernel: Tensor, kernel_size: int = 3) -> Tensor:
    """Zero-pad a ``(C_out, C_in/g, k, k)`` kernel to ``kernel_size`` around its centre.

    A 1x1 conv with padding 0 equals a 3x3 conv with padding 1 whose only non-zero tap is the centre,
    provided both have the same stride (true for every RepVGG-style block).
    """
    k = kernel.shape[-1]
    if kernel.shape[-2] != k or (kernel_size - k) % 2 != 0 or k > kernel_size:
        raise ValueError(f"pad_kernel: cannot centre a {tuple(kernel.shape[-2:])} kernel in {kernel_size}")
    p = (kernel_size - k) // 2
    return torch.nn.functional.pad(kernel, [p, p, p, p])


def identity_kernel(
    channels: int,
    groups: int = 1,
    kernel_size: int = 3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``(channels, channels // groups, k, k)`` kernel of the identity map.

    Output channel ``i`` belongs to group ``i // (channels // groups)``, where it sees input channel
    ``i`` at local index ``i % (channels // groups)``: a one at the kernel centre there.
    """
    if channels % groups != 0:
        raise ValueError(f"identity_kernel: {channels} channels not divisible by {groups} groups")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    idx = torch.arange(channels, device=kernel.device)
    kernel[idx, idx % per_group, kernel_size // 2, kernel_size // 2] = 1
    return kernel


def avg_pool_kernel(
    channels: int,
    groups: int = 1,
    kernel_size: int = 3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``(channels, channels // groups, k, k)`` kernel of a k x k average pool with stride 1, padding k // 2
    and zero padding counted (``nn.AvgPool2d`` defaults): ``1 / k^2`` on every tap of each channel's own input.
    """
    if channels % groups != 0:
        raise ValueError(f"avg_pool_kernel: {channels} channels not divisible by {groups} groups")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    idx = torch.arange(channels, device=kernel.device)
    kernel[idx, idx % per_group] = 1.0 / kernel_size**2
    return kernel


def merge_branches(
    branches: Sequence[tuple[Tensor, Tensor | None]], kernel_size: int = 3
) -> tuple[Tensor, Tensor]:
    """Sum parallel linear branches (same input, same stride) into one conv.

    Each branch is ``(kernel, bias)``; smaller kernels are centre-padded to ``kernel_size``.
    A None bias counts as zero. Returns ``(kernel, bias)``.
    """
    if not branches:
        raise ValueError("merge_branches: no branches to merge")
    first = branches[0][0]
    kernel = torch.zeros(
        first.shape[0], first.shape[1], kernel_size, kernel_size, dtype=first.dtype, device=first.device
    )
    bias = torch.zeros(first.shape[0], dtype=first.dtype, device=first.device)
    for branch_kernel, branch_bias in branches:
        kernel = kernel + pad_kernel(branch_kernel, kernel_size)
        if branch_bias is not None:
            bias = bias + branch_bias
    return kernel, bias


def _bn_branch(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``fuse_conv_bn`` with the statistics read from a BatchNorm2d module."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics")
    return fuse_conv_bn(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def reparameterize(model: _M) -> _M:
    """Collapse every block of ``model`` into its deployed form, in place, and return ``model``.

    Calls ``reparameterize()`` on every sub-module that defines it (RepVGG-style blocks become one
    conv with bias plus activation; ConvBNAct folds its BN). The model is put in eval mode first:
    folding uses the BN running statistics, exactly what eval-mode BN computes.
    """
    model.eval()
    with torch.no_grad():
        # Snapshot first: blocks replace their own children while we iterate.
        for module in list(model.modules()):
            method = getattr(module, "reparameterize", None)
            if callable(method):
                method()
    return model


def is_deployed(model: nn.Module) -> bool:
    """True when no BatchNorm and no un-collapsed block is left in ``model``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return False
        if callable(getattr(module, "reparameterize", None)) and not getattr(module, "deployed", True):
            return False
    return True
