"""What sensitivity, ptq and qat start from: the deployed float model, the dataset, and the seeded
calibration batches of its train split (letterboxed, never augmented) with their JSON-ready record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from repquant.data import DataConfig, load_data_config
from repquant.data.calib import CalibManifest, calibration_batches
from repquant.deploy.resolve import ModelHandle, open_model
from repquant.models import YOLOv6
from repquant.quant.config import QuantConfig, with_layout
from repquant.quant.ranking import KeepFloatRanking


@dataclass
class QuantInputs:
    handle: ModelHandle
    model: YOLOv6
    data: DataConfig
    batches: list[Tensor]
    calibration: dict[str, Any]


def load_quant_inputs(cfg: Any, batch_size: int = 2) -> QuantInputs:
    """From a config with ``model``, ``data``, ``calib_images``, ``img_size`` and ``seed``: the deployed model
    (its class count checked against the dataset) and ``calib_images`` calibration images in batches of
    ``batch_size``."""
    data = load_data_config(cfg.data)
    handle = open_model(cfg.model)
    model = handle.deployed_model(num_classes=data.nc)
    manifest = CalibManifest(data=str(cfg.data), split="train", num_images=cfg.calib_images, seed=cfg.seed,
                             img_size=cfg.img_size, batch_size=batch_size)
    batches, calibration = calibration_batches(manifest)
    return QuantInputs(handle, model, data, batches, calibration)


def quant_config_of(cfg: Any, keep: tuple[str, ...] = (), layout: str | None = None) -> QuantConfig:
    """The ``QuantConfig`` of a task config (calibration fields), keeping ``keep`` float, in ``layout``."""
    return with_layout(QuantConfig(calib_method=cfg.calib_method, percentile=cfg.percentile,
                                   num_calib_images=cfg.calib_images, keep_float_layers=keep), layout)


def ranking_of(cfg: Any) -> KeepFloatRanking:
    """The ``KeepFloatRanking`` of a ptq/qat config."""
    json_path = Path(cfg.sensitivity_json) if cfg.sensitivity_json is not None else None
    return KeepFloatRanking(json_path, cfg.ranking_mode, cfg.ranking_metric, cfg.isolated_images or None)
