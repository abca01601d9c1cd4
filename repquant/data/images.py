"""Image decoding and resizing: the only place that touches image files.

Images are handled as ``np.ndarray (H, W, 3) uint8 RGB``. Decoding goes through PIL with the EXIF
orientation applied (phone photos store a rotation tag instead of rotated pixels) and every supported mode
converted to RGB: 1, L, P (palette, with or without transparency), LA, RGBA, RGBX, CMYK, YCbCr, and 16-bit
grayscale (I;16*, and I with values in 0..65535) scaled to 8 bits by its high byte; PIL's own conversion
clips 16-bit values at 255, which turns a 16-bit PNG white. Other modes (F, LAB, HSV, 32-bit I) are refused.
A corrupt or truncated file raises ``DataError`` naming it, instead of the silent gray fill some loaders
fall back to.

Resizing uses PIL bilinear everywhere (letterbox, mosaic tiles, synthetic data) so that training,
evaluation and calibration see the same interpolation.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from repquant.errors import DataError

IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError)


def _open_rgb(path: Path) -> Image.Image:
    """Fully decoded RGB PIL image with EXIF orientation applied; DataError naming ``path`` otherwise."""
    try:
        with warnings.catch_warnings():
            # PIL warns (instead of failing) on some broken EXIF blocks; a warning is not corruption.
            warnings.simplefilter("ignore")
            with Image.open(path) as opened:
                opened.load()  # decode every byte now: a truncated JPEG fails here, not mid-training
                img: Image.Image = _to_rgb(ImageOps.exif_transpose(opened), path)
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err
    if img.width < 2 or img.height < 2:
        raise DataError(f"{path}: image is {img.width}x{img.height} pixels, too small")
    return img


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_CONVERTIBLE_MODES = ("1", "L", "P", "LA", "PA", "RGBA", "RGBX", "RGBa", "La", "CMYK", "YCbCr")


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """``img`` as 8-bit RGB (alpha dropped, as cv2.imread does); DataError for modes with no faithful mapping."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{path}: {img.mode} image with values outside 0..65535 (32-bit integer pixels are "
                            "not supported; save it as 8- or 16-bit)")
        gray = (values >> 8).astype(np.uint8)  # 16 -> 8 bits: the high byte, as OpenCV's IMREAD_COLOR does
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    if img.mode in _CONVERTIBLE_MODES or img.mode == "RGBA":
        return img.convert("RGB")
    raise DataError(f"{path}: image mode {img.mode} is not supported (convert it to 8-bit RGB or grayscale)")


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file.

    Returns:
        ``(H, W, 3) uint8`` RGB array, EXIF orientation applied.

    Raises:
        DataError: the file is missing, corrupt, truncated or not an image.
    """
    return np.asarray(_open_rgb(Path(path)), dtype=np.uint8)


def probe_image(path: str | Path) -> tuple[int, int]:
    """Decode ``path`` completely (to catch corruption early) and return its ``(height, width)``
    after EXIF orientation."""
    img = _open_rgb(Path(path))
    return img.height, img.width


def resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``(H, W, 3) uint8`` image to ``hw = (height, width)``."""
    height, width = int(hw[0]), int(hw[1])
    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
