"""Box utilities: conversions, pairwise IoU, and the elementwise IoU family against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from repquant.ops.boxes import IOU_KINDS, bbox_iou, box_area, box_convert, box_iou

F64 = torch.float64


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def test_box_convert_round_trip_and_area() -> None:
    xyxy = _t([1.0, 2.0, 5.0, 8.0])
    assert torch.equal(box_convert(xyxy, "xyxy", "xywh"), _t([1.0, 2.0, 4.0, 6.0]))
    assert torch.equal(box_convert(xyxy, "xyxy", "cxcywh"), _t([3.0, 5.0, 4.0, 6.0]))
    assert torch.equal(box_convert(box_convert(xyxy, "xyxy", "cxcywh"), "cxcywh", "xyxy"), xyxy)
    assert box_area(xyxy).item() == 24.0


def test_box_iou_pairwise_matches_elementwise() -> None:
    a = _t([0, 0, 2, 2], [1, 1, 3, 3])
    b = _t([1, 1, 3, 3], [10, 10, 11, 11], [0, 0, 2, 2])
    pairwise = box_iou(a, b)
    assert pairwise.shape == (2, 3)
    elementwise = bbox_iou(a[:, None], b[None, :], "iou", eps=1e-9)
    torch.testing.assert_close(pairwise, elementwise, atol=1e-8, rtol=0)
    assert pairwise[0, 0].item() == pytest.approx(1 / 7, abs=1e-9)


@pytest.mark.parametrize("kind", IOU_KINDS)
def test_identical_boxes_give_one(kind: str) -> None:
    box = _t([3.0, 4.0, 10.0, 20.0], [0.5, 0.5, 1.5, 3.0])
    assert torch.allclose(bbox_iou(box, box.clone(), kind, eps=1e-12), torch.ones(2, dtype=F64), atol=1e-9)


def test_iou_giou_diou_hand_values() -> None:
    a, b = _t([0, 0, 2, 2]), _t([1, 1, 3, 3])  # intersection 1, union 7, enclosing 3x3
    eps = 1e-12
    assert bbox_iou(a, b, "iou", eps).item() == pytest.approx(1 / 7, abs=1e-10)
    assert bbox_iou(a, b, "giou", eps).item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-10)
    # centres (1, 1) and (2, 2): rho^2 = 2; enclosing diagonal^2 = 18
    assert bbox_iou(a, b, "diou", eps).item() == pytest.approx(1 / 7 - 2 / 18, abs=1e-10)
    # equal aspect ratios: CIoU's v = 0, so CIoU == DIoU
    assert bbox_iou(a, b, "ciou", eps).item() == pytest.approx(1 / 7 - 2 / 18, abs=1e-10)


def test_giou_of_disjoint_boxes() -> None:
    # IoU 0, union 2, enclosing box 3x1: GIoU = -(3 - 2) / 3
    giou = bbox_iou(_t([0, 0, 1, 1]), _t([2, 0, 3, 1]), "giou", 1e-12)
    assert giou.item() == pytest.approx(-1 / 3, abs=1e-10)
    # far apart: GIoU tends to -1
    assert bbox_iou(_t([0, 0, 1, 1]), _t([1000, 1000, 1001, 1001]), "giou", 1e-12).item() < -0.999


def test_ciou_hand_value_with_different_aspect() -> None:
    a, b = _t([0, 0, 2, 1]), _t([0, 0, 1, 2])  # inter 1, union 3; centres (1, .5), (.5, 1); enclosing 2x2
    v = 4 / math.pi**2 * (math.atan(1 / 2) - math.atan(2)) ** 2
    alpha = v / (v - 1 / 3 + 1)
    expected = 1 / 3 - (0.5 / 8 + v * alpha)
    assert bbox_iou(a, b, "ciou", 1e-12).item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize(
    ("box2", "inter", "union", "dx", "dy", "cw", "ch", "angle"),
    [
        # centre offset (3, 1): the angle is measured from the x axis: sin(2 asin(1/sqrt(10))) = 0.6
        ([2.0, 1.0, 6.0, 3.0], 0.0, 12.0, 3.0, 1.0, 6.0, 3.0, 0.6),
        # centre offset (2, 1): sin(2 asin(1/sqrt(5))) = 0.8
        ([1.0, 1.0, 5.0, 3.0], 1.0, 11.0, 2.0, 1.0, 5.0, 3.0, 0.8),
    ],
)
def test_siou_hand_values(
    box2: list[float], inter: float, union: float, dx: float, dy: float, cw: float, ch: float, angle: float
) -> None:
    # box1 2x2, box2 4x2: shape cost only from the widths, omega_w = |2 - 4| / 4
    gamma = angle - 2
    distance_cost = 2 - math.exp(gamma * (dx / cw) ** 2) - math.exp(gamma * (dy / ch) ** 2)
    shape_cost = (1 - math.exp(-0.5)) ** 4
    expected = inter / union - 0.5 * (distance_cost + shape_cost)
    got = bbox_iou(_t([0.0, 0.0, 2.0, 2.0]), _t(box2), "siou", eps=1e-12).item()
    assert got == pytest.approx(expected, abs=1e-9)


def test_siou_is_symmetric_in_angle_about_45_degrees() -> None:
    # Offsets (3, 1) and (1, 3) have the same angle cost; with square boxes the SIoU is equal.
    a = _t([0, 0, 2, 2])
    s1 = bbox_iou(a, _t([3, 1, 5, 3]), "siou", 1e-12)
    s2 = bbox_iou(a, _t([1, 3, 3, 5]), "siou", 1e-12)
    assert s1.item() == pytest.approx(s2.item(), abs=1e-12)


def test_broadcasting_shapes() -> None:
    a = torch.rand(5, 1, 2, dtype=F64) * 10
    a = torch.cat((a, a + 1 + torch.rand(5, 1, 2, dtype=F64) * 5), dim=-1)
    b = torch.rand(1, 7, 2, dtype=F64) * 10
    b = torch.cat((b, b + 1 + torch.rand(1, 7, 2, dtype=F64) * 5), dim=-1)
    for kind in IOU_KINDS:
        out = bbox_iou(a, b, kind)
        assert out.shape == (5, 7)
        assert torch.isfinite(out).all()
        assert (out <= 1 + 1e-9).all() and (out >= -1.5).all()


@pytest.mark.parametrize("kind", IOU_KINDS)
def test_gradients_finite_including_identical_boxes(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=gen) * 50
    wh = torch.rand(64, 2, generator=gen) * 30 + 1
    target = torch.cat((xy, xy + wh), dim=-1)
    pred = (target + torch.randn(64, 4, generator=gen) * 3).clone()
    pred[:8] = target[:8]  # coincident boxes and centres: the SIoU angle is 0/0 without the guard
    pred.requires_grad_(True)
    loss = (1 - bbox_iou(pred, target, kind, eps=1e-7)).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(pred.grad).all()


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="unknown kind 'eiou'"):
        bbox_iou(_t([0, 0, 1, 1]), _t([0, 0, 1, 1]), "eiou")
