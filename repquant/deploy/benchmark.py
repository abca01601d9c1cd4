"""Latency and throughput of the network forward pass, for torch, ONNX Runtime and TensorRT.

Methodology (also written into every report): only the network forward pass including box
decoding is timed (``images (B, 3, H, W) -> boxes, scores``), on one input prepared before timing
and already on the device; pre-processing (decode, letterbox) and NMS are excluded. Each batch size
gets ``warmup`` untimed calls, then at least ``iters`` timed calls, continuing until
``min_seconds`` of timed work have passed. CPU calls are timed with ``time.perf_counter`` (the
backends return finished results); GPU calls with CUDA events recorded around each call on the
current stream. Throughput is ``batch_size / median latency`` in images per second.

The report format (``BenchReport``, ``SCHEMA_VERSION``, :func:`validate_report`) lives in
``repquant.deploy.report`` and is re-exported here; every field is documented in
``benchmarks/README.md``.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repquant.deploy.report import (
    BACKENDS,
    PRECISIONS,
    SCHEMA_VERSION,
    BenchReport,
    BenchResult,
    LatencyStats,
    read_report,
    validate_report,
)
from repquant.errors import RepquantError
from repquant.io import atomic_write_text

__all__ = [
    "METHODOLOGY",
    "SCHEMA_VERSION",
    "BenchReport",
    "BenchResult",
    "LatencyStats",
    "bench_command",
    "benchmark",
    "compare_reparam",
    "environment_info",
    "latency_stats",
    "ort_runner",
    "read_report",
    "reparam_speedup",
    "tensorrt_runner",
    "torch_runner",
    "validate_report",
]

METHODOLOGY = (
    "network forward pass incl. box decoding on a pre-allocated input already on the device; "
    "pre-processing and NMS excluded; {warmup} warm-up calls then >= {iters} timed calls per batch size; "
    "latency percentiles by linear interpolation, std is the population std; "
    "throughput = batch_size / median latency"
)


def latency_stats(timings_ms: Sequence[float]) -> LatencyStats:
    """Median, p90, p99 (linear interpolation between order statistics, numpy's default),
    mean, population std, min and max of ``timings_ms``."""
    values = np.asarray(timings_ms, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise RepquantError(f"latency_stats: need a non-empty 1-D list of timings, got shape {values.shape}")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return LatencyStats(
        median=float(p50),
        p90=float(p90),
        p99=float(p99),
        mean=float(values.mean()),
        std=float(values.std()),
        min=float(values.min()),
        max=float(values.max()),
    )


def benchmark(
    runner: Callable[[Any], Any],
    make_input: Callable[[int], Any],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 10,
    iters: int = 50,
    min_seconds: float = 0.0,
    device: str = "cpu",
    use_cuda_events: bool | None = None,
    backend: str = "torch",
    variant: str = "deployed",
    precision: str = "fp32",
    threads: int | None = None,
    cuda_graphs: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> list[BenchResult]:
    """Time ``runner(make_input(batch))`` for each batch size; returns one result per batch size.

    ``make_input(batch)`` returns the input of shape ``(batch, 3, H, W)`` (called once per batch,
    outside the timing). ``use_cuda_events`` defaults to ``device == "cuda"``; ``clock`` (seconds)
    exists so that tests can inject exact timings on the CPU path.
    """
    if iters < 1 or warmup < 0:
        raise RepquantError(f"benchmark: need iters >= 1 and warmup >= 0, got iters={iters} warmup={warmup}")
    events = device == "cuda" if use_cuda_events is None else use_cuda_events
    results = []
    for batch in batch_sizes:
        x = make_input(int(batch))
        for _ in range(warmup):
            runner(x)
        timings = (
            _time_cuda(runner, x, iters, min_seconds)
            if events
            else _time_cpu(runner, x, iters, min_seconds, clock)
        )
        stats = latency_stats(timings)
        results.append(
            BenchResult(
                backend=backend,
                variant=variant,
                precision=precision,
                device=device,
                batch_size=int(batch),
                img_size=(int(x.shape[2]), int(x.shape[3])),
                iterations=len(timings),
                warmup=warmup,
                timer="cuda_events" if events else "perf_counter",
                latency_ms=stats,
                throughput_img_s=int(batch) * 1000.0 / stats.median,
                threads=threads,
                cuda_graphs=cuda_graphs,
            )
        )
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


# --- environment ---------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU, threads, GPU and the versions that matter."""
    import torch

    import repquant

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
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
        },
    }


# --- runners ------------------------------------------------------------------------------------
# Each returns (runner, make_input): runner(x) runs the network; make_input(batch) builds the input
# once, on the runner's device and in its dtype, so that timing never includes a host copy.

Runner = Callable[[Any], Any]
InputFactory = Callable[[int], Any]


