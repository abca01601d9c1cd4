"""ATSS and TAL label assignment on hand-made cases, plus ATSS against a loop-based reference."""

from __future__ import annotations

import pytest
import torch

from repquant.errors import DataError
from repquant.models.head import make_anchors
from repquant.train.assigners import (
    ATSSAssigner,
    TaskAlignedAssigner,
    make_anchor_boxes,
    pad_targets,
    pairwise_iou,
)

NC = 3


def _grid32() -> torch.Tensor:
    """4x4 anchor points (stride 8) of a 32x32 image: x, y in {4, 12, 20, 28}; index = 4 * row + col."""
    points, _ = make_anchors((32, 32), (8,))
    return points


def _tal(topk: int = 13) -> TaskAlignedAssigner:
    return TaskAlignedAssigner(topk=topk, num_classes=NC)


def test_pad_targets_keeps_order_and_pads() -> None:
    targets = torch.tensor(
        [
            [2, 1, 10, 10, 20, 20],
            [0, 0, 1, 2, 3, 4],
            [2, 2, 30, 30, 40, 40],
        ],
        dtype=torch.float32,
    )
    gt, mask = pad_targets(targets, batch_size=4)
    assert gt.shape == (4, 2, 5) and mask.shape == (4, 2)
    assert mask.tolist() == [[True, False], [False, False], [True, True], [False, False]]
    assert gt[0, 0].tolist() == [0, 1, 2, 3, 4]
    assert gt[2, 0].tolist() == [1, 10, 10, 20, 20]
    assert gt[2, 1].tolist() == [2, 30, 30, 40, 40]
    assert gt[1, 0].tolist() == [-1, 0, 0, 0, 0]
    empty, empty_mask = pad_targets(torch.zeros((0, 6)), batch_size=3)
    assert empty.shape == (3, 0, 5) and empty_mask.shape == (3, 0)
    with pytest.raises(DataError, match="batch index out of range"):
        pad_targets(targets, batch_size=2)


def test_make_anchor_boxes_follow_yolov6_grid_cells() -> None:
    boxes, points, per_level, strides = make_anchor_boxes((64, 96), (8, 16, 32))
    assert per_level == [8 * 12, 4 * 6, 2 * 3]
    assert boxes.shape == (sum(per_level), 4)
    # first stride-8 cell: centre (4, 4), side 5 * 8
    assert boxes[0].tolist() == [-16.0, -16.0, 24.0, 24.0]
    # first stride-32 cell: centre (16, 16), side 5 * 32
    assert boxes[per_level[0] + per_level[1]].tolist() == [-64.0, -64.0, 96.0, 96.0]
    torch.testing.assert_close((boxes[:, :2] + boxes[:, 2:]) / 2, points)
    torch.testing.assert_close(boxes[:, 2] - boxes[:, 0], 5 * strides[:, 0])


def test_tal_one_gt_anchors_inside_get_it_and_padding_is_ignored() -> None:
    points = _grid32()
    gt_box = torch.tensor([0.0, 0.0, 16.0, 16.0])
    gt_boxes = torch.stack((gt_box, torch.tensor([0.0, 0.0, 32.0, 32.0])))[None]  # slot 1 is padding
    gt_labels = torch.tensor([[2.0, 1.0]])
    mask_gt = torch.tensor([[True, False]])
    pred_boxes = gt_box.expand(1, 16, 4).clone()
    pred_scores = torch.full((1, 16, NC), 0.5)
    out = _tal()(pred_scores, pred_boxes, points, gt_labels, gt_boxes, mask_gt)
    inside = [0, 1, 4, 5]
    assert out.fg_mask[0].nonzero().flatten().tolist() == inside
    expected_labels = torch.full((16,), NC)
    expected_labels[inside] = 2
    assert torch.equal(out.labels[0], expected_labels)
    # metric is equal everywhere, so the normalised score is max IoU = 1 on every positive
    expected_scores = torch.zeros(16, NC)
    expected_scores[inside, 2] = 1.0
    torch.testing.assert_close(out.scores[0], expected_scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.boxes[0, inside], gt_box.expand(4, 4))


