"""Channel-wise distillation against a loop over the formula; YOLOv6 self-distillation terms."""

from __future__ import annotations

import math

import pytest
import torch

from repquant.errors import ModelError
from repquant.train.distill import SelfDistillLoss, cwd_loss, distill_cls_loss, distill_dfl_loss

F64 = torch.float64


def _cwd_loop(student: list[torch.Tensor], teacher: list[torch.Tensor], tau: float) -> float:
    """tau^2 / (N*C) * sum_{n,c} sum_i phi(T)_i * log(phi(T)_i / phi(S)_i); phi: softmax over H*W of y/tau."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        n, c = s.shape[:2]
        level = 0.0
        for i in range(n):
            for j in range(c):
                ys = (s[i, j].flatten() / tau).tolist()
                yt = (t[i, j].flatten() / tau).tolist()
                zs = sum(math.exp(v) for v in ys)
                zt = sum(math.exp(v) for v in yt)
                for vs, vt in zip(ys, yt, strict=True):
                    ps, pt = math.exp(vs) / zs, math.exp(vt) / zt
                    level += pt * math.log(pt / ps)
        total += tau * tau / (n * c) * level
    return total


def _feats(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, 3, 4, 5, generator=gen, dtype=F64) * 2,
        torch.randn(2, 4, 2, 3, generator=gen, dtype=F64),
        torch.randn(2, 5, 1, 2, generator=gen, dtype=F64),
    ]


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_cwd_equals_loop_over_formula(tau: float) -> None:
    student, teacher = _feats(0), _feats(1)
    got = cwd_loss(student, teacher, tau=tau)
    assert got.dtype == F64 and got.dim() == 0
    assert got.item() == pytest.approx(_cwd_loop(student, teacher, tau), abs=1e-12, rel=0)
    assert got.item() > 0


def test_cwd_is_zero_for_identical_features() -> None:
    feats = _feats(2)
    assert cwd_loss(feats, [f.clone() for f in feats]).item() == pytest.approx(0.0, abs=1e-15)


def test_cwd_gradient_reaches_student_only() -> None:
    student = [f.requires_grad_(True) for f in _feats(3)]
    teacher = [f.requires_grad_(True) for f in _feats(4)]
    cwd_loss(student, teacher).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


def test_cwd_rejects_mismatched_levels() -> None:
    s, t = _feats(0), _feats(1)
    with pytest.raises(ModelError, match="level 1"):
        cwd_loss(s, [t[0], t[2], t[1]])
    with pytest.raises(ModelError, match="same non-zero number"):
        cwd_loss(s, t[:2])


def test_distill_cls_matches_yolov6_formula() -> None:
    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 6, 4, generator=gen)
    temp = 20.0
    # YOLOv6: KL(softmax(sigmoid(t)/T) || softmax(sigmoid(s)/T)) over classes, summed over anchors, * T^2
    p_s = torch.softmax(s.double().sigmoid().reshape(-1, 4) / temp, dim=1)
    p_t = torch.softmax(t.double().sigmoid().reshape(-1, 4) / temp, dim=1)
    expected = (p_t * (p_t.log() - p_s.log())).sum() * temp**2
    assert distill_cls_loss(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-4)
    assert distill_cls_loss(s, s.clone(), temp).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_dfl_on_foreground_rows_only() -> None:
    gen = torch.Generator().manual_seed(6)
    reg_max, temp = 4, 3.0
    s = torch.randn(1, 3, 4 * (reg_max + 1), generator=gen, dtype=F64)
    t = torch.randn(1, 3, 4 * (reg_max + 1), generator=gen, dtype=F64)
    fg = torch.tensor([[False, True, True]])
    rows_s = s[0, 1:].reshape(-1, reg_max + 1) / temp
    rows_t = t[0, 1:].reshape(-1, reg_max + 1) / temp
    p_t = rows_t.softmax(-1)
    kl = (p_t * (p_t.log() - rows_s.log_softmax(-1))).sum(-1)
    expected = kl.mean() * temp**2
    got = distill_dfl_loss(s, t, fg, reg_max, temp)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)
    # changing a background anchor does not matter
    s2 = s.clone()
    s2[0, 0] += 5
    assert distill_dfl_loss(s2, t, fg, reg_max, temp).item() == pytest.approx(got.item(), abs=1e-12)
    assert distill_dfl_loss(s, t, torch.zeros_like(fg), reg_max, temp).item() == 0.0
    assert distill_dfl_loss(s[..., :4], t[..., :4], fg, 0, temp).item() == 0.0


def test_self_distill_loss_combines_terms_with_yolov6_weights() -> None:
    gen = torch.Generator().manual_seed(7)
    nc, reg_max = 3, 16
    student = (
        torch.randn(2, 10, nc, generator=gen, requires_grad=True),
        torch.randn(2, 10, 4 * (reg_max + 1), generator=gen, requires_grad=True),
    )
    teacher = (
        torch.randn(2, 10, nc, generator=gen, requires_grad=True),
        torch.randn(2, 10, 4 * (reg_max + 1), generator=gen, requires_grad=True),
    )
    fg = torch.rand(2, 10, generator=gen) > 0.5
    loss_fn = SelfDistillLoss(nc, reg_max, temperature=20.0)
    loss = loss_fn(student, teacher, fg)
    expected = 1.0 * distill_cls_loss(student[0], teacher[0], 20.0) + 0.5 * distill_dfl_loss(
        student[1], teacher[1], fg, reg_max, 20.0
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student[0].grad.abs().sum() > 0 and student[1].grad.abs().sum() > 0
    assert teacher[0].grad is None and teacher[1].grad is None
    same = loss_fn(student, tuple(o.detach().clone() for o in student), fg)
    assert same.item() == pytest.approx(0, abs=1e-5)
    with pytest.raises(ModelError, match="do not match"):
        loss_fn(student, (teacher[0][:, :5], teacher[1]), fg)


def test_self_distill_takes_foreground_from_compute_loss() -> None:
    from repquant.train.losses import ComputeLoss

    gen = torch.Generator().manual_seed(8)
    nc, reg_max, a = 3, 16, 8 * 8 + 4 * 4 + 2 * 2
    student = (torch.randn(2, a, nc, generator=gen), torch.randn(2, a, 4 * (reg_max + 1), generator=gen))
    teacher = (torch.randn(2, a, nc, generator=gen), torch.randn(2, a, 4 * (reg_max + 1), generator=gen))
    targets = torch.tensor([[0, 1, 8.0, 8.0, 40.0, 48.0], [1, 0, 20.0, 16.0, 60.0, 56.0]])
    compute_loss = ComputeLoss(nc, reg_max, warmup_epoch=0)
    distill = SelfDistillLoss(nc, reg_max, compute_loss=compute_loss)
    compute_loss(student, targets, (64, 64), epoch=0)
    fg = compute_loss.last_assignment.fg_mask
    assert 0 < int(fg.sum()) < fg.numel()
    torch.testing.assert_close(distill(student, teacher), distill(student, teacher, fg))
    unlinked = SelfDistillLoss(nc, reg_max)(student, teacher)  # every anchor
    torch.testing.assert_close(unlinked, SelfDistillLoss(nc, reg_max)(student, teacher, torch.ones_like(fg)))
    assert not torch.allclose(unlinked, distill(student, teacher))
