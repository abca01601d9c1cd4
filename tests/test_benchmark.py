"""Benchmark statistics, timing loop, report schema and Markdown, and the torch/ORT runners."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from repquant.deploy.report import (
    SCHEMA_VERSION,
    BenchReport,
    BenchResult,
    Column,
    LatencyStats,
    markdown_table,
    pareto_front,
    plot_pareto,
    read_report,
    validate_report,
)
from repquant.deploy.timing import (
    TimingPlan,
    compare_runners,
    environment_info,
    latency_stats,
    reparam_speedup,
    time_runner,
)
from repquant.errors import RecipeError, RepquantError
from repquant.tasks import bench
from repquant.tasks.config import BenchConfig

IMG = 64


def bench_command(model: str, **settings) -> BenchReport:
    return bench.run(BenchConfig(model=model, **settings))


# --- statistics and timing loop (exact numbers, no timing assertions) ----------------------------


def test_latency_stats_known_values() -> None:
    stats = latency_stats([10.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0])  # 1..10, shuffled
    # Linear interpolation on the sorted values: p at position q * (n - 1) = q * 9.
    assert stats.median == 5.5  # position 4.5: between 5 and 6
    assert stats.p90 == pytest.approx(9.1, abs=1e-12)  # position 8.1: 9 + 0.1 * (10 - 9)
    assert stats.p99 == pytest.approx(9.91, abs=1e-12)  # position 8.91
    assert stats.mean == 5.5
    assert stats.std == pytest.approx(math.sqrt(8.25), abs=1e-12)  # population: sum((i - 5.5)^2) / 10
    assert (stats.min, stats.max) == (1.0, 10.0)


def test_latency_stats_single_and_empty() -> None:
    assert latency_stats([3.0]) == LatencyStats(3.0, 3.0, 3.0, 3.0, 0.0, 3.0, 3.0)
    with pytest.raises(RepquantError, match="non-empty"):
        latency_stats([])


class FakeClock:
    """A clock that only moves when the fake runner 'works' for a scripted duration."""

    def __init__(self, durations_s: list[float]) -> None:
        self.now = 100.0
        self.durations = list(durations_s)
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def run(self, x: np.ndarray) -> None:
        self.now += self.durations[self.calls % len(self.durations)]
        self.calls += 1


class FakeRunner:
    """A runner whose every call takes the clock's next scripted duration."""

    backend, precision, device, batch_size = "ort", "fp32", "cpu", None

    def __init__(self, clock: FakeClock, hw: tuple[int, int], threads: int | None = None) -> None:
        self.clock, self.img_size, self.threads = clock, hw, threads

    def make_input(self, batch: int) -> np.ndarray:
        return np.zeros((batch, 3, *self.img_size), np.float32)

    def __call__(self, x: np.ndarray) -> None:
        self.clock.run(x)


def test_benchmark_loop_with_injected_clock() -> None:
    # Powers of two keep every sum exact in binary floating point.
    clock = FakeClock([0.5, 0.25, 0.125, 0.25])
    runner = FakeRunner(clock, (32, 64), threads=3)
    results = time_runner(runner, TimingPlan(batch_sizes=(1, 4), warmup=2, iters=4), "x.onnx", clock=clock)
    assert clock.calls == 2 * (2 + 4)
    first, second = results
    # Warm-up consumed 0.5 and 0.25; the timed calls see 0.125, 0.25, 0.5, 0.25 (cycling).
    assert first.latency_ms == latency_stats([125.0, 250.0, 500.0, 250.0])
    assert first.latency_ms.median == 250.0
    assert first.throughput_img_s == 1 * 1000.0 / 250.0
    assert second.throughput_img_s == 4 * 1000.0 / second.latency_ms.median
    assert (first.batch_size, second.batch_size) == (1, 4)
    assert first.img_size == (32, 64) and first.iterations == 4 and first.warmup == 2
    assert (first.backend, first.variant, first.timer, first.threads) == ("ort", "x.onnx", "perf_counter", 3)


