"""PTQ of the committed BCCD yolov6s checkpoint: the exported QDQ graph (Q/DQ count, axes, int8 zero
points, keep-float convs without Q/DQ), integer execution in ONNX Runtime, and fake-quant torch vs ORT
parity in both layouts.

Parity: boxes >= 30 dB. The scores output of this checkpoint cannot reach 30 dB between *any* two exact
INT8 executions: ONNX Runtime running the same file with and without graph optimizations agrees with
itself to ~25-30 dB on scores (``QDQParity.floor_db``), because values on rounding boundaries flip with
the kernel's float rounding and the flips propagate through ~60 quantized layers into the sigmoid. So
each output must be within 3 dB of that floor; a wrong scale costs far more (one weight's scale
doubled: scores 29 -> 10 dB, test_parity_catches_a_wrong_scale)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (extra 'quant') not installed")

from repquant.checkpoint import load_checkpoint  # noqa: E402
from repquant.quant import ort_optimized_op_counts, qdq_nodes  # noqa: E402
from repquant.quant.qdq_export import merge_repeated_qdq  # noqa: E402
from repquant.tasks import ptq as ptq_task  # noqa: E402
from repquant.tasks.config import PTQConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "benchmarks" / "checkpoints" / "yolov6s_bccd.safetensors"
SENSITIVITY = ROOT / "benchmarks" / "results" / "sensitivity_yolov6s_bccd_320" / "sensitivity.json"
DATA_YAML = ROOT / "recipes" / "data" / "bccd.yaml"
KEEP_FLOAT = 6
FLOOR_MARGIN_DB = 3.0

pytestmark = pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "bccd").is_dir(),
                                reason="../shared/data/bccd is not present")


@pytest.fixture(scope="module", params=["tensorrt", "ort"])
def ptq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    img_size = int(load_checkpoint(CHECKPOINT)[1]["img_size"])
    out = tmp_path_factory.mktemp("ptq_bccd") / f"yolov6s_{request.param}.onnx"
    config = PTQConfig(str(CHECKPOINT), DATA_YAML, out, keep_float=KEEP_FLOAT, sensitivity_json=SENSITIVITY,
                       calib_images=16, img_size=img_size, layout=request.param)
    return ptq_task.run(config, progress=False)


def test_fake_quant_matches_onnx_runtime(ptq) -> None:
    parity = ptq.parity
    assert parity.snr_db["boxes"] >= 30.0, parity
    assert parity.exact(FLOOR_MARGIN_DB), parity


def test_qdq_graph(ptq) -> None:
    proto = onnx.load(str(ptq.onnx_path))
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}

    def weight_of(conv: onnx.NodeProto) -> str:  # the float weight's name, also behind DequantizeLinear(w_int8)
        name = conv.input[1]
        while name not in inits:
            name = producers[name].input[0]
        return name.removesuffix("_quantized")

    convs = {weight_of(n): n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    rows = qdq_nodes(proto)
    quantizes = [r for r in rows if r["op"] == "QuantizeLinear"]
    # Weights are stored as INT8 initializers read by a DequantizeLinear: no QuantizeLinear of their own.
    weight_rows = [r for r in rows if r["input"] in inits]
    assert weight_rows and all(r["op"] == "DequantizeLinear" for r in weight_rows)
    assert all(inits[r["input"]].data_type == onnx.TensorProto.INT8 for r in weight_rows)
    assert Counter(r["op"] for r in rows)["DequantizeLinear"] == len(quantizes) + len(weight_rows)
    assert all(r["zero_point_dtype"] == np.int8 and r["zero_point_max_abs"] == 0 for r in weight_rows)
    # Activations: int8 for TensorRT; for ONNX Runtime uint8, zero point 128 (symmetric, the same numbers) or 0
    # (placement 2: ReLU outputs and other non-negative tensors, 8 bits over [0, amax]).
    u8, s8 = np.dtype(np.uint8), np.dtype(np.int8)
    act_zero_points = {(s8, 0)} if ptq.layout == "tensorrt" else {(u8, 128), (u8, 0)}
    found = {(r["zero_point_dtype"], r["zero_point_max_abs"]) for r in rows if r not in weight_rows}
    assert found == act_zero_points, found
    weights = [{**r, "input": str(r["input"]).removesuffix("_quantized")} for r in weight_rows]
    # Every conv but the keep-float ones has a per-channel (axis 0) weight quantizer.
    float_weights = {f"model.{name}.weight" for name in ptq.keep_float_layers}
    assert float_weights <= set(convs)
    int8_convs = [w for w in convs if w not in float_weights]
    assert {r["input"] for r in weights} == set(int8_convs)
    for r in weights:  # ConvTranspose weights are (C_in, C_out, kh, kw): scales per output channel on axis 1
        axis = 1 if convs[r["input"]].op_type == "ConvTranspose" else 0
        assert r["axis"] == axis and r["num_scales"] == inits[f"{r['input']}_quantized"].dims[axis]
    activations = quantizes
    assert all(r["axis"] is None and r["num_scales"] == 1 for r in activations)
    # TensorRT layout: one input quantizer per INT8 conv + the SPPF pool input at each of its 3 calls.
    # ORT layout (placement 2): one Q/DQ per quantized tensor, fewer than the input + output quantizer per INT8
    # conv of placement 1; nothing left to merge.
    if ptq.layout == "tensorrt":
        assert len(activations) == len(int8_convs) + 3
    else:
        assert len(int8_convs) < len(activations) < 2 * len(int8_convs) + 3
        assert merge_repeated_qdq(proto) == 0
    for weight in float_weights:  # keep-float convs read float inputs and float weights
        conv = convs[weight]
        source = producers.get(conv.input[0])  # None: the graph input
        assert conv.input[1] == weight and (source is None or source.op_type != "DequantizeLinear"), conv.name


def test_ort_runs_integer_convolutions(ptq, tmp_path: Path) -> None:
    if ptq.layout != "ort":
        pytest.skip("the TensorRT layout leaves conv outputs float; ORT fuses only the ORT layout")
    counts = ort_optimized_op_counts(ptq.onnx_path, tmp_path / "optimized.onnx")
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(ptq.onnx_path)).graph.node)
    # Every INT8 conv runs as QLinearConv (the head's SiLU convs too); only the keep-float ones stay float (the
    # guard ReLU in front of each keeps ORT from giving them INT8 weights of its own).
    in_float = counts["Conv"] + counts["FusedConv"]
    assert counts["QLinearConv"] == convs - KEEP_FLOAT and in_float == KEEP_FLOAT, counts


def test_parity_catches_a_wrong_scale(tmp_path: Path) -> None:
    """qdq_parity is a real check: doubling one weight's dequantization scale drops it below its floor."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    from repquant.deploy.qdq import QDQExport, export_quantized_onnx, qdq_parity
    from repquant.quant.config import QuantConfig
    from repquant.quant.sensitivity import quantized_copy
    from repquant.tasks.inputs import load_quant_inputs

    # A trained model: an untrained YOLOv6 head (zero-initialized predictions) outputs constants.
    checkpoint = ROOT / "benchmarks" / "checkpoints" / "yolov6n_bccd.safetensors"
    inputs = load_quant_inputs(PTQConfig(str(checkpoint), DATA_YAML, tmp_path / "x.onnx", calib_images=4,
                                         img_size=160))
    model, batches = inputs.model, inputs.batches
    qmodel, _ = quantized_copy(model, batches, QuantConfig(num_calib_images=4))
    good = export_quantized_onnx(qmodel, tmp_path / "good.onnx", QDQExport(160, {}))
    images = torch.cat(batches)
    exact = qdq_parity(qmodel, good, images)
    assert exact.exact(FLOOR_MARGIN_DB), exact
    proto = onnx.load(str(good))
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] == "model.backbone.ERBlock_3.0.rbr_reparam.weight_quantized")
    scale = numpy_helper.to_array(next(a.t for a in consts[dq.input[1]].attribute if a.name == "value"))
    proto.graph.initializer.append(numpy_helper.from_array(scale * np.float32(2.0), "wrong_scale"))
    dq.input[1] = "wrong_scale"  # the INT8 weights stay: dequantized weights come out doubled
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    bad = qdq_parity(qmodel, tmp_path / "bad.onnx", images)
    assert not bad.exact(FLOOR_MARGIN_DB), bad
