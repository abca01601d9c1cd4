"""Box utilities. Written here because torchvision has no CPU wheel on our machines.

Formats: ``xyxy`` (x1, y1, x2, y2), ``xywh`` (x1, y1, w, h), ``cxcywh`` (cx, cy, w, h).
All functions work on tensors of shape (..., 4) unless stated.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FORMATS = ("xyxy", "xywh", "cxcywh")


def _to_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    if fmt == "xyxy":
        return boxes
    a, b, c, d = boxes.unbind(-1)
    if fmt == "xywh":
        return torch.stack((a, b, a + c, b + d), dim=-1)
    if fmt == "cxcywh":
        return torch.stack((a - c / 2, b - d / 2, a + c / 2, b + d / 2), dim=-1)
    raise ValueError(f"unknown box format {fmt!r}; expected one of {_FORMATS}")


def _from_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    if fmt == "xyxy":
        return boxes
    x1, y1, x2, y2 = boxes.unbind(-1)
    if fmt == "xywh":
        return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)
    if fmt == "cxcywh":
        return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)
    raise ValueError(f"unknown box format {fmt!r}; expected one of {_FORMATS}")


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert boxes (..., 4) between ``xyxy``, ``xywh`` and ``cxcywh``."""
    if in_fmt == out_fmt:
        return boxes
    return _from_xyxy(_to_xyxy(boxes, in_fmt), out_fmt)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes (..., 4) -> (...)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-9) -> Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter / (union + eps)
