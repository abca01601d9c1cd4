"""Latency and throughput of a runner's forward pass, and where it was measured.

Methodology (also written into every report): only the network forward pass including box decoding is
timed (``images (B, 3, H, W) -> boxes, scores``), on one input prepared before timing and already on the
device; pre-processing (decode, letterbox) and NMS are excluded. Each batch size gets ``warmup`` untimed
calls, then at least ``iters`` timed calls, continuing until ``min_seconds`` of timed work have passed.
CPU calls are timed with ``time.perf_counter`` (the backends return finished results); GPU calls with CUDA
events recorded around each call on the current stream. Throughput is ``batch_size / median latency``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from repquant.deploy.backends import Runner
from repquant.deploy.report import BenchResult, LatencyStats
from repquant.errors import RepquantError

METHODOLOGY = (
    "network forward pass incl. box decoding on a pre-allocated input already on the device; "
    "pre-processing and NMS excluded; {warmup} warm-up calls then >= {iters} timed calls per batch size; "
    "latency percentiles by linear interpolation, std is the population std; "
    "throughput = batch_size / median latency"
)


@dataclass(frozen=True)
class TimingPlan:
    """How long to time each batch size (see the module docstring)."""

    batch_sizes: tuple[int, ...] = (1, 32)
    warmup: int = 10
    iters: int = 50
    min_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.iters < 1 or self.warmup < 0 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise RepquantError(f"timing: need iters >= 1, warmup >= 0 and batch sizes >= 1, got iters={self.iters} "
                                f"warmup={self.warmup} batch_sizes={self.batch_sizes}")

    @property
    def methodology(self) -> str:
        return METHODOLOGY.format(warmup=self.warmup, iters=self.iters)


def latency_stats(timings_ms: Sequence[float]) -> LatencyStats:
    """Median, p90, p99 (linear interpolation between order statistics, numpy's default),
    mean, population std, min and max of ``timings_ms``."""
    values = np.asarray(timings_ms, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise RepquantError(f"latency_stats: need a non-empty 1-D list of timings, got shape {values.shape}")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return LatencyStats(median=float(p50), p90=float(p90), p99=float(p99), mean=float(values.mean()),
                        std=float(values.std()), min=float(values.min()), max=float(values.max()))


def time_runner(runner: Runner, plan: TimingPlan, variant: str = "deployed",
                clock: Callable[[], float] = time.perf_counter) -> list[BenchResult]:
    """Time ``runner(runner.make_input(batch))`` for each batch size of ``plan``; one result per batch size.

    CUDA runners are timed with CUDA events; ``clock`` (seconds) exists so that tests can inject exact
    timings on the CPU path.
    """
    events = runner.device.startswith("cuda")
    results = []
    for batch in plan.batch_sizes:
        x = runner.make_input(int(batch))
        for _ in range(plan.warmup):
            runner(x)
        if events:
            timings = _time_cuda(runner, x, plan.iters, plan.min_seconds)
        else:
            timings = _time_cpu(runner, x, plan.iters, plan.min_seconds, clock)
        stats = latency_stats(timings)
        results.append(BenchResult(
            backend=runner.backend, variant=variant, precision=runner.precision, device=runner.device,
            batch_size=int(batch), img_size=(int(x.shape[2]), int(x.shape[3])), iterations=len(timings),
            warmup=plan.warmup, timer="cuda_events" if events else "perf_counter", latency_ms=stats,
            throughput_img_s=int(batch) * 1000.0 / stats.median, threads=runner.threads,
            cuda_graphs=bool(getattr(runner, "_graphs", None)),
        ))
    return results


def compare_runners(runners: Mapping[str, Runner], plan: TimingPlan, rounds: int = 3,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, list[BenchResult]]:
    """Time several runners side by side: for each batch size, ``rounds`` rounds in which every runner is timed
    in turn (``plan.iters`` and ``plan.min_seconds`` split over the rounds, so the timed work is that of one
    ``time_runner`` call), so that a machine whose speed drifts (a busy neighbour, clock changes) slows them
    alike. Each runner's result per batch size is the round with the median latency. Use it for every speed
    ratio (INT8 vs FP32)."""
    per_round = TimingPlan((1,), plan.warmup, -(-plan.iters // rounds), plan.min_seconds / rounds)
    results: dict[str, list[BenchResult]] = {name: [] for name in runners}
    for batch in plan.batch_sizes:
        trials: dict[str, list[BenchResult]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, runner in runners.items():
                trials[name] += time_runner(runner, dataclasses.replace(per_round, batch_sizes=(batch,)), name, clock)
        for name, rows in trials.items():
            results[name].append(sorted(rows, key=lambda r: r.latency_ms.median)[len(rows) // 2])
    return results


def _time_cpu(runner: Callable, x: Any, iters: int, min_seconds: float, clock: Callable) -> list[float]:
    timings: list[float] = []
    total = 0.0
    while len(timings) < iters or total < min_seconds:
        start = clock()
        runner(x)
        elapsed = clock() - start
        timings.append(elapsed * 1000.0)
        total += elapsed
    return timings


def _time_cuda(runner: Callable, x: Any, iters: int, min_seconds: float) -> list[float]:
    import torch

    torch.cuda.synchronize()
    timings: list[float] = []
    total_ms = 0.0
    while len(timings) < iters or total_ms < min_seconds * 1000.0:
        pairs = []
        for _ in range(iters):  # enqueue a round without syncing, so the GPU never idles on the host
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner(x)
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        round_ms = [s.elapsed_time(e) for s, e in pairs]
        timings.extend(round_ms)
        total_ms += sum(round_ms)
    return timings


def reparam_speedup(results: Sequence[BenchResult]) -> dict[str, float]:
    """``{"bs<B>": train-form median / deployed median}`` for each batch measured in both forms."""
    medians = {(r.variant, r.batch_size): r.latency_ms.median for r in results if r.backend == "torch"}
    return {
        f"bs{b}": round(medians[("train-form", b)] / medians[("deployed", b)], 3)
        for (variant, b) in medians
        if variant == "train-form" and ("deployed", b) in medians
    }


# --- environment ---------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpuinfo_field(*keys: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    return _cpuinfo_field("model name", "hardware") or platform.processor() or platform.machine() or "unknown"


_SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
                "avx_vnni", "fma", "f16c")


def cpu_flags() -> list[str]:
    """The CPU features that decide INT8/bf16 kernel speed (VNNI, AVX-512, AMX), from /proc/cpuinfo."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in _SPEED_FLAGS if f in flags]


def environment_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU (model, speed-relevant flags), threads, GPU, versions."""
    import torch

    import repquant

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "versions": {
            "repquant": repquant.__version__,
            "torch": torch.__version__,
            "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"),
            "numpy": np.__version__,
            "tensorrt": _version("tensorrt"),
            "openvino": _version("openvino"),
        },
    }
