"""Dataset YAML, label scanning (YOLO txt or COCO json) and the detection dataset.

Everything is validated once, at construction (every image decoded, every label line parsed), so a
bad file stops the run before training starts, with a ``DataError`` naming the file and line.
The scan result is kept in memory; ``__getitem__`` only decodes and augments.

Sample format: ``image (3, S, S) uint8``, ``labels (n, 5) float32 [class, x1, y1, x2, y2]`` in input
pixels, and an ``ImageMeta`` mapping input pixels back to the original image.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor
from torch.utils.data import Dataset

from repquant.data.images import IMAGE_SUFFIXES, load_image, probe_image
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
# dataset YAML


@dataclass(frozen=True)
class SplitSource:
    """One split: an image folder, and a COCO json (``annotations``) or, when None, YOLO txt labels in
    the parallel ``labels`` folder (last ``images`` path component replaced by ``labels``)."""

    images: Path
    annotations: Path | None = None


@dataclass(frozen=True)
class DataConfig:
    """A parsed dataset YAML; every path absolute."""

    root: Path
    train: SplitSource
    val: SplitSource
    nc: int
    names: tuple[str, ...]
    test: SplitSource | None = None
    source: str = "<dict>"  # the YAML file, for error messages

    def split(self, name: str) -> SplitSource:
        """The ``train``, ``val`` or ``test`` split; DataError if absent."""
        if name not in ("train", "val", "test"):
            raise DataError(f"{self.source}: unknown split {name!r}; expected train, val or test")
        source = getattr(self, name)
        if source is None:
            raise DataError(f"{self.source}: no {name!r} split defined")
        return source


def _resolve_root(raw: Any, base: Path, source: str) -> Path:
    """Dataset root: absolute, or relative to the YAML's folder; if that does not exist, relative to
    the working directory (so ``path: ../shared/data/x`` written relative to the project root works
    from a YAML in ``recipes/data/``)."""
    if raw is None:
        return base.resolve()
    if not isinstance(raw, str | Path):
        raise DataError(f"{source}: 'path' must be a string, got {type(raw).__name__}")
    path = Path(raw).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [base / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataError(f"{source}: dataset root {str(raw)!r} not found (looked in {looked})")


def _parse_split(raw: Any, key: str, root: Path, source: str) -> SplitSource:
    if isinstance(raw, str):
        images, annotations = root / raw, None
    elif isinstance(raw, dict) and set(raw) <= {"images", "annotations"} and "images" in raw:
        images = root / str(raw["images"])
        annotations = root / str(raw["annotations"]) if raw.get("annotations") else None
    else:
        raise DataError(f"{source}: '{key}' must be an image folder or {{images: ..., annotations: ...}}, "
                        f"got {raw!r}")
    if not images.is_dir():
        raise DataError(f"{source}: '{key}' image folder {images} does not exist")
    if annotations is not None and not annotations.is_file():
        raise DataError(f"{source}: '{key}' annotation file {annotations} does not exist")
    return SplitSource(images.resolve(), annotations.resolve() if annotations else None)


def _parse_names(raw: Any, nc: Any, source: str) -> tuple[int, tuple[str, ...]]:
    if isinstance(raw, dict):
        if sorted(raw) != list(range(len(raw))):
            raise DataError(f"{source}: 'names' keys must be 0..{len(raw) - 1}, got {sorted(raw)}")
        names = tuple(str(raw[i]) for i in range(len(raw)))
    elif isinstance(raw, list):
        names = tuple(str(n) for n in raw)
    elif raw is None:
        names = ()
    else:
        raise DataError(f"{source}: 'names' must be a list or a mapping, got {type(raw).__name__}")
    if nc is None:
        nc = len(names)
    if isinstance(nc, bool) or not isinstance(nc, int) or nc <= 0:
        raise DataError(f"{source}: 'nc' must be a positive integer, got {nc!r}")
    if not names:
        names = tuple(str(i) for i in range(nc))
    if len(names) != nc:
        raise DataError(f"{source}: 'nc' is {nc} but 'names' has {len(names)} entries")
    return nc, names


def data_config_from_dict(raw: dict[str, Any], base_dir: str | Path, source: str = "<dict>") -> DataConfig:
    """Build a ``DataConfig`` from a YAML-like mapping; relative paths resolve against ``base_dir``."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_YAML_KEYS))
    if unknown:
        raise DataError(f"{source}: unknown key {unknown[0]!r}; expected {', '.join(_YAML_KEYS)}")
    for key in ("train", "val"):
        if raw.get(key) is None:
            raise DataError(f"{source}: missing key {key!r}")
    if raw.get("nc") is None and raw.get("names") is None:
        raise DataError(f"{source}: missing key 'nc' (or 'names')")
    root = _resolve_root(raw.get("path"), Path(base_dir), source)
    nc, names = _parse_names(raw.get("names"), raw.get("nc"), source)
    test = _parse_split(raw["test"], "test", root, source) if raw.get("test") is not None else None
    return DataConfig(root=root, train=_parse_split(raw["train"], "train", root, source),
                      val=_parse_split(raw["val"], "val", root, source), nc=nc, names=names, test=test,
                      source=source)


