"""What ``repquant quantize`` leaves behind: ``summary.json`` (schema ``SUMMARY_SCHEMA``), ``report.md``,
``report.html`` (one self-contained file, see ``repquant.tasks.quantize_html``) and ``run_log.json``.

``summary.json`` holds only what the run decided and measured, so that a rerun that reuses every stage
writes the same file byte for byte; stage times and reuse go to ``run_log.json``. Paths in it are relative
to the output folder. Its fields are documented in ``docs/quantize.md``.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from repquant.data import load_data_config
from repquant.deploy.report import Column, check_schema, markdown_table
from repquant.errors import RepquantError
from repquant.io import atomic_write_text
from repquant.tasks.quant_config import ENGINE_NAMES, QuantizeConfig
from repquant.tasks.stages import StageLog
from repquant.vocab import METRIC_CHOICES

SUMMARY_SCHEMA_ID = "repquant.quantize/1"
_EVAL = {"onnx": str, "sha256": str, "map50_95": float, "map50": float, "num_images": int, "per_class_ap50_95": dict}
_TRIED = {**_EVAL, "keep_float": int, "keep_float_layers": [str], "drop": float, "source": str}
_TIMES = {"latency_ms": float, "img_s": float}
SUMMARY_SCHEMA: dict[str, Any] = {
    "schema": str,
    "model": {"path": str, "sha256": str, "img_size": int},
    "data": {"path": str, "sha256": str, "names": [str]},
    "settings": dict,
    "budget": {"max_ap_drop": float, "met": bool},
    "fp32": _EVAL,
    "int8": {**_TRIED, "evaluated_onnx": str, "meets_budget": bool},
    "tried": [_TRIED],
    "sensitivity": {"json": str, "mode": str, "metric": str, "ranking": [str], "values": dict},
    "calibration": {"amax": str, "sha256": str, "quantizers": int, "images": dict},
    "speed": {"backend": str, "fp32": {str: _TIMES}, "int8": {str: _TIMES}, "speedup": dict,
              "tried_bs1_latency_ms": dict},
    "environment": {"cpu_model": str, "cpu_flags": list, "versions": dict},
    "commands": {"quantize": str, "fp32_map": str, "int8_map": str, "fp32_speed": str, "int8_speed": str},
}


def validate_summary(doc: Any) -> None:
    """Check a decoded ``summary.json`` against ``SUMMARY_SCHEMA`` (extra keys allowed) and its invariants:
    the INT8 file is one of the files tried, its drop is FP32 minus INT8 mAP. Raises :class:`RepquantError`
    naming the first offending field."""
    _check(doc, SUMMARY_SCHEMA, "summary")
    if doc["schema"] != SUMMARY_SCHEMA_ID:
        raise RepquantError(f"summary.schema: expected {SUMMARY_SCHEMA_ID}, got {doc['schema']!r}")
    int8 = doc["int8"]
    if int8["evaluated_onnx"] not in {t["onnx"] for t in doc["tried"]}:
        raise RepquantError(f"summary.int8.evaluated_onnx: {int8['evaluated_onnx']} is not among the files tried")
    if abs(doc["fp32"]["map50_95"] - int8["map50_95"] - int8["drop"]) > 1e-9:
        raise RepquantError("summary.int8.drop: not fp32.map50_95 - int8.map50_95")


def _check(value: Any, spec: Any, where: str) -> None:
    """``check_schema`` plus ``{str: spec}`` for objects with free keys."""
    if isinstance(spec, dict) and list(spec) == [str]:
        check_schema(value, dict, where)
        for key, item in value.items():
            _check(item, spec[str], f"{where}.{key}")
    elif isinstance(spec, dict):
        check_schema(value, dict, where)
        for key, sub in spec.items():
            if key not in value:
                raise RepquantError(f"{where}: missing key {key!r}")
            _check(value[key], sub, f"{where}.{key}")
    elif isinstance(spec, list):
        check_schema(value, list, where)
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]")
    else:
        check_schema(value, (float, int) if spec is float else spec, where)  # JSON writes 1.0 as 1.0, 0 as 0


_FLAG_NAMES = {"ranking_mode": "mode", "ranking_metric": "metric", "batch_sizes": "batch"}


def _flags(name: str, value: Any) -> list[str]:
    """The ``repquant quantize`` flags that set config field ``name`` to ``value``."""
    flag = "--" + _FLAG_NAMES.get(name, name).replace("_", "-")
    if name == "batch_sizes":
        return [f"{flag} {b}" for b in value]
    if name == "ranking_metric":
        value = next(cli for cli, fields in METRIC_CHOICES.items() if fields == (value,))
    return [f"{flag} {shlex.quote(str(value))}"]


def reproduce_commands(cfg: QuantizeConfig) -> dict[str, str]:
    """The commands that reproduce each number of the report (run from the directory the run was started in)."""
    defaults = QuantizeConfig(cfg.model, cfg.data, cfg.output)
    skip = ("model", "data", "output", "threads", "exist_ok")
    flags = [flag for f in dataclasses.fields(cfg) if f.name not in skip
             and getattr(cfg, f.name) != getattr(defaults, f.name) for flag in _flags(f.name, getattr(cfg, f.name))]
    model, data, out = (shlex.quote(str(p)) for p in (cfg.model, cfg.data, cfg.output))
    repquant = "repquant" if cfg.threads is None else f"repquant --threads {cfg.threads}"
    batches = " ".join(f"--batch {b}" for b in cfg.batch_sizes)
    timing = (f"--img-size {cfg.img_size} --warmup {cfg.bench_warmup} --iters {cfg.bench_iters} "
              f"--min-seconds {cfg.bench_min_seconds} {batches}")
    return {
        "quantize": " ".join([f"{repquant} quantize --model {model} --data {data} --output {out}", *flags]),
        "fp32_map": f"{repquant} eval --model {out}/fp32.onnx --data {data} --backend {cfg.backend}",
        "int8_map": f"{repquant} eval --model {out}/int8.onnx --data {data} --backend {cfg.backend}",
        "fp32_speed": f"{repquant} bench --model {out}/fp32.onnx --backend {cfg.backend} --precision fp32 {timing}",
        "int8_speed": f"{repquant} bench --model {out}/int8.onnx --backend {cfg.backend} --precision int8 {timing}",
    }


def build_summary(cfg: QuantizeConfig, identity: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    """The ``summary.json`` document from the stage results (``parts``: fp32, calibration, sensitivity,
    tried, int8, speed)."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name not in ("model", "data", "output", "exist_ok")}
    calibration = parts["calibration"]
    speed = dict(parts["speed"])
    environment = speed.pop("environment")
    return {
        "schema": SUMMARY_SCHEMA_ID,
        "model": {"path": str(cfg.model), "sha256": identity["model_sha256"], "img_size": cfg.img_size},
        "data": {"path": str(cfg.data), "sha256": identity["data_sha256"],
                 "names": list(load_data_config(cfg.data).names)},
        "settings": json.loads(json.dumps(settings, default=str)),
        "budget": {"max_ap_drop": cfg.max_ap_drop, "met": parts["int8"]["meets_budget"]},
        "fp32": parts["fp32"],
        "int8": parts["int8"],
        "tried": parts["tried"],
        "sensitivity": parts["sensitivity"],
        "calibration": {"amax": calibration["amax"], "sha256": calibration["sha256"],
                        "quantizers": calibration["quantizers"], "images": calibration["calibration"]},
        "speed": speed,
        "environment": environment,
        "commands": reproduce_commands(cfg),
    }


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def headline_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """FP32 and the final INT8 file: mAP, drop and the throughput of each batch size (the console table)."""
    speed, int8 = summary["speed"], summary["int8"]
    return [{"model": "FP32", "map": summary["fp32"]["map50_95"], "map50": summary["fp32"]["map50"], "drop": None,
             "float": None, **{b: t["img_s"] for b, t in speed["fp32"].items()}},
            {"model": f"INT8 ({int8['source']})", "map": int8["map50_95"], "map50": int8["map50"],
             "drop": int8["drop"], "float": int8["keep_float"], **{b: t["img_s"] for b, t in speed["int8"].items()}}]


