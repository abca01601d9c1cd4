"""``repquant info``: what a model is and what it costs deployed (params, GFLOPs = 2 x MACs, layers)."""

from __future__ import annotations

from typing import Any

from repquant.deploy.resolve import open_model
from repquant.models import model_profile
from repquant.tasks.config import InfoConfig

__all__ = ["InfoConfig", "run"]


def run(cfg: InfoConfig) -> dict[str, Any]:
    """The description as plain data (model, classes, block mode, reg_max, params, GFLOPs, layers)."""
    model = open_model(cfg.model).float_model(cfg.num_classes)
    profile = model_profile(model, cfg.img_size)
    config = model.config
    return {
        "model": config.name,
        "num_classes": config.num_classes,
        "block_mode": config.block_mode,
        "reg_max": config.reg_max,
        "params": profile.params,
        "params_m": round(profile.params / 1e6, 3),
        "gflops": round(profile.gflops, 3),
        "img_size": profile.img_size,
        "num_layers": profile.num_layers,
    }
