"""Distillation losses: YOLOv6 self-distillation (logits) and channel-wise distillation (features).

Self-distillation (YOLOv6 v3, yolov6/models/losses/loss_distill.py): a trained teacher of the same
family guides the student through
- a class term: ``T**2 * sum over anchors of KL(softmax(q_t / T) || softmax(q_s / T))`` over the
  class axis, where ``q = sigmoid(cls_logits)`` (YOLOv6's head emits probabilities in training, and
  its distillation softmaxes those), summed, not averaged, over anchors and images;
- a box term for ``reg_max > 0``: ``T**2 * mean over (foreground anchor, side) of KL`` between the
  teacher's and the student's DFL bin distributions at temperature ``T``.
YOLOv6 adds them to its class and DFL terms, so they carry the detection weights (1.0 and 0.5), and
multiplies both by ``((1 - cos(pi * epoch / epochs)) / 2) * (0.01 - 1) + 1`` (1 -> 0.01); the
trainer applies that decay (``repquant.train.schedule.cosine_decay``).

Channel-wise distillation (Shu et al., ICCV 2021), used by YOLOv6 QAT on the three neck outputs:
``phi(y)_{c,i}`` = softmax over the H*W positions of channel c of ``y / tau``;
``L = tau**2 / (N * C) * sum_{n,c} KL(phi(T)_{n,c} || phi(S)_{n,c})``, summed over levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from repquant.errors import ModelError

if TYPE_CHECKING:
    from repquant.train.losses import ComputeLoss


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision inputs (AMP) are upcast: the log-softmax terms underflow in float16."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _kl_rows(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(softmax(teacher) || softmax(student))`` per row of ``(..., K)`` logits -> ``(...)``."""
    log_p_t = F.log_softmax(teacher_logits, dim=-1)
    log_p_s = F.log_softmax(student_logits, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def distill_cls_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """YOLOv6 class distillation: ``(B, A, nc)`` logits of student and teacher -> scalar (summed over
    anchors and images)."""
    t = temperature
    student = _at_least_fp32(student_logits).sigmoid() / t
    teacher = _at_least_fp32(teacher_logits.detach()).sigmoid() / t
    return _kl_rows(student, teacher).sum() * t * t


def distill_dfl_loss(student_reg: Tensor, teacher_reg: Tensor, fg_mask: Tensor | None, reg_max: int,
                     temperature: float) -> Tensor:
    """YOLOv6 DFL distillation: ``(B, A, 4*(reg_max+1))`` DFL logits, ``fg_mask (B, A)`` bool (None: all
    anchors) -> scalar: mean over the selected (anchor, side) rows of the bin KL, times ``T**2``.
    Zero (with a graph) when ``reg_max == 0`` or no anchor is selected."""
    zero = student_reg.new_zeros(()) + student_reg.sum() * 0.0  # keeps the graph
    if reg_max == 0:
        return zero
    if fg_mask is not None:
        if not fg_mask.any():
            return zero
        student_reg, teacher_reg = student_reg[fg_mask], teacher_reg[fg_mask]
    t = temperature
    student = _at_least_fp32(student_reg).reshape(-1, reg_max + 1) / t
    teacher = _at_least_fp32(teacher_reg.detach()).reshape(-1, reg_max + 1) / t
    return _kl_rows(student, teacher).mean() * t * t


class SelfDistillLoss:
    """YOLOv6 self-distillation term (before the cosine decay the trainer applies).

    ``loss = w_class * d_class * distill_cls + w_dfl * d_dfl * distill_dfl`` with the detection
    weights ``w_class = 1.0``, ``w_dfl = 0.5`` and the distillation weights ``d_class = d_dfl = 1.0``
    (YOLOv6 defaults; its L config uses ``d_class = 2``); temperature 20 (YOLOv6 ``--temperature``).
    With ``compute_loss`` given, a call without ``fg_mask`` takes the foreground of that loss's
    latest assignment, so ``loss(student, teacher)`` right after ``compute_loss(...)`` is YOLOv6's term.
    """

    def __init__(self, num_classes: int, reg_max: int, temperature: float = 20.0,
                 class_weight: float = 1.0, dfl_weight: float = 0.5,
                 distill_class_weight: float = 1.0, distill_dfl_weight: float = 1.0,
                 compute_loss: ComputeLoss | None = None) -> None:
        self.compute_loss = compute_loss
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.temperature = temperature
        self.cls_factor = class_weight * distill_class_weight
        self.dfl_factor = dfl_weight * distill_dfl_weight

    def __call__(self, student_outputs: tuple[Tensor, Tensor], teacher_outputs: tuple[Tensor, Tensor],
                 fg_mask: Tensor | None = None) -> Tensor:
        """``outputs = (cls_logits (B, A, nc), reg_dist (B, A, 4*(reg_max+1)))`` of student and teacher;
        ``fg_mask (B, A)`` the foreground of the student's assignment (YOLOv6 distils DFL on foreground
        anchors only); None: from ``compute_loss.last_assignment`` if set, else every anchor.
        Teacher outputs are detached."""
        last = self.compute_loss.last_assignment if self.compute_loss is not None else None
        if fg_mask is None and last is not None:
            fg_mask = last.fg_mask
        s_cls, s_reg = student_outputs
        t_cls, t_reg = teacher_outputs
        if s_cls.shape != t_cls.shape or s_reg.shape != t_reg.shape:
            raise ModelError(
                f"SelfDistillLoss: student outputs {tuple(s_cls.shape)}, {tuple(s_reg.shape)} do not match "
                f"teacher outputs {tuple(t_cls.shape)}, {tuple(t_reg.shape)}")
        d_cls = distill_cls_loss(s_cls, t_cls, self.temperature)
        d_dfl = distill_dfl_loss(s_reg, t_reg, fg_mask, self.reg_max, self.temperature)
        return self.cls_factor * d_cls + self.dfl_factor * d_dfl


def cwd_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], tau: float = 1.0) -> Tensor:
    """Channel-wise distillation summed over levels.

    ``student_feats, teacher_feats``: matching sequences of ``(N, C, H, W)`` maps (e.g. the neck
    outputs P3, P4, P5). Per level ``tau**2 / (N * C) * sum_{n,c} KL(phi(T) || phi(S))`` with ``phi`` the
    softmax over the H*W positions of each channel of ``y / tau``. The teacher is detached, so only
    the student receives gradients. Returns a scalar.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ModelError(f"cwd_loss: got {len(student_feats)} student and {len(teacher_feats)} teacher "
                         "feature maps; expected the same non-zero number")
    total = student_feats[0].new_zeros(())
    for level, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        if s.shape != t.shape or s.dim() != 4:
            raise ModelError(f"cwd_loss: level {level} student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                             "expected equal (N, C, H, W) shapes")
        n, c = s.shape[:2]
        kl = _kl_rows(s.reshape(n, c, -1) / tau, t.detach().reshape(n, c, -1) / tau)  # (N, C)
        total = total + kl.sum() * (tau * tau) / (n * c)
    return total
