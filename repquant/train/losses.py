"""YOLOv6 detection loss: VarifocalLoss (classification), IoU loss + DFL (boxes), label assignment.

Conventions (as yolov6/models/losses/loss.py):
- every term is a sum over anchors divided by ``target_scores_sum`` (the sum of the soft class
  targets) when that exceeds 1; the loss is NOT multiplied by the batch size (YOLOv6 only multiplies
  by the world size under DDP, which is the trainer's business);
- box terms are computed in units of each anchor's stride (targets divided by the stride);
- ``components`` report the weighted terms, so ``total = cls + iou + dfl``.
The model emits logits; the scores the assigners and VFL see are ``sigmoid(cls_logits)`` (YOLOv6's
head applies the sigmoid itself in training mode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from repquant.errors import ModelError
from repquant.models.head import decode_boxes
from repquant.ops.boxes import IOU_KINDS, bbox_iou
from repquant.train.assigners import (
    Assignment,
    ATSSAssigner,
    TaskAlignedAssigner,
    make_anchor_boxes,
    pad_targets,
)

DEFAULT_LOSS_WEIGHT = {"class": 1.0, "iou": 2.5, "dfl": 0.5}


class VarifocalLoss:
    """Varifocal loss (Zhang et al., VarifocalNet, CVPR 2021), summed over all elements.

    ``weight = alpha * p**gamma * (1 - label) + target * label``;
    ``loss = sum(BCE(p, target) * weight)`` with ``p = sigmoid(logits)``. BCE is computed from the
    logits (numerically safer than YOLOv6's BCE on probabilities; equal where neither saturates).
    """

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0) -> None:
        self.alpha = alpha
        self.gamma = gamma

    def __call__(self, logits: Tensor, target_scores: Tensor, labels_one_hot: Tensor) -> Tensor:
        """``logits, target_scores, labels_one_hot: (B, A, nc)`` -> scalar sum."""
        if logits.dtype in (torch.float16, torch.bfloat16):  # AMP: the log terms need float32
            logits = logits.float()
        target_scores = target_scores.to(logits.dtype)
        label = labels_one_hot.to(logits.dtype)
        weight = self.alpha * logits.sigmoid().pow(self.gamma) * (1 - label) + target_scores * label
        bce = F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none")
        return (bce * weight).sum()


def boxes_to_dist(anchor_points: Tensor, boxes: Tensor, reg_max: int) -> Tensor:
    """xyxy ``boxes (..., 4)`` -> (l, t, r, b) distances from ``anchor_points (..., 2)``, same units,
    clamped to ``[0, reg_max - 0.01]`` so the right DFL bin exists (YOLOv6 ``bbox2dist``)."""
    lt = anchor_points - boxes[..., :2]
    rb = boxes[..., 2:] - anchor_points
    return torch.cat((lt, rb), dim=-1).clamp(0, reg_max - 0.01)


def distribution_focal_loss(pred_dist: Tensor, target: Tensor) -> Tensor:
    """DFL (Li et al., Generalized Focal Loss, 2020): ``pred_dist (P, 4, R+1)`` logits, ``target (P, 4)``
    in bins -> ``(P, 1)``: cross-entropy to the two bins around the target, linearly weighted, mean
    over the four sides."""
    bins = pred_dist.shape[-1]
    left = target.long()
    right = left + 1
    weight_left = right.to(target.dtype) - target
    weight_right = 1 - weight_left
    logits = pred_dist.reshape(-1, bins)
    loss_left = F.cross_entropy(logits, left.reshape(-1), reduction="none").view(left.shape)
    loss_right = F.cross_entropy(logits, right.reshape(-1), reduction="none").view(left.shape)
    return (loss_left * weight_left + loss_right * weight_right).mean(-1, keepdim=True)


class BboxLoss:
    """IoU loss (``1 - bbox_iou``) and, for ``reg_max > 0``, DFL over the foreground anchors, each
    weighted by the anchor's summed target score and divided by ``target_scores_sum`` when > 1."""

    def __init__(self, reg_max: int, iou_type: str = "giou") -> None:
        if iou_type not in IOU_KINDS:
            raise ModelError(f"BboxLoss: unknown iou_type {iou_type!r}; expected one of {IOU_KINDS}")
        self.reg_max = reg_max
        self.iou_type = iou_type

    def __call__(self, reg_dist: Tensor, pred_boxes: Tensor, anchor_points: Tensor, target_boxes: Tensor,
                 target_scores: Tensor, target_scores_sum: Tensor, fg_mask: Tensor) -> tuple[Tensor, Tensor]:
        """All boxes and points in stride units: ``reg_dist (B, A, 4*(R+1))``, ``pred_boxes (B, A, 4)``
        xyxy, ``anchor_points (A, 2)``, ``target_boxes (B, A, 4)`` xyxy, ``target_scores (B, A, nc)``,
        ``fg_mask (B, A)`` bool -> ``(loss_iou, loss_dfl)`` scalars (0 with a graph when no foreground)."""
        zero = reg_dist.new_zeros(()) + reg_dist.sum() * 0.0  # keeps the graph; +0.0 avoids -0.0
        if not fg_mask.any():
            return zero, zero
        norm = target_scores_sum if target_scores_sum > 1 else target_scores_sum.new_ones(())
        weight = target_scores.sum(-1)[fg_mask][:, None]  # (P, 1)
        iou = bbox_iou(pred_boxes[fg_mask], target_boxes[fg_mask], kind=self.iou_type, eps=1e-10)
        loss_iou = ((1.0 - iou)[:, None] * weight).sum() / norm
        if self.reg_max == 0:
            return loss_iou, zero
        points = anchor_points[None].expand(fg_mask.shape[0], -1, -1)[fg_mask]
        target_dist = boxes_to_dist(points, target_boxes[fg_mask], self.reg_max)
        pred_dist = reg_dist[fg_mask].reshape(-1, 4, self.reg_max + 1)
        loss_dfl = (distribution_focal_loss(pred_dist, target_dist) * weight).sum() / norm
        return loss_iou, loss_dfl


@dataclass(frozen=True)
class LossResult:
    """``loss`` scalar with graph; ``components`` weighted terms as floats; the ``assignment`` used."""

    loss: Tensor
    components: dict[str, float]
    assignment: Assignment
    target_scores_sum: Tensor


class ComputeLoss:
    """YOLOv6 detection loss: ATSS for ``epoch < warmup_epoch``, then TAL; VFL + IoU loss + DFL.

    ``iou_type``: 'giou' (YOLOv6 S/M/L), 'siou' (N/T), 'ciou', 'diou' or 'iou'. ``reg_max == 0``
    means ``reg_dist`` holds plain (l, t, r, b) distances in stride units and there is no DFL term.
    ``last_assignment`` keeps the assignment of the latest call (self-distillation uses its fg mask).
    """

    def __init__(self, num_classes: int, reg_max: int, strides: Sequence[int] = (8, 16, 32),
                 iou_type: str = "giou", warmup_epoch: int = 4,
                 loss_weight: Mapping[str, float] | None = None, grid_cell_offset: float = 0.5,
                 grid_cell_size: float = 5.0) -> None:
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(int(s) for s in strides)
        self.warmup_epoch = warmup_epoch
        self.loss_weight = {**DEFAULT_LOSS_WEIGHT, **(loss_weight or {})}
        self.grid_cell_offset = grid_cell_offset
        self.grid_cell_size = grid_cell_size
        self.warmup_assigner = ATSSAssigner(topk=9, num_classes=num_classes)
        self.formal_assigner = TaskAlignedAssigner(topk=13, num_classes=num_classes, alpha=1.0, beta=6.0)
        self.varifocal_loss = VarifocalLoss()
        self.bbox_loss = BboxLoss(reg_max, iou_type)
        self.last_assignment: Assignment | None = None

    def __call__(self, outputs: tuple[Tensor, Tensor], targets: Tensor, img_hw: tuple[int, int],
                 epoch: int) -> tuple[Tensor, dict[str, float]]:
        """``outputs = model(x)``: ``(cls_logits (B, A, nc), reg_dist (B, A, 4*(reg_max+1)))``;
        ``targets (N, 6)`` ``[batch_index, class_id, x1, y1, x2, y2]`` input pixels; ``img_hw`` the
        input size. Returns the scalar loss and ``{'cls', 'iou', 'dfl', 'total'}`` (weighted floats)."""
        result = self.compute(outputs, targets, img_hw, epoch)
        return result.loss, result.components

    def compute(self, outputs: tuple[Tensor, Tensor], targets: Tensor, img_hw: tuple[int, int],
                epoch: int) -> LossResult:
        """Same as ``__call__`` but also returns the assignment (self-distillation needs its fg mask)."""
        cls_logits, reg_dist = outputs
        batch_size = cls_logits.shape[0]
        dtype, device = reg_dist.dtype, reg_dist.device
        anchor_boxes, anchor_points, per_level, stride_tensor = make_anchor_boxes(
            img_hw, self.strides, self.grid_cell_size, self.grid_cell_offset, dtype=dtype, device=device)
        self._check_shapes(cls_logits, reg_dist, anchor_points.shape[0], img_hw)

        gt, mask_gt = pad_targets(targets.to(device=device, dtype=dtype), batch_size)
        gt_labels, gt_boxes = gt[..., 0], gt[..., 1:]
        pred_boxes = decode_boxes(reg_dist, anchor_points, stride_tensor, self.reg_max)  # xyxy pixels
        assignment = self._assign(cls_logits, pred_boxes, anchor_boxes, anchor_points, per_level,
                                  gt_labels, gt_boxes, mask_gt, epoch)

        labels_one_hot = F.one_hot(assignment.labels, self.num_classes + 1)[..., : self.num_classes]
        target_scores = assignment.scores
        loss_cls = self.varifocal_loss(cls_logits, target_scores, labels_one_hot)
        target_scores_sum = target_scores.sum()
        if target_scores_sum > 1:  # YOLOv6 guard: no division for (near-)empty batches
            loss_cls = loss_cls / target_scores_sum

        loss_iou, loss_dfl = self.bbox_loss(
            reg_dist, pred_boxes / stride_tensor, anchor_points / stride_tensor,
            assignment.boxes / stride_tensor, target_scores, target_scores_sum, assignment.fg_mask)
        w = self.loss_weight
        terms = {"cls": w["class"] * loss_cls, "iou": w["iou"] * loss_iou, "dfl": w["dfl"] * loss_dfl}
        loss = terms["cls"] + terms["iou"] + terms["dfl"]
        components = {name: float(value.detach()) for name, value in terms.items()}
        components["total"] = float(loss.detach())
        self.last_assignment = assignment
        return LossResult(loss, components, assignment, target_scores_sum)

    def _assign(self, cls_logits: Tensor, pred_boxes: Tensor, anchor_boxes: Tensor, anchor_points: Tensor,
                per_level: list[int], gt_labels: Tensor, gt_boxes: Tensor, mask_gt: Tensor,
                epoch: int) -> Assignment:
        if epoch < self.warmup_epoch:
            return self.warmup_assigner(anchor_boxes, per_level, gt_labels, gt_boxes, mask_gt,
                                        pred_boxes.detach())
        return self.formal_assigner(cls_logits.detach().sigmoid(), pred_boxes.detach(), anchor_points,
                                    gt_labels, gt_boxes, mask_gt)

    def _check_shapes(self, cls_logits: Tensor, reg_dist: Tensor, num_anchors: int,
                      img_hw: tuple[int, int]) -> None:
        if cls_logits.shape[1] != num_anchors or reg_dist.shape[1] != num_anchors:
            raise ModelError(
                f"ComputeLoss: outputs have {cls_logits.shape[1]} anchors but img_hw {tuple(img_hw)} with "
                f"strides {self.strides} gives {num_anchors}")
        if cls_logits.shape[2] != self.num_classes:
            raise ModelError(f"ComputeLoss: cls_logits has {cls_logits.shape[2]} classes, expected "
                             f"{self.num_classes}")
        if reg_dist.shape[2] != 4 * (self.reg_max + 1):
            raise ModelError(f"ComputeLoss: reg_dist has {reg_dist.shape[2]} channels, expected "
                             f"4 * (reg_max + 1) = {4 * (self.reg_max + 1)}")
