"""The torch backend: the deployed model wrapped with box decoding, eager (or a replayed CUDA graph)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from repquant.errors import RepquantError
from repquant.models.head import DecodedDetector


class TorchRunner:
    """``DecodedDetector(model)`` in eval mode under ``torch.inference_mode`` on ``device``, in fp32 or (CUDA)
    fp16; with ``cuda_graphs`` one captured graph per input shape is replayed."""

    backend = "torch"

    def __init__(self, model: nn.Module, img_size: int, device: str = "cpu", precision: str = "fp32",
                 cuda_graphs: bool = False, threads: int | None = None) -> None:
        if precision == "bf16":
            raise RepquantError("the torch backend runs fp32 (and fp16 on CUDA); bf16 on the CPU: the openvino "
                                "backend")
        if precision == "int8":
            raise RepquantError("the torch backend runs fp32 (and fp16 on CUDA); for int8 use the ort backend "
                                "with a Q/DQ ONNX file, or tensorrt")
        if (precision == "fp16" or cuda_graphs) and device != "cuda":
            raise RepquantError("torch fp16 and CUDA graphs need a CUDA GPU; none is visible")
        self.precision, self.device, self.threads = precision, device, threads
        self.img_size: tuple[int, int] | None = (img_size, img_size)
        self.batch_size: int | None = None
        config = getattr(model, "config", None)
        self.num_classes: int | None = getattr(config, "num_classes", None)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.net = DecodedDetector(model, self.img_size).to(device=device, dtype=self.dtype).eval()
        self._graphs = _CudaGraphRunner(self.net) if cuda_graphs else None
        self._generator = torch.Generator().manual_seed(0)

    def make_input(self, batch: int) -> torch.Tensor:
        assert self.img_size is not None
        return torch.rand(batch, 3, *self.img_size, generator=self._generator).to(self.device, self.dtype)

    def __call__(self, images: Any) -> tuple[Any, Any]:
        if self._graphs is not None:
            return self._graphs(images)
        x = torch.as_tensor(images).to(self.device, self.dtype)
        with torch.inference_mode():
            boxes, scores = self.net(x)
        return boxes, scores


class _CudaGraphRunner:
    """Replays one captured CUDA graph per input shape: removes per-kernel launch overhead, which
    dominates small-batch latency of a network this size. The first call with a new shape captures."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}

    def __call__(self, x: Any) -> Any:
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


class TorchBackend:
    """``open(model, options)`` -> :class:`TorchRunner`; ``device auto`` is CUDA when visible."""

    name = "torch"
    source = "torch"

    def open(self, source: Any, options: Any) -> TorchRunner:
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchRunner(source, options.img_size or 640, device, options.precision, options.cuda_graphs,
                           options.threads)


BACKEND = TorchBackend()