def test_compare_runners_interleaves_so_that_drift_hits_both_alike() -> None:
    # Two equally fast runners on a machine that slows down steadily: timed one after the other the second
    # looks much slower; timed in interleaved rounds the two stay close.
    def ratio(interleaved: bool) -> float:
        clock = FakeClock([0.001 * (1 + i / 50) for i in range(10_000)])
        a, b = FakeRunner(clock, (32, 32)), FakeRunner(clock, (32, 32))
        plan = TimingPlan(batch_sizes=(1, 2), warmup=1, iters=12)
        if interleaved:
            results = compare_runners({"a": a, "b": b}, plan, rounds=3, clock=clock)
            first, second = results["a"][0], results["b"][0]
            assert [r.batch_size for r in results["b"]] == [1, 2] and results["a"][0].variant == "a"
        else:
            [first, _], [second, _] = time_runner(a, plan, clock=clock), time_runner(b, plan, clock=clock)
        return second.latency_ms.median / first.latency_ms.median

    sequential, interleaved = ratio(False), ratio(True)
    assert sequential > 1.25
    assert abs(interleaved - 1) < (sequential - 1) / 2


def test_min_seconds_extends_the_run() -> None:
    clock = FakeClock([0.25])
    runner = FakeRunner(clock, (32, 32))
    [result] = time_runner(runner, TimingPlan(batch_sizes=(1,), warmup=0, iters=2, min_seconds=1.0), clock=clock)
    assert result.iterations == 4  # 4 x 0.25 s reaches 1 s exactly


def test_reparam_speedup_from_results() -> None:
    def result(variant: str, batch: int, median: float) -> BenchResult:
        return BenchResult(
            "torch",
            variant,
            "fp32",
            "cpu",
            batch,
            (64, 64),
            1,
            0,
            "perf_counter",
            LatencyStats(median, median, median, median, 0.0, median, median),
            batch / median,
        )

    rows = [result("train-form", 1, 3.0), result("deployed", 1, 2.0), result("train-form", 4, 9.0)]
    assert reparam_speedup(rows) == {"bs1": 1.5}  # bs4 has no deployed counterpart


# --- report schema, JSON round trip, Markdown ------------------------------------------------------


def _stats(median: float) -> LatencyStats:
    return LatencyStats(median, median + 1, median + 2, median, 0.5, median - 1, median + 3)


@pytest.fixture()
def report() -> BenchReport:
    env = environment_info()
    env.update(cpu_model="Test CPU", cpu_count=8, torch_threads=4, gpu_name=None, python="3.11.7")
    env["versions"] = {
        "repquant": "0.1.0",
        "torch": "2.13.0",
        "onnx": None,
        "onnxruntime": "1.32.0",
        "numpy": "2.0",
        "tensorrt": None,
    }
    results = [
        BenchResult(
            "ort", "m.onnx", "fp32", "cpu", 1, (64, 64), 20, 5, "perf_counter", _stats(2.5), 400.0, 4
        ),
        BenchResult("ort", "m|x", "int8", "cpu", 32, (64, 64), 20, 5, "perf_counter", _stats(40.0), 800.0, 4),
    ]
    return BenchReport(
        "yolov6n",
        (64, 64),
        "forward only",
        env,
        results,
        notes={"reparam_speedup": {"bs1": 1.5}},
        created_utc="2026-01-01T00:00:00Z",
    )


def test_report_validates_and_round_trips(report: BenchReport, tmp_path: Path) -> None:
    path = report.write_json(tmp_path / "sub" / "bench.json")
    data = json.loads(path.read_text())
    validate_report(data)
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["results"][0]["latency_ms"]["p99"] == 4.5
    again = read_report(path)
    assert again == report
    assert again.to_dict() == data


