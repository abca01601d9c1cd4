"""``repquant ptq``: mixed-precision post-training quantization to a QDQ ONNX file, the K layers INT8 hurts
most kept float.

Load and re-parameterize the model, draw the seeded calibration subset, rank the keep-float layers (from a
sensitivity JSON written by ``repquant sensitivity`` or measured now), calibrate the remaining quantizers,
export a QDQ ONNX file that carries the same ``repquant_*`` metadata as a float export (so ``repquant eval
--model X.onnx`` works) plus a ``repquant_quant`` record of the keep-float layers and calibration, and check
fake-quant vs ONNX Runtime parity on the first calibration batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repquant.data import DetectionDataset
from repquant.deploy.qdq import QDQExport, QDQParity, export_quantized_onnx, float_convs, qdq_parity
from repquant.outputs import check_output_file
from repquant.quant.config import quant_info
from repquant.quant.ranking import KeepFloatBudget, rank_keep_float, search_keep_float
from repquant.quant.sensitivity import quantized_copy
from repquant.tasks.config import Auto, PTQConfig
from repquant.tasks.inputs import QuantInputs, load_quant_inputs, quant_config_of, ranking_of

__all__ = ["PTQConfig", "PTQResult", "run"]

logger = logging.getLogger(__name__)
PARITY_BATCHES = 4  # calibration batches compared between torch fake-quant and ONNX Runtime


@dataclass(frozen=True)
class PTQResult:
    """What ``run`` wrote and decided; ``auto_search`` lists the evaluations of ``keep_float auto``."""

    onnx_path: Path
    keep_float_layers: tuple[str, ...]
    quantized_layers: int
    layout: str
    calibration: dict[str, Any]
    parity: QDQParity
    float_dtype: str = "fp32"
    auto_search: list[dict[str, float]] | None = None


def choose_keep_float(cfg: PTQConfig, inputs: QuantInputs,
                      progress: bool) -> tuple[tuple[str, ...], list[dict[str, float]] | None]:
    """The keep-float layers: the first K of the ranking, or for ``auto`` the smallest K within the budget,
    searched in the layout that is exported (the ORT layout also quantizes conv outputs)."""
    auto = isinstance(cfg.keep_float, Auto)
    wanted = cfg.max_keep_float if auto else int(cfg.keep_float)  # type: ignore[arg-type]
    ranking = list(rank_keep_float(inputs.model, inputs.batches, quant_config_of(cfg), wanted, ranking_of(cfg),
                                   progress))
    if not auto:
        return tuple(ranking), None
    qmodel, placement = quantized_copy(inputs.model, inputs.batches, quant_config_of(cfg, layout=cfg.layout))
    val = DetectionDataset(inputs.data, "val", cfg.img_size, augment=False)
    budget = KeepFloatBudget(cfg.max_ap_drop, cfg.max_keep_float)
    k, search = search_keep_float(inputs.model, qmodel, placement, ranking, val, budget, progress)
    return tuple(ranking[:k]), search


def run(cfg: PTQConfig, progress: bool = True) -> PTQResult:
    """Quantize ``cfg.model`` to INT8 except its keep-float layers; write the QDQ ONNX ``cfg.output``."""
    check_output_file(cfg.output, [cfg.model, cfg.data, cfg.sensitivity_json], cfg.overwrite)
    inputs = load_quant_inputs(cfg, cfg.batch_size)
    keep, search = choose_keep_float(cfg, inputs, progress)
    qconfig = quant_config_of(cfg, keep, cfg.layout)
    qmodel, placement = quantized_copy(inputs.model, inputs.batches, qconfig)
    auto = isinstance(cfg.keep_float, Auto)
    info = quant_info(qconfig, cfg.layout, calib_seed=cfg.seed,
                      ranking=None if not keep else f"{cfg.ranking_mode}/{cfg.ranking_metric}", auto_search=search,
                      max_ap_drop=cfg.max_ap_drop if auto else None, float_dtype=cfg.float_dtype)
    how = QDQExport(cfg.img_size, info, fp16_layers=float_convs(placement, keep) if cfg.float_dtype == "fp16" else (),
                    uint8_activations=cfg.layout == "ort")
    path = export_quantized_onnx(qmodel, cfg.output, how)
    parity = qdq_parity(qmodel, path, torch.cat(inputs.batches[:PARITY_BATCHES]))
    quantized = len(placement.layers) - len(keep)
    logger.info("ptq: wrote %s (%d of %d layers INT8, float %s: %s); fake-quant vs ORT SNR %s", path, quantized,
                len(placement.layers), cfg.float_dtype, ", ".join(keep) or "none", parity.describe())
    return PTQResult(path, keep, quantized, cfg.layout, inputs.calibration, parity, cfg.float_dtype, search)
