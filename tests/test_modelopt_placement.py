"""Our TensorRT-layout Q/DQ placement against ModelOpt's TensorRT-aware ONNX PTQ (``modelopt.onnx.quantization``)
on the same network: every input we quantize, ModelOpt quantizes the same way (weights per output channel on
the same axis, activations per tensor, same source tensor); ModelOpt's extra Q/DQ are all of one kind,
checked here by rule, and justified in docs/quantize.md ("Q/DQ placement vs ModelOpt"):

ModelOpt is tensor-centric (once a tensor has a Q/DQ pair, every consumer reads the DQ output); repquant puts
a quantizer on the consumers TensorRT's rules name (weighted ops, residual skips, MaxPool) and lets other
consumers read the float tensor. So ModelOpt alone quantizes a Concat input or the ``alpha * x`` Mul input
(BottleRep) when the same tensor is quantized for a conv or pool elsewhere.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from repquant.deploy.onnx_export import export_onnx
from repquant.deploy.qdq import QDQExport, export_quantized_onnx
from repquant.models import create_model
from repquant.quant import QuantConfig, calibrate, find_placement, insert_quantizers
from repquant.quant.config import quant_info
from repquant.quant.qdq_inspect import QuantizedInput, quantized_inputs
from repquant.reparam import reparameterize

IMG = 96
EXTRA_CONSUMERS = ("Concat", "Mul")  # non-weighted consumers of an already-quantized tensor


Placement = dict[tuple[str, int], QuantizedInput]


def _files(tmp_path: Path, variant: str) -> tuple[Placement, Placement, dict[str, str]]:
    """Both QDQ files of one seeded model, written in a child process: ModelOpt's ONNX PTQ patches ONNX
    Runtime's calibrators process-wide (modelopt/onnx/quantization/ort_patching.py), which breaks ORT's
    own qdq_loss_debug in later tests of the same process."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_modelopt_placement as t; " \
           f"t.write_files({str(tmp_path)!r}, {variant!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = (quantized_inputs(onnx.load(str(tmp_path / name))) for name in ("ours.onnx", "modelopt.onnx"))
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "ours.onnx")).graph.node}
    return ours, theirs, ops


def write_files(folder: str, variant: str) -> None:
    """ours.onnx (repquant, TensorRT layout) and modelopt.onnx (ModelOpt ONNX PTQ of fp32.onnx) in ``folder``."""
    from modelopt.onnx.quantization import quantize

    root = Path(folder)
    torch.manual_seed(0)
    model = reparameterize(create_model(variant, num_classes=3).eval())
    with torch.no_grad():  # YOLOv6 zero-inits the prediction convs
        for conv in [*model.head.cls_preds, *model.head.reg_preds]:
            conv.weight.normal_(0.0, 0.05)
    images = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    fp32 = export_onnx(model, root / "fp32.onnx", IMG, dynamic_batch=False)
    qmodel, config = copy.deepcopy(model), QuantConfig()
    placement = find_placement(qmodel)
    insert_quantizers(qmodel, placement, config)
    calibrate(qmodel, lambda m: m(images), "max", shared_groups=placement.shared_groups)
    how = QDQExport(IMG, quant_info(config, "tensorrt"), dynamic_batch=False)
    export_quantized_onnx(qmodel, root / "ours.onnx", how)
    quantize(str(fp32), quantize_mode="int8", calibration_data=images.numpy(), calibration_method="max",
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(root / "modelopt.onnx"),
             log_level="ERROR")


@pytest.mark.parametrize("variant", ["yolov6n", "yolov6s", "yolov6m"])
def test_placement_matches_modelopt_onnx_ptq(tmp_path: Path, variant: str) -> None:
    ours, theirs, ops = _files(tmp_path, variant)
    assert len(ours) > 100
    assert not set(ours) - set(theirs), f"quantized by repquant only: {sorted(set(ours) - set(theirs))[:5]}"
    for key, mine in ours.items():
        other = theirs[key]
        assert (mine.kind, mine.axis, mine.num_scales) == (other.kind, other.axis, other.num_scales), key
        # our weights are stored as INT8 initializers (name + "_quantized"), ModelOpt's stay float
        assert mine.tensor.removesuffix("_quantized") == other.tensor, key
        if mine.kind == "weight":
            assert mine.axis == (1 if ops[key[0]] == "ConvTranspose" else 0) and mine.num_scales > 1
        else:
            assert mine.axis is None and mine.num_scales == 1
    ours_activations = {q.tensor for q in ours.values() if q.kind == "activation"}
    extra = {key: q for key, q in theirs.items() if key not in ours}
    assert extra  # the documented difference exists (else update docs/quantize.md)
    for (node, index), q in extra.items():
        assert q.kind == "activation" and ops[node] in EXTRA_CONSUMERS, (node, index)
        assert q.tensor in ours_activations, f"{node} input {index}: {q.tensor} is not quantized by repquant at all"
    if variant == "yolov6m":  # the BottleRep residuals: skips quantized alike, ModelOpt also feeds alpha * x an INT8 x
        assert any(ops[node] == "Mul" for node, _ in extra)
        assert any(ops[node] == "Add" and q.kind == "activation" for (node, _), q in ours.items())
