"""Parameter and FLOP counts of the deployed network, comparable to the YOLOv6 README table."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from repquant.reparam import is_deployed, reparameterize


@dataclass(frozen=True)
class ModelProfile:
    """``params``: parameter count; ``gflops``: 1e-9 * 2 * multiply-accumulates for one
    ``(1, 3, img_size, img_size)`` image; ``num_layers``: Conv2d/ConvTranspose2d/Linear layers."""

    params: int
    gflops: float
    img_size: int
    num_layers: int


def model_profile(model: nn.Module, img_size: int = 640) -> ModelProfile:
    """Profile the DEPLOYED form of ``model`` (a re-parameterized copy if needed; ``model`` is untouched).

    FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per MAC for
    convolutions (bias adds, activations, pooling and concatenation are not counted), the same
    convention as YOLOv6's ``thop`` MACs x 2. The forward runs on the meta device: shapes only.
    """
    deployed = model if is_deployed(model) else reparameterize(copy.deepcopy(model))
    params = sum(p.numel() for p in deployed.parameters())
    num_layers = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) for m in deployed.modules())
    meta_model = copy.deepcopy(deployed).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta_model(torch.empty(1, 3, img_size, img_size, device="meta"))
    return ModelProfile(
        params=params, gflops=counter.get_total_flops() / 1e9, img_size=img_size, num_layers=num_layers
    )
