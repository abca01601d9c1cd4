"""Transforms: exact letterbox geometry, boxes that follow flips/affine/mosaic, HSV and mixup."""

from __future__ import annotations

import numpy as np
import pytest

from repquant.data.transforms import (
    PAD_VALUE,
    AugmentConfig,
    affine_matrix,
    augment_hsv,
    hflip,
    letterbox,
    mixup,
    mosaic,
    random_affine,
    scale_boxes,
    transform_labels,
    vflip,
    warp_affine,
)
from repquant.errors import DataError


def _block_image(hw: tuple[int, int], box: tuple[int, int, int, int], color=(255, 0, 0), bg=40) -> np.ndarray:
    """Background ``bg`` with a solid block covering edge box (x1, y1, x2, y2)."""
    img = np.full((*hw, 3), bg, dtype=np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = color
    return img


def _labels(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32).reshape(-1, 5)


# ---------------------------------------------------------------------------------------------- letterbox


def test_letterbox_wide_image_pads_top_and_bottom():
    img = np.full((100, 200, 3), 7, dtype=np.uint8)
    out, ratio, pad = letterbox(img, 64)
    assert out.shape == (64, 64, 3)
    assert ratio == (32 / 100, 64 / 200) and pad == (0, 16)
    assert (out[:16] == PAD_VALUE).all() and (out[48:] == PAD_VALUE).all()
    assert (out[16:48] == 7).all()


def test_letterbox_tall_odd_padding_and_auto():
    img = np.full((90, 30, 3), 7, dtype=np.uint8)
    out, ratio, pad = letterbox(img, (64, 64))
    # r = 64/90 -> resized (64, round(21.33) = 21); 43 columns of padding: 21 left, 22 right.
    assert out.shape == (64, 64, 3) and pad == (21, 0) and ratio == (64 / 90, 21 / 30)
    assert (out[:, :21] == PAD_VALUE).all() and (out[:, 42:] == PAD_VALUE).all()
    assert (out[:, 21:42] == 7).all()
    out_auto, _, pad_auto = letterbox(img, 64, auto=True, stride=32)
    assert out_auto.shape == (64, 21 + 43 % 32, 3) and pad_auto == (5, 0)


def test_letterbox_no_scaleup_and_shrink():
    small = np.full((20, 10, 3), 7, dtype=np.uint8)
    out, ratio, pad = letterbox(small, 64, scaleup=False)
    assert ratio == (1.0, 1.0) and pad == (27, 22) and (out[22:42, 27:37] == 7).all()
    square = np.full((100, 100, 3), 7, dtype=np.uint8)
    out, ratio, pad = letterbox(square, 64, shrink=6)  # v3 eval: load at 634, pad to 640
    assert out.shape == (64, 64, 3) and ratio == (0.58, 0.58) and pad == (3, 3)
    assert (out[:3] == PAD_VALUE).all() and (out[3:61, 3:61] == 7).all() and (out[61:] == PAD_VALUE).all()


def test_letterbox_box_mapping_matches_pixels():
    img = _block_image((16, 32), (10, 4, 14, 8))
    out, ratio, pad = letterbox(img, 64)  # exact 2x upscale, 16 rows of padding on top
    assert ratio == (2.0, 2.0) and pad == (0, 16)
    box = scale_boxes(_labels([0, 10, 4, 14, 8]), ratio, pad)[0, 1:]
    np.testing.assert_array_equal(box, [20, 24, 28, 32])
    inner = out[25:31, 21:27]  # one pixel inside the box: untouched by bilinear blending
    assert (inner == [255, 0, 0]).all()
    assert (out[:16] == PAD_VALUE).all() and (out[16:23, :] == 40).all()


# ---------------------------------------------------------------------------------------------- flips


def test_hflip_and_vflip_boxes_follow_the_pixels():
    img = _block_image((12, 20), (2, 3, 5, 9))
    labels = _labels([1, 2, 3, 5, 9])
    flipped, lab = hflip(img, labels)
    np.testing.assert_array_equal(lab, _labels([1, 20 - 5, 3, 20 - 2, 9]))
    assert (flipped[3:9, 15:18] == [255, 0, 0]).all() and (flipped == [255, 0, 0]).all(-1).sum() == 18
    flipped, lab = vflip(img, labels)
    np.testing.assert_array_equal(lab, _labels([1, 2, 12 - 9, 5, 12 - 3]))
    assert (flipped[3:9, 2:5] == [255, 0, 0]).all()
    # flipping twice is the identity, for pixels and boxes
    again, lab2 = hflip(*hflip(img, labels))
    np.testing.assert_array_equal(again, img)
    np.testing.assert_array_equal(lab2, labels)


# ---------------------------------------------------------------------------------------------- affine


def test_integer_translation_is_exact():
    img = _block_image((32, 32), (6, 4, 12, 8))
    matrix = np.array([[1, 0, 5], [0, 1, 3], [0, 0, 1]], dtype=np.float64)
    out = warp_affine(img, matrix, (32, 32))
    expected = np.full_like(img, PAD_VALUE)
    expected[3:, 5:] = img[:-3, :-5]
    np.testing.assert_array_equal(out, expected)
    lab = transform_labels(_labels([2, 6, 4, 12, 8]), matrix, (32, 32))
    np.testing.assert_array_equal(lab, _labels([2, 11, 7, 17, 11]))


def test_rotation_by_90_degrees_matches_rot90():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    # (x, y) -> (y, W - x): counter-clockwise on screen, as np.rot90.
    matrix = np.array([[0, 1, 0], [-1, 0, 16], [0, 0, 1]], dtype=np.float64)
    np.testing.assert_array_equal(warp_affine(img, matrix, (16, 16)), np.rot90(img))
    lab = transform_labels(_labels([0, 2, 3, 6, 10]), matrix, (16, 16))
    np.testing.assert_allclose(lab, _labels([0, 3, 16 - 6, 10, 16 - 2]), atol=1e-5)


def test_scale_and_collapsed_boxes_are_dropped():
    labels = _labels([0, 4, 6, 8, 12], [1, 20, 20, 30, 30], [2, 1, 1, 2, 2])
    scale2 = np.diag([2.0, 2.0, 1.0])
    out = transform_labels(labels, scale2, (40, 40), scale=2.0)
    # box 1 moves to [40, 60] and is clipped to zero width; box 2 becomes 2x2 pixels: both dropped.
    np.testing.assert_array_equal(out, _labels([0, 8, 12, 16, 24]))
    shift = np.array([[1, 0, -7], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    # shifted 7 pixels out of the image: 1-pixel slivers are dropped, a 3-pixel rest is kept
    out = transform_labels(_labels([0, 4, 6, 8, 12], [1, 0, 0, 8, 8]), shift, (40, 40))
    assert out.shape == (0, 5)
    out = transform_labels(_labels([1, 0, 0, 10, 8]), shift, (40, 40))
    np.testing.assert_array_equal(out, _labels([1, 0, 0, 3, 8]))


def test_random_affine_without_randomness_is_identity():
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    labels = _labels([0, 3, 4, 20, 30])
    out, lab = random_affine(
        img, labels, (32, 32), degrees=0, translate=0, scale=0, shear=0, rng=np.random.default_rng(0)
    )
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(lab, labels)


def test_affine_matrix_is_seeded_and_maps_center():
    m1, s1 = affine_matrix((100, 80), (64, 64), 10, 0.1, 0.5, 5, np.random.default_rng(3))
    m2, s2 = affine_matrix((100, 80), (64, 64), 10, 0.1, 0.5, 5, np.random.default_rng(3))
    np.testing.assert_array_equal(m1, m2)
    assert s1 == s2 and 0.5 <= s1 <= 1.5
    m0, _ = affine_matrix((100, 80), (64, 64), 0, 0, 0, 0, np.random.default_rng(3))
    np.testing.assert_allclose(m0 @ [40, 50, 1], [32, 32, 1])  # input center -> output center


# ---------------------------------------------------------------------------------------------- mosaic


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _mosaic_inputs():
    sizes = [(40, 64), (64, 32), (64, 48), (30, 64)]  # long side = S: tiles are not resized
    images, labels = [], []
    for k, (h, w) in enumerate(sizes):
        box = (w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)
        images.append(_block_image((h, w), box, COLORS[k], bg=0))
        labels.append(_labels([k, *box]))
    return images, labels


@pytest.mark.parametrize("seed", range(6))
def test_mosaic_without_scaling_boxes_sit_on_their_blocks(seed):
    images, labels = _mosaic_inputs()
    aug = AugmentConfig(translate=0.0, scale=0.0)  # affine is then an integer shift of the canvas
    out, lab = mosaic(images, labels, 64, aug, np.random.default_rng(seed))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert ((lab[:, 1:] >= 0) & (lab[:, 1:] <= 64)).all() and (lab[:, 3] > lab[:, 1]).all()
    for cls, x1, y1, x2, y2 in lab:
        region = out[int(y1) : int(y2), int(x1) : int(x2)]
        # every box pixel is its class color (boxes are clipped to the visible part of the tile)
        assert (region == COLORS[int(cls)]).all(), (seed, cls)
    # every block with > 2 visible rows and columns and > 10% of its area visible is labelled
    for k, color in enumerate(COLORS):
        visible = (out == color).all(-1)
        x1, y1, x2, y2 = labels[k][0, 1:].tolist()  # tiles are not resized: block area in pixels
        big = visible.any(0).sum() > 2 and visible.any(1).sum() > 2
        if big and visible.sum() > 0.1 * (x2 - x1) * (y2 - y1):
            assert k in lab[:, 0], (seed, k)


def test_mosaic_default_augmentation_shapes():
    images, labels = _mosaic_inputs()
    for seed in range(5):
        out, lab = mosaic(images, labels, 64, AugmentConfig(), np.random.default_rng(seed))
        assert out.shape == (64, 64, 3)
        assert ((lab[:, 1:] >= 0) & (lab[:, 1:] <= 64)).all()
        assert ((lab[:, 3] - lab[:, 1]) > 2).all() and ((lab[:, 4] - lab[:, 2]) > 2).all()
        for cls, x1, y1, x2, y2 in lab:  # box centers land on the right color (bilinear edges aside)
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            np.testing.assert_allclose(out[cy, cx], COLORS[int(cls)], atol=60)
    with pytest.raises(ValueError, match="4 images"):
        mosaic(images[:3], labels[:3], 64, AugmentConfig(), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- color, mixup


def test_hsv_gains_exact_on_gray():
    gray = np.full((8, 8, 3), 100, dtype=np.uint8)
    rng = np.random.default_rng(5)
    out = augment_hsv(gray, 0.5, 0.9, 0.0, rng)
    np.testing.assert_array_equal(out, gray)  # gray has no hue or saturation to change
    gains = np.random.default_rng(7).uniform(-1, 1, 3) * [0, 0, 0.4] + 1
    out = augment_hsv(gray, 0.0, 0.0, 0.4, np.random.default_rng(7))
    assert (out == int(np.clip(100 * gains[2], 0, 255))).all()
    color = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(augment_hsv(color, 0, 0, 0, np.random.default_rng(0)), color)
    shifted = augment_hsv(color, 0.5, 0.0, 0.0, np.random.default_rng(1))
    # a hue change keeps the value channel (max of R, G, B) up to rounding
    np.testing.assert_allclose(shifted.max(-1), color.max(-1), atol=2)


def test_mixup_blends_and_keeps_both_label_sets():
    a, b = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)
    out, lab = mixup(
        a, _labels([0, 1, 1, 4, 4]), b, _labels([1, 2, 2, 6, 6], [2, 0, 0, 3, 3]), np.random.default_rng(0)
    )
    r = np.random.default_rng(0).beta(32.0, 32.0)
    assert (out == int(200 * (1 - r))).all() and 60 < out[0, 0, 0] < 140
    np.testing.assert_array_equal(lab[:, 0], [0, 1, 2])


# ---------------------------------------------------------------------------------------------- config


def test_augment_config_defaults_and_validation():
    aug = AugmentConfig()
    assert (
        aug.hsv_h,
        aug.hsv_s,
        aug.hsv_v,
        aug.degrees,
        aug.translate,
        aug.scale,
        aug.shear,
        aug.flipud,
        aug.fliplr,
        aug.mosaic,
        aug.mixup,
    ) == (0.015, 0.7, 0.4, 0.0, 0.1, 0.5, 0.0, 0.0, 0.5, 1.0, 0.0)
    assert AugmentConfig.for_variant("yolov6s").mixup == 0.0
    assert AugmentConfig.for_variant("yolov6m").mixup == 0.1
    assert AugmentConfig.for_variant("yolov6l").scale == 0.9
    with pytest.raises(DataError, match="AugmentConfig.fliplr"):
        AugmentConfig(fliplr=1.5)
    with pytest.raises(DataError, match="AugmentConfig.hsv_h"):
        AugmentConfig(hsv_h=-0.1)
