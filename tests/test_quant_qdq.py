"""QDQ ONNX export of fake-quant models, checked against ONNX Runtime.

TensorRT layout (inputs + weights quantized): Q/DQ counts, axes, int8 zero points, keep-float conv
without Q/DQ, fake-quant torch vs ORT SNR. ORT layout (conv outputs also quantized): ORT's CPU QDQ
fusion must produce integer ``QLinearConv`` nodes, and still match the fake-quant torch output.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from quant_models import Residual
from torch import nn

from repquant.quant import (
    QuantConfig,
    calibrate,
    export_qdq_onnx,
    find_placement,
    insert_quantizers,
    ort_optimized_op_counts,
    qdq_nodes,
    snr_db,
)

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (extra 'quant') not installed")
ort = pytest.importorskip("onnxruntime")

MIN_SNR_DB = 30.0


class StandIn(nn.Module):
    """Deployed-YOLOv6 op kinds: conv+relu, residual add, SPPF pool chain, concat, ConvTranspose."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act, self.block = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Residual(8)
        self.pool, self.sppf_out = nn.MaxPool2d(5, 1, 2), nn.Conv2d(24, 8, 1)
        self.up, self.lat, self.head = nn.ConvTranspose2d(8, 6, 2, 2), nn.Conv2d(8, 8, 1), nn.Conv2d(14, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.stem(x))
        b = self.block(a)
        y1 = self.pool(b)
        y2 = self.pool(y1)
        c = self.act(self.sppf_out(torch.cat([b, y1, y2], 1)))
        lateral = self.act(self.lat(F.interpolate(a, scale_factor=2.0)))
        return self.head(torch.cat([self.up(c), lateral], 1))


def _quantized_stand_in(config: QuantConfig) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = StandIn().eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    p = find_placement(net)
    insert_quantizers(net, p, config)
    calibrate(net, lambda m: m(x), config.calib_method, shared_groups=p.shared_groups)
    return net, x


def _ort_outputs(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def test_tensorrt_layout_qdq_nodes(tmp_path: Path) -> None:
    net, x = _quantized_stand_in(QuantConfig(keep_float_layers=("lat",)))
    path = export_qdq_onnx(net, x[:1], tmp_path / "standin.onnx")
    proto = onnx.load(str(path))
    rows = qdq_nodes(proto)
    q_rows = [r for r in rows if r["op"] == "QuantizeLinear"]
    # 6 enabled convs x (input + weight) + skip + pool input called twice (y1 = pool(b), y2 = pool(y1)).
    assert len(q_rows) == 6 * 2 + 1 + 2
    assert Counter(r["op"] for r in rows)["DequantizeLinear"] == len(q_rows)
    assert all(r["zero_point_dtype"] == np.int8 and r["zero_point_max_abs"] == 0 for r in rows)
    weights = {r["input"]: r for r in q_rows if str(r["input"]).endswith(".weight")}
    quantized = ("stem", "block.conv1", "block.conv2", "sppf_out", "up", "head")
    assert set(weights) == {f"{n}.weight" for n in quantized}
    assert weights["up.weight"]["axis"] == 1
    assert weights["up.weight"]["num_scales"] == 6  # C_out of the transpose
    assert all(r["axis"] == 0 for n, r in weights.items() if n != "up.weight")
    assert weights["head.weight"]["num_scales"] == 4
    activations = [r for r in q_rows if r not in weights.values()]
    assert all(r["axis"] is None and r["num_scales"] == 1 for r in activations)
    # The keep-float conv reads float tensors directly.
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    lat = next(n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] == "lat.weight")
    assert producers[lat.input[0]] != "DequantizeLinear"
    with torch.no_grad():
        ref = net(x[:1]).numpy()
    assert snr_db(ref, _ort_outputs(path, x[:1])[0]) >= MIN_SNR_DB


def test_ort_layout_runs_integer_qlinearconv(tmp_path: Path) -> None:
    net, x = _quantized_stand_in(QuantConfig(quantize_conv_outputs=True))
    path = export_qdq_onnx(net, x[:1], tmp_path / "standin_ort.onnx")
    ops = ort_optimized_op_counts(path, tmp_path / "standin_ort.opt.onnx")
    assert ops["QLinearConv"] + ops["ConvInteger"] >= 1, ops
    with torch.no_grad():
        ref = net(x).numpy()
    assert snr_db(ref, _ort_outputs(path, x)[0]) >= MIN_SNR_DB


@pytest.fixture(scope="module")
def yolov6n_qdq(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, Path]:
    from repquant.models import create_model
    from repquant.reparam import reparameterize

    torch.manual_seed(0)
    model = reparameterize(create_model("yolov6n", num_classes=3).eval())
    with torch.no_grad():  # YOLOv6 zero-inits the prediction convs; give them weights to quantize
        for conv in [*model.head.cls_preds, *model.head.reg_preds]:
            conv.weight.normal_(0.0, 0.05)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    p = find_placement(model)
    insert_quantizers(model, p, QuantConfig())
    calibrate(model, lambda m: m(x), "max", shared_groups=p.shared_groups)
    path = export_qdq_onnx(model, x[:1], tmp_path_factory.mktemp("qdq") / "yolov6n.onnx",
                           output_names=("cls_logits", "reg_dist"))
    return model, x, path


def test_yolov6n_qdq_export(yolov6n_qdq: tuple[nn.Module, torch.Tensor, Path]) -> None:
    model, x, path = yolov6n_qdq
    rows = qdq_nodes(onnx.load(str(path)))
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    transposed = sum(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    # input + weight per conv, and the SPPF pool input once per call (3 chained calls).
    assert Counter(r["op"] for r in rows) == {"QuantizeLinear": 2 * (convs + transposed) + 3,
                                              "DequantizeLinear": 2 * (convs + transposed) + 3}
    assert sum(r["axis"] == 1 for r in rows) == 2 * transposed
    with torch.no_grad():
        ref = model(x[:1])
    for torch_out, ort_out in zip(ref, _ort_outputs(path, x[:1]), strict=True):
        assert snr_db(torch_out, ort_out) >= MIN_SNR_DB


@pytest.mark.slow
def test_yolov6n_ort_layout_runs_qlinearconv(tmp_path: Path) -> None:
    from repquant.models import create_model
    from repquant.reparam import reparameterize

    torch.manual_seed(0)
    model = reparameterize(create_model("yolov6n", num_classes=3).eval())
    with torch.no_grad():
        for conv in [*model.head.cls_preds, *model.head.reg_preds]:
            conv.weight.normal_(0.0, 0.05)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    p = find_placement(model)
    insert_quantizers(model, p, QuantConfig(quantize_conv_outputs=True))
    calibrate(model, lambda m: m(x), "max", shared_groups=p.shared_groups)
    path = export_qdq_onnx(model, x, tmp_path / "yolov6n_ort.onnx", output_names=("cls_logits", "reg_dist"))
    ops = ort_optimized_op_counts(path, tmp_path / "yolov6n_ort.opt.onnx")
    assert ops["QLinearConv"] >= 1, ops
    with torch.no_grad():
        ref = model(x)
    for torch_out, ort_out in zip(ref, _ort_outputs(path, x), strict=True):
        assert snr_db(torch_out, ort_out) >= MIN_SNR_DB
