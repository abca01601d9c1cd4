"""Label assignment for the anchor-free YOLOv6 head: ATSS (warm-up epochs) and TAL (afterwards).

Shapes used throughout: ``B`` images, ``M`` padded ground-truth slots per image, ``A`` anchors
(level by level, stride 8/16/32, row-major inside a level), ``nc`` classes. Boxes are xyxy input
pixels. Padded GT slots are marked ``False`` in ``mask_gt (B, M)`` and never receive anchors.

Numerics follow YOLOv6 (yolov6/assigners/*.py): ATSS (Zhang et al., CVPR 2020) picks the ``topk``
anchor boxes nearest to each GT centre per level, keeps those whose IoU exceeds mean + std of the
candidates' IoUs and whose centre lies inside the GT; TAL (Feng et al., TOOD, ICCV 2021) ranks the
anchors inside each GT by ``score**alpha * IoU**beta`` and keeps the ``topk``. An anchor claimed by
several GTs goes to the one with the highest IoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from repquant.errors import DataError
from repquant.models.head import make_anchors


@dataclass(frozen=True)
class Assignment:
    """Result of one assignment.

    ``labels (B, A)`` long, ``num_classes`` for background; ``boxes (B, A, 4)`` xyxy pixels (meaningful
    only where ``fg_mask``); ``scores (B, A, nc)`` soft targets (IoU- or alignment-scaled one-hot);
    ``fg_mask (B, A)`` bool.
    """

    labels: Tensor
    boxes: Tensor
    scores: Tensor
    fg_mask: Tensor


def make_anchor_boxes(img_hw: tuple[int, int], strides: Sequence[int] = (8, 16, 32),
                      grid_cell_size: float = 5.0, offset: float = 0.5,
                      dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor, list[int], Tensor]:
    """ATSS anchor boxes as YOLOv6 ``generate_anchors``: a square of side ``grid_cell_size * stride``
    centred on every anchor point.

    Returns ``anchor_boxes (A, 4)`` xyxy pixels, ``anchor_points (A, 2)`` pixels (same as
    ``make_anchors``), ``anchors_per_level`` and ``stride_tensor (A, 1)``.
    """
    points, stride_tensor = make_anchors(img_hw, strides, offset, dtype=dtype, device=device)
    half = grid_cell_size * stride_tensor * 0.5
    boxes = torch.cat((points - half, points + half), dim=-1)
    per_level = [(img_hw[0] // s) * (img_hw[1] // s) for s in strides]
    return boxes, points, per_level, stride_tensor


def pad_targets(targets: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Collated ``targets (N, 6)`` ``[batch_index, class_id, x1, y1, x2, y2]`` -> padded per image.

    Returns ``gt (B, M, 5)`` rows ``[class_id, x1, y1, x2, y2]`` (padding rows ``[-1, 0, 0, 0, 0]``),
    M = the largest box count of any image (0 when there are no boxes), and ``mask_gt (B, M)`` bool.
    """
    batch_index = targets[:, 0].long()
    if targets.shape[0] and (int(batch_index.min()) < 0 or int(batch_index.max()) >= batch_size):
        raise DataError(f"targets: batch index out of range [0, {batch_size}): "
                        f"{int(batch_index.min())}..{int(batch_index.max())}")
    counts = torch.bincount(batch_index, minlength=batch_size)
    m = int(counts.max()) if targets.shape[0] else 0
    gt = targets.new_zeros((batch_size, m, 5))
    gt[..., 0] = -1
    mask_gt = torch.zeros((batch_size, m), dtype=torch.bool, device=targets.device)
    if m == 0:
        return gt, mask_gt
    # Slot of each row inside its image: rank among the rows with the same batch index (stable order).
    order = torch.argsort(batch_index, stable=True)
    sorted_index = batch_index[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel(), device=targets.device) - starts[sorted_index]
    gt[sorted_index, slot] = targets[order, 1:6]
    mask_gt[sorted_index, slot] = True
    return gt, mask_gt


