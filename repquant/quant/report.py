"""Sensitivity reports (JSON / CSV / Markdown / PNG, a top-k printout), the mAP check, and the one
library call behind ``repquant sensitivity``.

JSON schema (``write_json``)::

    {"model", "metric_definitions", "calibration": {...}, "wall_time_s", "timings_s", "num_images",
     "isolated_images", "output_error": {...},
     "layers": [{"name", "kind", "isolated": {"mse", "snr_db", "cosine", "signal_power",
                 "num_elements"}, "accumulated": {...}, "local": {...}, "extras": {...}}],
     "rankings": {mode: {metric: [layer names, most sensitive first]}}, "map_check": {...} | null}

Row by row ``snr_db == 10 log10(signal_power / mse)``; non-finite values (``snr_db`` of an exact
layer) are written as ``null`` so the file is strict JSON.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from repquant.errors import CalibrationError
from repquant.io import atomic_write_text
from repquant.quant.config import QuantConfig
from repquant.quant.placement import QuantPlacement
from repquant.quant.sensitivity import (
    DESCENDING,
    METRICS,
    MODES,
    ModeStats,
    SensitivityResult,
    layer_sensitivity,
    quantized_copy,
    set_enabled_layers,
)

logger = logging.getLogger(__name__)

METRIC_DEFINITIONS = {
    "mse": "mean((y_q - y)^2), pooled over every element of every calibration image",
    "snr_db": "10*log10(sum(y^2) / sum((y_q - y)^2)), pooled (= ORT qdq_loss_debug SQNR); higher is better",
    "cosine": "<y, y_q> / (|y| |y_q|), no absolute value, pooled",
    "signal_power": "mean(y^2), so snr_db = 10*log10(signal_power / mse)",
    "isolated": "only this layer's quantizers on; error at the raw model outputs, all outputs pooled together",
    "accumulated": "all quantizers on; error of this layer's output vs the float model's same output",
    "local": "this layer on the float model's input to it: op(Q(x), Q(w)) vs op(x, w)",
    "input_snr_db": "SNR of Q(x) vs x for the layer's activation quantizer (input or residual skip), float x",
    "weight_snr_db": "SNR of Q(w) vs w for the layer's per-channel weight quantizer",
}


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _stats(s: ModeStats) -> dict[str, Any]:
    return {"mse": _num(s.mse), "snr_db": _num(s.snr_db), "cosine": _num(s.cosine),
            "signal_power": _num(s.signal_power), "num_elements": s.num_elements}


def result_to_dict(result: SensitivityResult, model: str, calibration: dict[str, Any],
                   map_check: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document (see the module docstring)."""
    layers = []
    for ly in result.layers:
        row: dict[str, Any] = {"name": ly.name, "kind": ly.kind}
        row.update({m: _stats(s) for m, s in ly.modes.items()})
        row["extras"] = {k: _num(v) for k, v in ly.extras.items()}
        layers.append(row)
    cfg = result.config
    return {
        "model": model,
        "metric_definitions": METRIC_DEFINITIONS,
        "calibration": {**calibration, "calib_method": cfg.calib_method, "percentile": cfg.percentile,
                        "keep_float_layers": list(cfg.keep_float_layers)},
        "wall_time_s": result.wall_time_s,
        "timings_s": result.timings_s,
        "num_images": result.num_images,
        "isolated_images": result.isolated_images,
        "output_error": _stats(result.output_error),
        "layers": layers,
        "rankings": result.rankings,
        "map_check": map_check,
    }


