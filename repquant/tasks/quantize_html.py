"""The figures, ``report.md`` and ``report.html`` of ``repquant quantize``, all from ``summary.json``.

The Markdown report is the one source of the text: ``report.html`` is it rendered by the ``markdown`` library
with the figures inlined as base64 PNGs, so the HTML is one self-contained file to mail or attach to CI.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

import markdown

from repquant.deploy.report import Column, markdown_table, plot_pareto
from repquant.io import atomic_write_bytes, atomic_write_text
from repquant.quant.report import plot_layer_bars
from repquant.tasks.quant_config import ENGINE_NAMES
from repquant.tasks.quantize_report import headline_table

SENSITIVITY_TOP = 30
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "avx_vnni")
_CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;font-size:.9em}
th{background:#f2f2f2}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
code,pre{background:#f6f8fa}pre{padding:.8em;overflow-x:auto;white-space:pre-wrap}details{margin:.5em 0}"""


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _engine(summary: dict[str, Any]) -> str:
    return ENGINE_NAMES[summary["speed"]["backend"]]


def _label(row: dict[str, Any]) -> str:
    return f"{'QAT' if row['source'] == 'qat' else 'PTQ'} K={row['keep_float']}"


def write_figures(summary: dict[str, Any], out: Path) -> dict[str, str]:
    """``accuracy_latency.png``, ``sensitivity.png`` and ``per_class_ap.png`` in ``out/figures``; returns the
    paths relative to ``out``."""
    folder = out / "figures"
    latency = summary["speed"]["tried_bs1_latency_ms"]
    fp32_bs1 = summary["speed"]["fp32"].get("bs1", {}).get("latency_ms")
    rows = [{"name": "FP32", "latency_ms": fp32_bs1, "map50_95": summary["fp32"]["map50_95"]}]
    rows += [{"name": _label(t), "latency_ms": latency.get(t["onnx"]), "map50_95": t["map50_95"]}
             for t in summary["tried"]]
    floor = summary["fp32"]["map50_95"] - summary["budget"]["max_ap_drop"]
    figures = {"accuracy_latency": plot_pareto(rows, folder / "accuracy_latency.png",
                                               title=f"mAP@.5:.95 vs batch-1 latency ({_engine(summary)}, CPU)",
                                               threshold=(floor, "FP32 - max AP drop"))}
    sens = summary["sensitivity"]
    names = sens["ranking"][:max(SENSITIVITY_TOP, summary["int8"]["keep_float"])]
    figures["sensitivity"] = plot_layer_bars(
        names, [sens["values"][n] for n in names], folder / "sensitivity.png", f"{sens['mode']} {sens['metric']}",
        f"INT8 sensitivity: top {len(names)} layers", marked=summary["int8"]["keep_float_layers"])
    figures["per_class_ap"] = _plot_per_class(summary, folder / "per_class_ap.png")
    return {name: path.relative_to(out).as_posix() for name, path in figures.items()}