def test_tal_topk_respected_and_scores_normalised_by_best_metric() -> None:
    points = _grid32()
    gt_box = torch.tensor([[[0.0, 0.0, 32.0, 32.0]]])  # every anchor centre is inside
    pred_boxes = gt_box.expand(1, 16, 4).clone()  # IoU 1 everywhere: the metric is the class score
    pred_scores = torch.zeros(1, 16, NC)
    pred_scores[0, :, 1] = torch.arange(1, 17) / 20.0
    out = _tal(topk=3)(pred_scores, pred_boxes, points, torch.tensor([[1.0]]), gt_box, torch.tensor([[True]]))
    assert out.fg_mask[0].nonzero().flatten().tolist() == [13, 14, 15]
    expected = torch.tensor([14.0, 15.0, 16.0]) / 16
    torch.testing.assert_close(out.scores[0, 13:, 1], expected, atol=1e-6, rtol=0)
    assert out.scores[0, :13].abs().sum() == 0


def test_tal_anchor_claimed_by_two_gts_goes_to_higher_iou() -> None:
    points = _grid32()
    g1, g2 = torch.tensor([0.0, 0.0, 16.0, 16.0]), torch.tensor([0.0, 0.0, 24.0, 24.0])
    gt_boxes = torch.stack((g1, g2))[None]
    gt_labels = torch.tensor([[0.0, 1.0]])
    mask_gt = torch.tensor([[True, True]])
    scores = torch.full((1, 16, NC), 0.5)
    in_both, only_g2 = [0, 1, 4, 5], [2, 6, 8, 9, 10]
    # predictions equal to g2: the shared anchors go to g2 (IoU 1 vs 16^2 / 24^2)
    out = _tal()(scores, g2.expand(1, 16, 4).clone(), points, gt_labels, gt_boxes, mask_gt)
    assert sorted(out.fg_mask[0].nonzero().flatten().tolist()) == sorted(in_both + only_g2)
    assert out.labels[0, in_both + only_g2].tolist() == [1] * 9
    # predictions equal to g1: the shared anchors go to g1, the others stay with g2
    out = _tal()(scores, g1.expand(1, 16, 4).clone(), points, gt_labels, gt_boxes, mask_gt)
    assert out.labels[0, in_both].tolist() == [0] * 4
    assert out.labels[0, only_g2].tolist() == [1] * 5
    torch.testing.assert_close(out.boxes[0, in_both], g1.expand(4, 4))
    assert out.labels[0, [3, 7, 11, 12, 13, 14, 15]].tolist() == [NC] * 7  # outside every GT


def test_tal_image_without_gt_and_empty_batch_are_background() -> None:
    points = _grid32()
    gt_boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0]], [[0.0, 0.0, 0.0, 0.0]]])
    mask_gt = torch.tensor([[True], [False]])
    pred = torch.tensor([0.0, 0.0, 16.0, 16.0]).expand(2, 16, 4).clone()
    out = _tal()(torch.full((2, 16, NC), 0.5), pred, points, torch.tensor([[0.0], [-1.0]]), gt_boxes, mask_gt)
    assert out.fg_mask[0].sum() == 4 and not out.fg_mask[1].any()
    assert (out.labels[1] == NC).all() and out.scores[1].abs().sum() == 0
    empty = _tal()(
        torch.rand(2, 16, NC),
        pred,
        points,
        torch.zeros(2, 0),
        torch.zeros(2, 0, 4),
        torch.zeros(2, 0, dtype=torch.bool),
    )
    assert not empty.fg_mask.any() and (empty.labels == NC).all() and empty.scores.shape == (2, 16, NC)


def _atss_reference(
    anchor_boxes: torch.Tensor, per_level: list[int], gt_boxes: torch.Tensor, mask_gt: torch.Tensor, topk: int
) -> torch.Tensor:
    """Loop-based ATSS (one GT at a time) -> assigned GT index per anchor, -1 for background: (B, A)."""
    b, m = mask_gt.shape
    a = anchor_boxes.shape[0]
    centers = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2
    owner = torch.full((b, a), -1)
    for i in range(b):
        positives: dict[int, list[int]] = {}
        all_ious = pairwise_iou(gt_boxes[i][None], anchor_boxes[None], eps=1e-6)[0]  # (M, A)
        for j in range(m):
            if not mask_gt[i, j]:
                continue
            g = gt_boxes[i, j]
            ious = pairwise_iou(g[None, None], anchor_boxes[None], eps=1e-6)[0, 0]
            gc = (g[:2] + g[2:]) / 2
            dist = ((centers - gc) ** 2).sum(-1).sqrt()
            candidates, start = [], 0
            for n in per_level:
                order = sorted(range(start, start + n), key=lambda k: float(dist[k]))
                candidates += order[: min(topk, n)]
                start += n
            cand_iou = ious[candidates]
            thr = cand_iou.mean() + cand_iou.std()
            for k in candidates:
                inside = bool((centers[k] > g[:2]).all() and (centers[k] < g[2:]).all())
                if ious[k] > thr and inside:
                    positives.setdefault(k, []).append(j)
        for k, claims in positives.items():
            # YOLOv6: a contested anchor goes to the highest-IoU GT slot of the image
            owner[i, k] = claims[0] if len(claims) == 1 else int(all_ious[:, k].argmax())
    return owner


