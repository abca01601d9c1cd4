"""Geometric and photometric transforms for detection: letterbox, mosaic, mixup, HSV, affine, flips.

Conventions:
- images are ``np.ndarray (H, W, 3) uint8`` RGB;
- labels are ``np.ndarray (n, 5) float32`` rows ``[class, x1, y1, x2, y2]`` in pixels of that image,
  with the continuous convention that pixel ``i`` covers ``[i, i + 1)`` so an image spans
  ``[0, W] x [0, H]`` (PIL's resize and affine warp use the same convention, which keeps box
  geometry exact);
- randomness comes only from the ``np.random.Generator`` passed in (no global RNG), so a sample
  is a pure function of (seed, epoch, index) in the dataset.

Semantics follow YOLOv6 (yolov6/data/data_augment.py); the implementation is PIL + numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from repquant.data.images import resize
from repquant.errors import DataError

PAD_VALUE = 114  # gray used for letterbox and mosaic borders (YOLOv5/v6)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation hyper-parameters; defaults are YOLOv6 v3 n/s (configs/yolov6n.py)."""

    hsv_h: float = 0.015  # hue gain (fraction)
    hsv_s: float = 0.7  # saturation gain (fraction)
    hsv_v: float = 0.4  # value gain (fraction)
    degrees: float = 0.0  # rotation, +/- degrees
    translate: float = 0.1  # translation, +/- fraction of the output size
    scale: float = 0.5  # scale gain, uniform in [1 - scale, 1 + scale]
    shear: float = 0.0  # shear, +/- degrees
    flipud: float = 0.0  # probability of a vertical flip
    fliplr: float = 0.5  # probability of a horizontal flip
    mosaic: float = 1.0  # probability of a 4-image mosaic
    mixup: float = 0.0  # probability of mixing a second mosaic in (only after a mosaic)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise DataError(f"AugmentConfig.{f.name}: expected a finite number >= 0, got {value!r}")
        for name in ("flipud", "fliplr", "mosaic", "mixup", "scale"):
            if getattr(self, name) > 1:
                raise DataError(f"AugmentConfig.{name}: expected a value in [0, 1], "
                                f"got {getattr(self, name)}")

    @classmethod
    def for_variant(cls, model_name: str) -> AugmentConfig:
        """YOLOv6 v3 defaults per size: n/s as the class defaults; m/l use scale 0.9 and mixup 0.1."""
        size = model_name.removeprefix("yolov6").lstrip("-_")[:1].lower()
        if size in ("m", "l"):
            return cls(scale=0.9, mixup=0.1)
        return cls()


# ----------------------------------------------------------------------------------------------------
# letterbox


