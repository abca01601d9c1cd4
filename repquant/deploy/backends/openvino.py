"""The OpenVINO backend (CPU plugin, optional extra ``repquant[openvino]``): FP32 exports and repquant's Q/DQ
files, with the same call signature as the other runners.

OpenVINO runs a float model in bf16 by default on CPUs that have it (AVX-512 BF16, AMX); here the inference
precision is always set explicitly and recorded in the runner's ``precision``: ``fp32`` asks for f32,
``bf16`` for bf16, and an ``int8`` (Q/DQ) file runs its float parts in f32. The performance hint is
``latency`` (one inference request per call) or ``throughput`` (the batch split over the plugin's optimal
number of parallel requests, so one call keeps every stream busy). A model is compiled once per batch size
(static shapes are what the CPU plugin optimises best), on the first call with that batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from repquant.deploy.backends import images_as_numpy, seeded_images
from repquant.deploy.onnx_export import onnx_has_qdq, read_onnx_metadata
from repquant.deploy.onnx_file import load_onnx_graph
from repquant.errors import CheckpointError, MissingDependencyError, ModelError, RepquantError

HINTS = ("latency", "throughput")
_INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise MissingDependencyError("openvino", "openvino", "OpenVINO inference") from err
    return openvino


def _static_dims(path: Path) -> tuple[tuple[int, int] | None, int | None, int | None]:
    """(img_size, batch_size, num_classes) of a repquant export from its metadata, else from static shapes."""
    try:
        meta = read_onnx_metadata(path)
        return meta["img_size"], meta["batch_size"], meta["num_classes"]
    except CheckpointError:
        graph = load_onnx_graph(path).graph

        def dims(value: Any) -> list[int | None]:
            return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

        shape, last = dims(graph.input[0]), dims(graph.output[-1])
        size = (shape[2], shape[3]) if len(shape) == 4 and shape[2] and shape[3] else None
        return size, (shape[0] or None) if shape else None, last[-1] if last else None


class OpenVinoRunner:
    """An ONNX detector compiled by OpenVINO for the CPU (see the module docstring)."""

    backend, device = "openvino", "cpu"

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", hint: str = "latency",
                 threads: int | None = None) -> None:
        ov = import_openvino()
        self.path = Path(path)
        load_onnx_graph(self.path)  # the door: parses, has a graph, external data inside its folder
        if hint not in HINTS:
            raise RepquantError(f"OpenVINO hint {hint!r}: expected one of {', '.join(HINTS)}")
        quantized = onnx_has_qdq(self.path)
        if (precision == "int8") != quantized:
            raise RepquantError(f"{self.path}: {'has' if quantized else 'has no'} Q/DQ nodes, which does not match "
                                f"precision {precision}")
        if precision not in _INFERENCE_PRECISION:
            raise RepquantError(f"OpenVINO on the CPU runs fp32, bf16 or int8 (Q/DQ files), not {precision}")
        self.precision, self.hint, self.threads = precision, hint, threads
        self.img_size, self.batch_size, self.num_classes = _static_dims(self.path)
        self.inference_precision = _INFERENCE_PRECISION[precision]
        self._ov = ov
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(os.fspath(self.path))
        except RuntimeError as err:
            raise CheckpointError(f"{self.path}: OpenVINO cannot read the model "
                                  f"({' '.join(str(err).split())[:160]})") from None
        self._compiled: dict[int, Any] = {}

    @property
    def config(self) -> dict[str, str]:
        """The plugin settings this runner compiles with (recorded next to its timings)."""
        config = {"PERFORMANCE_HINT": self.hint.upper(), "INFERENCE_PRECISION_HINT": self.inference_precision}
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
        return config

    def _compile(self, batch: int) -> Any:
        if batch not in self._compiled:
            assert self.img_size is not None
            model = self._model.clone()
            model.reshape({model.input(0): self._ov.PartialShape([batch, 3, *self.img_size])})
            self._compiled[batch] = self._core.compile_model(model, "CPU", self.config)
        return self._compiled[batch]

    def _chunks(self, batch: int) -> int:
        """Parallel requests for one call: the plugin's optimum under the throughput hint (a divisor of the
        batch, so every request has the same static shape), one under the latency hint."""
        if self.hint == "latency" or batch == 1:
            return 1
        optimal = int(self._compile(batch).get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        return max(n for n in range(1, min(optimal, batch) + 1) if batch % n == 0)

    def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        array = images_as_numpy(images, self.path)
        if self.img_size is None:
            self.img_size = (int(array.shape[2]), int(array.shape[3]))
        if tuple(array.shape[2:]) != tuple(self.img_size):
            raise ModelError(f"{self.path}: compiled for {self.img_size[0]}x{self.img_size[1]} images, got "
                             f"{array.shape[2]}x{array.shape[3]}")
        chunks = self._chunks(array.shape[0])
        if chunks == 1:
            outputs = self._requests(array.shape[0], 1)[0].infer({0: array})
            return np.asarray(outputs[0]), np.asarray(outputs[1])
        return self._parallel(array, chunks)

    def _parallel(self, array: np.ndarray, chunks: int) -> tuple[np.ndarray, np.ndarray]:
        # Plain asynchronous requests, waited one by one: no Python callback runs on OpenVINO's threads (a
        # callback needs the GIL, which a waiting caller may hold: that deadlocked AsyncInferQueue here).
        size = array.shape[0] // chunks
        requests = self._requests(size, chunks)
        for index, request in enumerate(requests):
            request.start_async({0: array[index * size:(index + 1) * size]})
        for request in requests:
            request.wait()
        outputs = [(np.array(r.get_output_tensor(0).data), np.array(r.get_output_tensor(1).data)) for r in requests]
        return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])

    def _requests(self, batch: int, count: int) -> list[Any]:
        compiled = self._compile(batch)
        pool = getattr(compiled, "_repquant_pool", [])
        while len(pool) < count:
            pool.append(compiled.create_infer_request())
        compiled._repquant_pool = pool
        return pool[:count]

    def make_input(self, batch: int) -> np.ndarray:
        return seeded_images(batch, self.img_size, self.path)


class OpenVinoBackend:
    """``open(onnx_path, options)`` -> :class:`OpenVinoRunner` (``options.hint``: latency or throughput)."""

    name = "openvino"
    source = "onnx"

    def open(self, source: Any, options: Any) -> OpenVinoRunner:
        return OpenVinoRunner(source, options.precision, options.hint, options.threads)


BACKEND = OpenVinoBackend()
