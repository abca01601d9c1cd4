"""The detection dataset over a scanned split (``repquant.data.labels``) of a dataset YAML
(``repquant.data.config``).

Everything is validated once, at construction (every image decoded, every label line parsed), so a
bad file stops the run before training starts, with a ``DataError`` naming the file and line.
The scan result is kept in memory; ``__getitem__`` only decodes and augments.

Sample format: ``image (3, S, S) uint8``, ``labels (n, 5) float32 [class, x1, y1, x2, y2]`` in input
pixels, and an ``ImageMeta`` mapping input pixels back to the original image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from repquant.data.config import DataConfig
from repquant.data.images import load_image
from repquant.data.labels import scan_coco, scan_yolo
from repquant.data.transforms import (
    AugmentConfig,
    augment_hsv,
    hflip,
    letterbox,
    mixup,
    mosaic,
    random_affine,
    scale_boxes,
    vflip,
)
from repquant.errors import DataError

logger = logging.getLogger(__name__)

BOX_TOLERANCE = 1e-3  # normalised; boxes this far outside [0, 1] are clipped, further is an error
_YAML_KEYS = ("path", "train", "val", "test", "nc", "names")


# ----------------------------------------------------------------------------------------------------
# dataset


@dataclass(frozen=True)
class ImageMeta:
    """Where a sample came from. ``ratio (ratio_h, ratio_w)`` and ``pad (left, top)`` map original
    pixels to input pixels (``x_in = x * ratio_w + left``); they are exact for non-augmented samples
    and meaningless when ``augmented`` is True (mosaic/affine)."""

    image_id: int
    file: str
    orig_hw: tuple[int, int]
    ratio: tuple[float, float]
    pad: tuple[int, int]
    augmented: bool = False


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Un-augmented labels of one image for COCO evaluation: ``boxes (n, 4) xyxy`` original pixels,
    ``classes (n,)`` int64."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray = field(repr=False)
    classes: np.ndarray = field(repr=False)


class DetectionDataset(Dataset):
    """Detection dataset over one split of a ``DataConfig``.

    ``augment=False``: letterbox to ``img_size`` (evaluation, calibration). ``augment=True``: YOLOv6
    training pipeline (mosaic + mixup, or letterbox + random affine; then HSV and flips). The
    augmentation RNG is seeded from ``(seed, epoch, index)``: call ``set_epoch`` before each epoch.
    With DataLoader workers keep ``persistent_workers=False`` (the default) so each epoch's workers
    receive the updated epoch and mosaic flag.
    """

    def __init__(self, data_config: DataConfig, split: str, img_size: int, augment: bool = False,
                 aug: AugmentConfig | None = None, seed: int = 0) -> None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
            raise DataError(f"{data_config.source}: img_size must be a positive integer, got {img_size!r}")
        self.data_config, self.split, self.img_size = data_config, split, img_size
        self.augment, self.aug, self.seed = augment, aug if aug is not None else AugmentConfig(), seed
        self.epoch, self._mosaic_enabled = 0, True
        source = data_config.split(split)
        if source.annotations is None:
            self._records, self.stats = scan_yolo(source.images, data_config.nc)
        else:
            self._records, self.stats = scan_coco(source.images, source.annotations, data_config.nc)
        self.stats.boxes = sum(len(r.classes) for r in self._records)
        self.stats.background = sum(not len(r.classes) for r in self._records)
        logger.info("%s %s: %d images, %d boxes, %d background images (%d without label file, %d with an "
                    "empty one), %d crowd boxes skipped", data_config.source, split, self.stats.images,
                    self.stats.boxes, self.stats.background, self.stats.missing_label_files,
                    self.stats.empty_label_files, self.stats.crowd_skipped)

    @property
    def names(self) -> tuple[str, ...]:
        return self.data_config.names

    @property
    def files(self) -> list[Path]:
        return [r.file for r in self._records]

    @property
    def mosaic_enabled(self) -> bool:
        return self._mosaic_enabled

    def __len__(self) -> int:
        return len(self._records)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (samples are a function of seed, epoch, index)."""
        self.epoch = int(epoch)

    def set_mosaic(self, enabled: bool) -> None:
        """Open or close mosaic (and mixup, which only follows a mosaic). YOLOv6 v3 closes them for the
        last 15 epochs so the model finishes on letterboxed images like those seen at evaluation,
        without the mosaic's large gray borders."""
        self._mosaic_enabled = bool(enabled)

    def labels_pixels(self, index: int) -> np.ndarray:
        """(n, 5) ``[class, x1, y1, x2, y2]`` float32 in original pixels of image ``index``."""
        rec = self._records[index]
        return np.concatenate((rec.classes[:, None].astype(np.float32), rec.boxes), axis=1)

    def ground_truth(self) -> list[GroundTruth]:
        """Un-augmented labels of every image, original pixels, in dataset order."""
        return [GroundTruth(r.image_id, r.file.name, r.width, r.height, r.boxes.astype(np.float64),
                            r.classes.copy()) for r in self._records]

    def _mosaic(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        indices = [index, *rng.integers(0, len(self), 3).tolist()]
        rng.shuffle(indices)
        images = [load_image(self._records[i].file) for i in indices]
        return mosaic(images, [self.labels_pixels(i) for i in indices], self.img_size, self.aug, rng)

    def _load_letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray, ImageMeta]:
        rec = self._records[index]
        image, ratio, pad = letterbox(load_image(rec.file), self.img_size)
        meta = ImageMeta(rec.image_id, str(rec.file), (rec.height, rec.width), ratio, pad, self.augment)
        return image, scale_boxes(self.labels_pixels(index), ratio, pad), meta

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, ImageMeta]:
        """Returns ``(image (3, S, S) uint8, labels (n, 5) float32 [cls, x1, y1, x2, y2] input pixels,
        meta)``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        if not self.augment:
            image, labels, meta = self._load_letterboxed(index)
        else:
            image, labels, meta = self._augmented(index)
        size = self.img_size
        labels[:, [1, 3]] = labels[:, [1, 3]].clip(0, size)
        labels[:, [2, 4]] = labels[:, [2, 4]].clip(0, size)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(labels.astype(np.float32)), meta)

    def _augmented(self, index: int) -> tuple[np.ndarray, np.ndarray, ImageMeta]:
        aug, size = self.aug, self.img_size
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self._mosaic_enabled and rng.random() < aug.mosaic:
            image, labels = self._mosaic(index, rng)
            if rng.random() < aug.mixup:
                image2, labels2 = self._mosaic(int(rng.integers(0, len(self))), rng)
                image, labels = mixup(image, labels, image2, labels2, rng)
            rec = self._records[index]
            meta = ImageMeta(rec.image_id, str(rec.file), (rec.height, rec.width), (1.0, 1.0), (0, 0), True)
        else:
            image, labels, meta = self._load_letterboxed(index)
            image, labels = random_affine(image, labels, (size, size), aug.degrees, aug.translate,
                                          aug.scale, aug.shear, rng)
        image = augment_hsv(image, aug.hsv_h, aug.hsv_s, aug.hsv_v, rng)
        if rng.random() < aug.flipud:
            image, labels = vflip(image, labels)
        if rng.random() < aug.fliplr:
            image, labels = hflip(image, labels)
        return image, labels, meta

    @staticmethod
    def collate_fn(batch: list[tuple[Tensor, Tensor, ImageMeta]]) -> tuple[Tensor, Tensor, list[ImageMeta]]:
        """Stack samples: ``images (B, 3, S, S) float32 in [0, 1]``, ``targets (N, 6) [batch_index,
        class, x1, y1, x2, y2]`` input pixels, ``metas``."""
        images, labels, metas = zip(*batch, strict=True)
        targets = [torch.cat((torch.full((len(lab), 1), float(i)), lab), dim=1)
                   for i, lab in enumerate(labels)]
        return torch.stack(images).float().div_(255.0), torch.cat(targets).reshape(-1, 6), list(metas)
