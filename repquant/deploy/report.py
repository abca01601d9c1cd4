"""Result formats: the benchmark report (fixed JSON schema, validation, Markdown) and generic
Markdown tables plus an accuracy-vs-latency Pareto plot (PNG) for the CI report.

Generic rows are plain dicts (one per model/backend/precision), e.g.
``{"name": "yolov6n int8", "latency_ms": 1.9, "map50_95": 0.343}``. The benchmark report's fields
are documented in ``benchmarks/README.md``; ``SCHEMA_VERSION`` changes whenever one does.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from repquant.errors import RepquantError
from repquant.io import atomic_write_bytes, atomic_write_text
from repquant.vocab import BACKENDS, PRECISIONS


@dataclass(frozen=True)
class Column:
    """A table column: ``key`` of the row dict, ``header`` text, and a value formatter."""

    key: str
    header: str
    fmt: str | Callable[[Any], str] = "{}"

    def render(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"  # missing or not applicable (e.g. no GPU)
        if callable(self.fmt):
            return self.fmt(value)
        return self.fmt.format(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column | str]) -> str:
    """A GitHub Markdown table; numeric columns (by header) are right-aligned. Ends with a newline.

    ``columns`` items are :class:`Column` or plain keys (header = key, ``str`` formatting).
    ``|`` inside values is escaped so that it cannot split a cell.
    """
    cols = [c if isinstance(c, Column) else Column(c, c) for c in columns]
    if not cols:
        raise RepquantError("markdown_table: no columns given")
    cells = [[c.render(row).replace("|", "\\|") for c in cols] for row in rows]
    numeric = [
        bool(rows) and all(isinstance(row.get(c.key), int | float) or row.get(c.key) is None for row in rows)
        for c in cols
    ]
    lines = [
        "| " + " | ".join(c.header for c in cols) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    lines.extend("| " + " | ".join(r) + " |" for r in cells)
    return "\n".join(lines) + "\n"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when lower x (latency) and higher y (accuracy) are better.

    A point is dominated when another has ``x' <= x`` and ``y' >= y`` with one strict. Result is
    sorted by increasing x. Exact duplicates are all kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = -math.inf
    last: tuple[float, float] | None = None
    for i in order:
        x, y = points[i]
        if y > best_y or (last is not None and (x, y) == last):
            front.append(i)
            best_y = max(best_y, y)
            last = (x, y)
    return front


def plot_pareto(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    x_key: str = "latency_ms",
    y_key: str = "map50_95",
    title: str = "Accuracy vs latency",
    x_label: str = "latency (ms, lower is better)",
    y_label: str = "mAP@0.5:0.95",
    threshold: tuple[float, str] | None = None,
) -> Path:
    """Scatter ``y_key`` against ``x_key`` (rows missing either are skipped), label each point by ``name``,
    join the Pareto front, draw ``threshold`` (y value, label) as a horizontal line when given, and write a
    PNG atomically at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # headless (CI); must precede pyplot's first import in the process
    import matplotlib.pyplot as plt

    usable = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    if not usable:
        raise RepquantError(f"plot_pareto: no row has both {x_key!r} and {y_key!r}")
    points = [(float(r[x_key]), float(r[y_key])) for r in usable]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    try:
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
        ax.plot(
            [points[i][0] for i in front],
            [points[i][1] for i in front],
            "--",
            color="tab:orange",
            label="Pareto front",
            zorder=2,
        )
        for row, (x, y) in zip(usable, points, strict=True):
            ax.annotate(
                str(row.get("name", "")), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        if threshold is not None:
            ax.axhline(threshold[0], color="tab:red", linestyle=":", label=threshold[1])
        ax.set(title=title, xlabel=x_label, ylabel=y_label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# --- benchmark report format (schema version SCHEMA_VERSION) ----------------------------------

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-call latencies in milliseconds."""

    median: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class BenchResult:
    """One (backend, variant, precision, batch size) measurement. See benchmarks/README.md."""

    backend: str
    variant: str
    precision: str
    device: str
    batch_size: int
    img_size: tuple[int, int]
    iterations: int
    warmup: int
    timer: str
    latency_ms: LatencyStats
    throughput_img_s: float
    threads: int | None = None
    cuda_graphs: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["img_size"] = list(self.img_size)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchResult:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}  # the schema allows extra keys
        values["img_size"] = tuple(values["img_size"])
        values["latency_ms"] = LatencyStats(**values["latency_ms"])
        return cls(**values)


@dataclass
class BenchReport:
    """A benchmark run: what was measured, where, how, and the results. See benchmarks/README.md."""

    model: str
    img_size: tuple[int, int]
    methodology: str
    environment: dict[str, Any]
    results: list[BenchResult]
    notes: dict[str, Any] = field(default_factory=dict)
    created_utc: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "created_utc": self.created_utc,
            "model": self.model,
            "img_size": list(self.img_size),
            "methodology": self.methodology,
            "environment": self.environment,
            "results": [r.to_dict() for r in self.results],
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchReport:
        validate_report(data)
        return cls(
            model=data["model"],
            img_size=tuple(data["img_size"]),
            methodology=data["methodology"],
            environment=dict(data["environment"]),
            results=[BenchResult.from_dict(r) for r in data["results"]],
            notes=dict(data["notes"]),
            created_utc=data["created_utc"],
            schema_version=data["schema_version"],
        )

    def write_json(self, path: str | os.PathLike) -> Path:
        data = self.to_dict()
        validate_report(data)
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        return Path(path)

    def to_markdown(self) -> str:
        return report_markdown(self)


def read_report(path: str | os.PathLike) -> BenchReport:
    """Load and validate a JSON report written by :meth:`BenchReport.write_json`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RepquantError(f"{path}: cannot read benchmark report ({err})") from None
    try:
        return BenchReport.from_dict(data)
    except RepquantError as err:
        raise RepquantError(f"{path}: {err}") from None


# --- schema -------------------------------------------------------------------------------------

_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
_STATS = {k: _NUM for k in ("median", "p90", "p99", "mean", "std", "min", "max")}
RESULT_SCHEMA: dict[str, Any] = {
    "backend": str,
    "variant": str,
    "precision": str,
    "device": str,
    "batch_size": int,
    "img_size": [int],
    "iterations": int,
    "warmup": int,
    "timer": str,
    "latency_ms": _STATS,
    "throughput_img_s": _NUM,
    "threads": _OPT_INT,
    "cuda_graphs": bool,
}
REPORT_SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "created_utc": str,
    "model": str,
    "img_size": [int],
    "methodology": str,
    "environment": {
        "python": str,
        "platform": str,
        "cpu_model": str,
        "cpu_count": _OPT_INT,
        "torch_threads": int,
        "gpu_name": _OPT_STR,
        "cuda": _OPT_STR,
        "versions": {k: _OPT_STR for k in ("repquant", "torch", "onnx", "onnxruntime", "numpy", "tensorrt")},
    },
    "results": [RESULT_SCHEMA],
    "notes": dict,
}
_ENUMS = {"backend": BACKENDS, "precision": PRECISIONS, "timer": ("perf_counter", "cuda_events")}


def validate_report(data: Any) -> None:
    """Check ``data`` (a decoded JSON report) against ``REPORT_SCHEMA``: every key present with its
    type (extra keys allowed), ``schema_version == SCHEMA_VERSION``, known enum values, ``img_size``
    of length 2. Raises :class:`RepquantError` naming the first offending field."""
    check_schema(data, REPORT_SCHEMA, "report")
    if data["schema_version"] != SCHEMA_VERSION:
        raise RepquantError(f"report.schema_version: expected {SCHEMA_VERSION}, got {data['schema_version']}")
    for where, sizes in [("report.img_size", data["img_size"])] + [
        (f"results[{i}].img_size", r["img_size"]) for i, r in enumerate(data["results"])
    ]:
        if len(sizes) != 2:
            raise RepquantError(f"{where}: expected [height, width], got {sizes}")
    for i, result in enumerate(data["results"]):
        for key, allowed in _ENUMS.items():
            if result[key] not in allowed:
                raise RepquantError(f"results[{i}].{key}: {result[key]!r} is not one of {', '.join(allowed)}")


def check_schema(value: Any, spec: Any, where: str) -> None:
    """Check ``value`` against ``spec`` (dict of keys -> spec, ``[spec]`` for lists, a type or tuple of types);
    extra keys are allowed; raise :class:`RepquantError` naming the first offending field."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise RepquantError(f"{where}: expected an object, got {type(value).__name__}")
        for key, sub in spec.items():
            if key not in value:
                raise RepquantError(f"{where}: missing key {key!r}")
            check_schema(value[key], sub, f"{where}.{key}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise RepquantError(f"{where}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            check_schema(item, spec[0], f"{where}[{i}]")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        # bool is an int subclass in Python, but true/false is never a valid count or size.
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise RepquantError(f"{where}: expected {names}, got {type(value).__name__} {value!r:.40}")


# --- Markdown -----------------------------------------------------------------------------------

RESULT_COLUMNS = (
    Column("backend", "backend"),
    Column("variant", "variant"),
    Column("precision", "precision"),
    Column("device", "device"),
    Column("batch_size", "batch"),
    Column("median", "median ms", "{:.2f}"),
    Column("p90", "p90 ms", "{:.2f}"),
    Column("p99", "p99 ms", "{:.2f}"),
    Column("throughput_img_s", "img/s", "{:.1f}"),
    Column("iterations", "iters"),
)


def report_markdown(report: BenchReport) -> str:
    """A Markdown section: header, environment line, methodology, and one table row per result."""
    env = report.environment
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    h, w = report.img_size
    rows = [{**r.to_dict(), **asdict(r.latency_ms)} for r in report.results]
    lines = [
        f"### {report.model} @ {h}x{w}",
        "",
        f"CPU: {env['cpu_model']} ({env['cpu_count']} cores, torch threads {env['torch_threads']}); "
        f"GPU: {env['gpu_name'] or 'none'}; {versions}; python {env['python']}.",
        "",
        f"Method: {report.methodology}.",
        "",
        markdown_table(rows, RESULT_COLUMNS),
    ]
    for key, value in report.notes.items():
        lines.append(f"- {key}: {json.dumps(value)}")
    return "\n".join(lines).rstrip() + "\n"