def headline_table(summary: dict[str, Any]) -> str:
    """A Markdown table of :func:`headline_rows` (mAP in %, throughput in img/s) and a line with the INT8
    speed-up of each batch size."""
    speed = summary["speed"]
    batches = list(speed["fp32"])
    columns = [Column("model", "model"), Column("map", "mAP@.5:.95 %", _pct), Column("map50", "mAP@.5 %", _pct),
               Column("drop", "drop (pts)", _pct), Column("float", "float layers")]
    columns += [Column(b, f"{b} img/s", "{:.1f}") for b in batches]
    speedups = ", ".join(f"{b} {speed['speedup'][b]:.2f}x" for b in batches)
    return markdown_table(headline_rows(summary), columns) + f"\nINT8 vs FP32 throughput: {speedups}\n"


def console_summary(summary: dict[str, Any], paths: dict[str, Path]) -> str:
    """What ``repquant quantize`` prints: the headline table, the keep-float layers and where the report is."""
    int8 = summary["int8"]
    budget = summary["budget"]
    verdict = "within" if budget["met"] else "OUTSIDE"
    layers = ", ".join(int8["keep_float_layers"]) or "none (every layer INT8)"
    return (headline_table(summary)
            + f"\nINT8 file {paths['int8']}: drop {_pct(int8['drop'])} pts, {verdict} the budget of "
              f"{_pct(budget['max_ap_drop'])} pts ({int8['num_images']} val images, "
              f"{ENGINE_NAMES[summary['speed']['backend']]}).\n"
            + f"Float layers ({int8['keep_float']}): {layers}\n"
            + f"Report: {paths['html']} (also {paths['markdown'].name}, {paths['summary'].name})")


def write_reports(cfg: QuantizeConfig, out: Path, identity: dict[str, Any],
                  parts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write ``summary.json`` (validated first), the figures, ``report.md`` and ``report.html`` into ``out``."""
    from repquant.tasks.quantize_html import write_figures, write_html, write_markdown

    summary = build_summary(cfg, identity, parts)
    validate_summary(summary)
    paths = {"summary": out / "summary.json", "int8": out / summary["int8"]["onnx"]}
    atomic_write_text(paths["summary"], json.dumps(summary, indent=2) + "\n")
    figures = write_figures(summary, out)
    paths["markdown"] = write_markdown(summary, figures, out / "report.md")
    paths["html"] = write_html(paths["markdown"], out / "report.html")
    return summary, paths


def write_run_log(out: Path, log: StageLog, wall_time_s: float) -> Path:
    """``run_log.json``: each stage's seconds and whether it was reused, and the run's wall time."""
    path = out / "run_log.json"
    atomic_write_text(path, json.dumps({"wall_time_s": round(wall_time_s, 2), "stages": log.to_dict()}, indent=2)
                      + "\n")
    return path
