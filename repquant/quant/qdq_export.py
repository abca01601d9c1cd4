"""Export a calibrated fake-quant model to ONNX with QuantizeLinear / DequantizeLinear (QDQ).

modelopt's ``TensorQuantizer`` has a TorchScript ONNX symbolic that writes Q/DQ pairs: symmetric
INT8, zero point 0 (int8), ``scale = amax / 127``, ``axis`` for per-channel weights (Conv axis 0,
ConvTranspose axis 1), per tensor for activations. The dynamo exporter does not use these symbolics,
so export goes through ``torch.onnx.export(..., dynamo=False)``. modelopt writes each zero point as
``Cast(Constant)``; we fold those into int8 constants so the file is plain QDQ for TensorRT and ORT.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from repquant.errors import ModelError

DEFAULT_OPSET = 17


def _fold_constant_casts(model: onnx.ModelProto) -> int:
    """Replace ``Cast(Constant)`` by one Constant of the target type; returns how many were folded."""
    graph = model.graph
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Cast" or node.input[0] not in constants:
            continue
        src = constants[node.input[0]]
        value = numpy_helper.to_array(next(a.t for a in src.attribute if a.name == "value"))
        to = next(a.i for a in node.attribute if a.name == "to")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(to)
        tensor = numpy_helper.from_array(np.asarray(value).astype(dtype), name=node.output[0])
        const = onnx.helper.make_node(
            "Constant", [], [node.output[0]], value=tensor, name=f"{node.name}_folded"
        )
        graph.node.insert(list(graph.node).index(node), const)
        graph.node.remove(node)
        folded += 1
    used = {i for n in graph.node for i in n.input}
    for out, src in constants.items():
        if out not in used:
            graph.node.remove(src)
    return folded


def _drop_noop_casts(model: onnx.ModelProto) -> int:
    """Remove every ``Cast`` to the type its input already has (modelopt's quantizer casts its input to the
    compute dtype, float32 to float32 here); returns how many. Such a Cast between a tensor and its Q/DQ
    hides the tensor's quantization from pattern matchers (TensorRT's Q/DQ fusion, placement checks)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    graph_outputs = {o.name for o in model.graph.output}
    dropped = 0
    for node in list(model.graph.node):
        if node.op_type != "Cast" or node.output[0] in graph_outputs:
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        if types.get(node.input[0]) != to:
            continue
        _rewire(model.graph, node.output[0], node.input[0])
        model.graph.node.remove(node)
        dropped += 1
    return dropped