def letterbox(image: np.ndarray, new_shape: int | tuple[int, int], color: int = PAD_VALUE,
              auto: bool = False, scaleup: bool = True, stride: int = 32, shrink: int = 0
              ) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio, then pad with gray, centered.

    Args:
        image: (H0, W0, 3) uint8.
        new_shape: output ``(height, width)`` (or one int for a square).
        color: pad value.
        auto: pad only to the next multiple of ``stride`` (smaller output, YOLOv6 ``auto``).
        scaleup: allow enlarging; ``False`` only shrinks images larger than ``new_shape``.
        stride: see ``auto``.
        shrink: fit the content into ``new_shape - shrink`` pixels and pad the rest, i.e. keep a
            gray border of at least ``shrink / 2`` pixels per side. YOLOv6 v3 evaluates with images
            loaded at 634 and padded to 640 (``test_load_size=634``), the border the model saw
            during mosaic training; 0 gives the plain letterbox.

    Returns:
        ``(out (H, W, 3) uint8, ratio (ratio_h, ratio_w), pad (left, top))``: a point ``(x, y)`` of
        the original image maps to ``(x * ratio_w + left, y * ratio_h + top)``. The ratios are the
        exact per-axis ratios after rounding the resized size to whole pixels.
    """
    out_h, out_w = (new_shape, new_shape) if isinstance(new_shape, int) else (int(new_shape[0]),
                                                                              int(new_shape[1]))
    h0, w0 = image.shape[:2]
    r = min((out_h - shrink) / h0, (out_w - shrink) / w0)
    if not scaleup:
        r = min(r, 1.0)
    new_h, new_w = max(1, round(h0 * r)), max(1, round(w0 * r))
    pad_h, pad_w = out_h - new_h, out_w - new_w
    if auto:
        pad_h, pad_w = pad_h % stride, pad_w % stride
    top, left = pad_h // 2, pad_w // 2
    out = np.full((new_h + pad_h, new_w + pad_w, 3), color, dtype=np.uint8)
    out[top:top + new_h, left:left + new_w] = resize(image, (new_h, new_w))
    return out, (new_h / h0, new_w / w0), (left, top)


def scale_boxes(labels: np.ndarray, ratio: tuple[float, float], pad: tuple[float, float]) -> np.ndarray:
    """Map ``(n, 5) [cls, x1, y1, x2, y2]`` labels through a letterbox ``(ratio_h, ratio_w), (left, top)``."""
    out = labels.astype(np.float32, copy=True)
    out[:, [1, 3]] = labels[:, [1, 3]] * ratio[1] + pad[0]
    out[:, [2, 4]] = labels[:, [2, 4]] * ratio[0] + pad[1]
    return out


def fit_long_side(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the longer side equals ``size`` (YOLOv6 ``load_image``); labels follow."""
    h0, w0 = image.shape[:2]
    r = size / max(h0, w0)
    new_h, new_w = max(1, round(h0 * r)), max(1, round(w0 * r))
    return resize(image, (new_h, new_w)), scale_boxes(labels, (new_h / h0, new_w / w0), (0, 0))


# ----------------------------------------------------------------------------------------------------
# photometric


def augment_hsv(image: np.ndarray, hgain: float, sgain: float, vgain: float,
                rng: np.random.Generator) -> np.ndarray:
    """Random multiplicative gains on hue (cyclic), saturation and value; returns a new image.

    PIL's HSV has all three channels in 0..255, so the hue lookup wraps at 256 (OpenCV's at 180).
    """
    gains = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1
    if not (hgain or sgain or vgain):
        return image
    hsv = np.asarray(Image.fromarray(image).convert("HSV"))
    x = np.arange(256, dtype=np.float64)
    luts = (np.mod(x * gains[0], 256).astype(np.uint8),
            np.clip(x * gains[1], 0, 255).astype(np.uint8),
            np.clip(x * gains[2], 0, 255).astype(np.uint8))
    hsv = np.stack([lut[hsv[..., c]] for c, lut in enumerate(luts)], axis=-1)
    return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))


