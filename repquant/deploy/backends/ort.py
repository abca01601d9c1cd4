"""The ONNX Runtime backend (CPU provider): exported detectors run with the same call signature as
``DecodedDetector``; a Q/DQ file runs as real INT8 where ORT fuses the pattern (``QLinearConv``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from repquant.deploy.backends import images_as_numpy, seeded_images
from repquant.deploy.onnx_export import decode_onnx_metadata, onnx_has_qdq
from repquant.deploy.onnx_file import load_onnx_graph
from repquant.errors import CheckpointError, ModelError, RepquantError

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtDetector:
    """An ONNX Runtime session over a file written by ``export_onnx``.

    ``detector(images)`` with ``images: (B, 3, H, W)`` float in [0, 1] (numpy array or torch
    tensor) returns the graph's two outputs as float32 numpy arrays: ``boxes (B, A, 4)`` xyxy input
    pixels and ``scores (B, A, num_classes)`` for a decoded export (``cls_logits``, ``reg_dist``
    for a raw one).

    Attributes read from the file's metadata (``None`` when the file was not exported by repquant
    and the graph's shapes are symbolic): ``img_size (h, w)``, ``num_classes``, ``batch_size``
    (``None`` for a dynamic batch), ``config`` (ModelConfig dict).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        graph_optimization: str = "all",
    ) -> None:
        self.path = Path(path)
        self.backend, self.device, self.threads = "ort", "cpu", intra_op_threads
        if graph_optimization not in _OPT_LEVELS:
            raise RepquantError(
                f"graph_optimization {graph_optimization!r}: expected one of {', '.join(_OPT_LEVELS)}"
            )
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise RepquantError(
                f"ONNX Runtime provider {missing[0]} is not available (available: {', '.join(available)})"
            )
        load_onnx_graph(self.path)  # the door: parses, has a graph, external data inside its folder
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPT_LEVELS[graph_optimization]
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(os.fspath(self.path), options, providers=list(providers))
        except Exception as err:  # InvalidProtobuf, Fail, NoSuchFile: pybind classes without a common base
            reason = " ".join(str(err).split())[:200]
            raise CheckpointError(f"{self.path}: ONNX Runtime cannot load the model ({reason})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if len(self.output_names) < 2:
            raise CheckpointError(f"{self.path}: expected a detector with two outputs (boxes, scores), found "
                                  f"{len(self.output_names)}")
        self.precision = "int8" if onnx_has_qdq(self.path) else "fp32"
        self._read_metadata()

    def _read_metadata(self) -> None:
        props = self.session.get_modelmeta().custom_metadata_map
        if "repquant_img_size" in props:
            meta = decode_onnx_metadata(props, self.path)
            self.img_size: tuple[int, int] | None = meta["img_size"]
            self.num_classes: int | None = meta["num_classes"]
            self.batch_size: int | None = meta["batch_size"]
            self.config: dict[str, Any] | None = meta["config"]
            return
        # A foreign ONNX file: fall back to the static shapes of the graph, if any.
        shape = self.session.get_inputs()[0].shape
        static = [d if isinstance(d, int) else None for d in shape]
        h, w = (static[2], static[3]) if len(static) == 4 else (None, None)
        self.img_size = (h, w) if h is not None and w is not None else None
        self.batch_size = static[0] if static else None
        last = self.session.get_outputs()[-1].shape
        self.num_classes = last[-1] if last and isinstance(last[-1], int) else None
        self.config = None

    def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Run the session on ``images (B, 3, H, W)``; returns the two outputs as numpy arrays."""
        array = images_as_numpy(images, self.path)
        if self.img_size is not None and tuple(array.shape[2:]) != tuple(self.img_size):
            raise ModelError(
                f"{self.path}: exported for {self.img_size[0]}x{self.img_size[1]} images, "
                f"got {array.shape[2]}x{array.shape[3]}"
            )
        if self.batch_size is not None and array.shape[0] != self.batch_size:
            raise ModelError(
                f"{self.path}: exported with static batch {self.batch_size}, got batch {array.shape[0]}"
            )
        first, second = self.session.run(self.output_names[:2], {self.input_name: array})
        return first, second

    def make_input(self, batch: int) -> np.ndarray:
        """A seeded timing input of ``batch`` images at the file's size."""
        return seeded_images(batch, self.img_size, self.path)

    def __repr__(self) -> str:
        return (
            f"OrtDetector({str(self.path)!r}, img_size={self.img_size}, num_classes={self.num_classes}, "
            f"providers={self.session.get_providers()})"
        )



class OrtBackend:
    """``open(onnx_path, options)`` -> :class:`OrtDetector` on the CPU provider."""

    name = "ort"
    source = "onnx"

    def open(self, source: Any, options: Any) -> OrtDetector:
        if options.precision == "bf16":
            raise RepquantError("ONNX Runtime's CPU provider has no bf16 path for these models; bf16 runs on the "
                                "openvino backend")
        if options.precision == "fp16":
            raise RepquantError("ONNX Runtime runs here on the CPU without fast fp16 kernels; use the tensorrt "
                                "backend for fp16")
        runner = OrtDetector(source, intra_op_threads=options.threads,
                             graph_optimization=options.graph_optimization)
        if runner.precision != options.precision:
            raise RepquantError(f"{source}: {'has' if runner.precision == 'int8' else 'has no'} Q/DQ nodes, which "
                                f"does not match precision {options.precision}")
        return runner


BACKEND = OrtBackend()