def export_qdq_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    input_names: tuple[str, ...] = ("images",),
    output_names: tuple[str, ...] | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Write the fake-quant ``model`` as a QDQ ONNX file and check it with ``onnx.checker``.

    ``example_input``: ``(B, 3, H, W)`` float; ``dynamic_batch`` makes dim 0 symbolic.
    Returns the written path.
    """
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in (*input_names, *(output_names or ()))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from modelopt's fake-quant python code
        torch.onnx.export(
            model, (example_input,), str(path), dynamo=False, opset_version=opset,
            input_names=list(input_names), output_names=list(output_names) if output_names else None,
            dynamic_axes=dynamic_axes,
        )
    model.train(was_training)
    proto = onnx.load(str(path))
    _fold_constant_casts(proto)
    _drop_noop_casts(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ModelError(f"{path}: exported QDQ ONNX fails onnx.checker: {err}") from err
    onnx.save(proto, str(path))
    return path


def convs_to_fp16(proto: onnx.ModelProto, weight_names: set[str]) -> onnx.ModelProto:
    """Run the Conv / ConvTranspose nodes whose weight initializer is in ``weight_names`` in FP16: weight and bias
    stored as float16, ``Cast`` to float16 before and back to float32 after each.

    For TensorRT's strongly typed networks (TensorRT 11 drops the FP16 builder flag: precision comes
    from the ONNX types), so the keep-float layers of a mixed-precision model run in FP16, not FP32.
    Raises ``ModelError`` naming the weights no convolution reads.
    """
    import onnx_graphsurgeon as gs  # graph surgery only here; keeps the package import light

    graph = gs.import_onnx(proto)
    found: set[str] = set()
    for node in [n for n in graph.nodes if n.op in ("Conv", "ConvTranspose") and n.inputs[1].name in weight_names]:
        found.add(node.inputs[1].name)
        for i, const in enumerate(node.inputs[1:], start=1):
            values = _constant_values(const)
            if values is None:
                raise ModelError(f"Conv {node.name}: input {const.name} is not a constant; cannot store it as FP16")
            node.inputs[i] = gs.Constant(f"{const.name}_fp16", values.astype(np.float16))
        x16 = gs.Variable(f"{node.name}_input_fp16", dtype=np.float16)
        graph.nodes.append(gs.Node("Cast", f"{node.name}_cast_in", {"to": onnx.TensorProto.FLOAT16},
                                   inputs=[node.inputs[0]], outputs=[x16]))
        y32, y16 = node.outputs[0], gs.Variable(f"{node.name}_output_fp16", dtype=np.float16)
        node.inputs[0], node.outputs[0] = x16, y16
        graph.nodes.append(gs.Node("Cast", f"{node.name}_cast_out", {"to": onnx.TensorProto.FLOAT},
                                   inputs=[y16], outputs=[y32]))
    if missing := weight_names - found:
        raise ModelError(f"no convolution reads the weights {sorted(missing)}; cannot make them FP16")
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out, full_check=True)
    return out


def activations_to_uint8(proto: onnx.ModelProto) -> int:
    """Rewrite every activation Q/DQ from int8 (zero point 0) to uint8 (zero point 128), in place;
    weights stay int8. Returns how many nodes changed.

    The same numbers (``q_u8 = q_s8 + 128``, both dequantize to ``(q - zp) * scale``), in the form
    ONNX Runtime's x86 CPU kernels want (U8S8). ORT converts int8 activations itself, but skips a
    QuantizeLinear read twice, as a SiLU (``x * sigmoid(x)``) reads its input; the conv before it
    is then left with a uint8 input and an int8 output and runs in float. For the ORT layout only:
    TensorRT wants int8.
    """
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    weight_q = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in initializers}
    changed = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.input[0] in initializers or node.input[0] in weight_q:
            continue
        if _initializer_or_constant(proto, node.input[2]).dtype == np.uint8:
            continue  # an unsigned quantizer (ReLU outputs): already uint8 with zero point 0
        zero_point = f"{node.name or node.output[0]}_zero_point_u8"
        graph.initializer.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), zero_point))
        node.input[2] = zero_point
        changed += 1
    _drop_unused_constants(graph)  # the int8 zero points replaced
    return changed


def _qdq_params(proto: onnx.ModelProto, node: onnx.NodeProto) -> tuple[bytes, bytes, str, int | None]:
    scale = _initializer_or_constant(proto, node.input[1])
    zero_point = _initializer_or_constant(proto, node.input[2])
    axis = next((a.i for a in node.attribute if a.name == "axis"), None) if scale.size > 1 else None
    return scale.astype(np.float32).tobytes(), zero_point.tobytes(), str(zero_point.dtype), axis


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    for consumer in graph.node:
        for i, value in enumerate(consumer.input):
            if value == old:
                consumer.input[i] = new


def merge_repeated_qdq(proto: onnx.ModelProto) -> int:
    """Quantize each tensor once, in place; returns how many Q/DQ nodes were removed. Two exact rewrites:
    a QuantizeLinear of a DequantizeLinear with the same scale, zero point and axis returns the DQ's input
    (``Q(DQ(q)) = q``), and Q (or DQ) nodes reading one tensor with the same parameters are one node.

    With placement 2 of the ONNX Runtime layout a ReLU's quantizer and its consumers' input quantizers share
    one scale, so the export repeats Q/DQ pairs that compute nothing; ORT removes such a pair only when the
    DQ has a single consumer (its DoubleQDQPairsRemover), hence this pass. Graph outputs are never renamed.
    """
    graph, removed = proto.graph, 0
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        changed = False
        producers = {out: n for n in graph.node for out in n.output}
        seen: dict[tuple[str, str, tuple[bytes, bytes, str, int | None]], str] = {}
        for node in list(graph.node):
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
                continue
            if node.output[0] in outputs:
                continue
            params = _qdq_params(proto, node)
            source = producers.get(node.input[0])
            if node.op_type == "QuantizeLinear" and source is not None and source.op_type == "DequantizeLinear" \
                    and len(source.input) >= 3 and _qdq_params(proto, source) == params:
                _rewire(graph, node.output[0], source.input[0])
            elif (key := (node.op_type, node.input[0], params)) in seen:
                _rewire(graph, node.output[0], seen[key])
            else:
                seen[key] = node.output[0]
                continue
            graph.node.remove(node)
            removed, changed = removed + 1, True
    _drop_unused_constants(graph)
    return removed


def _drop_unused_constants(graph: onnx.GraphProto) -> None:
    """Remove Constant nodes and initializers nothing reads any more (the scales of merged Q/DQ nodes)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def guard_float_convs(proto: onnx.ModelProto) -> list[str]:
    """Keep float-weight convs float in ONNX Runtime, in place; returns the convs it could not guard.

    ORT's ``WeightBiasQuantization`` gives a Conv / ConvTranspose whose input comes straight from a
    DequantizeLinear and whose weight is a float initializer per-tensor INT8 weights of its own, silently undoing
    a keep-float layer. A ``Relu`` between them hides the DQ and changes nothing when the DQ is unsigned with zero
    point 0 (its values are >= 0): that is every tensor a keep-float conv reads under placement 2. Any other DQ
    cannot be guarded exactly and is reported.
    """
    graph = proto.graph
    producers = {out: n for n in graph.node for out in n.output}
    initializers = {i.name: i for i in graph.initializer}
    unguarded: list[str] = []
    for node in list(graph.node):
        weight = initializers.get(node.input[1]) if node.op_type in ("Conv", "ConvTranspose") else None
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        source = producers.get(node.input[0])
        if source is None or source.op_type != "DequantizeLinear":
            continue
        zero_point = _initializer_or_constant(proto, source.input[2]) if len(source.input) > 2 else None
        if zero_point is None or zero_point.dtype != np.uint8 or zero_point.any():
            unguarded.append(node.name)
            continue
        guarded = f"{node.input[0]}_float_read"
        graph.node.insert(list(graph.node).index(node),
                          onnx.helper.make_node("Relu", [node.input[0]], [guarded], name=f"{node.name}_float_read"))
        node.input[0] = guarded
    return unguarded


