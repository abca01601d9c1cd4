"""``repquant train`` / ``hyper-search`` / ``train-repopt``: a training recipe run on the shared loop."""

from __future__ import annotations

from repquant.train.config import TrainConfig
from repquant.train.fit import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "run"]


def run(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` (``resume``: continue the run in ``cfg.output_dir``)."""
    return train(cfg, resume=resume)
