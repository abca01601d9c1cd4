"""The model files of the engine tests (tests/test_engines.py, tests/openvino_cases.py): FP32 and INT8 (ORT
layout) exports of one seeded yolov6n, and ONNX Runtime helpers to run them."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from repquant.deploy.onnx_export import export_onnx
from repquant.deploy.qdq import QDQExport, export_quantized_onnx
from repquant.models import create_model
from repquant.quant import QuantConfig, calibrate, find_placement, insert_quantizers
from repquant.quant.config import quant_info, with_layout
from repquant.quant.qdq_export import export_qdq_onnx
from repquant.reparam import reparameterize

IMG = 96


def build_files(root: Path, raw: bool = False) -> dict[str, Path]:
    """``fp32`` and ``int8`` files (with ``raw``: also the QDQ export before its weights become INT8)."""
    torch.manual_seed(0)
    model = reparameterize(create_model("yolov6n", num_classes=3).eval())
    with torch.no_grad():  # YOLOv6 zero-inits the prediction convs; give them weights
        for conv in [*model.head.cls_preds, *model.head.reg_preds]:
            conv.weight.normal_(0.0, 0.05)
    x = torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    files = {"fp32": export_onnx(model, root / "fp32.onnx", IMG, dynamic_batch=True)}
    qmodel = copy.deepcopy(model)
    placement = find_placement(qmodel)
    config = with_layout(QuantConfig(), "ort")
    insert_quantizers(qmodel, placement, config)
    calibrate(qmodel, lambda m: m(x), "max", shared_groups=placement.shared_groups)
    files["int8"] = export_quantized_onnx(qmodel, root / "int8.onnx",
                                          QDQExport(IMG, quant_info(config, "ort"), uint8_activations=True))
    if raw:
        files["raw"] = export_qdq_onnx(qmodel, x[:1], root / "raw_qdq.onnx", output_names=("cls_logits", "reg_dist"))
    return files


def run_ort(path: Path, x: np.ndarray, level: str = "all") -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def images(batch: int = 4) -> np.ndarray:
    return np.random.default_rng(3).random((batch, 3, IMG, IMG), dtype=np.float32)
