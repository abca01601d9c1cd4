"""Label scanning: YOLO txt files or a COCO json, every image probed and every label line parsed once, so a
bad file stops the run before training starts with a ``DataError`` naming the file and line."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from repquant.data.images import IMAGE_SUFFIXES, probe_image
from repquant.errors import DataError

logger = logging.getLogger(__name__)

BOX_TOLERANCE = 1e-3  # normalised; boxes this far outside [0, 1] are clipped, further is an error


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
    if not isinstance(data, dict):
        raise DataError(f"{path}: COCO json must be an object with images, annotations and categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{path}: COCO json has no {missing[0]!r} list")
    for section, fields in _COCO_FIELDS.items():
        for i, entry in enumerate(data[section]):
            _check_coco_entry(entry, fields, f"{path} {section}[{i}]")
    return data


_NUMBER = (int, float)
_COCO_FIELDS: dict[str, dict[str, Any]] = {
    "categories": {"id": int},
    "images": {"id": int, "file_name": str, "height": int, "width": int},
    "annotations": {"image_id": int, "category_id": int, "bbox": list},
}


def _check_coco_entry(entry: Any, fields: dict[str, Any], where: str) -> None:
    """Every field COCO loading reads, present and of its type (a bbox: four numbers)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if "id" in entry:
        where = f"{where.rsplit('[', 1)[0]} id {entry['id']}"
    for key, kind in fields.items():
        value = entry.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, kind):
            raise DataError(f"{where}: {'missing' if value is None else 'bad'} field {key!r} "
                            f"(expected {kind.__name__}, got {value!r:.40})")
    bbox = entry.get("bbox")
    if bbox is not None and (len(bbox) != 4 or not all(isinstance(v, _NUMBER) and not isinstance(v, bool)
                                                        for v in bbox)):
        raise DataError(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r:.60}")


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