def _plot_per_class(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["fp32"]["per_class_ap50_95"])
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.6))
    try:
        for offset, (key, label) in zip((-0.2, 0.2), (("fp32", "FP32"), ("int8", "INT8")), strict=True):
            values = [summary[key]["per_class_ap50_95"].get(n, 0.0) for n in names]
            ax.bar([i + offset for i in x], values, width=0.4, label=label)
        ax.set_xticks(list(x), names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
        ax.set(ylabel="AP@.5:.95", title="Per-class AP, FP32 vs INT8 (val)")
        ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _tried_table(summary: dict[str, Any]) -> str:
    latency = summary["speed"]["tried_bs1_latency_ms"]
    final = summary["int8"]["evaluated_onnx"]
    rows = [{"file": f"`{t['onnx']}`" + (" (chosen)" if t["onnx"] == final else ""), "how": _label(t),
             "map": t["map50_95"], "drop": t["drop"], "ms": latency.get(t["onnx"]),
             "snr": _worst(t.get("parity_snr_db")), "floor": _worst(t.get("parity_floor_db"))}
            for t in summary["tried"]]
    table = markdown_table(rows, [Column("file", "file"), Column("how", "how"), Column("map", "mAP@.5:.95 %", _pct),
                                  Column("drop", "drop (pts)", _pct), Column("ms", "bs1 ms", "{:.2f}"),
                                  Column("snr", "parity SNR dB", "{:.1f}"), Column("floor", "ORT floor dB", "{:.1f}")])
    return table + ("\nParity: ONNX Runtime against the torch fake-quant model on calibration images (worst output); "
                    "the floor is ONNX Runtime against itself with graph optimizations off. Parity at the floor means "
                    "the file computes what was calibrated.\n")


def _worst(per_output: dict[str, float] | None) -> float | None:
    return min(per_output.values()) if per_output else None


def _per_class_table(summary: dict[str, Any]) -> str:
    fp32, int8 = summary["fp32"]["per_class_ap50_95"], summary["int8"]["per_class_ap50_95"]
    rows = [{"cls": n, "fp32": fp32[n], "int8": int8.get(n), "delta": (int8.get(n) or 0.0) - fp32[n]} for n in fp32]
    return markdown_table(rows, [Column("cls", "class"), Column("fp32", "FP32 AP %", _pct),
                                 Column("int8", "INT8 AP %", _pct), Column("delta", "INT8 - FP32 (pts)", _pct)])


def _speed_table(summary: dict[str, Any]) -> str:
    speed = summary["speed"]
    rows = [{"batch": b, "fp32_ms": speed["fp32"][b]["latency_ms"], "fp32_img": speed["fp32"][b]["img_s"],
             "int8_ms": speed["int8"][b]["latency_ms"], "int8_img": speed["int8"][b]["img_s"],
             "x": speed["speedup"][b]} for b in speed["fp32"]]
    return markdown_table(rows, [Column("batch", "batch"), Column("fp32_ms", "FP32 ms", "{:.2f}"),
                                 Column("fp32_img", "FP32 img/s", "{:.1f}"), Column("int8_ms", "INT8 ms", "{:.2f}"),
                                 Column("int8_img", "INT8 img/s", "{:.1f}"), Column("x", "speed-up", "{:.2f}x")])


def _keep_float_section(summary: dict[str, Any]) -> str:
    int8, sens = summary["int8"], summary["sensitivity"]
    if not int8["keep_float_layers"]:
        return "Every quantizable layer runs in INT8.\n"
    lines = [f"{i}. `{n}` ({sens['mode']} {sens['metric']} {sens['values'][n]:.3g})"
             for i, n in enumerate(int8["keep_float_layers"], 1)]
    return "\n".join(lines) + "\n"


def _calibration_section(summary: dict[str, Any]) -> str:
    images, settings = summary["calibration"]["images"], summary["settings"]
    files = ", ".join(html.escape(f) for f in images.get("files", []))
    return (f"{images.get('num_images')} images of the `{images.get('split')}` split ({images.get('split_size')} "
            f"in all), drawn with seed {images.get('seed')}, letterboxed to {images.get('img_size')} px, never "
            f"augmented; method `{settings['calib_method']}`"
            + (f" (percentile {settings['percentile']})" if settings["calib_method"] == "percentile" else "")
            + f"; {summary['calibration']['quantizers']} quantizers; amax file `{summary['calibration']['amax']}` "
              f"(sha256 `{summary['calibration']['sha256'][:16]}`).\n\n"
            + f"<details><summary>calibration images</summary>{files}</details>\n")


def _environment_section(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    flags = ", ".join(f for f in SPEED_FLAGS if f in env["cpu_flags"]) or "none of " + ", ".join(SPEED_FLAGS)
    timing = summary["settings"]
    return (f"{_engine(summary)} on the CPU: {env['cpu_model']} ({env.get('cpu_count')} cores, speed-relevant flags: "
            f"{flags}); {env.get('torch_threads')} threads; {versions}. The files are timed in turn over 3 rounds "
            f"(each: {timing['bench_warmup']} warm-up runs, then at least a third of {timing['bench_iters']} timed "
            f"runs and of {timing['bench_min_seconds']} s); latency is the median round's median, so that a "
            "drifting machine slows every file alike. Compare speeds only within one run.\n")


def report_markdown(summary: dict[str, Any], figures: dict[str, str]) -> str:
    """The report's text (see the module docstring)."""
    int8, budget = summary["int8"], summary["budget"]
    model = Path(summary["model"]["path"]).name
    verdict = ("meets" if budget["met"] else "does NOT meet") + f" the budget of {_pct(budget['max_ap_drop'])} pts"
    commands = "\n".join(f"# {name}\n{cmd}" for name, cmd in summary["commands"].items())
    return "\n".join([
        f"# INT8 report: {model} on {Path(summary['data']['path']).name}\n",
        f"The INT8 file `{int8['onnx']}` ({_label(int8)}) loses {_pct(int8['drop'])} points of mAP@.5:.95 against "
        f"FP32 on {int8['num_images']} val images, both run in {_engine(summary)}: it {verdict}.\n",
        headline_table(summary),
        f"![accuracy vs latency]({figures['accuracy_latency']})\n",
        "## Files tried\n", _tried_table(summary),
        "## Layers kept in floating point\n", _keep_float_section(summary),
        f"![sensitivity]({figures['sensitivity']})\n",
        "## Per-class AP\n", _per_class_table(summary), f"![per-class AP]({figures['per_class_ap']})\n",
        "## Speed\n", _speed_table(summary),
        "## Calibration\n", _calibration_section(summary),
        "## Engine and machine\n", _environment_section(summary),
        "## Reproduce\n", f"```\n{commands}\n```\n",
    ])


def write_markdown(summary: dict[str, Any], figures: dict[str, str], path: Path) -> Path:
    atomic_write_text(path, report_markdown(summary, figures))
    return path


def write_html(markdown_path: Path, path: Path) -> Path:
    """``markdown_path`` rendered to one self-contained HTML file: each local image inlined as base64."""
    body = markdown.markdown(markdown_path.read_text(), extensions=["tables", "fenced_code"])

    def inline(match: re.Match[str]) -> str:
        data = base64.b64encode((markdown_path.parent / html.unescape(match.group(1))).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    title = html.escape(markdown_path.read_text().splitlines()[0].lstrip("# "))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")
    atomic_write_text(path, page)
    return path
