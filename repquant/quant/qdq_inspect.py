"""Read a QDQ ONNX graph: its Q/DQ nodes, which operator inputs it quantizes, what ONNX Runtime makes of it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def _constant_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of every Constant node output and initializer, by tensor name."""
    arrays = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    arrays.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})
    return arrays


def qdq_nodes(proto: onnx.ModelProto) -> list[dict[str, object]]:
    """Every QuantizeLinear / DequantizeLinear: op, input tensor name, axis, zero-point dtype."""
    consts = _constant_arrays(proto.graph)
    rows: list[dict[str, object]] = []
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        zp = consts.get(node.input[2]) if len(node.input) > 2 else None
        scale = consts.get(node.input[1])
        rows.append({
            "op": node.op_type, "input": node.input[0], "axis": axis,
            "zero_point_dtype": None if zp is None else zp.dtype,
            "zero_point_max_abs": None if zp is None else int(np.abs(zp.astype(np.int64)).max()),
            "num_scales": None if scale is None else int(np.asarray(scale).size),
        })
    return rows


def ort_optimized_op_counts(onnx_path: str | Path, optimized_path: str | Path) -> Counter[str]:
    """Optimize with ONNX Runtime (CPU, ``ORT_ENABLE_ALL``), save the result, count its op types.

    QDQ fusion turns ``DQ -> Conv -> Q`` into ``QLinearConv`` (integer execution).
    """
    import onnxruntime as ort  # imported here: only this check needs it

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized_path)
    options.log_severity_level = 3  # the optimized-model hardware warning is expected
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(optimized_path)).graph.node)


@dataclass(frozen=True)
class QuantizedInput:
    """One operator input fed by a DequantizeLinear: the float ``tensor`` behind the Q/DQ (a weight
    initializer name, or the activation's producer output), its ``kind`` (weight or activation), the
    per-channel ``axis`` (None: per tensor) and the number of scales."""

    tensor: str
    kind: str
    axis: int | None
    num_scales: int


_PASS_THROUGH = ("QuantizeLinear", "DequantizeLinear", "Identity", "Cast")


def quantized_inputs(proto: onnx.ModelProto) -> dict[tuple[str, int], QuantizedInput]:
    """Which inputs of which operators a QDQ graph quantizes: ``{(node name, input index): QuantizedInput}``.

    The placement of two QDQ files of one network compares by these keys (the exporters name nodes by module
    path), whatever tool wrote the Q/DQ nodes and however it spelled weights and scales.
    """
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    constants = _constant_arrays(graph)

    def source(tensor: str) -> tuple[str, bool]:
        node = producers.get(tensor)
        while node is not None and node.op_type in _PASS_THROUGH:
            tensor = node.input[0]
            node = producers.get(tensor)
        return tensor, tensor in initializers or (node is not None and node.op_type == "Constant")

    found: dict[tuple[str, int], QuantizedInput] = {}
    for node in graph.node:
        if node.op_type in (*_PASS_THROUGH, "Constant"):
            continue
        for index, value in enumerate(node.input):
            dq = producers.get(value)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            tensor, is_weight = source(dq.input[0])
            scale = np.asarray(constants.get(dq.input[1], np.zeros(1)))
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) if scale.size > 1 else None
            found[(node.name, index)] = QuantizedInput(tensor, "weight" if is_weight else "activation", axis,
                                                       int(scale.size))
    return found
