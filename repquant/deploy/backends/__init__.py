"""Inference engines behind ``eval``, ``bench`` and the PTQ parity check, one module per engine.

A backend is a module ``repquant.deploy.backends.<name>`` exposing ``BACKEND``, an object with ``name`` and
``open(source, options) -> Runner``; its name is listed in ``repquant.vocab.BACKENDS``. Modules are
imported on first use, so onnxruntime, TensorRT or OpenVINO load only when their backend runs. Adding an
engine is one new module here plus its name in the vocabulary.

``source`` is what the engine consumes: a torch ``nn.Module`` for ``torch``, a file path (ONNX, engine)
for the others; ``repquant.deploy.resolve.open_runner`` turns any model spec into the right source
(exporting a checkpoint to ONNX when an ONNX engine is asked for).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

from repquant import vocab
from repquant.errors import ModelError, RepquantError


@dataclass(frozen=True)
class RunnerOptions:
    """How to open a runner: ``precision`` (fp32 | fp16 | int8; int8 needs a Q/DQ model), intra-op
    ``threads`` (None: the engine's default), ``img_size`` for sources that do not fix their own (torch),
    ``device`` (``auto``: CUDA when the backend needs or can use it), ``cuda_graphs`` (torch on CUDA),
    ONNX Runtime's ``graph_optimization`` level (``all`` | ``extended`` | ``basic`` | ``disable``) and
    OpenVINO's performance ``hint`` (``latency`` | ``throughput``)."""

    precision: str = "fp32"
    threads: int | None = None
    img_size: int | None = None
    device: str = "auto"
    cuda_graphs: bool = False
    graph_optimization: str = "all"
    hint: str = "latency"

    def __post_init__(self) -> None:
        if self.precision not in vocab.PRECISIONS:
            raise RepquantError(f"precision {self.precision!r}: expected one of {', '.join(vocab.PRECISIONS)}")


class Runner(Protocol):
    """An opened model. ``runner(images (B, 3, H, W) float in [0, 1])`` returns ``(boxes (B, A, 4) xyxy input
    pixels, scores (B, A, nc))`` as numpy arrays or tensors of the engine's device; ``make_input(batch)``
    builds a timing input once, on that device and in that dtype. ``img_size`` (h, w) and ``batch_size``
    are fixed by the model file (None when free)."""

    backend: str
    precision: str
    device: str
    threads: int | None
    img_size: tuple[int, int] | None
    batch_size: int | None

    def __call__(self, images: Any) -> tuple[Any, Any]: ...

    def make_input(self, batch: int) -> Any: ...


class Backend(Protocol):
    name: str
    #: what ``open`` consumes: "torch" (an nn.Module), "onnx" (an ONNX file) or "engine" (its own file)
    source: str

    def open(self, source: Any, options: RunnerOptions) -> Runner: ...


def images_as_numpy(images: Any, source: Any) -> Any:
    """``images`` (a torch tensor or array-like, ``(B, 3, H, W)``) as a contiguous float32 numpy array, for the
    ONNX engines; another shape is a ``ModelError`` naming ``source``."""
    import numpy as np

    if hasattr(images, "detach"):  # a torch tensor; avoids importing torch here
        images = images.detach().to("cpu").numpy()
    array = np.ascontiguousarray(images, dtype=np.float32)
    if array.ndim != 4 or array.shape[1] != 3:
        raise ModelError(f"{source}: expected images of shape (B, 3, H, W), got {tuple(array.shape)}")
    return array


def seeded_images(batch: int, img_size: tuple[int, int] | None, source: Any) -> Any:
    """A seeded timing input of ``batch`` images for an engine whose model fixes ``img_size``."""
    import numpy as np

    if img_size is None:
        raise RepquantError(f"{source}: the ONNX input has no static image size; cannot build an input")
    return np.random.default_rng(0).random((batch, 3, *img_size), dtype=np.float32)


def backend_names() -> tuple[str, ...]:
    """The registered backends (``repquant.vocab.BACKENDS``, read at call time)."""
    return vocab.BACKENDS


def get_backend(name: str) -> Backend:
    """The backend ``name`` (its module is imported now); an unknown name lists the valid ones."""
    if name not in vocab.BACKENDS:
        raise RepquantError(f"unknown backend {name!r}; valid backends: {', '.join(vocab.BACKENDS)}")
    module = importlib.import_module(f"repquant.deploy.backends.{name}")
    backend: Backend = module.BACKEND
    return backend
