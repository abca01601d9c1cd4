"""Calibration data: a seeded, deterministic image subset, letterboxed as at inference, never augmented.

Calibration hygiene (REFERENCE.md): the subset is drawn without replacement from one split with a
fixed seed, so a manifest names exactly the same images on every machine; images go through the
inference letterbox (``DetectionDataset(augment=False)``: resize keeping the aspect ratio, centered
gray pad 114, no ``auto``) and never through mosaic / HSV / flips (YOLOv6 calibrated on mosaic
images, a defect). TensorRT recommends >= 500 images for CNNs; YOLOv6 used 128. Count and source
are logged.

A manifest (``calib/*.yaml``) is a :class:`CalibManifest`; its ``data`` path is relative to the
manifest file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from repquant.data.config import load_data_config
from repquant.data.dataset import DetectionDataset
from repquant.data.transforms import PAD_VALUE
from repquant.errors import CalibrationError
from repquant.recipe import load_recipe

logger = logging.getLogger(__name__)

LETTERBOX = {"pad_value": PAD_VALUE, "centered": True, "scaleup": True, "auto": False, "augment": False}


@dataclass(frozen=True)
class CalibManifest:
    """Which images calibrate a model, and how they are pre-processed.

    ``data``: dataset YAML (relative paths are relative to the manifest file); ``split``: ``train``
    (default: keep the validation split for measuring) / ``val`` / ``test``; ``num_images`` drawn
    without replacement with ``seed``; ``img_size``: square letterbox side (a multiple of 32);
    ``batch_size``: images per yielded batch.
    """

    data: str
    split: str = "train"
    num_images: int = 128
    seed: int = 0
    img_size: int = 640
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise CalibrationError(f"calibration manifest: split {self.split!r} is not train, val or test")
        if self.num_images < 1:
            raise CalibrationError(f"calibration manifest: num_images must be >= 1, got {self.num_images}")
        if self.img_size < 32 or self.img_size % 32:
            raise CalibrationError(
                f"calibration manifest: img_size must be a positive multiple of 32, got {self.img_size}"
            )
        if self.batch_size < 1:
            raise CalibrationError(f"calibration manifest: batch_size must be >= 1, got {self.batch_size}")


def load_calib_manifest(path: str | os.PathLike) -> CalibManifest:
    """Read a manifest YAML (unknown keys raise ``RecipeError``); ``data`` becomes an absolute path."""
    path = Path(path)
    manifest = load_recipe(path, CalibManifest)
    data = Path(manifest.data)
    if not data.is_absolute():
        data = (path.resolve().parent / data).resolve()
    return replace(manifest, data=str(data))


def select_calibration_images(dataset: Any, num_images: int, seed: int, source: str | None = None) -> list[int]:
    """Indices of ``num_images`` distinct images of ``dataset`` drawn with ``seed``, sorted ascending.

    Deterministic for a given ``(len(dataset), num_images, seed)``. Raises ``CalibrationError`` naming
    ``source`` (default: the dataset's YAML and split) when the dataset is empty or too small.
    """
    size = len(dataset)
    where = source or _describe(dataset)
    if size == 0:
        raise CalibrationError(f"{where}: no images to calibrate with")
    if num_images < 1:
        raise CalibrationError(f"{where}: num_images must be >= 1, got {num_images}")
    if size < num_images:
        raise CalibrationError(f"{where}: calibration asks for {num_images} images but the split has only {size}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(size, size=num_images, replace=False))


def _describe(dataset: Any) -> str:
    config = getattr(dataset, "data_config", None)
    split = getattr(dataset, "split", None)
    if config is not None:
        return f"{config.source} ({split})"
    return type(dataset).__name__


def calibration_dataset(manifest: CalibManifest) -> DetectionDataset:
    """The manifest's split as a letterboxed, un-augmented ``DetectionDataset``."""
    return DetectionDataset(load_data_config(manifest.data), manifest.split, manifest.img_size, augment=False)


def calibration_loader(manifest: CalibManifest, dataset: DetectionDataset | None = None) -> Iterator[Tensor]:
    """Yield ``images (B, 3, S, S) float32 in [0, 1]`` batches of the manifest's subset, in index order.

    ``dataset``: reuse an already scanned ``calibration_dataset(manifest)``. Logs count and source.
    """
    dataset = dataset if dataset is not None else calibration_dataset(manifest)
    if dataset.augment:
        raise CalibrationError(f"{_describe(dataset)}: calibration needs a dataset built with augment=False")
    source = f"{manifest.data} ({manifest.split})"
    indices = select_calibration_images(dataset, manifest.num_images, manifest.seed, source)
    logger.info("calibration: %d of %d images of %s, seed %d, letterbox %d (no augmentation)",
                len(indices), len(dataset), source, manifest.seed, manifest.img_size)
    for start in range(0, len(indices), manifest.batch_size):
        batch = [dataset[i] for i in indices[start:start + manifest.batch_size]]
        yield dataset.collate_fn(batch)[0]


def calibration_batches(manifest: CalibManifest) -> tuple[list[Tensor], dict[str, Any]]:
    """All calibration batches in memory, and a JSON-ready record of where they came from.

    The record holds the manifest fields, the letterbox settings and the chosen file names.
    """
    dataset = calibration_dataset(manifest)
    batches = list(calibration_loader(manifest, dataset))
    indices = select_calibration_images(dataset, manifest.num_images, manifest.seed)
    files = dataset.files
    record = {
        "data": manifest.data, "split": manifest.split, "num_images": manifest.num_images,
        "seed": manifest.seed, "img_size": manifest.img_size, "letterbox": dict(LETTERBOX),
        "split_size": len(dataset), "files": [files[i].name for i in indices],
    }
    return batches, record


def stack_images(batches: list[Tensor]) -> Tensor:
    """``(N, 3, S, S)`` from a list of batches (for tests and small sets)."""
    return torch.cat(batches, dim=0)
