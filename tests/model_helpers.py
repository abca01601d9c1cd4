"""Model helpers shared by the re-parameterization and official-checkpoint tests."""

from __future__ import annotations

import torch
from torch import nn

from repquant.models.blocks import ScaleLayer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output scale max |a|."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize(model: nn.Module, x: torch.Tensor | list[torch.Tensor], seed: int = 0) -> None:
    """Non-trivial BN statistics and affine, random branch scales, random head preds and alphas.

    Running statistics are first set from a train-mode pass over ``x`` (so activations keep a unit
    scale through the deep network), then perturbed at random: what folding must reproduce is the
    eval-mode BN with arbitrary statistics, not batch statistics.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype

    def rand(shape, lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    # Scales and residual weights first: the BN statistics below must see the activations they cause.
    for module in model.modules():
        if isinstance(module, ScaleLayer):
            module.weight.copy_(rand(module.weight.shape, 0.3, 1.5))
    for name, param in model.named_parameters():
        if name.endswith("alpha"):
            param.copy_(rand(param.shape, 0.5, 1.5))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, the batch statistics
    model.train()
    model(x)
    for bn in bns:
        c = bn.num_features
        bn.running_mean.add_(rand(c, -0.3, 0.3) * bn.running_var.sqrt())
        bn.running_var.mul_(rand(c, 0.7, 1.4))
        bn.weight.copy_(rand(c, 0.5, 1.5))
        bn.bias.copy_(rand(c, -0.3, 0.3))
    for name, module in model.named_modules():
        if name.startswith("head.") and ("cls_preds." in name or "reg_preds." in name):
            bound = module.in_channels**-0.5
            module.weight.copy_(rand(module.weight.shape, -bound, bound) * 3)
            module.bias.copy_(rand(module.bias.shape, -1, 1))
    model.eval()
