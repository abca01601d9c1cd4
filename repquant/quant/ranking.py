"""Which layers stay float: keep-float rankings (from a sensitivity JSON or measured), the mAP check that
tests a proxy against the real per-layer mAP drop, and Spearman rank correlation."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from repquant.errors import CalibrationError
from repquant.eval import evaluate
from repquant.models import DecodedDetector
from repquant.provenance import check_identity, model_identity
from repquant.quant.config import QuantConfig
from repquant.quant.metrics import get_metric
from repquant.quant.placement import QuantPlacement
from repquant.quant.sensitivity import SensitivityResult, layer_sensitivity, set_enabled_layers

logger = logging.getLogger(__name__)


def _num(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (``[10, 20, 20] -> [1, 2.5, 2.5]``)."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation with average ranks for ties (Pearson on the ranks); NaN if constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return math.nan if denom == 0.0 else float(rx @ ry) / denom


def map_check(model: nn.Module, qmodel: nn.Module, placement: QuantPlacement, dataset: Any,
              result: SensitivityResult, layers: Sequence[str], batch_size: int = 8,
              progress: bool = False) -> dict[str, Any]:
    """mAP@.5:.95 drop of quantizing each of ``layers`` alone, and how well each proxy predicts it.

    ``model``: the float YOLOv6; ``qmodel``: its calibrated copy (``quantized_copy``); ``dataset``:
    an un-augmented ``DetectionDataset``. Correlation: Spearman between the proxy's sensitivity
    score (``mse``, ``-snr_db``, ``-cosine``: larger = more sensitive) and the drop, over ``layers``.
    """
    img_hw = (dataset.img_size, dataset.img_size)
    base = evaluate(DecodedDetector(model, img_hw).eval(), dataset, batch_size, progress=progress).map50_95
    drops: dict[str, float] = {}
    for name in layers:
        set_enabled_layers(qmodel, placement, [name])
        quant = evaluate(DecodedDetector(qmodel, img_hw).eval(), dataset, batch_size, progress=progress)
        drops[name] = base - quant.map50_95
        logger.info("map check: %s alone -> mAP drop %.4f", name, drops[name])
    set_enabled_layers(qmodel, placement, None)
    correlation: dict[str, dict[str, float | None]] = {}
    for mode in result.modes:
        correlation[mode] = {}
        for metric in result.rankings[mode]:
            sign = -1.0 if get_metric(metric).higher_is_better else 1.0
            scores = [sign * getattr(result.layer(n).modes[mode], metric) for n in layers]
            correlation[mode][metric] = _num(spearman(scores, [drops[n] for n in layers]))
    return {"float_map50_95": base, "map_drop": drops, "spearman": correlation}


# --- keep-float rankings --------------------------------------------------------------------------------


def keep_float_from_sensitivity(path: str | os.PathLike, k: int, mode: str, metric: str,
                                identity: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The first ``k`` layers of ``rankings[mode][metric]`` in a ``repquant sensitivity`` JSON; with
    ``identity`` (``repquant.provenance.model_identity`` of the model it is used with) the JSON must have been
    measured on that model."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        rankings = doc["rankings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CalibrationError(f"{path}: not a repquant sensitivity JSON ({type(err).__name__}: {err})") from None
    if identity is not None:
        check_identity(doc.get("model_identity"), identity, str(path), "the sensitivity ranking")
    if mode not in rankings or metric not in rankings[mode]:
        have = [f"{m}/{k}" for m, per in rankings.items() for k in per]
        raise CalibrationError(f"{path}: no ranking {mode}/{metric}; it has {', '.join(have)}")
    ranking = rankings[mode][metric]
    if k > len(ranking):
        raise CalibrationError(f"{path}: --keep-float {k} but the model has only {len(ranking)} quantizable layers")
    return tuple(ranking[:k])



@dataclass(frozen=True)
class KeepFloatRanking:
    """Where the keep-float order comes from: a ``repquant sensitivity`` JSON, or a measurement now in
    ``mode`` / ``metric`` (the isolated mode on the first ``isolated_images`` calibration images; None: all)."""

    sensitivity_json: Path | None = None
    mode: str = "isolated"
    metric: str = "mse"
    isolated_images: int | None = 32

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.metric}"


def rank_keep_float(model: nn.Module, batches: Sequence[Tensor], config: QuantConfig, k: int,
                    ranking: KeepFloatRanking, progress: bool = False) -> tuple[str, ...]:
    """The ``k`` most sensitive layers: from ``ranking.sensitivity_json`` when given, else measured now on
    ``batches`` (``layer_sensitivity`` restricted to ``ranking.mode``)."""
    if k == 0:
        return ()
    if ranking.sensitivity_json is not None:
        identity = model_identity(model, int(batches[0].shape[-1]) if batches else None)
        return keep_float_from_sensitivity(ranking.sensitivity_json, k, ranking.mode, ranking.metric, identity)
    logger.info("measuring %s sensitivity to rank keep-float layers", ranking.label)
    result = layer_sensitivity(model, batches, config, modes=(ranking.mode,), progress=progress,
                               isolated_images=ranking.isolated_images)
    order = result.ranking(ranking.mode, ranking.metric)
    if k > len(order):
        raise CalibrationError(f"--keep-float {k} but the model has only {len(order)} quantizable layers")
    return tuple(order[:k])




def search_keep_float(model: nn.Module, qmodel: nn.Module, placement: QuantPlacement, ranking: list[str],
                      val_dataset: Any, budget: KeepFloatBudget, progress: bool = False
                      ) -> tuple[int, list[dict[str, float]]]:
    """Smallest K <= ``budget.max_keep_float`` whose INT8 mAP@.5:.95 on ``val_dataset`` is within
    ``budget.max_ap_drop`` of FP32, keeping ``ranking[:K]`` float; and the evaluations made (``k``, ``map50_95``,
    ``drop``; ``k = -1`` is FP32).

    ``qmodel`` is calibrated once with every quantizer: max / histogram calibration observes float
    activations, so a layer's scales do not depend on which other layers are quantized.
    """
    img_hw = (val_dataset.img_size, val_dataset.img_size)
    fp32 = evaluate(DecodedDetector(model, img_hw).eval(), val_dataset, progress=progress).map50_95
    evaluations: list[dict[str, float]] = [{"k": -1, "map50_95": fp32, "drop": 0.0}]
    all_layers = [ly.name for ly in placement.layers]
    try:
        for k in range(0, min(budget.max_keep_float, len(ranking)) + 1):
            float_layers = set(ranking[:k])
            set_enabled_layers(qmodel, placement, [n for n in all_layers if n not in float_layers])
            int8 = evaluate(DecodedDetector(qmodel, img_hw).eval(), val_dataset, progress=progress).map50_95
            evaluations.append({"k": k, "map50_95": int8, "drop": fp32 - int8})
            logger.info("ptq auto: K=%d keep-float -> mAP@.5:.95 %.4f (FP32 %.4f, drop %.4f)", k, int8, fp32,
                        fp32 - int8)
            if fp32 - int8 <= budget.max_ap_drop:
                return k, evaluations
    finally:
        set_enabled_layers(qmodel, placement, None)
    best = min(evaluations[1:], key=lambda e: e["drop"])
    raise CalibrationError(
        f"ptq --keep-float auto: no K <= {budget.max_keep_float} keeps the mAP drop within {budget.max_ap_drop} "
        f"(FP32 {fp32:.4f}; best K={int(best['k'])} drops {best['drop']:.4f}); raise --max-keep-float or "
        "--max-ap-drop"
    )


@dataclass(frozen=True)
class KeepFloatBudget:
    """``--keep-float auto``: the largest mAP@.5:.95 drop allowed and the most float layers tried."""

    max_ap_drop: float = 0.005
    max_keep_float: int = 12