def load_data_config(path: str | Path) -> DataConfig:
    """Parse a dataset YAML (YOLOv6/Ultralytics style: ``path``, ``train``, ``val``, ``test``, ``nc``,
    ``names``); any problem raises ``DataError`` naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise DataError(f"{path}: dataset YAML not found") from err
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"{path}: cannot read dataset YAML ({' '.join(str(err).split())})") from err
    return data_config_from_dict(raw, path.resolve().parent, source=str(path))


# ----------------------------------------------------------------------------------------------------
# scanning


@dataclass(frozen=True, eq=False)
class _Record:
    """One validated image: its file, id, original size and boxes (n, 4) xyxy original pixels."""

    file: Path
    image_id: int
    height: int
    width: int
    boxes: np.ndarray
    classes: np.ndarray


@dataclass
class ScanStats:
    """Counts from the scan, logged once."""

    images: int = 0
    boxes: int = 0
    background: int = 0  # images without any box
    missing_label_files: int = 0
    empty_label_files: int = 0
    crowd_skipped: int = 0


def parse_yolo_labels(path: Path, nc: int) -> np.ndarray:
    """Parse and validate a YOLO label file.

    Returns:
        (n, 5) float64 rows ``[class, x1, y1, x2, y2]`` normalised to [0, 1] (clipped when within
        ``BOX_TOLERANCE`` of the image).

    Raises:
        DataError: ``<file> line N: <problem>`` for the first bad line.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read label file ({err})") from err
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append(_parse_yolo_line(line, nc, f"{path} line {line_no}"))
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def _parse_yolo_line(line: str, nc: int, where: str) -> list[float]:
    parts = line.split()
    if len(parts) != 5:
        raise DataError(f"{where}: expected 5 columns (class cx cy w h), got {len(parts)}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        raise DataError(f"{where}: non-numeric value {bad!r}") from None
    if not all(np.isfinite(values)):
        raise DataError(f"{where}: non-finite value in {line.strip()!r}")
    cls, cx, cy, w, h = values
    if cls != int(cls) or not 0 <= cls < nc:
        raise DataError(f"{where}: class id {parts[0]} out of range [0, {nc})")
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: non-positive box width/height ({parts[3]}, {parts[4]})")
    return [cls, *_check_normalised_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, where)]


def _check_normalised_box(x1: float, y1: float, x2: float, y2: float, where: str) -> list[float]:
    if min(x1, y1) < -BOX_TOLERANCE or max(x2, y2) > 1 + BOX_TOLERANCE:
        raise DataError(f"{where}: box (x1 {x1:.4f}, y1 {y1:.4f}, x2 {x2:.4f}, y2 {y2:.4f}) outside the "
                        f"image [0, 1] beyond tolerance {BOX_TOLERANCE}")
    return [min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2)]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _labels_dir(images: Path) -> Path:
    parts = list(images.parts)
    if "images" not in parts:
        raise DataError(f"{images}: YOLO labels need an 'images' folder in the path (labels are found by "
                        f"replacing it with 'labels'), or give a COCO json as 'annotations'")
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:])