def test_atss_matches_loop_reference() -> None:
    anchor_boxes, _, per_level, _ = make_anchor_boxes((64, 64), (8, 16, 32))
    gen = torch.Generator().manual_seed(3)
    b, m = 3, 4
    xy = torch.rand(b, m, 2, generator=gen) * 40
    wh = torch.rand(b, m, 2, generator=gen) * 40 + 6
    gt_boxes = torch.cat((xy, (xy + wh).clamp(max=64)), dim=-1)
    mask_gt = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    gt_labels = torch.randint(0, NC, (b, m), generator=gen).float()
    out = ATSSAssigner(topk=9, num_classes=NC)(anchor_boxes, per_level, gt_labels, gt_boxes, mask_gt)
    owner = _atss_reference(anchor_boxes, per_level, gt_boxes, mask_gt, topk=9)
    assert torch.equal(out.fg_mask, owner >= 0)
    assert out.fg_mask.sum() > 10
    idx = owner.clamp(min=0)
    expected_labels = torch.where(owner >= 0, torch.gather(gt_labels.long(), 1, idx), NC)
    assert torch.equal(out.labels, expected_labels)
    fg = out.fg_mask
    torch.testing.assert_close(out.boxes[fg], torch.gather(gt_boxes, 1, idx[..., None].expand(-1, -1, 4))[fg])
    # no pred_boxes: plain one-hot scores
    assert torch.equal(out.scores.sum(-1), fg.float())


def test_atss_perfect_anchor_is_positive_and_soft_labels_use_prediction_iou() -> None:
    anchor_boxes, _, per_level, _ = make_anchor_boxes((64, 64), (8, 16, 32))
    gt = torch.tensor([[[0.0, 0.0, 40.0, 40.0]]])  # exactly the stride-8 cell box at (20, 20)
    assigner = ATSSAssigner(topk=9, num_classes=NC)
    out = assigner(anchor_boxes, per_level, torch.tensor([[2.0]]), gt, torch.tensor([[True]]))
    assert out.fg_mask[0, 2 * 8 + 2]
    centers = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2
    assert ((centers[out.fg_mask[0]] > 0) & (centers[out.fg_mask[0]] < 40)).all()
    a = anchor_boxes.shape[0]
    perfect = assigner(
        anchor_boxes,
        per_level,
        torch.tensor([[2.0]]),
        gt,
        torch.tensor([[True]]),
        pred_boxes=gt.expand(1, a, 4),
    )
    torch.testing.assert_close(perfect.scores[..., 2], out.fg_mask.float(), atol=1e-6, rtol=0)
    half = gt.clone()
    half[..., 2] = 20.0  # predicted boxes of half the GT: IoU 0.5
    soft = assigner(
        anchor_boxes,
        per_level,
        torch.tensor([[2.0]]),
        gt,
        torch.tensor([[True]]),
        pred_boxes=half.expand(1, a, 4),
    )
    torch.testing.assert_close(soft.scores[..., 2], 0.5 * out.fg_mask.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("assigner", ["atss", "tal"])
def test_assigners_empty_gt_tensor(assigner: str) -> None:
    anchor_boxes, points, per_level, _ = make_anchor_boxes((64, 64), (8, 16, 32))
    a = points.shape[0]
    labels, boxes, mask = torch.zeros(2, 0), torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool)
    if assigner == "atss":
        out = ATSSAssigner(9, NC)(anchor_boxes, per_level, labels, boxes, mask, torch.rand(2, a, 4))
    else:
        tal = TaskAlignedAssigner(13, NC)
        out = tal(torch.rand(2, a, NC), torch.rand(2, a, 4), points, labels, boxes, mask)
    assert out.labels.shape == (2, a) and (out.labels == NC).all()
    assert out.boxes.shape == (2, a, 4) and out.scores.shape == (2, a, NC) and not out.fg_mask.any()