def pairwise_iou(gt_boxes: Tensor, boxes: Tensor, eps: float = 1e-9) -> Tensor:
    """IoU of every GT with every box, per image: ``(B, M, 4)`` x ``(B, A, 4)`` -> ``(B, M, A)``."""
    lt = torch.maximum(gt_boxes[:, :, None, :2], boxes[:, None, :, :2])
    rb = torch.minimum(gt_boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (gt_boxes[..., 2:] - gt_boxes[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)
    return inter / (area1[:, :, None] + area2[:, None, :] - inter + eps)


def points_in_boxes(points: Tensor, gt_boxes: Tensor, eps: float = 1e-9) -> Tensor:
    """Whether each anchor point lies strictly inside each GT: ``(A, 2)`` x ``(B, M, 4)`` -> ``(B, M, A)``."""
    lt = points[None, None] - gt_boxes[:, :, None, :2]
    rb = gt_boxes[:, :, None, 2:] - points[None, None]
    return torch.cat((lt, rb), dim=-1).amin(dim=-1) > eps


def resolve_multiple_gts(mask_pos: Tensor, overlaps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Give an anchor claimed by several GTs to the GT with the highest IoU.

    ``mask_pos, overlaps: (B, M, A)`` -> ``target_gt_idx (B, A)`` long, ``fg_mask (B, A)`` bool and the
    resolved ``mask_pos (B, M, A)`` bool (at most one GT per anchor). As YOLOv6
    (``select_highest_overlaps``) the arg-max runs over all GT slots of the image, not only the
    claiming ones: a claimed anchor can move to a GT it was not positive for. Kept on purpose: with
    it the whole loss matches YOLOv6 to float32 round-off; only claiming GTs would change it by up
    to a few percent on random predictions.
    """
    mask_pos = mask_pos.bool()
    multi = mask_pos.sum(dim=1, keepdim=True) > 1
    if multi.any():
        is_best = F.one_hot(overlaps.argmax(dim=1), mask_pos.shape[1]).permute(0, 2, 1).bool()
        mask_pos = torch.where(multi, is_best, mask_pos)
    fg_mask = mask_pos.any(dim=1)
    return mask_pos.to(torch.uint8).argmax(dim=1), fg_mask, mask_pos


def gather_targets(gt_labels: Tensor, gt_boxes: Tensor, target_gt_idx: Tensor, fg_mask: Tensor,
                   num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-anchor targets from GT indices: labels ``(B, A)`` (``num_classes`` = background), boxes
    ``(B, A, 4)``, one-hot scores ``(B, A, nc)`` (zero rows for background)."""
    labels = torch.gather(gt_labels.long(), 1, target_gt_idx)
    labels = torch.where(fg_mask, labels, torch.full_like(labels, num_classes))
    boxes = torch.gather(gt_boxes, 1, target_gt_idx[..., None].expand(-1, -1, 4))
    scores = F.one_hot(labels, num_classes + 1)[..., :num_classes].to(gt_boxes.dtype)
    return labels, boxes, scores


def _empty_assignment(batch_size: int, num_anchors: int, num_classes: int, like: Tensor) -> Assignment:
    return Assignment(
        labels=torch.full((batch_size, num_anchors), num_classes, dtype=torch.long, device=like.device),
        boxes=like.new_zeros((batch_size, num_anchors, 4)),
        scores=like.new_zeros((batch_size, num_anchors, num_classes)),
        fg_mask=torch.zeros((batch_size, num_anchors), dtype=torch.bool, device=like.device),
    )


class ATSSAssigner:
    """Adaptive Training Sample Selection over fixed anchor boxes (YOLOv6 warm-up assigner)."""

    def __init__(self, topk: int = 9, num_classes: int = 80) -> None:
        self.topk = topk
        self.num_classes = num_classes

    @torch.no_grad()
    def __call__(self, anchor_boxes: Tensor, anchors_per_level: Sequence[int], gt_labels: Tensor,
                 gt_boxes: Tensor, mask_gt: Tensor, pred_boxes: Tensor | None = None) -> Assignment:
        """Assign anchors to GTs.

        ``anchor_boxes (A, 4)`` xyxy pixels, ``anchors_per_level`` sizes summing to A,
        ``gt_labels (B, M)``, ``gt_boxes (B, M, 4)`` xyxy pixels, ``mask_gt (B, M)`` bool,
        ``pred_boxes (B, A, 4)`` xyxy pixels or None. With ``pred_boxes`` the one-hot scores are
        scaled by the IoU of the prediction with its assigned GT (YOLOv6 soft labels).
        """
        b, m = gt_boxes.shape[:2]
        a = anchor_boxes.shape[0]
        if m == 0:
            return _empty_assignment(b, a, self.num_classes, gt_boxes)
        mask_gt = mask_gt.bool()
        anchors = anchor_boxes[None].expand(b, -1, -1)
        overlaps = pairwise_iou(gt_boxes, anchors, eps=1e-6)  # (B, M, A)
        gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
        anchor_centers = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2
        distances = torch.cdist(gt_centers, anchor_centers[None].expand(b, -1, -1))  # (B, M, A)

        candidate_idx = self._nearest_per_level(distances, anchors_per_level)  # (B, M, K)
        is_candidate = torch.zeros_like(overlaps, dtype=torch.bool).scatter_(-1, candidate_idx, True)
        is_candidate &= mask_gt[..., None]
        candidate_iou = torch.gather(overlaps, -1, candidate_idx)
        # Adaptive threshold per GT: mean + (unbiased) std of the candidates' IoUs.
        threshold = candidate_iou.mean(-1, keepdim=True) + candidate_iou.std(-1, keepdim=True)
        is_pos = is_candidate & (overlaps > threshold)
        mask_pos = is_pos & points_in_boxes(anchor_centers, gt_boxes) & mask_gt[..., None]

        target_gt_idx, fg_mask, mask_pos = resolve_multiple_gts(mask_pos, overlaps)
        labels, boxes, scores = gather_targets(gt_labels, gt_boxes, target_gt_idx, fg_mask, self.num_classes)
        if pred_boxes is not None:
            pred_iou = pairwise_iou(gt_boxes, pred_boxes) * mask_pos
            scores = scores * pred_iou.amax(dim=1)[..., None]
        return Assignment(labels, boxes, scores, fg_mask)

    def _nearest_per_level(self, distances: Tensor, anchors_per_level: Sequence[int]) -> Tensor:
        """Indices (into all A anchors) of the ``topk`` nearest anchors of each level: ``(B, M, K)``."""
        chunks, start = [], 0
        for level_distances in torch.split(distances, list(anchors_per_level), dim=-1):
            k = min(self.topk, level_distances.shape[-1])
            chunks.append(level_distances.topk(k, dim=-1, largest=False).indices + start)
            start += level_distances.shape[-1]
        return torch.cat(chunks, dim=-1)


class TaskAlignedAssigner:
    """Task-aligned assigner (TOOD) as used by YOLOv6 after the warm-up epochs."""

    def __init__(self, topk: int = 13, num_classes: int = 80, alpha: float = 1.0, beta: float = 6.0,
                 eps: float = 1e-9) -> None:
        self.topk = topk
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def __call__(self, pred_scores: Tensor, pred_boxes: Tensor, anchor_points: Tensor, gt_labels: Tensor,
                 gt_boxes: Tensor, mask_gt: Tensor) -> Assignment:
        """Assign anchors to GTs.

        ``pred_scores (B, A, nc)`` probabilities in [0, 1], ``pred_boxes (B, A, 4)`` xyxy pixels,
        ``anchor_points (A, 2)`` pixels, ``gt_labels (B, M)``, ``gt_boxes (B, M, 4)`` xyxy pixels,
        ``mask_gt (B, M)`` bool. Target scores are the one-hot labels scaled per anchor by
        ``metric / max metric of its GT * max IoU of its GT`` (metric = ``score**alpha * IoU**beta``).
        """
        b, m = gt_boxes.shape[:2]
        a = anchor_points.shape[0]
        if m == 0:
            return _empty_assignment(b, a, self.num_classes, gt_boxes)
        mask_gt = mask_gt.bool()
        labels_idx = gt_labels.long().clamp(min=0)  # padding slots carry -1
        # Predicted probability of each GT's class at every anchor: (B, M, A).
        gt_class_scores = torch.gather(pred_scores.permute(0, 2, 1), 1,
                                       labels_idx[..., None].expand(-1, -1, a))
        overlaps = pairwise_iou(gt_boxes, pred_boxes)
        align_metric = gt_class_scores.pow(self.alpha) * overlaps.pow(self.beta)

        in_gts = points_in_boxes(anchor_points, gt_boxes)
        k = min(self.topk, a)
        topk_idx = (align_metric * in_gts).topk(k, dim=-1).indices
        in_topk = torch.zeros_like(in_gts).scatter_(-1, topk_idx, True)
        mask_pos = in_topk & in_gts & mask_gt[..., None]

        target_gt_idx, fg_mask, mask_pos = resolve_multiple_gts(mask_pos, overlaps)
        labels, boxes, scores = gather_targets(gt_labels, gt_boxes, target_gt_idx, fg_mask, self.num_classes)

        align_metric = align_metric * mask_pos
        max_metric = align_metric.amax(dim=-1, keepdim=True)  # (B, M, 1)
        max_iou = (overlaps * mask_pos).amax(dim=-1, keepdim=True)
        norm = (align_metric * max_iou / (max_metric + self.eps)).amax(dim=1)  # (B, A)
        return Assignment(labels, boxes, scores * norm[..., None], fg_mask)