def torch_runner(
    model: Any, img_size: tuple[int, int], device: str = "cpu", fp16: bool = False, cuda_graphs: bool = False
) -> tuple[Runner, InputFactory]:
    """``DecodedDetector(model)`` in eval mode under ``torch.inference_mode``; the model is used as
    given (train-form or deployed). ``fp16`` and ``cuda_graphs`` need ``device == "cuda"``."""
    import torch

    from repquant.models.head import DecodedDetector

    if (fp16 or cuda_graphs) and device != "cuda":
        raise RepquantError(f"torch runner: fp16 and CUDA graphs need device 'cuda', got {device!r}")
    dtype = torch.float16 if fp16 else torch.float32
    net = DecodedDetector(model, img_size).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(0)

    def make_input(batch: int) -> Any:
        return torch.rand(batch, 3, *img_size, generator=generator).to(device=device, dtype=dtype)

    def run(x: Any) -> Any:
        with torch.inference_mode():
            return net(x)

    return (_CudaGraphRunner(net) if cuda_graphs else run), make_input


class _CudaGraphRunner:
    """Replays one captured CUDA graph per input shape: removes per-kernel launch overhead, which
    dominates small-batch latency of a network this size. The first call with a new shape captures."""

    def __init__(self, net: Any) -> None:
        self.net = net
        self.graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}

    def __call__(self, x: Any) -> Any:
        import torch

        key = tuple(x.shape)
        if key not in self.graphs:
            static_in = x.clone()
            side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graphs recommends
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(3):
                    self.net(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_out = self.net(static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        if x.data_ptr() != static_in.data_ptr():
            static_in.copy_(x)
        graph.replay()
        return static_out


def ort_runner(path: str | os.PathLike, threads: int | None = None) -> tuple[Runner, InputFactory, Any]:
    """An ``OrtDetector`` on the CPU provider with ``threads`` intra-op threads (``None``: ORT default).
    Returns ``(runner, make_input, detector)``; the detector knows ``img_size`` and ``batch_size``."""
    from repquant.deploy.ort import OrtDetector

    detector = OrtDetector(path, intra_op_threads=threads)
    if detector.img_size is None:
        raise RepquantError(f"{path}: the ONNX input has no static image size; cannot benchmark it")
    rng = np.random.default_rng(0)

    def make_input(batch: int) -> np.ndarray:
        return rng.random((batch, 3, *detector.img_size), dtype=np.float32)

    return detector, make_input, detector


def tensorrt_runner(engine_path: str | os.PathLike) -> tuple[Runner, InputFactory, Any]:
    """A ``TrtRunner`` and CUDA inputs in the engine input's dtype -> ``(runner, make_input, runner)``."""
    import torch

    from repquant.deploy.tensorrt import TrtRunner

    runner = TrtRunner(engine_path)
    _, _, h, w = runner.input_shape

    def make_input(batch: int) -> Any:
        return torch.rand(batch, 3, h, w, device="cuda").to(runner.input_dtype)

    return runner, make_input, runner


# --- commands -----------------------------------------------------------------------------------


def compare_reparam(
    model: Any,
    img_size: tuple[int, int],
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 3,
    iters: int = 10,
    device: str = "cpu",
    threads: int | None = None,
) -> list[BenchResult]:
    """Torch latency of the train-form ``model`` and of its re-parameterized copy (variants
    ``train-form`` and ``deployed``), interleaved per batch size so that drift hits both alike."""
    import copy

    from repquant.reparam import is_deployed, reparameterize

    if is_deployed(model):
        raise RepquantError(f"{type(model).__name__}: model is already deployed; pass the train-form model")
    deployed = reparameterize(copy.deepcopy(model).eval())
    results = []
    for batch in batch_sizes:
        for variant, net in (("train-form", model.eval()), ("deployed", deployed)):
            run, make_input = torch_runner(net, img_size, device=device)
            results += benchmark(
                run,
                make_input,
                (batch,),
                warmup,
                iters,
                device=device,
                backend="torch",
                variant=variant,
                threads=threads,
            )
    return results


def reparam_speedup(results: Sequence[BenchResult]) -> dict[str, float]:
    """``{"bs<B>": train-form median / deployed median}`` for each batch measured in both forms."""
    medians = {(r.variant, r.batch_size): r.latency_ms.median for r in results if r.backend == "torch"}
    return {
        f"bs{b}": round(medians[("train-form", b)] / medians[("deployed", b)], 3)
        for (variant, b) in medians
        if variant == "train-form" and ("deployed", b) in medians
    }


def bench_command(
    model: str,
    backend: str = "ort",
    precision: str = "fp32",
    batch_sizes: Sequence[int] = (1, 32),
    img_size: int | tuple[int, int] = 640,
    warmup: int = 10,
    iters: int = 50,
    threads: int | None = None,
    output_json: str | os.PathLike | None = None,
    output_md: str | os.PathLike | None = None,
    min_seconds: float = 0.0,
    cuda_graphs: bool = False,
    compare_train_form: bool = False,
) -> BenchReport:
    """``repquant bench``: measure ``model`` on one backend and write the JSON/Markdown reports.

    ``model`` is a registry name or checkpoint (torch; ort/tensorrt export it to a temporary ONNX),
    an ONNX file (ort; tensorrt builds an engine from it) or an engine file (``.engine``/``.plan``,
    tensorrt). ``int8`` needs a Q/DQ ONNX file (or an engine built from one); torch runs fp32 and,
    on CUDA, fp16. ``img_size`` is ignored for ONNX/engine files, which fix their own size.
    """
    import tempfile

    import torch

    from repquant.deploy.onnx_export import normalize_img_size

    if backend not in BACKENDS or precision not in PRECISIONS:
        raise RepquantError(
            f"bench: backend must be one of {BACKENDS}, precision one of {PRECISIONS}; "
            f"got {backend!r}, {precision!r}"
        )
    hw = normalize_img_size(img_size)
    device = "cuda" if backend == "tensorrt" or (backend == "torch" and torch.cuda.is_available()) else "cpu"
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    notes: dict[str, Any] = {}
    common = dict(
        batch_sizes=batch_sizes,
        warmup=warmup,
        iters=iters,
        min_seconds=min_seconds,
        device=device,
        backend=backend,
        precision=precision,
        threads=threads,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="repquant-bench-") as tmp:
            if backend == "torch":
                results = _bench_torch(model, precision, hw, device, cuda_graphs, compare_train_form, common)
                if compare_train_form:
                    notes["reparam_speedup"] = reparam_speedup(results)
            else:
                runner, make_input, handle = _onnx_backend(
                    model, backend, precision, hw, batch_sizes, threads, Path(tmp)
                )
                hw = handle.img_size if backend == "ort" else tuple(handle.input_shape[2:])
                # A given file is named by its file name; a model exported on the fly is "deployed".
                is_file = model.endswith((".onnx", ".engine", ".plan"))
                variant = Path(model).name if is_file else "deployed"
                results = benchmark(runner, make_input, variant=variant, **common)
        environment = environment_info()  # while the requested thread count is still set
    finally:
        torch.set_num_threads(old_threads)
    report = BenchReport(
        model=model,
        img_size=hw,
        methodology=METHODOLOGY.format(warmup=warmup, iters=iters),
        environment=environment,
        results=results,
        notes=notes,
    )
    if output_json is not None:
        report.write_json(output_json)
    if output_md is not None:
        atomic_write_text(output_md, report.to_markdown())
    return report


def _bench_torch(
    spec: str,
    precision: str,
    hw: tuple[int, int],
    device: str,
    cuda_graphs: bool,
    compare: bool,
    common: dict[str, Any],
) -> list[BenchResult]:
    import copy

    from repquant.checkpoint import resolve_model
    from repquant.reparam import is_deployed, reparameterize

    if precision == "int8":
        raise RepquantError(
            "bench: the torch backend runs fp32 (and fp16 on CUDA); for int8 use --backend ort "
            "with a Q/DQ ONNX file or --backend tensorrt"
        )
    if precision == "fp16" and device != "cuda":
        raise RepquantError("bench: torch fp16 needs a CUDA GPU; none is visible")
    model = resolve_model(spec).eval()
    results: list[BenchResult] = []
    if compare:
        results += compare_reparam(
            model,
            hw,
            common["batch_sizes"],
            common["warmup"],
            common["iters"],
            device=device,
            threads=common["threads"],
        )
    deployed = model if is_deployed(model) else reparameterize(copy.deepcopy(model))
    if not compare:
        fp16 = precision == "fp16"
        run, make_input = torch_runner(deployed, hw, device, fp16=fp16, cuda_graphs=cuda_graphs)
        results += benchmark(run, make_input, variant="deployed", cuda_graphs=cuda_graphs, **common)
    return results


def _onnx_backend(
    spec: str,
    backend: str,
    precision: str,
    hw: tuple[int, int],
    batch_sizes: Sequence[int],
    threads: int | None,
    tmp: Path,
) -> tuple[Runner, InputFactory, Any]:
    from repquant.deploy.tensorrt import build_engine, import_tensorrt, onnx_has_qdq

    if backend == "tensorrt":
        import_tensorrt("TensorRT benchmarks")  # fail before any export work
        if spec.endswith((".engine", ".plan")):
            return tensorrt_runner(spec)
    elif precision == "fp16":
        raise RepquantError(
            "bench: ONNX Runtime runs here on the CPU without fast fp16 kernels; "
            "use --backend tensorrt for fp16"
        )
    if spec.endswith(".onnx"):
        onnx_path = Path(spec)
        quantized = onnx_has_qdq(onnx_path)
        if backend == "ort" and quantized != (precision == "int8"):
            raise RepquantError(
                f"{onnx_path}: {'has' if quantized else 'has no'} Q/DQ nodes, "
                f"which does not match --precision {precision}"
            )
    else:
        if precision == "int8":
            raise RepquantError(f"{spec}: int8 needs a quantized (Q/DQ) ONNX file; quantize and export first")
        from repquant.checkpoint import resolve_model
        from repquant.deploy.onnx_export import export_onnx

        onnx_path = export_onnx(
            resolve_model(spec), tmp / "model.onnx", hw, batch_size=max(batch_sizes), dynamic_batch=True
        )
    if backend == "ort":
        return ort_runner(onnx_path, threads)
    engine = build_engine(onnx_path, tmp / "model.engine", precision=precision, batch_sizes=batch_sizes)
    return tensorrt_runner(engine.engine_path)
