"""Sensitivity reports: JSON / CSV / Markdown / PNG writers and console text (returned, never printed).

JSON schema (``write_json``)::

    {"model", "model_identity": {"variant", "num_classes", "weights_sha256", "img_size"},
     "metric_definitions", "calibration": {...}, "wall_time_s", "timings_s", "num_images", "isolated_images",
     "output_error": {...},
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
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from repquant.io import atomic_write_bytes, atomic_write_text
from repquant.quant.metrics import get_metric, metric_names
from repquant.quant.sensitivity import ModeStats, SensitivityResult

_OTHER_DEFINITIONS = {
    "signal_power": "mean(y^2), so snr_db = 10*log10(signal_power / mse)",
    "isolated": "only this layer's quantizers on; error at the raw model outputs, all outputs pooled together",
    "accumulated": "all quantizers on; error of this layer's output vs the float model's same output",
    "local": "this layer on the float model's input to it: op(Q(x), Q(w)) vs op(x, w)",
    "input_snr_db": "SNR of Q(x) vs x for the layer's activation quantizer (input or residual skip), float x",
    "weight_snr_db": "SNR of Q(w) vs w for the layer's per-channel weight quantizer",
}


def metric_definitions() -> dict[str, str]:
    """What every reported number means: each registered metric's definition, then the modes and extras."""
    return {**{name: get_metric(name).definition for name in metric_names()}, **_OTHER_DEFINITIONS}


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _stats(s: ModeStats) -> dict[str, Any]:
    return {**{k: _num(v) for k, v in s.values.items()}, "signal_power": _num(s.signal_power),
            "num_elements": s.num_elements}


def result_to_dict(result: SensitivityResult, model: str, calibration: dict[str, Any],
                   map_check: dict[str, Any] | None = None, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document (see the module docstring); ``identity``: ``provenance.model_identity`` of the model
    measured, which ``ptq`` / ``qat --sensitivity`` check against the model they quantize."""
    layers = []
    for ly in result.layers:
        row: dict[str, Any] = {"name": ly.name, "kind": ly.kind}
        row.update({m: _stats(s) for m, s in ly.modes.items()})
        row["extras"] = {k: _num(v) for k, v in ly.extras.items()}
        layers.append(row)
    cfg = result.config
    return {
        "model": model,
        "model_identity": identity,
        "metric_definitions": metric_definitions(),
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
    header = ["name", "kind"] + [f"{m}_{k}" for m in result.modes for k in (*metric_names(), "signal_power")] + extras
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for ly in result.layers:
        values = [getattr(ly.modes[m], k) for m in result.modes for k in (*metric_names(), "signal_power")]
        cells = [ly.extras.get(k) for k in extras]
        writer.writerow([ly.name, ly.kind, *(repr(float(v)) for v in values),
                         *("" if v is None else repr(float(v)) for v in cells)])
    path = Path(path)
    atomic_write_text(path, buf.getvalue())
    return path


def _fmt(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3e}" if metric == "mse" else f"{value:.6f}" if metric == "cosine" else f"{value:.2f}"


def markdown_table(result: SensitivityResult, mode: str, metric: str, top_k: int | None = None) -> str:
    """Layers ordered by ``rankings[mode][metric]`` with every mode's metrics."""
    names = result.ranking(mode, metric)[:top_k]
    head = ["rank", "layer", "kind"] + [f"{m} {k}" for m in result.modes for k in metric_names()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, name in enumerate(names, 1):
        ly = result.layer(name)
        cells = [_fmt(getattr(ly.modes[m], k), k) for m in result.modes for k in metric_names()]
        lines.append("| " + " | ".join([str(rank), f"`{name}`", ly.kind, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(result: SensitivityResult, path: str | os.PathLike, mode: str, metrics: Sequence[str],
                   model: str, map_check: dict[str, Any] | None = None) -> Path:
    """A short header (definitions, calibration size, time), one ranked table per metric, the mAP check."""
    text = (f"# INT8 sensitivity of {model}\n\nMetrics pooled over {result.num_images} calibration images "
            f"(isolated mode: {result.isolated_images}); calibration `{result.config.calib_method}`; "
            f"wall time {result.wall_time_s:.1f} s.\n\n"
            + "".join(f"- `{k}`: {v}\n" for k, v in metric_definitions().items()))
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
    names = result.ranking(mode, metric)[:top_k]
    values = [getattr(result.layer(n).modes[mode], metric) for n in names]
    return plot_layer_bars(names, values, path, f"{mode} {metric}",
                           f"INT8 sensitivity: top {len(names)} layers by {mode} {metric}")


def plot_layer_bars(names: Sequence[str], values: Sequence[float], path: str | os.PathLike, x_label: str,
                    title: str, marked: Sequence[str] = (), marked_label: str = "kept float") -> Path:
    """Horizontal bars, one per layer in the given order (first on top), ``marked`` layers in another colour;
    a PNG written atomically at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    values = [v if math.isfinite(v) else 0.0 for v in values]
    colours = ["tab:blue" if n in marked else "tab:red" for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(names) + 1.5))
    try:
        ax.barh(range(len(names)), values, color=colours)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(x_label)
        ax.set_title(title)
        if marked:
            ax.legend(handles=[Patch(color="tab:blue", label=marked_label), Patch(color="tab:red", label="INT8")],
                      loc="lower right")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def format_top_k(result: SensitivityResult, mode: str, metric: str, k: int = 10) -> str:
    """``k`` lines ``rank. layer  value`` for the console."""
    lines = [f"top {k} layers by {mode} {metric}:"]
    for rank, name in enumerate(result.ranking(mode, metric)[:k], 1):
        value = getattr(result.layer(name).modes[mode], metric)
        lines.append(f"{rank:3d}. {name:60s} {_fmt(value, metric)}")
    return "\n".join(lines)


def format_map_check(check: dict[str, Any]) -> str:
    """The per-layer mAP drops and each proxy's Spearman correlation with them."""
    lines = [f"mAP check (float mAP@.5:.95 {check['float_map50_95']:.4f}): drop when quantized alone"]
    for name, drop in sorted(check["map_drop"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:60s} {drop:+.4f}")
    for mode, per_metric in check["spearman"].items():
        cells = ", ".join(f"{k} {'n/a' if v is None else f'{v:+.3f}'}" for k, v in per_metric.items())
        lines.append(f"  Spearman vs mAP drop ({mode}): {cells}")
    return "\n".join(lines)
