"""Evaluation: post-processing (NMS) shared by torch and ONNX Runtime outputs, and COCO mAP."""

from repquant.eval.coco import build_coco_gt, coco_map, detections_to_coco_results
from repquant.eval.predict import EvalResult, evaluate, postprocess, scale_to_original

__all__ = [
    "EvalResult",
    "build_coco_gt",
    "coco_map",
    "detections_to_coco_results",
    "evaluate",
    "postprocess",
    "scale_to_original",
]