def weights_to_int8(proto: onnx.ModelProto) -> int:
    """Store every quantized weight as its INT8 (or UINT8) values, in place: ``W (float) -> QuantizeLinear ->
    DequantizeLinear`` becomes ``W_q (int8) -> DequantizeLinear``. Returns how many weights changed.

    The stored values are what the QuantizeLinear computed at run time (ONNX semantics: ``saturate(round_half_
    even(W / scale) + zero_point)`` per axis, float32 division), so the file computes the same numbers and is
    about a quarter of the size; ORT's own ``quantize_static`` writes its weights the same way. Written by hand:
    onnx and ORT have no pass that folds an existing QDQ graph's weight quantizers (ORT's quantizers start
    from a float model).
    """
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    changed = 0
    for node in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in initializers]:
        weight = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32)
        scale = _initializer_or_constant(proto, node.input[1]).astype(np.float32)
        zero_point = _initializer_or_constant(proto, node.input[2])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        info = np.iinfo(zero_point.dtype)
        q = np.rint(weight / scale.reshape(shape)) + zero_point.astype(np.float32).reshape(shape)
        name = f"{node.input[0]}_quantized"
        graph.initializer.append(numpy_helper.from_array(np.clip(q, info.min, info.max).astype(zero_point.dtype),
                                                         name))
        _rewire(graph, node.output[0], name)
        graph.node.remove(node)
        changed += 1
    _drop_unused_constants(graph)  # the float weights
    return changed


def _initializer_or_constant(proto: onnx.ModelProto, name: str) -> np.ndarray:
    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
    raise ModelError(f"QDQ graph: {name} is neither an initializer nor a Constant")


def _constant_values(tensor: object) -> np.ndarray | None:
    """Values of a graph-surgeon constant, also behind the ``Identity`` nodes the TorchScript exporter
    writes when it de-duplicates equal initializers; None for a computed tensor."""
    import onnx_graphsurgeon as gs

    while isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Identity":
        tensor = tensor.inputs[0].inputs[0]
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None
