"""Box utilities. Written here because torchvision has no CPU wheel on our machines.

Formats: ``xyxy`` (x1, y1, x2, y2), ``xywh`` (x1, y1, w, h), ``cxcywh`` (cx, cy, w, h).
All functions work on tensors of shape (..., 4) unless stated.
"""

from __future__ import annotations

import math

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


IOU_KINDS = ("iou", "giou", "diou", "ciou", "siou")


def bbox_iou(box1: Tensor, box2: Tensor, kind: str = "iou", eps: float = 1e-7) -> Tensor:
    """Elementwise IoU family of xyxy boxes: (..., 4) and (..., 4) (broadcast) -> (...).

    Numerics follow YOLOv6 ``IOUloss`` (yolov6/utils/figure_iou.py): ``eps`` is added to the heights
    and the union; GIoU adds it to the enclosing area, DIoU/CIoU to the squared enclosing diagonal;
    CIoU's trade-off ``alpha`` carries no gradient. SIoU (Gevorgyan 2022, arXiv 2205.12740) is
    ``IoU - (distance_cost + shape_cost) / 2`` with the angle cost folded into the distance cost and
    shape exponent theta = 4. One deviation: SIoU's centre distance ``sigma`` gets ``eps**2`` under the
    square root, so coincident centres give 1 instead of NaN (YOLOv6 divides 0 by 0 there).
    The loss is ``1 - bbox_iou(...)``.
    """
    if kind not in IOU_KINDS:
        raise ValueError(f"bbox_iou: unknown kind {kind!r}; expected one of {IOU_KINDS}")
    b1_x1, b1_y1, b1_x2, b1_y2 = box1.unbind(-1)
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.unbind(-1)
    inter = (torch.minimum(b1_x2, b2_x2) - torch.maximum(b1_x1, b2_x1)).clamp(min=0) * (
        torch.minimum(b1_y2, b2_y2) - torch.maximum(b1_y1, b2_y1)
    ).clamp(min=0)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    cw = torch.maximum(b1_x2, b2_x2) - torch.minimum(b1_x1, b2_x1)  # enclosing box width
    ch = torch.maximum(b1_y2, b2_y2) - torch.minimum(b1_y1, b2_y1)  # enclosing box height
    if kind == "giou":
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    # Centre offsets (box2 - box1) in each axis.
    dx = (b2_x1 + b2_x2 - b1_x1 - b1_x2) * 0.5
    dy = (b2_y1 + b2_y2 - b1_y1 - b1_y2) * 0.5
    if kind in ("diou", "ciou"):
        c2 = cw**2 + ch**2 + eps
        rho2 = dx**2 + dy**2
        if kind == "diou":
            return iou - rho2 / c2
        v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
        with torch.no_grad():
            alpha = v / (v - iou + (1 + eps))
        return iou - (rho2 / c2 + v * alpha)
    return iou - 0.5 * (_siou_distance_cost(dx, dy, cw, ch, eps) + _siou_shape_cost(w1, h1, w2, h2))


def _siou_distance_cost(dx: Tensor, dy: Tensor, cw: Tensor, ch: Tensor, eps: float) -> Tensor:
    """SIoU angle-aware distance cost: ``2 - exp(gamma * rho_x) - exp(gamma * rho_y)``, gamma = angle - 2."""
    sigma = torch.sqrt(dx**2 + dy**2 + eps**2)
    sin_alpha_x, sin_alpha_y = dx.abs() / sigma, dy.abs() / sigma
    # Use the smaller angle to the axes: beyond 45 degrees measure from the other axis.
    sin_alpha = torch.where(sin_alpha_x > math.sqrt(2) / 2, sin_alpha_y, sin_alpha_x)
    angle_cost = torch.cos(torch.arcsin(sin_alpha) * 2 - math.pi / 2)
    gamma = angle_cost - 2
    return 2 - torch.exp(gamma * (dx / cw) ** 2) - torch.exp(gamma * (dy / ch) ** 2)


def _siou_shape_cost(w1: Tensor, h1: Tensor, w2: Tensor, h2: Tensor, theta: float = 4.0) -> Tensor:
    """SIoU shape cost ``sum over w, h of (1 - exp(-omega))**theta``, omega = relative size difference."""
    omega_w = (w1 - w2).abs() / torch.maximum(w1, w2)
    omega_h = (h1 - h2).abs() / torch.maximum(h1, h2)
    return (1 - torch.exp(-omega_w)) ** theta + (1 - torch.exp(-omega_h)) ** theta
