"""Post-processing shared by torch and ONNX Runtime outputs, and the evaluation loop.

The detector (a ``DecodedDetector`` or an ORT session wrapper) gives ``boxes (B, A, 4)`` xyxy in input
pixels and ``scores (B, A, nc)`` in [0, 1]; ``postprocess`` turns those into per-image detections the
way YOLOv6's ``non_max_suppression`` does for evaluation, and ``evaluate`` scores them with pycocotools.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from repquant.errors import DataError
from repquant.eval.coco import build_coco_gt, coco_map, detections_to_coco_results
from repquant.ops.nms import batched_nms

MAX_NMS = 30000  # at most this many (box, class) candidates enter NMS per image, as in YOLOv6

ArrayLike = Tensor | np.ndarray
PredictFn = Callable[[Tensor], tuple[ArrayLike, ArrayLike]]


class ImageMetaLike(Protocol):
    """What evaluation needs from ``repquant.data.ImageMeta``.

    ``ratio`` is the letterbox scale (one float, or ``(ratio_h, ratio_w)``); ``pad`` is ``(left, top)``
    in input pixels; ``orig_hw`` is the original image ``(height, width)``.
    """

    image_id: int
    file: str
    orig_hw: tuple[int, int]
    ratio: float | tuple[float, float]
    pad: tuple[float, float]


@dataclass(frozen=True)
class EvalResult:
    """COCO metrics of one evaluation run. ``per_class_ap50_95`` maps class name to AP@[.5:.95] for the
    classes that have ground truth."""

    map50_95: float
    map50: float
    per_class_ap50_95: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0
    seconds: float = 0.0


def _postprocess_one(boxes: Tensor, scores: Tensor, conf_thres: float, iou_thres: float,
                     max_det: int, multi_label: bool) -> Tensor:
    """One image: boxes (A, 4) xyxy, scores (A, nc) -> (n, 6) detections."""
    if multi_label:
        # Every (box, class) pair above the threshold is a candidate: this is what YOLOv6 and
        # YOLOv5 use for mAP, it raises recall at low thresholds.
        box_idx, cls_idx = (scores > conf_thres).nonzero(as_tuple=True)
        conf = scores[box_idx, cls_idx]
    else:
        conf, cls_idx = scores.max(1)
        box_idx = (conf > conf_thres).nonzero().squeeze(1)
        conf, cls_idx = conf[box_idx], cls_idx[box_idx]
    if conf.numel() > MAX_NMS:
        top = conf.argsort(descending=True)[:MAX_NMS]
        box_idx, cls_idx, conf = box_idx[top], cls_idx[top], conf[top]
    cand = boxes[box_idx]
    keep = batched_nms(cand, conf, cls_idx, iou_thres, max_keep=max_det)
    return torch.cat((cand[keep], conf[keep, None], cls_idx[keep, None].to(cand.dtype)), dim=1)


def postprocess(boxes: ArrayLike, scores: ArrayLike, conf_thres: float = 0.03, iou_thres: float = 0.65,
                max_det: int = 300, multi_label: bool = True) -> list[Tensor]:
    """Confidence filter, class-aware NMS and top-``max_det`` per image.

    Args:
        boxes: (B, A, 4) xyxy input pixels (tensor or numpy array).
        scores: (B, A, nc) class probabilities in [0, 1].
        conf_thres: keep (box, class) pairs with score > ``conf_thres``.
        iou_thres: NMS IoU threshold (per class).
        max_det: detections kept per image, highest scores first.
        multi_label: one box may yield several classes; otherwise only its best class.

    Returns:
        One (n, 6) float tensor per image, rows ``x1, y1, x2, y2, score, class`` in input pixels,
        sorted by descending score.
    """
    boxes, scores = torch.as_tensor(boxes), torch.as_tensor(scores)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"postprocess: expected boxes (B, A, 4) and scores (B, A, nc), "
                         f"got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    boxes, scores = boxes.float(), scores.float()
    multi_label = multi_label and scores.shape[-1] > 1
    return [_postprocess_one(b, s, conf_thres, iou_thres, max_det, multi_label)
            for b, s in zip(boxes, scores, strict=True)]


def scale_to_original(det: Tensor, meta: ImageMetaLike) -> Tensor:
    """Undo the letterbox: (n, 6) detections in input pixels -> original-image pixels.

    Subtracts the padding, divides by the resize ratio and clips to the original image. Returns a new
    tensor; score and class columns are unchanged.
    """
    ratio = meta.ratio
    ratio_h, ratio_w = (ratio, ratio) if isinstance(ratio, int | float | np.floating) else ratio
    pad_left, pad_top = meta.pad
    height, width = meta.orig_hw
    out = det.clone()
    out[:, [0, 2]] = ((det[:, [0, 2]] - pad_left) / ratio_w).clamp(0, width)
    out[:, [1, 3]] = ((det[:, [1, 3]] - pad_top) / ratio_h).clamp(0, height)
    return out


def _class_names(dataset: Any, ground_truths: Sequence[Any]) -> list[str]:
    """Class names from the dataset (``names`` or ``data_config.names``), else '0'..'max class'."""
    names = getattr(dataset, "names", None) or getattr(getattr(dataset, "data_config", None), "names", None)
    if names:
        return [str(n) for n in names]
    top = max((int(np.max(gt.classes)) for gt in ground_truths if len(gt.classes)), default=-1)
    return [str(i) for i in range(top + 1)]


def _model_device(predict_fn: PredictFn) -> torch.device | None:
    """Device of an ``nn.Module`` predict_fn, so images can follow it; None for other callables."""
    if isinstance(predict_fn, torch.nn.Module):
        param = next(predict_fn.parameters(), None)
        return param.device if param is not None else None
    return None


def evaluate(predict_fn: PredictFn, dataset: Any, batch_size: int = 8, conf_thres: float = 0.03,
             iou_thres: float = 0.65, max_det: int = 300, num_workers: int = 0,
             progress: bool = True) -> EvalResult:
    """COCO mAP of ``predict_fn`` on ``dataset``.

    Args:
        predict_fn: ``images (B, 3, S, S) float [0, 1] -> (boxes (B, A, 4) xyxy input pixels,
            scores (B, A, nc))``, as torch tensors or numpy arrays. Put a torch model in eval mode
            first; an ``nn.Module`` gets the images on its own device.
        dataset: has ``__len__``, ``__getitem__``, ``collate_fn`` returning ``(images, targets, metas)``
            and ``ground_truth()`` (see ``repquant.data``); optional ``names``.
        batch_size, num_workers: of the DataLoader (no shuffling).
        conf_thres, iou_thres, max_det: of :func:`postprocess`.
        progress: show a tqdm bar.
    """
    start = time.perf_counter()
    ground_truths = dataset.ground_truth()
    names = _class_names(dataset, ground_truths)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=dataset.collate_fn)
    device = _model_device(predict_fn)
    image_ids: list[int] = []
    detections: list[Tensor] = []
    with torch.inference_mode():
        for images, _targets, metas in tqdm(loader, desc="eval", disable=not progress, leave=False):
            if device is not None:
                images = images.to(device)
            boxes, scores = predict_fn(images)
            dets = postprocess(boxes, scores, conf_thres, iou_thres, max_det)
            for det, meta in zip(dets, metas, strict=True):
                if getattr(meta, "augmented", False):
                    # Mosaic/affine samples cannot be mapped back to the original image.
                    raise DataError(f"{meta.file}: evaluation needs a dataset built with augment=False")
                detections.append(scale_to_original(det.cpu(), meta))
                image_ids.append(int(meta.image_id))
    coco_gt = build_coco_gt(ground_truths, names)
    metrics = coco_map(coco_gt, detections_to_coco_results(image_ids, detections))
    per_class = {names[k]: ap for k, ap in metrics["per_class"].items()}
    return EvalResult(
        map50_95=metrics["map50_95"], map50=metrics["map50"], per_class_ap50_95=per_class,
        num_images=len(image_ids), num_detections=sum(len(d) for d in detections),
        seconds=time.perf_counter() - start,
    )
