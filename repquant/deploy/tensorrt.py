"""TensorRT engines from repquant ONNX files (the runner: ``repquant.deploy.tensorrt_runner``).

With the runner, the only modules that import ``tensorrt`` (inside functions, so importing them is cheap and
works without TensorRT). Buffers, streams and events come from torch: no pycuda.

Precision follows explicit quantization: INT8 comes from the Q/DQ nodes of the ONNX file (written
by ``repquant.quant.qdq_export``), never from an implicit calibrator (deprecated in TensorRT 10.1,
removed in 11).

- TensorRT 10: the network is weakly typed and the builder flags choose the kernels: ``fp16`` sets
  ``BuilderFlag.FP16``; ``int8`` sets ``INT8`` (the Q/DQ layers run in INT8) and ``FP16`` (layers
  left outside Q/DQ may run in FP16, as YOLOv6's TensorRT deployment does); ``fp32`` sets none and
  clears ``TF32``.
- TensorRT 11: networks are always strongly typed and the ``INT8``/``FP16`` flags are gone, so the
  precision is what the ONNX file says: an FP16 engine needs an ONNX file with FP16 weights, and
  layers outside Q/DQ run in the ONNX's float type.

Next to the engine, ``<engine>.json`` records how it was built (:class:`EngineInfo`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repquant.deploy.onnx_export import onnx_has_qdq
from repquant.errors import CheckpointError, MissingDependencyError, ModelError, RepquantError
from repquant.io import atomic_open, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:  # typed against the published ``tensorrt-stubs`` (TensorRT 10 API) in CI
    import tensorrt as trt

ENGINE_METADATA_VERSION = 1

TRT_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class EngineInfo:
    """What :func:`build_engine` wrote; also stored as JSON in ``metadata_path``."""

    engine_path: str
    metadata_path: str
    precision: str
    batch_sizes: tuple[int, ...]
    input_name: str
    input_shape: tuple[int, ...]  # as in the ONNX file; -1 for the dynamic batch axis
    strongly_typed: bool
    tensorrt_version: str
    gpu_name: str
    onnx_path: str
    onnx_sha256: str
    engine_bytes: int
    build_seconds: float
    format_version: int = ENGINE_METADATA_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["batch_sizes"] = list(self.batch_sizes)
        data["input_shape"] = list(self.input_shape)
        return data


def tensorrt_available() -> bool:
    """Whether the TensorRT runtime imports. The stub-only ``tensorrt-stubs`` package (installed for the type
    check) makes ``tensorrt`` an empty namespace package: that is not TensorRT."""
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


def import_tensorrt(purpose: str = "building TensorRT engines") -> str:
    """Check that TensorRT imports (else :class:`MissingDependencyError` with the install hint); its version.

    Callers then ``import tensorrt as trt`` themselves, so the type checker sees the real module.
    """
    if not tensorrt_available():
        raise MissingDependencyError("tensorrt", "tensorrt", purpose)
    import tensorrt

    return str(tensorrt.__version__)


def require_cuda(what: str) -> Any:
    """torch with a visible CUDA device, or a one-line :class:`RepquantError`."""
    import torch

    if not torch.cuda.is_available():
        raise RepquantError(f"{what} needs a CUDA GPU, but torch sees none (CUDA_VISIBLE_DEVICES, driver?)")
    return torch


def onnx_has_fp16_weights(onnx_path: str | os.PathLike) -> bool:
    """Whether any initializer of the ONNX graph is float16 (needed for FP16 under strong typing)."""
    import onnx

    from repquant.deploy.onnx_file import load_onnx_graph

    proto = load_onnx_graph(onnx_path)
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_request(onnx_path: Path, precision: str, batch_sizes: Sequence[int]) -> tuple[int, ...]:
    if not onnx_path.is_file():
        raise CheckpointError(f"{onnx_path}: no such ONNX file")
    if precision not in TRT_PRECISIONS:
        raise RepquantError(f"precision {precision!r}: TensorRT engines here are {', '.join(TRT_PRECISIONS)}")
    batches = tuple(sorted({int(b) for b in batch_sizes}))
    if not batches or batches[0] < 1:
        raise RepquantError(f"{onnx_path}: batch sizes must be >= 1, got {list(batch_sizes)}")
    quantized = onnx_has_qdq(onnx_path)
    if precision == "int8" and not quantized:
        raise RepquantError(
            f"{onnx_path}: an INT8 engine needs an ONNX file with Q/DQ nodes "
            "(quantize and export it first); implicit INT8 calibration is not supported"
        )
    if precision != "int8" and quantized:
        raise RepquantError(f"{onnx_path}: the ONNX file has Q/DQ nodes; build it with precision 'int8'")
    return batches


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    precision: str = "int8",
    batch_sizes: Sequence[int] = (1,),
    workspace_mb: int = 4096,
    timing_cache: str | os.PathLike | None = None,
) -> EngineInfo:
    """Build a serialized TensorRT engine from ``onnx_path`` and write it atomically to ``engine_path``.

    Args:
        precision: ``fp32``, ``fp16`` or ``int8`` (int8 needs Q/DQ nodes in the ONNX file).
        batch_sizes: for a dynamic-batch ONNX, one optimization profile per batch size
            (min = opt = max, so every batch gets its own tuned kernels; profile ``i`` serves
            ``sorted(batch_sizes)[i]``). A static-batch ONNX accepts only its own batch.
        workspace_mb: limit of the builder's scratch GPU memory pool.
        timing_cache: file read before the build (when it exists) and rewritten after it, which
            makes rebuilds on the same GPU and TensorRT version much faster.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    batches = _check_request(onnx_path, precision, batch_sizes)
    _check_trt10(onnx_path, precision)
    import tensorrt as trt

    torch = require_cuda("building a TensorRT engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser = _parse_network(builder, logger, onnx_path)
    tensor = network.get_input(0)
    input_name, input_shape = tensor.name, shape_of(tensor.shape)
    config = _builder_config(builder, precision, workspace_mb)
    _add_profiles(builder, config, onnx_path, input_name, input_shape, batches)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - start
    if serialized is None:
        raise ModelError(f"{onnx_path}: TensorRT failed to build a {precision} engine (see its log above)")
    with atomic_open(engine_path, "wb") as f:
        f.write(memoryview(serialized))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    info = EngineInfo(
        engine_path=str(engine_path), metadata_path=str(engine_metadata_path(engine_path)), precision=precision,
        batch_sizes=batches, input_name=input_name, input_shape=input_shape,
        strongly_typed=not hasattr(trt.BuilderFlag, "INT8"), tensorrt_version=trt.__version__,
        gpu_name=torch.cuda.get_device_name(torch.cuda.current_device()), onnx_path=str(onnx_path),
        onnx_sha256=sha256_file(onnx_path), engine_bytes=int(serialized.nbytes), build_seconds=round(build_seconds, 3),
    )
    atomic_write_text(info.metadata_path, json.dumps(info.to_dict(), indent=2) + "\n")
    return info


def _check_trt10(onnx_path: Path, precision: str) -> None:
    """TensorRT >= 10; under 11 (strongly typed, no precision flags) an FP16 build needs FP16 weights."""
    version = import_tensorrt()
    if int(version.split(".")[0]) < 10:
        raise MissingDependencyError("tensorrt>=10", "tensorrt", f"building engines (found {version})")
    import tensorrt as trt

    strongly_typed = not hasattr(trt.BuilderFlag, "INT8")  # removed in TensorRT 11
    if strongly_typed and precision == "fp16" and not onnx_has_fp16_weights(onnx_path):
        raise RepquantError(
            f"{onnx_path}: TensorRT {version} builds strongly typed networks, so an FP16 engine "
            "needs an ONNX file with FP16 weights"
        )


def _parse_network(
    builder: trt.Builder, logger: trt.ILogger, onnx_path: Path
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """The parsed network (and its parser, which must outlive it) of a one-input ONNX file."""
    import tensorrt as trt

    # TRT 11 ignores the flags (always strongly typed); TRT 10 runs weakly typed so that precision flags apply.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"{onnx_path}: TensorRT cannot parse the ONNX file ({errors[:300]})")
    if network.num_inputs != 1:
        raise ModelError(f"{onnx_path}: expected one input tensor, found {network.num_inputs}")
    return network, parser


def _builder_config(builder: trt.Builder, precision: str, workspace_mb: int) -> trt.IBuilderConfig:
    """Workspace limit and, under TensorRT 10, the precision flags (FP16 also for INT8 engines: layers left
    outside Q/DQ may run in FP16, as YOLOv6's TensorRT deployment does)."""
    import tensorrt as trt

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    has_precision_flags = hasattr(trt.BuilderFlag, "INT8")
    if has_precision_flags and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if has_precision_flags and precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default and rounds matmul/conv inputs to 10 mantissa bits: not FP32.
        config.clear_flag(trt.BuilderFlag.TF32)
    return config


def _add_profiles(
    builder: trt.Builder, config: trt.IBuilderConfig, onnx_path: Path, name: str, shape: tuple[int, ...],
    batches: tuple[int, ...],
) -> None:
    if len(shape) != 4 or any(d < 0 for d in shape[1:]):
        raise ModelError(f"{onnx_path}: input {name} must be (B, 3, H, W) with static H and W, got {shape}")
    if shape[0] >= 0:  # static batch: no profile needed, but it fixes the only batch size
        if batches != (shape[0],):
            raise ModelError(
                f"{onnx_path}: exported with static batch {shape[0]}, cannot build batch sizes "
                f"{list(batches)}; export with a dynamic batch"
            )
        return
    import tensorrt as trt

    for batch in batches:
        profile = builder.create_optimization_profile()
        dims = trt.Dims([batch, *shape[1:]])
        profile.set_shape(name, dims, dims, dims)
        config.add_optimization_profile(profile)


def shape_of(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (-1 for a dynamic axis)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def engine_metadata_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_engine_metadata(engine_path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON written beside ``engine_path`` by :func:`build_engine`, or ``None`` if absent."""
    path = engine_metadata_path(engine_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable engine metadata ({err})") from None
