"""The TensorRT backend: a serialized engine run on CUDA tensors (``repquant.deploy.tensorrt.TrtRunner``);
an ONNX source is first built into an engine next to a temporary copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repquant.deploy.tensorrt import build_engine, import_tensorrt
from repquant.deploy.tensorrt_runner import TrtRunner
from repquant.modelfile import ENGINE_SUFFIXES


class TensorRTRunner:
    """:class:`TrtRunner` with the runner interface (CUDA inputs in the engine's input dtype)."""

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: Path, precision: str, threads: int | None = None) -> None:
        self.trt = TrtRunner(engine_path)
        self.precision, self.threads = precision, threads
        _, _, h, w = self.trt.input_shape
        self.img_size: tuple[int, int] | None = (int(h), int(w))
        batch = int(self.trt.input_shape[0])
        self.batch_size: int | None = batch if batch >= 0 else None

    def make_input(self, batch: int) -> Any:
        import torch

        assert self.img_size is not None
        return torch.rand(batch, 3, *self.img_size, device="cuda").to(self.trt.input_dtype)

    def __call__(self, images: Any) -> tuple[Any, Any]:
        boxes, scores = self.trt(images)[:2]
        return boxes, scores


class TensorRTBackend:
    """``open(engine or onnx path, options)``: an engine file runs as is; an ONNX file is built first with
    the requested precision (INT8 from its Q/DQ nodes) and one static profile per ``options.batch_sizes``."""

    name = "tensorrt"
    source = "engine"

    def open(self, source: Any, options: Any, batch_sizes: tuple[int, ...] = (1,)) -> TensorRTRunner:
        import_tensorrt("TensorRT inference")  # fail before any build work
        path = Path(source)
        if path.suffix not in ENGINE_SUFFIXES:
            engine = path.with_suffix(".engine")
            path = Path(build_engine(path, engine, precision=options.precision, batch_sizes=batch_sizes).engine_path)
        return TensorRTRunner(path, options.precision, options.threads)


BACKEND = TensorRTBackend()
