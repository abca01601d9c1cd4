"""Post-processing, letterbox inversion and COCO mAP on hand-made predictions with known answers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor

from repquant.errors import DataError
from repquant.eval import (
    EvalResult,
    build_coco_gt,
    coco_map,
    detections_to_coco_results,
    evaluate,
    postprocess,
    scale_to_original,
)

# ----------------------------------------------------------------------------------------- fixtures


@dataclass
class Meta:
    image_id: int
    file: str
    orig_hw: tuple[int, int]
    ratio: float | tuple[float, float]
    pad: tuple[float, float]


@dataclass
class GT:
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) xyxy original pixels
    classes: np.ndarray  # (n,)


def _letterbox_meta(image_id: int, orig_hw: tuple[int, int], size: int) -> Meta:
    """Letterbox parameters of an (h, w) image resized into a size x size square, padding centred."""
    h, w = orig_hw
    ratio = min(size / h, size / w)
    new_h, new_w = round(h * ratio), round(w * ratio)
    return Meta(image_id, f"img{image_id}.jpg", orig_hw, ratio, ((size - new_w) / 2, (size - new_h) / 2))


def _to_input(boxes: np.ndarray, meta: Meta) -> np.ndarray:
    """Original pixels -> letterboxed input pixels (what a perfect detector would output)."""
    out = boxes * meta.ratio
    out[:, [0, 2]] += meta.pad[0]
    out[:, [1, 3]] += meta.pad[1]
    return out


def _det(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)


def _map(gts: list[GT], dets: dict[int, list[list[float]]], names: list[str]) -> dict:
    coco_gt = build_coco_gt(gts, names)
    ids = list(dets)
    return coco_map(coco_gt, detections_to_coco_results(ids, [_det(dets[i]) for i in ids]))


# ------------------------------------------------------------------------------------- postprocess


def test_postprocess_multi_label_and_single_label() -> None:
    boxes = torch.tensor([[[0.0, 0, 10, 10], [50.0, 50, 60, 60]]])
    scores = torch.tensor([[[0.9, 0.8, 0.01], [0.02, 0.03, 0.5]]])
    (multi,) = postprocess(boxes, scores, conf_thres=0.03)  # 0.03 is not > 0.03: dropped
    expected = torch.tensor([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 1], [50, 50, 60, 60, 0.5, 2]])
    torch.testing.assert_close(multi, expected)
    (single,) = postprocess(boxes, scores, conf_thres=0.03, multi_label=False)
    assert single[:, 5].tolist() == [0, 2]


def test_postprocess_nms_is_per_class_and_accepts_numpy() -> None:
    boxes = np.array([[[0.0, 0, 10, 10], [1.0, 0, 11, 10], [1.0, 0, 11, 10]]], dtype=np.float32)
    scores = np.array([[[0.9, 0.0], [0.8, 0.0], [0.0, 0.7]]], dtype=np.float32)
    (det,) = postprocess(boxes, scores, iou_thres=0.65)
    # Box 1 overlaps box 0 (IoU 9/11) in the same class: suppressed; box 2 is another class: kept.
    assert det[:, 4].tolist() == pytest.approx([0.9, 0.7])
    assert det[:, 5].tolist() == [0, 1]


def test_postprocess_max_det_keeps_best_and_batches() -> None:
    x = torch.arange(20, dtype=torch.float32)[:, None] * 20
    boxes = torch.cat((x, x * 0, x + 10, x * 0 + 10), dim=1)[None].repeat(2, 1, 1)  # 20 disjoint boxes
    scores = torch.rand(2, 20, 1, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    dets = postprocess(boxes, scores, max_det=5)
    assert len(dets) == 2
    for det, s in zip(dets, scores, strict=True):
        assert det.shape == (5, 6)
        assert det[:, 4].tolist() == pytest.approx(s[:, 0].sort(descending=True).values[:5].tolist())


def test_postprocess_empty_and_shape_errors() -> None:
    (det,) = postprocess(torch.zeros(1, 4, 4), torch.zeros(1, 4, 3))
    assert det.shape == (0, 6)
    with pytest.raises(ValueError, match="postprocess: expected"):
        postprocess(torch.zeros(1, 4, 4), torch.zeros(1, 5, 3))


# ------------------------------------------------------------------------------- scale_to_original


@pytest.mark.parametrize("ratio", [0.5, (0.5, 0.5)])
def test_scale_to_original_inverts_letterbox(ratio: float | tuple[float, float]) -> None:
    # 128 x 64 (h, w) image into 64 x 64: ratio 0.5, resized to 64 x 32, 16 px padding left and right.
    meta = Meta(1, "a.jpg", (128, 64), ratio, (16.0, 0.0))
    orig = np.array([[3.0, 5.0, 40.0, 100.0], [0.0, 0.0, 64.0, 128.0]])
    det = torch.cat((torch.from_numpy(_to_input(orig, Meta(1, "a", (128, 64), 0.5, (16.0, 0.0)))),
                     torch.tensor([[0.9, 2.0], [0.5, 0.0]], dtype=torch.float64)), dim=1)
    back = scale_to_original(det, meta)
    assert torch.equal(back[:, :4], torch.from_numpy(orig))
    assert torch.equal(back[:, 4:], det[:, 4:])
    assert torch.equal(det[0, :4], torch.tensor([17.5, 2.5, 36.0, 50.0], dtype=torch.float64))  # untouched


def test_scale_to_original_anisotropic_ratio_and_clip() -> None:
    meta = Meta(1, "a.jpg", (100, 200), (0.25, 0.5), (2.0, 4.0))  # ratio is (h, w), pad is (left, top)
    det = torch.tensor([[12.0, 9.0, 52.0, 29.0, 0.5, 0.0], [-10.0, -10.0, 500.0, 500.0, 0.5, 0.0]])
    back = scale_to_original(det, meta)
    assert back[0, :4].tolist() == [20.0, 20.0, 100.0, 100.0]
    assert back[1, :4].tolist() == [0.0, 0.0, 200.0, 100.0]


# ---------------------------------------------------------------------------- COCO mAP, known answers

_SQUARES = np.array([[10.0, 10.0, 60.0, 60.0], [100.0, 20.0, 180.0, 90.0]])


def _two_images() -> list[GT]:
    return [GT(1, "a.jpg", 200, 150, _SQUARES.copy(), np.array([0, 0])),
            GT(2, "b.jpg", 200, 150, _SQUARES + 5.0, np.array([0, 0]))]


def test_map_perfect_predictions() -> None:
    gts = _two_images()
    dets = {g.image_id: [[*b, 0.9, 0] for b in g.boxes.tolist()] for g in gts}
    m = _map(gts, dets, ["a"])
    assert m["map50_95"] == pytest.approx(1.0, abs=1e-12)
    assert m["map50"] == pytest.approx(1.0, abs=1e-12)
    assert m["per_class"] == {0: pytest.approx(1.0, abs=1e-12)}


def test_map_half_the_boxes_found() -> None:
    # 4 GT; ranked detections: hit, miss (far from any GT), hit. Recall 1/4, 1/4, 2/4; precision
    # 1, 1/2, 2/3; interpolated (max to the right) 1, 2/3, 2/3. Of the 101 recall points 0, .01, .., 1:
    # 26 (r <= .25) get precision 1, 25 (.25 < r <= .5) get 2/3, 50 (r > .5, never reached) get 0.
    expected = (26 * 1.0 + 25 * 2 / 3) / 101
    gts = _two_images()
    dets = {1: [[*_SQUARES[0], 0.9, 0], [150.0, 150.0, 190.0, 190.0, 0.8, 0]],
            2: [[*(_SQUARES[1] + 5.0), 0.7, 0]]}
    m = _map(gts, dets, ["a"])
    assert m["map50"] == pytest.approx(expected, abs=1e-12)
    assert m["map50_95"] == pytest.approx(expected, abs=1e-12)  # exact hits count at every threshold


def test_map_half_found_without_false_positives() -> None:
    gts = _two_images()
    dets = {1: [[*_SQUARES[0], 0.9, 0]], 2: [[*(_SQUARES[0] + 5.0), 0.6, 0]]}
    m = _map(gts, dets, ["a"])
    assert m["map50"] == pytest.approx(51 / 101, abs=1e-12)  # precision 1 up to recall .5 (51 points)


def test_map_iou_0625_counts_up_to_threshold_0_6() -> None:
    # GT 100 x 100, prediction 100 x 62.5 inside it: IoU = 0.625 -> a hit at IoU thresholds .5, .55, .6
    # (AP 1 each) and a miss at .65 .. .95 (AP 0): AP50 = 1, AP50_95 = 3 / 10.
    gts = [GT(7, "c.jpg", 300, 300, np.array([[0.0, 0.0, 100.0, 100.0]]), np.array([1]))]
    m = _map(gts, {7: [[0.0, 0.0, 100.0, 62.5, 0.8, 1]]}, ["a", "b"])
    assert m["map50"] == pytest.approx(1.0, abs=1e-12)
    assert m["map50_95"] == pytest.approx(0.3, abs=1e-12)
    assert list(m["per_class"]) == [1]  # class 0 has no ground truth: not averaged in


def test_map_is_mean_over_classes() -> None:
    gts = [GT(1, "a.jpg", 300, 300, np.array([[0.0, 0.0, 100.0, 100.0], [150.0, 150.0, 250.0, 250.0]]),
              np.array([0, 1]))]
    dets = {1: [[0.0, 0.0, 100.0, 100.0, 0.9, 0], [150.0, 150.0, 250.0, 212.5, 0.9, 1],
                [150.0, 150.0, 250.0, 250.0, 0.9, 2]]}  # right box, class without GT: ignored
    m = _map(gts, dets, ["a", "b", "c"])
    assert m["per_class"] == {0: pytest.approx(1.0, abs=1e-12), 1: pytest.approx(0.3, abs=1e-12)}
    assert m["map50_95"] == pytest.approx(0.65, abs=1e-12)
    assert m["map50"] == pytest.approx(1.0, abs=1e-12)


def test_map_empty_predictions_is_zero() -> None:
    gts = _two_images()
    assert _map(gts, {}, ["a"]) == {"map50_95": 0.0, "map50": 0.0, "per_class": {0: 0.0}}
    assert _map(gts, {1: [], 2: []}, ["a"])["map50_95"] == 0.0


def test_build_coco_gt_rejects_unknown_class() -> None:
    with pytest.raises(DataError, match="a.jpg: class 3 out of range"):
        build_coco_gt([GT(1, "a.jpg", 10, 10, np.array([[0.0, 0, 5, 5]]), np.array([3]))], ["a", "b"])


# -------------------------------------------------------------------------------------- evaluate()


class TinyDataset:
    """Minimal dataset protocol: images of varied sizes letterboxed to 64 x 64, with ground truth."""

    names = ["cat", "dog", "bird"]
    size = 64

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.gts: list[GT] = []
        self.metas: list[Meta] = []
        for i, (h, w) in enumerate([(48, 64), (128, 64), (64, 64), (100, 150), (30, 90)]):
            n = int(rng.integers(1, 4))
            xy = rng.uniform(0, 0.5, size=(n, 2)) * (w, h)
            wh = rng.uniform(0.2, 0.5, size=(n, 2)) * (w, h)
            boxes = np.concatenate((xy, xy + wh), axis=1)
            classes = rng.integers(0, 3, size=n) if i else np.array([0, 0, 1][:n])
            self.gts.append(GT(100 + i, f"img{i}.jpg", w, h, boxes, classes))
            self.metas.append(_letterbox_meta(100 + i, (h, w), self.size))

    def __len__(self) -> int:
        return len(self.gts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Meta]:
        return torch.zeros(3, self.size, self.size), torch.zeros(0, 6), self.metas[i]

    @staticmethod
    def collate_fn(batch: list) -> tuple[Tensor, Tensor, list[Meta]]:
        images, targets, metas = zip(*batch, strict=True)
        return torch.stack(images), torch.cat(targets), list(metas)

    def ground_truth(self) -> list[GT]:
        return self.gts


def _oracle(dataset: TinyDataset, as_numpy: bool):
    """predict_fn returning every GT box (in input pixels) with score 0.9 for its class, padded with
    zero-score anchors. Images are matched to GT by call order (no shuffling)."""
    order = iter(range(len(dataset)))
    num_anchors = 8

    def predict(images: Tensor):
        boxes = np.zeros((len(images), num_anchors, 4), dtype=np.float32)
        scores = np.zeros((len(images), num_anchors, len(dataset.names)), dtype=np.float32)
        for b in range(len(images)):
            i = next(order)
            gt, meta = dataset.gts[i], dataset.metas[i]
            n = len(gt.boxes)
            boxes[b, :n] = _to_input(gt.boxes, meta)
            scores[b, np.arange(n), gt.classes] = 0.9
        return (boxes, scores) if as_numpy else (torch.from_numpy(boxes), torch.from_numpy(scores))

    return predict


@pytest.mark.parametrize("as_numpy", [False, True])
def test_evaluate_oracle_gives_map_one(as_numpy: bool) -> None:
    dataset = TinyDataset()
    result = evaluate(_oracle(dataset, as_numpy), dataset, batch_size=2, progress=False)
    assert isinstance(result, EvalResult)
    assert result.map50_95 == pytest.approx(1.0, abs=1e-9)
    assert result.map50 == pytest.approx(1.0, abs=1e-9)
    assert set(result.per_class_ap50_95) <= set(dataset.names)
    assert all(ap == pytest.approx(1.0, abs=1e-9) for ap in result.per_class_ap50_95.values())
    assert result.num_images == len(dataset)
    assert result.num_detections == sum(len(g.boxes) for g in dataset.gts)


def test_evaluate_no_detections_is_zero() -> None:
    dataset = TinyDataset()

    def nothing(images: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros(len(images), 8, 4), torch.zeros(len(images), 8, 3)

    result = evaluate(nothing, dataset, batch_size=4, progress=False)
    assert (result.map50_95, result.map50, result.num_detections) == (0.0, 0.0, 0)