def _list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def _image_ids(files: list[Path]) -> list[int]:
    """COCO-style ids: the numeric file stem when every stem is a distinct number, else the index."""
    stems = [f.stem for f in files]
    if all(s.isdigit() for s in stems) and len(set(map(int, stems))) == len(stems):
        return [int(s) for s in stems]
    return list(range(len(files)))


def scan_yolo(images_dir: Path, nc: int) -> tuple[list[_Record], ScanStats]:
    """Validate a YOLO split: every image decodes, every label line is valid, no orphan label file."""
    files = _list_images(images_dir)
    labels_dir = _labels_dir(images_dir)
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir}: labels folder for images {images_dir} does not exist")
    expected = {f.relative_to(images_dir).with_suffix(".txt") for f in files}
    if len(expected) != len(files):
        raise DataError(f"{images_dir}: two images share a file stem, so their labels are ambiguous")
    orphans = sorted(p for p in labels_dir.rglob("*.txt") if p.relative_to(labels_dir) not in expected)
    if orphans:
        raise DataError(f"{orphans[0]}: label file without a matching image in {images_dir}"
                        + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""))
    stats, records = ScanStats(images=len(files)), []
    for file, image_id in zip(files, _image_ids(files), strict=True):
        height, width = probe_image(file)
        label_file = labels_dir / file.relative_to(images_dir).with_suffix(".txt")
        if label_file.is_file():
            rows = parse_yolo_labels(label_file, nc)
            stats.empty_label_files += not len(rows)
        else:
            rows = np.zeros((0, 5))
            stats.missing_label_files += 1
        boxes = (rows[:, 1:] * [width, height, width, height]).astype(np.float32)
        records.append(_Record(file, image_id, height, width, boxes, rows[:, 0].astype(np.int64)))
    return records, stats


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read COCO json ({err})") from err
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{path}: COCO json has no {missing[0]!r} list")
    return data


def scan_coco(images_dir: Path, json_path: Path, nc: int) -> tuple[list[_Record], ScanStats]:
    """Validate a COCO split. Category ids map to 0..nc-1 by ascending id; crowd boxes are skipped."""
    data = _load_json(json_path)
    cat_ids = sorted(int(c["id"]) for c in data["categories"])
    if len(cat_ids) != nc:
        raise DataError(f"{json_path}: {len(cat_ids)} categories but the dataset YAML says nc={nc}")
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    images = sorted(data["images"], key=lambda im: str(im["file_name"]))
    if not images:
        raise DataError(f"{json_path}: no images listed")
    per_image: dict[int, list[dict[str, Any]]] = {int(im["id"]): [] for im in images}
    stats = ScanStats(images=len(images))
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            stats.crowd_skipped += 1
            continue
        if int(ann["image_id"]) not in per_image:
            raise DataError(f"{json_path} annotation id {ann.get('id')}: unknown image_id {ann['image_id']}")
        per_image[int(ann["image_id"])].append(ann)
    records = []
    for im in images:
        file = images_dir / str(im["file_name"])
        height, width = probe_image(file)
        if (height, width) != (int(im["height"]), int(im["width"])):
            raise DataError(f"{file}: decoded size {width}x{height} differs from {json_path} "
                            f"({im['width']}x{im['height']})")
        rows = [_coco_row(ann, cat_index, width, height, json_path) for ann in per_image[int(im["id"])]]
        rows_np = np.array(rows, dtype=np.float64).reshape(-1, 5)
        records.append(_Record(file, int(im["id"]), height, width,
                               rows_np[:, 1:].astype(np.float32), rows_np[:, 0].astype(np.int64)))
    return records, stats


def _coco_row(ann: dict[str, Any], cat_index: dict[int, int], width: int, height: int,
              json_path: Path) -> list[float]:
    where = f"{json_path} annotation id {ann.get('id')}"
    if int(ann["category_id"]) not in cat_index:
        raise DataError(f"{where}: category_id {ann['category_id']} not in 'categories'")
    x, y, w, h = (float(v) for v in ann["bbox"])
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: non-positive box width/height ({w}, {h})")
    norm = _check_normalised_box(x / width, y / height, (x + w) / width, (y + h) / height, where)
    return [cat_index[int(ann["category_id"])], norm[0] * width, norm[1] * height, norm[2] * width,
            norm[3] * height]


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
