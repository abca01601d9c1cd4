"""NMS against a brute-force greedy reference (torchvision semantics) and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repquant.ops import nms as nms_module
from repquant.ops.nms import batched_nms, nms


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, thres: float) -> list[int]:
    """Textbook greedy NMS: visit by descending score (ties in input order), keep a box unless its IoU
    with a kept box is > thres. IoU in float64 without epsilon."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    keep: list[int] = []
    for i in order:
        if keep:
            kept = boxes[keep]
            w = np.clip(np.minimum(kept[:, 2], boxes[i, 2]) - np.maximum(kept[:, 0], boxes[i, 0]), 0, None)
            h = np.clip(np.minimum(kept[:, 3], boxes[i, 3]) - np.maximum(kept[:, 1], boxes[i, 1]), 0, None)
            inter = w * h
            area_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            area_k = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])
            if np.any(inter / (area_i + area_k - inter) > thres):
                continue
        keep.append(i)
    return keep


def _random_boxes(n: int, seed: int, extent: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, extent, size=(n, 2))
    wh = rng.uniform(2, extent / 3, size=(n, 2))
    return np.concatenate((xy, xy + wh), axis=1), rng.uniform(0, 1, size=n)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("thres", [0.3, 0.5, 0.7])
def test_nms_matches_reference(seed: int, thres: float) -> None:
    boxes, scores = _random_boxes(300, seed)
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thres)
    assert keep.dtype == torch.int64
    assert keep.tolist() == _reference_nms(boxes, scores, thres)


@pytest.mark.parametrize("seed", [4, 5])
def test_nms_small_blocks_match_reference(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many tiny blocks exercise the check against boxes kept in earlier blocks."""
    monkeypatch.setattr(nms_module, "_BLOCK", 7)
    boxes, scores = _random_boxes(250, seed)
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.45)
    assert keep.tolist() == _reference_nms(boxes, scores, 0.45)


def test_nms_many_boxes_float32() -> None:
    """More boxes than one block, float32 like model outputs (reference on the same float32 values)."""
    boxes, scores = _random_boxes(2500, 7, extent=640.0)
    boxes32, scores32 = boxes.astype(np.float32), scores.astype(np.float32)
    keep = nms(torch.from_numpy(boxes32), torch.from_numpy(scores32), 0.65)
    assert keep.tolist() == _reference_nms(boxes32.astype(np.float64), scores32, 0.65)
    assert 0 < len(keep) < 2500


def test_nms_threshold_is_strict() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])  # IoU exactly 0.5
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]


def test_nms_suppressed_box_does_not_suppress() -> None:
    # A overlaps B, B overlaps C, A and C are disjoint: B goes, so C stays.
    boxes = torch.tensor([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [10.5, 0, 20.5, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.3).tolist() == [0, 2]


def test_nms_order_and_ties() -> None:
    boxes = torch.tensor([[0.0, 0, 1, 1], [10.0, 0, 11, 1], [20.0, 0, 21, 1], [0.0, 0, 1, 1]])
    scores = torch.tensor([0.2, 0.9, 0.5, 0.2])
    # Sorted by descending score; the duplicate of box 0 has the same score and comes later: suppressed.
    assert nms(boxes, scores, 0.5).tolist() == [1, 2, 0]


def test_nms_empty() -> None:
    keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.int64


def test_nms_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="nms: expected boxes"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)


def test_batched_nms_keeps_other_classes() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [1.0, 0, 11, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [0]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 2]), 0.5).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_nms_equals_per_class_reference(seed: int) -> None:
    boxes, scores = _random_boxes(400, seed)
    boxes -= 50.0  # negative coordinates must not let class offsets overlap
    classes = np.random.default_rng(seed).integers(0, 5, size=400)
    expected = []
    for c in range(5):
        idx = np.flatnonzero(classes == c)
        expected += [int(idx[k]) for k in _reference_nms(boxes[idx], scores[idx], 0.5)]
    expected.sort(key=lambda i: -scores[i])
    keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), 0.5)
    assert keep.tolist() == expected


@pytest.mark.parametrize("per_class_above", [0, 10**9])
def test_batched_nms_both_paths_agree(per_class_above: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The offset trick and the per-class loop give the same indices, ties included."""
    boxes, scores = _random_boxes(600, 3)
    scores = np.round(scores, 1)  # many exact ties across classes
    classes = np.random.default_rng(3).integers(0, 7, size=600)
    args = (torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), torch.from_numpy(classes), 0.6)
    expected = []
    for c in range(7):
        idx = np.flatnonzero(classes == c)
        ref = _reference_nms(boxes[idx].astype(np.float32).astype(np.float64), scores[idx], 0.6)
        expected += [int(idx[k]) for k in ref]
    expected.sort(key=lambda i: (-np.float32(scores[i]), i))
    monkeypatch.setattr(nms_module, "_PER_CLASS_ABOVE", per_class_above)
    assert batched_nms(*args).tolist() == expected
    assert batched_nms(*args, max_keep=25).tolist() == expected[:25]


@pytest.mark.parametrize("max_keep", [0, 1, 30, 10**6])
def test_nms_max_keep_is_head_of_full_result(max_keep: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nms_module, "_BLOCK", 16)  # stop early after a few blocks
    boxes, scores = _random_boxes(300, 9)
    full = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5)
    head = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5, max_keep=max_keep)
    assert head.tolist() == full[:max_keep].tolist()


@pytest.mark.parametrize("step", [0.2, 0.45, 0.7])
def test_nms_long_suppression_chains(step: float) -> None:
    """Boxes sliding along a line, each overlapping the next: whether box i is kept depends on every box before
    it (the worst case of the vectorised greedy pass, which must still equal the one-by-one loop)."""
    n = 300
    x = np.arange(n, dtype=np.float64) * step * 10.0
    boxes = np.stack([x, np.zeros(n), x + 10.0, np.full(n, 10.0)], axis=1)
    scores = np.linspace(1.0, 0.5, n)
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3)
    assert keep.tolist() == _reference_nms(boxes, scores, 0.3)
