"""Run a serialized TensorRT engine on torch CUDA tensors (the engine builder is ``repquant.deploy.tensorrt``).

Imports ``tensorrt`` only inside :class:`TrtRunner`, so importing this module works without TensorRT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from repquant.deploy.tensorrt import import_tensorrt, read_engine_metadata, require_cuda, shape_of
from repquant.errors import CheckpointError, ModelError

_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


class TrtRunner:
    """Run a serialized engine on torch CUDA tensors.

    ``runner(images)`` with ``images: (B, 3, H, W)`` on the GPU (dtype of the engine input, usually
    float32) returns the engine outputs as torch CUDA tensors, in engine order (``boxes (B, A, 4)``,
    ``scores (B, A, nc)`` for a decoded export). Output buffers are allocated once per batch size and
    reused: copy them if you keep results across calls. The launch is asynchronous on
    ``self.stream``; the call waits for nothing, so time it with CUDA events on that stream (or call
    ``torch.cuda.synchronize()``).
    """

    def __init__(self, engine_path: str | os.PathLike) -> None:
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such TensorRT engine file")
        import_tensorrt("running TensorRT engines")
        import tensorrt as trt

        torch = require_cuda("running a TensorRT engine")
        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise CheckpointError(
                f"{self.path}: TensorRT {trt.__version__} cannot load this engine "
                "(built by another TensorRT version or for another GPU?)"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.input_names) != 1:
            raise ModelError(f"{self.path}: expected one input tensor, found {len(self.input_names)}")
        self.input_name = self.input_names[0]
        self.input_shape = shape_of(self.engine.get_tensor_shape(self.input_name))
        self.input_dtype = getattr(torch, _TORCH_DTYPES[self.engine.get_tensor_dtype(self.input_name).name])
        self.stream = torch.cuda.Stream()
        # One context whose profile follows the batch: a profile may serve one context at a time.
        self.context = self.engine.create_execution_context()
        self._batch: int | None = None
        self._outputs: dict[int, dict[str, Any]] = {}
        self.metadata = read_engine_metadata(self.path)

    def batch_sizes(self) -> list[int]:
        """The batch sizes this engine serves (the static batch, or those of its optimization profiles)."""
        if self.input_shape[0] >= 0:
            return [int(self.input_shape[0])]
        sizes: list[int] = []
        for index in range(self.engine.num_optimization_profiles):
            low, _, high = self.engine.get_tensor_profile_shape(self.input_name, index)
            sizes.extend(range(int(low[0]), int(high[0]) + 1))
        return sorted(set(sizes))

    def _profile_for(self, batch: int) -> int:
        for index in range(self.engine.num_optimization_profiles):
            low, _, high = self.engine.get_tensor_profile_shape(self.input_name, index)
            if int(low[0]) <= batch <= int(high[0]):
                return index
        served = self.batch_sizes()
        raise ModelError(f"{self.path}: no optimization profile for batch {batch} (serves {served})")

    def _prepare(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """Select the profile and input shape for ``shape``'s batch; bind that batch's output buffers."""
        batch = shape[0]
        if batch == self._batch:
            return self._outputs[batch]
        if self.input_shape[0] >= 0:
            if batch != self.input_shape[0]:
                raise ModelError(f"{self.path}: engine has static batch {self.input_shape[0]}, got {batch}")
        else:
            self.context.set_optimization_profile_async(self._profile_for(batch), self.stream.cuda_stream)
        self.context.set_input_shape(self.input_name, shape)
        torch = self._torch
        if batch not in self._outputs:
            buffers = {}
            for name in self.output_names:
                dims = shape_of(self.context.get_tensor_shape(name))
                dtype = getattr(torch, _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name])
                buffers[name] = torch.empty(dims, dtype=dtype, device="cuda")
            self._outputs[batch] = buffers
        for name, buffer in self._outputs[batch].items():
            self.context.set_tensor_address(name, buffer.data_ptr())
        self._batch = batch
        return self._outputs[batch]

    def __call__(self, images: Any) -> tuple[Any, ...]:
        """Enqueue the engine on ``images (B, 3, H, W)`` (CUDA); returns the output tensors."""
        if not getattr(images, "is_cuda", False):
            raise ModelError(f"{self.path}: TensorRT inputs must be CUDA tensors")
        if tuple(images.shape[1:]) != tuple(self.input_shape[1:]):
            raise ModelError(
                f"{self.path}: engine input is {tuple(self.input_shape)}, got {tuple(images.shape)}"
            )
        images = images.contiguous()
        outputs = self._prepare(tuple(int(d) for d in images.shape))
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        # The input may come from torch's current stream: make the engine's stream wait for it.
        self.stream.wait_stream(self._torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ModelError(f"{self.path}: TensorRT execution failed for batch {images.shape[0]}")
        # Reverse direction: later torch work on the current stream sees finished outputs.
        self._torch.cuda.current_stream().wait_stream(self.stream)
        return tuple(outputs[name] for name in self.output_names)

    def __repr__(self) -> str:
        return f"TrtRunner({str(self.path)!r}, batch_sizes={self.batch_sizes()})"
