"""A seeded, learnable toy detection dataset: colored shapes on noisy backgrounds.

Class ``k`` is drawn as a filled shape of one fixed color (rectangle for even ``k``, ellipse for odd
``k``) so color and shape both identify it; boxes are the exact pixel extent of the drawn shape.
The same seed gives the same bytes (PIL's JPEG encoder is deterministic for fixed settings).
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

# Well-separated hues for the first classes; more classes get evenly spaced hues.
_BASE_COLORS = ((220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 30), (200, 60, 200), (30, 200, 200))
_SHAPES = ("rect", "ellipse")
_MAX_OBJECTS = 4
_JPEG_QUALITY = 95


def class_color(k: int, num_classes: int) -> tuple[int, int, int]:
    """RGB color of class ``k``."""
    if num_classes <= len(_BASE_COLORS):
        return _BASE_COLORS[k]
    r, g, b = colorsys.hsv_to_rgb(k / num_classes, 0.85, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def class_names(num_classes: int) -> list[str]:
    """Names like ``rect_0``, ``ellipse_1``: shape and class index."""
    return [f"{_SHAPES[k % 2]}_{k}" for k in range(num_classes)]


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _sample_boxes(rng: np.random.Generator, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """1..4 boxes (x1, y1, x2, y2) in edge pixels, 20-50% of the short side, overlapping at most 0.1 IoU."""
    count = int(rng.integers(1, _MAX_OBJECTS + 1))
    short = min(height, width)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(20 * count):  # rejection sampling; a fixed number of draws keeps it deterministic
        if len(boxes) == count:
            break
        bw, bh = (int(v) for v in rng.integers(int(0.2 * short), int(0.5 * short) + 1, 2))
        x1, y1 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
        box = (x1, y1, x1 + bw, y1 + bh)
        if all(_iou(box, other) < 0.1 for other in boxes):
            boxes.append(box)
    return boxes


def _make_image(rng: np.random.Generator, height: int, width: int, num_classes: int
                ) -> tuple[Image.Image, list[tuple[int, tuple[int, int, int, int]]]]:
    base = rng.integers(70, 150, 3)
    noise = rng.normal(0, 12, (height, width, 3))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    objects = []
    for box in _sample_boxes(rng, height, width):
        k = int(rng.integers(0, num_classes))
        # PIL includes both end pixels, so the shape covering edge box [x1, x2) ends at pixel x2 - 1.
        corners = (box[0], box[1], box[2] - 1, box[3] - 1)
        if _SHAPES[k % 2] == "rect":
            draw.rectangle(corners, fill=class_color(k, num_classes))
        else:
            draw.ellipse(corners, fill=class_color(k, num_classes))
        objects.append((k, box))
    return image, objects


def _write_split(root: Path, split: str, count: int, img_hw: tuple[int, int], num_classes: int,
                 rng: np.random.Generator) -> None:
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    height, width = img_hw
    for i in range(count):
        image, objects = _make_image(rng, height, width, num_classes)
        image.save(image_dir / f"{i:06d}.jpg", format="JPEG", quality=_JPEG_QUALITY)
        lines = [f"{k} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                 f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}" for k, (x1, y1, x2, y2) in objects]
        (label_dir / f"{i:06d}.txt").write_text("".join(line + "\n" for line in lines))


def make_synthetic_dataset(root: str | Path, num_train: int = 16, num_val: int = 8,
                           img_size: tuple[int, int] = (128, 128), num_classes: int = 3,
                           seed: int = 0) -> Path:
    """Write a YOLO-format toy dataset and its YAML under ``root``.

    Layout: ``images/{train,val}/NNNNNN.jpg``, ``labels/{train,val}/NNNNNN.txt`` and ``data.yaml``
    (``path: .``, so the folder can be moved). Every image has 1-4 objects; ``img_size`` is
    ``(height, width)`` of the written images.

    Returns:
        Path of ``data.yaml``.
    """
    if num_train < 1 or num_val < 1 or num_classes < 1:
        raise ValueError(f"make_synthetic_dataset: num_train, num_val and num_classes must be >= 1, got "
                         f"{num_train}, {num_val}, {num_classes}")
    if min(img_size) < 16:
        raise ValueError(f"make_synthetic_dataset: img_size {img_size} too small (need >= 16 pixels)")
    root = Path(root)
    rng = np.random.default_rng(seed)
    _write_split(root, "train", num_train, img_size, num_classes, rng)
    _write_split(root, "val", num_val, img_size, num_classes, rng)
    config = {"path": ".", "train": "images/train", "val": "images/val", "nc": num_classes,
              "names": class_names(num_classes)}
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return yaml_path