def write_json(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Strict JSON (``allow_nan=False``), written atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


def write_csv(result: SensitivityResult, path: str | os.PathLike) -> Path:
    """One row per layer: name, kind, ``<mode>_<metric>`` and ``<mode>_signal_power``, extras."""
    buf = io.StringIO()
    extras = sorted({k for ly in result.layers for k in ly.extras})
    header = ["name", "kind"] + [f"{m}_{k}" for m in result.modes for k in (*METRICS, "signal_power")] + extras
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for ly in result.layers:
        values = [getattr(ly.modes[m], k) for m in result.modes for k in (*METRICS, "signal_power")]
        writer.writerow([ly.name, ly.kind, *(repr(float(v)) for v in values),
                         *("" if ly.extras.get(k) is None else repr(float(ly.extras[k])) for k in extras)])
    path = Path(path)
    atomic_write_text(path, buf.getvalue())
    return path


def _fmt(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3e}" if metric == "mse" else f"{value:.6f}" if metric == "cosine" else f"{value:.2f}"


def markdown_table(result: SensitivityResult, mode: str, metric: str, top_k: int | None = None) -> str:
    """Layers ordered by ``rankings[mode][metric]`` with every mode's three metrics."""
    names = result.ranking(mode, metric)[:top_k]
    head = ["rank", "layer", "kind"] + [f"{m} {k}" for m in result.modes for k in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, name in enumerate(names, 1):
        ly = result.layer(name)
        cells = [_fmt(getattr(ly.modes[m], k), k) for m in result.modes for k in METRICS]
        lines.append("| " + " | ".join([str(rank), f"`{name}`", ly.kind, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(result: SensitivityResult, path: str | os.PathLike, mode: str, metrics: Sequence[str],
                   model: str, map_check: dict[str, Any] | None = None) -> Path:
    """A short header (definitions, calibration size, time), one ranked table per metric, the mAP check."""
    text = (f"# INT8 sensitivity of {model}\n\nMetrics pooled over {result.num_images} calibration images "
            f"(isolated mode: {result.isolated_images}); calibration `{result.config.calib_method}`; "
            f"wall time {result.wall_time_s:.1f} s.\n\n"
            + "".join(f"- `{k}`: {v}\n" for k, v in METRIC_DEFINITIONS.items()))
    for metric in metrics:
        text += f"\n## Ranked by {mode} {metric} (most sensitive first)\n\n" + markdown_table(result, mode, metric)
    if map_check is not None:
        text += "\n## mAP check\n\n```\n" + format_map_check(map_check) + "\n```\n"
    path = Path(path)
    atomic_write_text(path, text)
    return path


def write_png(result: SensitivityResult, path: str | os.PathLike, mode: str, metric: str,
              top_k: int = 30) -> Path:
    """Horizontal bar chart of the ``top_k`` most sensitive layers by ``mode`` / ``metric``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result.ranking(mode, metric)[:top_k]
    values = [getattr(result.layer(n).modes[mode], metric) for n in names]
    values = [v if math.isfinite(v) else 0.0 for v in values]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(names) + 1.5))
    ax.barh(range(len(names)), values, color="tab:red")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{mode} {metric}")
    ax.set_title(f"INT8 sensitivity: top {len(names)} layers by {mode} {metric}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_top_k(result: SensitivityResult, mode: str, metric: str, k: int = 10) -> str:
    """``k`` lines ``rank. layer  value`` for the console."""
    lines = [f"top {k} layers by {mode} {metric}:"]
    for rank, name in enumerate(result.ranking(mode, metric)[:k], 1):
        value = getattr(result.layer(name).modes[mode], metric)
        lines.append(f"{rank:3d}. {name:60s} {_fmt(value, metric)}")
    return "\n".join(lines)


# --- rank correlation and the mAP check -------------------------------------------------------------


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
    from repquant.eval import evaluate
    from repquant.models import DecodedDetector

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
        for metric in METRICS:
            sign = 1.0 if DESCENDING[metric] else -1.0
            scores = [sign * getattr(result.layer(n).modes[mode], metric) for n in layers]
            correlation[mode][metric] = _num(spearman(scores, [drops[n] for n in layers]))
    return {"float_map50_95": base, "map_drop": drops, "spearman": correlation}


# --- keep-float rankings --------------------------------------------------------------------------------


def keep_float_from_sensitivity(path: str | os.PathLike, k: int, mode: str, metric: str) -> tuple[str, ...]:
    """The first ``k`` layers of ``rankings[mode][metric]`` in a ``repquant sensitivity`` JSON."""
    path = Path(path)
    try:
        rankings = json.loads(path.read_text())["rankings"]
    except (OSError, ValueError, KeyError) as err:
        raise CalibrationError(f"{path}: not a repquant sensitivity JSON ({type(err).__name__}: {err})") from None
    if mode not in rankings or metric not in rankings[mode]:
        have = [f"{m}/{k}" for m, per in rankings.items() for k in per]
        raise CalibrationError(f"{path}: no ranking {mode}/{metric}; it has {', '.join(have)}")
    ranking = rankings[mode][metric]
    if k > len(ranking):
        raise CalibrationError(f"{path}: --keep-float {k} but the model has only {len(ranking)} quantizable layers")
    return tuple(ranking[:k])



def rank_keep_float(model: nn.Module, batches: Sequence[Tensor], config: Any, k: int,
                    sensitivity_json: str | os.PathLike | None, mode: str = "isolated", metric: str = "mse",
                    isolated_images: int | None = 32, progress: bool = False) -> tuple[str, ...]:
    """The ``k`` most sensitive layers: from a ``repquant sensitivity`` JSON when given, else measured now
    on ``batches`` (``layer_sensitivity`` restricted to ``mode``)."""
    if k == 0:
        return ()
    if sensitivity_json is not None:
        return keep_float_from_sensitivity(sensitivity_json, k, mode, metric)
    logger.info("measuring %s %s sensitivity to rank keep-float layers", mode, metric)
    result = layer_sensitivity(model, batches, config, modes=(mode,), progress=progress,
                               isolated_images=isolated_images)
    ranking = result.ranking(mode, metric)
    if k > len(ranking):
        raise CalibrationError(f"--keep-float {k} but the model has only {len(ranking)} quantizable layers")
    return tuple(ranking[:k])


# --- the CLI's one call -----------------------------------------------------------------------------


def load_for_quantization(model_path_or_name: str, data_yaml: str | os.PathLike, calib_images: int,
                          img_size: int, seed: int = 0, batch_size: int = 2) -> tuple[nn.Module, Any, list, dict]:
    """The deployed (re-parameterized) float model, the dataset config, the seeded calibration batches
    of its train split (letterboxed, never augmented) and their JSON-ready record."""
    from repquant.checkpoint import resolve_model
    from repquant.data import load_data_config
    from repquant.data.calib import CalibManifest, calibration_batches
    from repquant.reparam import is_deployed, reparameterize

    data_config = load_data_config(data_yaml)
    model = resolve_model(model_path_or_name, num_classes=data_config.nc).eval()
    if not is_deployed(model):
        model = reparameterize(model).eval()
    manifest = CalibManifest(data=str(data_yaml), split="train", num_images=calib_images, seed=seed,
                             img_size=img_size, batch_size=batch_size)
    batches, calibration = calibration_batches(manifest)
    return model, data_config, batches, calibration


def sensitivity_command(model_path_or_name: str, data_yaml: str | os.PathLike, output_dir: str | os.PathLike,
                        metrics: Sequence[str] = ("snr_db",), mode: str = "isolated", calib_images: int = 128,
                        img_size: int = 640, modes: Sequence[str] = MODES, map_check_top_k: int = 0,
                        config: QuantConfig | None = None, seed: int = 0, batch_size: int = 2,
                        isolated_images: int | None = None, top_k: int = 10,
                        progress: bool = True) -> dict[str, Path]:
    """Load a deployed model, calibrate on ``calib_images`` seeded train images, measure, write reports.

    ``model_path_or_name``: checkpoint path or registry name (random init; for smoke runs). The
    model is re-parameterized if it is not deployed yet. Writes ``sensitivity.{json,csv,md}`` and one
    ``sensitivity_<metric>.png`` per metric in ``metrics`` under ``output_dir``, ranked by ``mode``;
    ``map_check_top_k > 0`` also measures the mAP drop of each layer in the union of every metric's
    top ``map_check_top_k`` (in ``mode``) quantized alone on the val split. Prints the top ``top_k``
    per metric. Returns the written paths by kind.
    """
    from repquant.data import DetectionDataset

    metrics = tuple(metrics)
    if mode not in modes or not metrics or any(m not in METRICS for m in metrics):
        raise ValueError(f"sensitivity: ranking {mode}/{metrics} must be one of modes {list(modes)} x {list(METRICS)}")
    model, data_config, batches, calibration = load_for_quantization(model_path_or_name, data_yaml, calib_images,
                                                                     img_size, seed, batch_size)
    config = config or QuantConfig(num_calib_images=calib_images)
    result = layer_sensitivity(model, batches, config, modes, progress=progress, isolated_images=isolated_images)
    check = None
    if map_check_top_k > 0:
        checked = list(dict.fromkeys(n for m in metrics for n in result.ranking(mode, m)[:map_check_top_k]))
        qmodel, placement = quantized_copy(model, batches, config)
        val = DetectionDataset(data_config, "val", img_size, augment=False)
        check = map_check(model, qmodel, placement, val, result, checked, progress=progress)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = result_to_dict(result, model_path_or_name, calibration, check)
    paths = {
        "json": write_json(doc, out / "sensitivity.json"),
        "csv": write_csv(result, out / "sensitivity.csv"),
        "md": write_markdown(result, out / "sensitivity.md", mode, metrics, model_path_or_name, check),
    }
    for metric in metrics:
        paths[f"png_{metric}"] = write_png(result, out / f"sensitivity_{metric}.png", mode, metric)
    for metric in metrics:
        print(format_top_k(result, mode, metric, top_k))
    if check is not None:
        print(format_map_check(check))
    print(f"SNR in dB, pooled over all {result.num_images} images; wall time {result.wall_time_s:.1f} s")
    return paths


def format_map_check(check: dict[str, Any]) -> str:
    """The per-layer mAP drops and each proxy's Spearman correlation with them."""
    lines = [f"mAP check (float mAP@.5:.95 {check['float_map50_95']:.4f}): drop when quantized alone"]
    for name, drop in sorted(check["map_drop"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:60s} {drop:+.4f}")
    for mode, per_metric in check["spearman"].items():
        cells = ", ".join(f"{k} {'n/a' if v is None else f'{v:+.3f}'}" for k, v in per_metric.items())
        lines.append(f"  Spearman vs mAP drop ({mode}): {cells}")
    return "\n".join(lines)