def mixup(image: np.ndarray, labels: np.ndarray, image2: np.ndarray, labels2: np.ndarray,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """MixUp (arXiv 1710.09412) with ratio ~ Beta(32, 32) as YOLOv6; keeps the boxes of both."""
    r = rng.beta(32.0, 32.0)
    mixed = (image.astype(np.float32) * r + image2.astype(np.float32) * (1 - r)).astype(np.uint8)
    return mixed, np.concatenate((labels, labels2), 0)


# ----------------------------------------------------------------------------------------------------
# flips


def hflip(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: ``x -> W - x`` (so ``x1' = W - x2``, ``x2' = W - x1``)."""
    width = image.shape[1]
    out = labels.copy()
    out[:, 1], out[:, 3] = width - labels[:, 3], width - labels[:, 1]
    return np.ascontiguousarray(image[:, ::-1]), out


def vflip(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror up-down: ``y -> H - y``."""
    height = image.shape[0]
    out = labels.copy()
    out[:, 2], out[:, 4] = height - labels[:, 4], height - labels[:, 2]
    return np.ascontiguousarray(image[::-1]), out


# ----------------------------------------------------------------------------------------------------
# affine


def affine_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int], degrees: float, translate: float,
                  scale: float, shear: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Random 3x3 affine ``M = T @ Sh @ R @ C`` as YOLOv6 ``get_transform_matrix``.

    C moves the input center to the origin; R rotates by ``U(-degrees, degrees)`` (counter-clockwise
    on screen) and scales by ``s ~ U(1 - scale, 1 + scale)``; Sh shears; T moves the origin to
    ``U(0.5 - translate, 0.5 + translate) * out size``. Returns ``(M, s)``.
    """
    in_h, in_w = in_hw
    out_h, out_w = out_hw
    angle, s = rng.uniform(-degrees, degrees), rng.uniform(1 - scale, 1 + scale)
    shear_x, shear_y = rng.uniform(-shear, shear, 2)
    tx, ty = rng.uniform(0.5 - translate, 0.5 + translate, 2)
    center = np.array([[1, 0, -in_w / 2], [0, 1, -in_h / 2], [0, 0, 1]], dtype=np.float64)
    a = math.radians(angle)
    rot = np.array([[s * math.cos(a), s * math.sin(a), 0], [-s * math.sin(a), s * math.cos(a), 0],
                    [0, 0, 1]], dtype=np.float64)
    sh = np.array([[1, math.tan(math.radians(shear_x)), 0], [math.tan(math.radians(shear_y)), 1, 0],
                   [0, 0, 1]], dtype=np.float64)
    trans = np.array([[1, 0, tx * out_w], [0, 1, ty * out_h], [0, 0, 1]], dtype=np.float64)
    return trans @ sh @ rot @ center, float(s)


def warp_affine(image: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int],
                color: int = PAD_VALUE) -> np.ndarray:
    """Warp ``image`` by the forward 3x3 ``matrix`` (input pixel -> output pixel), bilinear, gray fill."""
    out_h, out_w = out_hw
    if image.shape[:2] == (out_h, out_w) and np.allclose(matrix, np.eye(3)):
        return image
    inverse = np.linalg.inv(matrix)  # PIL wants output -> input
    warped = Image.fromarray(image).transform(
        (out_w, out_h), Image.Transform.AFFINE, data=tuple(inverse[:2].ravel().tolist()),
        resample=Image.Resampling.BILINEAR, fillcolor=(color, color, color))
    return np.asarray(warped)


def box_candidates(before: np.ndarray, after: np.ndarray, wh_thr: float = 2.0, ar_thr: float = 20.0,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Boolean mask of boxes that survive a transform: ``before``/``after`` are (n, 4) xyxy, ``before``
    already scaled by the transform's scale. A box survives if it is wider and taller than ``wh_thr``
    pixels, keeps more than ``area_thr`` of its area (the rest was clipped away) and its aspect ratio
    stays below ``ar_thr``."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def transform_labels(labels: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int],
                     scale: float = 1.0) -> np.ndarray:
    """Boxes through an affine ``matrix``: the enclosing box of the 4 moved corners, clipped to the
    output; boxes that collapse (``box_candidates``) are dropped. ``scale`` is the transform's
    scale, used to judge the area kept."""
    if not len(labels):
        return labels.reshape(0, 5).astype(np.float32)
    out_h, out_w = out_hw
    n = len(labels)
    corners = np.ones((n * 4, 3))
    corners[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
    moved = (corners @ matrix.T)[:, :2].reshape(n, 8)
    xs, ys = moved[:, 0::2], moved[:, 1::2]
    boxes = np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), axis=1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, out_w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, out_h)
    keep = box_candidates(labels[:, 1:5] * scale, boxes)
    return np.concatenate((labels[keep, :1], boxes[keep]), axis=1).astype(np.float32)


def random_affine(image: np.ndarray, labels: np.ndarray, out_hw: tuple[int, int], degrees: float,
                  translate: float, scale: float, shear: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation to an ``out_hw`` canvas; collapsed boxes dropped."""
    matrix, s = affine_matrix(image.shape[:2], out_hw, degrees, translate, scale, shear, rng)
    return warp_affine(image, matrix, out_hw), transform_labels(labels, matrix, out_hw, s)


# ----------------------------------------------------------------------------------------------------
# mosaic


def _tile_placement(i: int, xc: int, yc: int, h: int, w: int, s: int) -> tuple[tuple[int, ...], ...]:
    """Canvas slice (x1a, y1a, x2a, y2a) and tile slice (x1b, y1b, x2b, y2b) of tile ``i`` around
    the mosaic center ``(xc, yc)`` of a ``2s x 2s`` canvas (0 top-left, 1 top-right, 2 bottom-left,
    3 bottom-right); each tile touches the center with its inner corner and is cropped at the
    canvas edge."""
    if i == 0:
        a = (max(xc - w, 0), max(yc - h, 0), xc, yc)
        b = (w - (a[2] - a[0]), h - (a[3] - a[1]), w, h)
    elif i == 1:
        a = (xc, max(yc - h, 0), min(xc + w, 2 * s), yc)
        b = (0, h - (a[3] - a[1]), min(w, a[2] - a[0]), h)
    elif i == 2:
        a = (max(xc - w, 0), yc, xc, min(2 * s, yc + h))
        b = (w - (a[2] - a[0]), 0, w, min(a[3] - a[1], h))
    else:
        a = (xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h))
        b = (0, 0, min(w, a[2] - a[0]), min(a[3] - a[1], h))
    return a, b


