"""Training: label assignment, losses, distillation, and the training loop."""

from repquant.train.assigners import Assignment, ATSSAssigner, TaskAlignedAssigner, pad_targets
from repquant.train.distill import SelfDistillLoss, cwd_loss
from repquant.train.losses import BboxLoss, ComputeLoss, VarifocalLoss

__all__ = [
    "ATSSAssigner",
    "Assignment",
    "BboxLoss",
    "ComputeLoss",
    "SelfDistillLoss",
    "TaskAlignedAssigner",
    "VarifocalLoss",
    "cwd_loss",
    "pad_targets",
]
