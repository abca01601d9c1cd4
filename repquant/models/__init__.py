"""YOLOv6 model family: variants as data, blocks with one re-parameterization protocol."""

from repquant.models.head import DecodedDetector, decode_boxes, make_anchors
from repquant.models.profile import ModelProfile, model_profile
from repquant.models.registry import get_config, list_models
from repquant.models.yolov6 import ModelConfig, YOLOv6, create_model

__all__ = [
    "DecodedDetector",
    "ModelConfig",
    "ModelProfile",
    "YOLOv6",
    "create_model",
    "decode_boxes",
    "get_config",
    "list_models",
    "make_anchors",
    "model_profile",
]