def _broken(report: BenchReport, edit) -> dict:
    data = copy.deepcopy(report.to_dict())
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["results"][1]["latency_ms"].pop("p99"), r"results\[1\]\.latency_ms: missing key 'p99'"),
        (
            lambda d: d["results"][0].update(batch_size="1"),
            r"results\[0\]\.batch_size: expected int, got str",
        ),
        (
            lambda d: d["results"][0].update(batch_size=True),
            r"results\[0\]\.batch_size: expected int, got bool",
        ),
        (lambda d: d["results"][0].update(backend="onnx"), r"results\[0\]\.backend: 'onnx' is not one of"),
        (
            lambda d: d["environment"]["versions"].update(torch=2),
            r"versions\.torch: expected str/null, got int",
        ),
        (lambda d: d.update(schema_version=2), r"schema_version: expected 1, got 2"),
        (lambda d: d.update(img_size=[64]), r"report\.img_size: expected \[height, width\]"),
        (lambda d: d.update(results={}), r"report\.results: expected a list, got dict"),
        (lambda d: d.pop("environment"), r"report: missing key 'environment'"),
    ],
)
def test_validator_names_the_bad_field(report: BenchReport, edit, message: str) -> None:
    with pytest.raises(RepquantError, match=message):
        validate_report(_broken(report, edit))


def test_read_report_names_the_file(report: BenchReport, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(report, lambda d: d.pop("notes"))))
    with pytest.raises(RepquantError, match=r"bad\.json: report: missing key 'notes'"):
        read_report(path)


def test_report_markdown(report: BenchReport) -> None:
    text = report.to_markdown()
    lines = text.splitlines()
    assert lines[0] == "### yolov6n @ 64x64"
    assert "CPU: Test CPU (8 cores, torch threads 4); GPU: none;" in lines[2]
    assert "onnx" not in lines[2].replace("onnxruntime", "")  # versions that are None are left out
    assert lines[4] == "Method: forward only."
    assert lines[6] == (
        "| backend | variant | precision | device | batch | median ms | p90 ms | p99 ms | img/s | iters |"
    )
    assert lines[7] == "|---|---|---|---|---:|---:|---:|---:|---:|---:|"
    assert lines[8] == "| ort | m.onnx | fp32 | cpu | 1 | 2.50 | 3.50 | 4.50 | 400.0 | 20 |"
    assert lines[9] == "| ort | m\\|x | int8 | cpu | 32 | 40.00 | 41.00 | 42.00 | 800.0 | 20 |"
    assert lines[-1] == '- reparam_speedup: {"bs1": 1.5}'


def test_markdown_table_generic() -> None:
    rows = [{"name": "a", "ms": 1.234, "ap": None}, {"name": "b", "ms": 10, "ap": 0.5}]
    table = markdown_table(
        rows, ["name", Column("ms", "latency ms", "{:.1f}"), Column("ap", "AP", lambda v: f"{v:.0%}")]
    )
    assert table == ("| name | latency ms | AP |\n|---|---:|---:|\n| a | 1.2 | - |\n| b | 10.0 | 50% |\n")


def test_pareto_front_known_answer() -> None:
    # (latency, AP): b is dominated by a (slower, worse); d by c; e duplicates a.
    points = [(1.0, 0.30), (2.0, 0.25), (3.0, 0.40), (4.0, 0.35), (1.0, 0.30), (5.0, 0.45)]
    assert pareto_front(points) == [0, 4, 2, 5]
    assert pareto_front([]) == []


def test_plot_pareto_writes_png(tmp_path: Path) -> None:
    rows = [
        {"name": "fp32", "latency_ms": 3.0, "map50_95": 0.37},
        {"name": "int8", "latency_ms": 1.5, "map50_95": 0.35},
        {"name": "no-ap", "latency_ms": 1.0},
    ]
    path = plot_pareto(rows, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RepquantError, match="no row has both"):
        plot_pareto([{"name": "x"}], tmp_path / "none.png")


# --- real runners on a tiny model ------------------------------------------------------------------


def test_ort_bench_command_on_yolov6n(tmp_path: Path) -> None:
    report = bench_command(
        "yolov6n",
        backend="ort",
        precision="fp32",
        batch_sizes=(1, 2),
        img_size=IMG,
        warmup=1,
        iters=3,
        threads=1,
        output_json=str(tmp_path / "b.json"),
        output_md=str(tmp_path / "b.md"),
    )
    validate_report(json.loads((tmp_path / "b.json").read_text()))
    assert (tmp_path / "b.md").read_text() == report.to_markdown()
    assert report.img_size == (IMG, IMG) and report.environment["torch_threads"] == 1
    assert [r.batch_size for r in report.results] == [1, 2]
    for r in report.results:
        assert (r.backend, r.variant, r.precision, r.device, r.threads) == (
            "ort",
            "deployed",
            "fp32",
            "cpu",
            1,
        )
        assert r.iterations == 3 and r.latency_ms.min > 0
        assert r.throughput_img_s == r.batch_size * 1000.0 / r.latency_ms.median