def mosaic(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], img_size: int,
           aug: AugmentConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """4-image mosaic (YOLOv6 ``mosaic_augmentation``) followed by ``random_affine`` to the output.

    Each image is resized to long side ``img_size`` and placed in a quadrant of a gray
    ``2S x 2S`` canvas around a random center in ``[S/2, 3S/2)``; the affine then scales and
    translates the canvas center into the ``S x S`` output, which leaves gray borders where the
    tiles do not reach (the borders YOLOv6 v3 trains away by closing mosaic in the last epochs).

    Args:
        images: four (H, W, 3) uint8 images of any size.
        labels: four (n_i, 5) ``[cls, x1, y1, x2, y2]`` label arrays, pixels of the matching image.
        img_size: output side S.

    Returns:
        ``(image (S, S, 3) uint8, labels (n, 5))`` with boxes inside ``[0, S]``.
    """
    if len(images) != 4 or len(labels) != 4:
        raise ValueError(f"mosaic needs 4 images and 4 label arrays, got {len(images)} and {len(labels)}")
    s = img_size
    xc, yc = (int(v) for v in rng.uniform(s // 2, 3 * s // 2, 2))
    canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, dtype=np.uint8)
    placed = []
    for i, (image, lab) in enumerate(zip(images, labels, strict=True)):
        image, lab = fit_long_side(image, lab.reshape(-1, 5), s)
        h, w = image.shape[:2]
        (x1a, y1a, x2a, y2a), (x1b, y1b, x2b, y2b) = _tile_placement(i, xc, yc, h, w, s)
        canvas[y1a:y2a, x1a:x2a] = image[y1b:y2b, x1b:x2b]
        placed.append(scale_boxes(lab, (1.0, 1.0), (x1a - x1b, y1a - y1b)))
    all_labels = np.concatenate(placed, 0)
    # Tiles are only cropped at the canvas border, so clipping to the canvas clips each box to the
    # visible part of its tile; hidden boxes get zero size and box_candidates drops them.
    all_labels[:, 1:] = all_labels[:, 1:].clip(0, 2 * s)
    return random_affine(canvas, all_labels, (s, s), aug.degrees, aug.translate, aug.scale, aug.shear, rng)
