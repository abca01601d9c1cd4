"""Greedy non-maximum suppression with torchvision's semantics, written here (no CPU torchvision wheel).

``nms`` matches ``torchvision.ops.nms``: boxes are visited by descending score (stable sort, so ties
keep input order), and a box is dropped when its IoU with an already kept box is strictly greater than
``iou_thres``. IoU is ``inter / (area_i + area_j - inter)`` with no epsilon, like torchvision's kernel.

Instead of one N x N IoU matrix (30k boxes would need 3.6 GB) the sorted boxes are processed in blocks:
a block is first checked against every box kept so far, then the survivors run the greedy loop on
their own small IoU matrix. Suppressed boxes never suppress others, so the result is exact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from repquant.ops.boxes import box_iou

_BLOCK = 1024  # boxes per block: a 1024 x 1024 IoU matrix is 4 MB
_PER_CLASS_ABOVE = 1000  # batched_nms switches from the offset trick to a loop over classes


def _greedy(suppress: np.ndarray) -> np.ndarray:
    """Greedy pass over a strictly upper-triangular (M, M) bool matrix: i suppresses j > i.

    Returns the kept local indices (ascending, i.e. by descending score).
    """
    removed = np.zeros(suppress.shape[0], dtype=bool)
    keep: list[int] = []
    for i in range(suppress.shape[0]):
        if removed[i]:
            continue
        keep.append(i)
        removed |= suppress[i]
    return np.asarray(keep, dtype=np.int64)


def nms(boxes: Tensor, scores: Tensor, iou_thres: float, max_keep: int | None = None) -> Tensor:
    """Greedy NMS.

    Args:
        boxes: (N, 4) xyxy.
        scores: (N,).
        iou_thres: suppress a box whose IoU with a kept, higher-scoring box is > ``iou_thres``.
        max_keep: return only the first ``max_keep`` kept boxes. Greedy NMS decides boxes in score
            order, so this is exactly the head of the full result, and it lets the loop stop early:
            the cost grows with (boxes visited) x (boxes kept), seconds for 30k scattered boxes.

    Returns:
        keep: (K,) int64 indices into ``boxes``, sorted by descending score.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms: expected boxes (N, 4) and scores (N,), got {tuple(boxes.shape)} "
                         f"and {tuple(scores.shape)}")
    device = boxes.device
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if not boxes.dtype.is_floating_point or boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()  # half IoU would round thresholds away
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    kept_pos: list[Tensor] = []  # positions in the sorted order
    kept_boxes = sorted_boxes[:0]
    limit = boxes.shape[0] if max_keep is None else max_keep
    for start in range(0, sorted_boxes.shape[0], _BLOCK):
        if kept_boxes.shape[0] >= limit:
            break
        block = sorted_boxes[start:start + _BLOCK]
        if kept_boxes.shape[0]:
            alive = ~(box_iou(kept_boxes, block, eps=0.0) > iou_thres).any(0)
            alive_idx = alive.nonzero().squeeze(1)
            block = block[alive_idx]
        else:
            alive_idx = torch.arange(block.shape[0], device=device)
        if block.shape[0] == 0:
            continue
        suppress = (box_iou(block, block, eps=0.0) > iou_thres).triu(diagonal=1)
        local = torch.from_numpy(_greedy(suppress.cpu().numpy())).to(device)
        kept_pos.append(start + alive_idx[local])
        kept_boxes = torch.cat((kept_boxes, block[local]))
    if not kept_pos:  # only when max_keep == 0
        return torch.empty(0, dtype=torch.int64, device=device)
    return order[torch.cat(kept_pos)[:limit]]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_thres: float,
                max_keep: int | None = None) -> Tensor:
    """Class-aware NMS: boxes with different ``idxs`` never suppress each other.

    Up to ``_PER_CLASS_ABOVE`` boxes, each category is shifted by a coordinate offset larger than the
    span of all boxes and one ``nms`` call does the work; above it, one ``nms`` per category is faster
    (the greedy loop costs visited x kept, and classes no longer share a kept set), as torchvision does
    on CPU. Both paths compute in float64: the offset shift is then exact for float32 inputs, so they
    give identical results.

    Args:
        boxes: (N, 4) xyxy.
        scores: (N,).
        idxs: (N,) integer category of each box.
        iou_thres: as in :func:`nms`.
        max_keep: as in :func:`nms` (over all categories).

    Returns:
        keep: (K,) int64 indices, sorted by descending score (ties in input order).
    """
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    boxes = boxes.double()
    if boxes.shape[0] <= _PER_CLASS_ABOVE:
        low = boxes.min()
        span = boxes.max() - low + 1.0
        shifted = boxes - low + idxs.to(boxes.dtype)[:, None] * span
        return nms(shifted, scores, iou_thres, max_keep)
    parts = []
    for cls in idxs.unique():
        members = (idxs == cls).nonzero().squeeze(1)
        # The top max_keep overall lie within each class's own top max_keep.
        parts.append(members[nms(boxes[members], scores[members], iou_thres, max_keep)])
    keep = torch.cat(parts).sort().values  # input order first, so the stable score sort breaks ties
    keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
    return keep if max_keep is None else keep[:max_keep]
