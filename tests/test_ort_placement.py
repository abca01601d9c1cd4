"""ONNX Runtime layout, placement 2 (``QuantConfig.quantize_relu_outputs``): every conv quantized after its ReLU
(unsigned, uint8 zero point 0), the SiLU's sigmoid and the MaxPool outputs quantized, one Q/DQ per tensor.

Checked on a seeded yolov6n: ORT fuses every conv into an integer QLinearConv with the ReLU gone, runs the
head SiLUs as QLinearSigmoid/QLinearMul and the SPPF pools on INT8; the exported file computes what the
fake-quant model computes (parity at ORT's own floor); keep-float layers leave their weights and their output
float while their consumers quantize their inputs themselves; quantized checkpoints record the placement and
files written before it (no ``ort_placement``) rebuild the old one.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

from repquant.deploy.qdq import QDQExport, export_quantized_onnx, qdq_parity
from repquant.models import create_model
from repquant.quant import (
    QuantConfig,
    calibrate,
    find_placement,
    insert_quantizers,
    ort_optimized_op_counts,
    quantizer_state,
)
from repquant.quant.checkpoint import load_quantized_model, save_quantized_checkpoint
from repquant.quant.config import quant_info, with_layout
from repquant.quant.qdq_export import merge_repeated_qdq
from repquant.reparam import reparameterize

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (extra 'quant') not installed")

IMG = 96
KEEP = "backbone.ERBlock_3.0.rbr_reparam"  # a conv followed by its own ReLU


@pytest.fixture(scope="module")
def model_and_images() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = reparameterize(create_model("yolov6n", num_classes=3).eval())
    with torch.no_grad():  # YOLOv6 zero-inits the prediction convs
        for conv in [*model.head.cls_preds, *model.head.reg_preds]:
            conv.weight.normal_(0.0, 0.05)
    return model, torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _quantized(model: torch.nn.Module, images: torch.Tensor, keep: tuple[str, ...] = (),
               ort_placement: int = 2) -> tuple[torch.nn.Module, QuantConfig]:
    config = with_layout(QuantConfig(keep_float_layers=keep), "ort", ort_placement)
    qmodel = copy.deepcopy(model)
    placement = find_placement(qmodel)
    insert_quantizers(qmodel, placement, config)
    calibrate(qmodel, lambda m: m(images), "max", shared_groups=placement.shared_groups)
    return qmodel.eval(), config


def _export(qmodel: torch.nn.Module, config: QuantConfig, path: Path) -> Path:
    return export_quantized_onnx(qmodel, path, QDQExport(IMG, quant_info(config, "ort"), uint8_activations=True))


def test_placement_2_runs_every_conv_and_activation_in_int8(model_and_images, tmp_path: Path) -> None:
    model, images = model_and_images
    qmodel, config = _quantized(model, images)
    states = quantizer_state(qmodel)
    placement = find_placement(model)
    assert len(placement.relu_after) == 54 and len(placement.silu_after) == 9
    for conv, relu in placement.relu_after:
        assert not states[f"{conv}.output_quantizer"].enabled  # the ReLU's quantizer stands in for it
        assert states[f"{relu}.output_quantizer"].enabled and states[f"{relu}.output_quantizer"].unsigned
    path = _export(qmodel, config, tmp_path / "int8.onnx")
    ops = ort_optimized_op_counts(path, tmp_path / "int8.opt.onnx")
    convs = sum(isinstance(m, torch.nn.Conv2d) and "dfl" not in n for n, m in model.named_modules())
    assert ops["QLinearConv"] == convs and ops["Relu"] == 0 and ops["Conv"] + ops["FusedConv"] == 0, ops
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == 9 and ops["NhwcMaxPool"] == 3, ops
    assert ops["QuantizeLinear"] <= 4, ops  # the network input, and around the float ConvTransposes
    parity = qdq_parity(qmodel, path, images[:2])
    assert parity.exact(enough_db=50.0), parity.describe()
    # one Q/DQ pair per tensor left: the merge finds nothing more to do
    assert merge_repeated_qdq(onnx.load(str(path))) == 0


def test_keep_float_conv_leaves_its_weights_and_output_float(model_and_images, tmp_path: Path) -> None:
    model, images = model_and_images
    qmodel, config = _quantized(model, images, keep=(KEEP,))
    states = quantizer_state(qmodel)
    relu = dict(find_placement(model).relu_after)[KEEP]
    assert not states[f"{KEEP}.weight_quantizer"].enabled and not states[f"{relu}.output_quantizer"].enabled
    consumer = "backbone.ERBlock_3.1.conv1.rbr_reparam.input_quantizer"  # reads the ReLU's output
    assert states[consumer].enabled and states[consumer].unsigned
    upstream = states["backbone.ERBlock_2.1.block.0.act.output_quantizer"]  # the tensor the kept conv reads
    assert upstream.enabled  # stays the INT8 tensor its other readers share
    path = _export(qmodel, config, tmp_path / "keep.onnx")
    nodes = onnx.load(str(path)).graph.node
    kept = next(n for n in nodes if n.op_type == "Conv" and n.input[1] == f"model.{KEEP}.weight")
    assert kept.input[0].endswith("_float_read")  # the guard ReLU: ORT cannot requantize the float weights
    ops = ort_optimized_op_counts(path, tmp_path / "keep.opt.onnx")
    assert ops["Conv"] + ops["FusedConv"] == 1 and ops["QLinearConv"] == 68, ops  # exactly the kept conv in float
    parity = qdq_parity(qmodel, path, images[:2])
    assert parity.exact(enough_db=50.0), parity.describe()


def test_checkpoints_record_the_placement(model_and_images, tmp_path: Path) -> None:
    model, images = model_and_images
    qmodel, config = _quantized(model, images)
    info = quant_info(config, "ort")
    assert info["ort_placement"] == 2
    path = save_quantized_checkpoint(tmp_path / "q2.safetensors", qmodel, info)
    loaded, record = load_quantized_model(path)
    assert record["ort_placement"] == 2
    with torch.no_grad():
        for a, b in zip(qmodel(images), loaded(images), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A record without ort_placement (written before it existed) rebuilds placement 1.
    old, old_config = _quantized(model, images, ort_placement=1)
    assert not old_config.quantize_relu_outputs
    old_info = quant_info(old_config, "ort")
    assert "ort_placement" not in old_info
    loaded_old, _ = load_quantized_model(save_quantized_checkpoint(tmp_path / "q1.safetensors", old, old_info))
    states = quantizer_state(loaded_old)
    assert states["backbone.stem.rbr_reparam.output_quantizer"].enabled
    assert not any(name.endswith("act.output_quantizer") and s.enabled for name, s in states.items())
    with torch.no_grad():
        for a, b in zip(old(images), loaded_old(images), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_merge_repeated_qdq_is_exact_and_can_merge(model_and_images, tmp_path: Path) -> None:
    """The export before the merge repeats Q/DQ pairs (ReLU quantizer, then each consumer's); merging them
    changes no output bit."""
    import numpy as np

    from repquant.deploy.backends.ort import OrtDetector
    from repquant.quant.qdq_export import activations_to_uint8, export_qdq_onnx

    model, images = model_and_images
    qmodel, _ = _quantized(model, images)
    raw = export_qdq_onnx(qmodel, images[:1], tmp_path / "raw.onnx", output_names=("cls", "reg"))
    proto = onnx.load(str(raw))
    activations_to_uint8(proto)
    before = Counter(n.op_type for n in proto.graph.node)
    removed = merge_repeated_qdq(proto)
    after = Counter(n.op_type for n in proto.graph.node)
    assert removed > 50 and before["QuantizeLinear"] - after["QuantizeLinear"] > 25
    onnx.save(proto, str(tmp_path / "merged.onnx"))
    unmerged = onnx.load(str(raw))
    activations_to_uint8(unmerged)
    onnx.save(unmerged, str(tmp_path / "unmerged.onnx"))
    merged_out = OrtDetector(tmp_path / "merged.onnx", graph_optimization="disable")(images)
    unmerged_out = OrtDetector(tmp_path / "unmerged.onnx", graph_optimization="disable")(images)
    for a, b in zip(merged_out, unmerged_out, strict=True):
        np.testing.assert_array_equal(a, b)
