"""COCO-style mAP with pycocotools, on in-memory ground truth (no annotation json on disk).

Category ids are class indices; annotation ids start at 1 because pycocotools stores the matched gt id
in ``dtMatches`` and treats id 0 as "unmatched". pycocotools prints progress to stdout; it is silenced
here and the numbers are returned instead.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from repquant.errors import DataError


class GroundTruthLike(Protocol):
    """What evaluation needs from ``repquant.data.GroundTruth``."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) xyxy original pixels
    classes: np.ndarray  # (n,) int


def build_coco_gt(ground_truths: Sequence[GroundTruthLike], class_names: Sequence[str]) -> COCO:
    """In-memory COCO ground truth: one image per entry, category id = class index, bbox xywh,
    area = w * h, iscrowd 0."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for gt in ground_truths:
        images.append({"id": int(gt.image_id), "file_name": str(gt.file_name),
                       "width": int(gt.width), "height": int(gt.height)})
        boxes = np.asarray(gt.boxes, dtype=np.float64).reshape(-1, 4)
        bad = [int(c) for c in np.asarray(gt.classes).reshape(-1) if not 0 <= int(c) < len(class_names)]
        if bad:
            raise DataError(f"{gt.file_name}: class {bad[0]} out of range for {len(class_names)} class names")
        for (x1, y1, x2, y2), cls in zip(boxes.tolist(), np.asarray(gt.classes).reshape(-1).tolist(),
                                         strict=True):
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": int(gt.image_id),
                                "category_id": int(cls), "bbox": [x1, y1, w, h], "area": w * h,
                                "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i, "name": str(n)} for i, n in enumerate(class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco_results(image_ids: Sequence[int], detections: Sequence[Tensor | np.ndarray]
                               ) -> list[dict[str, Any]]:
    """COCO results list from per-image detections.

    Args:
        image_ids: the COCO image id of each entry of ``detections``.
        detections: (n, 6) rows ``x1, y1, x2, y2, score, class`` in original-image pixels.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.
    """
    results: list[dict[str, Any]] = []
    for image_id, det in zip(image_ids, detections, strict=True):
        rows = det.detach().cpu().double().numpy() if isinstance(det, Tensor) else np.asarray(det, np.float64)
        for x1, y1, x2, y2, score, cls in rows.reshape(-1, 6).tolist():
            results.append({"image_id": int(image_id), "category_id": int(cls),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return results


def _mean_valid(values: np.ndarray) -> float:
    """Mean over entries > -1 (pycocotools marks absent categories with -1); 0.0 when none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else 0.0


def coco_map(coco_gt: COCO, results: list[dict[str, Any]]) -> dict[str, Any]:
    """mAP@[.5:.95], mAP@.5 (area all, 100 detections per image, COCO defaults) and per-class AP.

    Returns:
        ``{"map50_95": float, "map50": float, "per_class": {class index: AP@[.5:.95]}}``; per_class
        covers the categories with ground truth. Empty ``results`` give 0.0 everywhere.
    """
    cat_ids = sorted(coco_gt.getCatIds())
    gt_cats = sorted({ann["category_id"] for ann in coco_gt.dataset["annotations"]})
    if not results or not gt_cats:
        # pycocotools' loadRes indexes results[0] and crashes on an empty list.
        return {"map50_95": 0.0, "map50": 0.0, "per_class": {c: 0.0 for c in gt_cats}}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision: (iou thresholds, recall points, categories, area ranges, max dets); area "all" is 0
    # and max dets 100 is the last, as in summarize()'s first two stats.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {c: _mean_valid(precision[:, :, cat_ids.index(c)]) for c in gt_cats}
    return {"map50_95": max(float(evaluator.stats[0]), 0.0), "map50": max(float(evaluator.stats[1]), 0.0),
            "per_class": per_class}