def test_ort_bench_of_an_onnx_file_checks_precision(tmp_path: Path) -> None:
    from repquant.deploy.onnx_export import export_onnx
    from repquant.models import create_model

    path = export_onnx(create_model("yolov6n", num_classes=2), tmp_path / "n.onnx", IMG, dynamic_batch=True)
    report = bench_command(str(path), backend="ort", batch_sizes=(1,), img_size=640, warmup=0, iters=2)
    assert report.img_size == (IMG, IMG)  # the file's own size wins over img_size
    assert report.results[0].variant == "n.onnx"
    with pytest.raises(RepquantError, match="has no Q/DQ nodes.*precision int8"):
        bench_command(str(path), backend="ort", precision="int8", batch_sizes=(1,), warmup=0, iters=1)


def test_torch_bench_command_compares_train_form() -> None:
    report = bench_command(
        "yolov6n", backend="torch", batch_sizes=(1,), img_size=IMG, warmup=1, iters=2, compare_train_form=True
    )
    assert [(r.variant, r.batch_size) for r in report.results] == [("train-form", 1), ("deployed", 1)]
    assert set(report.notes["reparam_speedup"]) == {"bs1"}
    validate_report(report.to_dict())


def test_torch_runner_plain_deployed() -> None:
    report = bench_command("yolov6n", backend="torch", batch_sizes=(2,), img_size=IMG, warmup=0, iters=2)
    [result] = report.results
    assert (result.variant, result.batch_size, result.img_size, result.cuda_graphs) == (
        "deployed",
        2,
        (IMG, IMG),
        False,
    )


def test_compare_train_form_rejects_deployed_model(tmp_path: Path) -> None:
    from repquant.checkpoint import save_checkpoint
    from repquant.models import create_model
    from repquant.reparam import reparameterize

    path = save_checkpoint(tmp_path / "d.safetensors", reparameterize(create_model("yolov6n", num_classes=2)))
    with pytest.raises(RepquantError, match="already deployed"):
        bench_command(str(path), backend="torch", batch_sizes=(1,), img_size=IMG, compare_train_form=True)


@pytest.mark.parametrize(
    ("backend", "precision", "message"),
    [
        ("torch", "int8", "torch backend runs fp32"),
        ("ort", "fp16", "without fast fp16"),
        ("ort", "int8", "int8 needs a quantized"),
        ("onnx", "fp32", "backend must be one of"),
    ],
)
def test_bench_command_rejects_unsupported_combinations(backend: str, precision: str, message: str) -> None:
    with pytest.raises((RepquantError, RecipeError), match=message):
        bench_command(
            "yolov6n", backend=backend, precision=precision, batch_sizes=(1,), img_size=IMG, warmup=0, iters=1
        )


def test_torch_fp16_needs_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is allowed")
    with pytest.raises(RepquantError, match="fp16 and CUDA graphs need a CUDA GPU"):
        bench_command("yolov6n", backend="torch", precision="fp16", batch_sizes=(1,), img_size=IMG)


@pytest.mark.gpu
def test_torch_cuda_events_fp16_and_cuda_graphs() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    report = bench_command(
        "yolov6n",
        backend="torch",
        precision="fp16",
        batch_sizes=(1, 2),
        img_size=IMG,
        warmup=2,
        iters=5,
        cuda_graphs=True,
    )
    for r in report.results:
        assert (r.device, r.timer, r.cuda_graphs, r.precision) == ("cuda", "cuda_events", True, "fp16")
        assert r.iterations >= 5 and r.latency_ms.min > 0
    assert report.environment["gpu_name"]
