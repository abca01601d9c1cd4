"""Efficient decoupled head (raw tensors) and box decoding (functions, plus an export wrapper).

The head never decodes: ``forward`` returns ``(cls_logits (B, A, nc), reg_dist (B, A, 4*(reg_max+1)))``
with anchors ordered level by level (stride 8, 16, 32), row-major inside a level.
Decoding (``decode_boxes``) follows YOLOv6 ``dist2bbox``: ``x1y1 = anchor - lt``, ``x2y2 = anchor + rb``
with distances in units of the level stride; for ``reg_max > 0`` the distances are the expectation
of a softmax over ``reg_max + 1`` bins with values ``0..reg_max`` (DFL, Li et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from repquant.errors import ModelError
from repquant.models.blocks import ConvBNAct

PRIOR_PROB = 1e-2


class EffiDeHead(nn.Module):
    """Per level: 1x1 stem, 3x3 cls conv, 3x3 reg conv (Conv+BN+SiLU), 1x1 cls pred, 1x1 reg pred."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, reg_max: int) -> None:
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.stems = nn.ModuleList(ConvBNAct(c, c, 1, 1, act="silu") for c in in_channels)
        self.cls_convs = nn.ModuleList(ConvBNAct(c, c, 3, 1, act="silu") for c in in_channels)
        self.reg_convs = nn.ModuleList(ConvBNAct(c, c, 3, 1, act="silu") for c in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, 4 * (reg_max + 1), 1) for c in in_channels)
        self.initialize_biases()

    @torch.no_grad()
    def initialize_biases(self) -> None:
        """YOLOv6 init: zero pred weights, cls bias at prior 0.01, reg bias 1."""
        convs: list[Any] = [*self.cls_preds, *self.reg_preds]
        for i, conv in enumerate(convs):
            conv.weight.zero_()
            conv.bias.fill_(-math.log((1 - PRIOR_PROB) / PRIOR_PROB) if i < len(self.cls_preds) else 1.0)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Neck outputs ``(P3, P4, P5)`` -> ``(cls_logits (B, A, nc), reg_dist (B, A, 4*(R+1)))``."""
        cls_list, reg_list = [], []
        for i, feat in enumerate(features):
            x = self.stems[i](feat)
            cls_out = self.cls_preds[i](self.cls_convs[i](x))
            reg_out = self.reg_preds[i](self.reg_convs[i](x))
            cls_list.append(cls_out.flatten(2).permute(0, 2, 1))
            reg_list.append(reg_out.flatten(2).permute(0, 2, 1))
        return torch.cat(cls_list, dim=1), torch.cat(reg_list, dim=1)


def make_anchors(
    img_hw: tuple[int, int],
    strides: Sequence[int] = (8, 16, 32),
    offset: float = 0.5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Anchor centres for an ``img_hw`` input.

    Returns ``anchor_points (A, 2)`` as (x, y) input pixels ``((col + offset) * s, (row + offset) * s)``
    and ``stride_tensor (A, 1)``, level by level, row-major inside a level.
    """
    points, stride_list = [], []
    for s in strides:
        h, w = img_hw[0] // s, img_hw[1] // s
        ys = (torch.arange(h, dtype=dtype, device=device) + offset) * s
        xs = (torch.arange(w, dtype=dtype, device=device) + offset) * s
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2))
        stride_list.append(torch.full((h * w, 1), float(s), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_list)


class DFLProjection(nn.Module):
    """DFL expectation: softmax over ``reg_max + 1`` bins, then dot with the fixed values ``0..reg_max``.

    A constant projection, not a learned layer: quantizers must leave it in float (it is a matmul
    with a buffer, not a Conv2d, and lives at the name ``dfl_proj`` in ``DecodedDetector``).
    """

    def __init__(self, reg_max: int) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.proj: Tensor
        self.register_buffer("proj", torch.arange(reg_max + 1, dtype=torch.float32), persistent=False)

    def forward(self, reg_dist: Tensor) -> Tensor:
        """``(B, A, 4*(reg_max+1))`` logits -> ``(B, A, 4)`` distances in stride units."""
        b, a, _ = reg_dist.shape
        probs = reg_dist.reshape(b, a, 4, self.reg_max + 1).softmax(dim=-1)
        return probs @ self.proj.to(probs.dtype)


def dist_to_boxes(dist: Tensor, anchor_points: Tensor, stride_tensor: Tensor) -> Tensor:
    """``dist (B, A, 4)`` (l, t, r, b) in stride units -> ``(B, A, 4)`` xyxy pixels."""
    lt, rb = (dist * stride_tensor).chunk(2, dim=-1)
    return torch.cat((anchor_points - lt, anchor_points + rb), dim=-1)


def decode_boxes(reg_dist: Tensor, anchor_points: Tensor, stride_tensor: Tensor, reg_max: int) -> Tensor:
    """Raw ``reg_dist (B, A, 4*(reg_max+1))`` -> ``(B, A, 4)`` xyxy input pixels."""
    if reg_max > 0:
        b, a, _ = reg_dist.shape
        bins = torch.arange(reg_max + 1, dtype=reg_dist.dtype, device=reg_dist.device)
        dist = reg_dist.reshape(b, a, 4, reg_max + 1).softmax(dim=-1) @ bins
    else:
        dist = reg_dist
    return dist_to_boxes(dist, anchor_points, stride_tensor)


class DecodedDetector(nn.Module):
    """``model`` plus decoding for a fixed input size: what ONNX export writes and evaluation consumes.

    ``forward(x (B, 3, H, W))`` -> ``(boxes (B, A, 4) xyxy input pixels, scores (B, A, nc) in [0, 1])``.
    """

    def __init__(self, model: nn.Module, img_hw: tuple[int, int]) -> None:
        super().__init__()
        config: Any = model.config
        strides = tuple(config.strides)
        if img_hw[0] % max(strides) or img_hw[1] % max(strides):
            raise ModelError(f"DecodedDetector: img_hw {tuple(img_hw)} must be multiples of {max(strides)}")
        self.model = model
        self.img_hw = (int(img_hw[0]), int(img_hw[1]))
        self.reg_max = config.reg_max
        self.dfl_proj = DFLProjection(self.reg_max) if self.reg_max > 0 else None
        anchor_points, stride_tensor = make_anchors(self.img_hw, strides)
        self.anchor_points: Tensor
        self.stride_tensor: Tensor
        self.register_buffer("anchor_points", anchor_points, persistent=False)
        self.register_buffer("stride_tensor", stride_tensor, persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[-2:]) != self.img_hw:
            raise ModelError(
                f"DecodedDetector: input {tuple(x.shape[-2:])} != configured img_hw {self.img_hw}"
            )
        cls_logits, reg_dist = self.model(x)
        dist = reg_dist if self.dfl_proj is None else self.dfl_proj(reg_dist)
        anchors = self.anchor_points.to(dist.dtype)
        boxes = dist_to_boxes(dist, anchors, self.stride_tensor.to(dist.dtype))
        return boxes, cls_logits.sigmoid()
