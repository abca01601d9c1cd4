"""Data: dataset YAML, YOLO/COCO label scanning, letterbox and YOLOv6 augmentations, synthetic data."""

from repquant.data.config import DataConfig, SplitSource, data_config_from_dict, load_data_config
from repquant.data.dataset import DetectionDataset, GroundTruth, ImageMeta
from repquant.data.images import load_image, probe_image, resize
from repquant.data.labels import ScanStats, parse_yolo_labels
from repquant.data.synthetic import make_synthetic_dataset
from repquant.data.transforms import AugmentConfig, letterbox, scale_boxes

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "DetectionDataset",
    "GroundTruth",
    "ImageMeta",
    "ScanStats",
    "SplitSource",
    "data_config_from_dict",
    "letterbox",
    "load_data_config",
    "load_image",
    "make_synthetic_dataset",
    "parse_yolo_labels",
    "probe_image",
    "resize",
    "scale_boxes",
]
