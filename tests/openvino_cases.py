"""OpenVINO backend cases, run by ``tests/test_engines.py`` in their own pytest process: OpenVINO's thread
pool in the main test process made a later fork (a test that spawns a subprocess) crash with SIGSEGV, and users
of the backend run it in their own process anyway.

    python -m pytest tests/openvino_cases.py
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from repquant.checkpoint import load_model
from repquant.deploy.onnx_export import export_onnx
from repquant.deploy.qdq import QDQExport, export_quantized_onnx
from repquant.models import create_model
from repquant.quant import QuantConfig, calibrate, find_placement, insert_quantizers
from repquant.quant.config import quant_info
from repquant.quant.metrics import snr_db
from repquant.reparam import reparameterize

pytest.importorskip("openvino", reason="openvino (extra 'openvino') not installed")

IMG = 96


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FP32 and INT8 (ORT layout) exports of one seeded yolov6n."""
    root = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    model = reparameterize(create_model("yolov6n", num_classes=3).eval())
    with torch.no_grad():  # YOLOv6 zero-inits the prediction convs; give them weights
        for conv in [*model.head.cls_preds, *model.head.reg_preds]:
            conv.weight.normal_(0.0, 0.05)
    x = torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    fp32 = export_onnx(model, root / "fp32.onnx", IMG, dynamic_batch=True)
    qmodel = copy.deepcopy(model)
    placement = find_placement(qmodel)
    config = QuantConfig(quantize_conv_outputs=True)
    insert_quantizers(qmodel, placement, config)
    calibrate(qmodel, lambda m: m(x), "max", shared_groups=placement.shared_groups)
    int8 = export_quantized_onnx(qmodel, root / "int8.onnx",
                                 QDQExport(IMG, quant_info(config, "ort"), uint8_activations=True))
    return {"fp32": fp32, "int8": int8}


def _ort(path: Path, x: np.ndarray, level: str = "all") -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _images(batch: int = 4) -> np.ndarray:
    return np.random.default_rng(3).random((batch, 3, IMG, IMG), dtype=np.float32)




def _openvino(path: Path, precision: str, hint: str = "latency"):
    from repquant.deploy.backends import RunnerOptions, get_backend

    return get_backend("openvino").open(path, RunnerOptions(precision=precision, hint=hint))


def test_openvino_f32_matches_onnx_runtime(files: dict[str, Path]) -> None:
    runner = _openvino(files["fp32"], "fp32")
    assert runner.config["INFERENCE_PRECISION_HINT"] == "f32" and runner.precision == "fp32"
    assert (runner.img_size, runner.num_classes) == ((IMG, IMG), 3)
    x = _images()
    for ours, theirs in zip(runner(x), _ort(files["fp32"], x), strict=True):
        assert snr_db(theirs, ours) > 60  # the same float network, other kernels


def test_openvino_bf16_is_explicit_and_close(files: dict[str, Path]) -> None:
    runner = _openvino(files["fp32"], "bf16")
    assert runner.config["INFERENCE_PRECISION_HINT"] == "bf16" and runner.precision == "bf16"
    x = _images()
    boxes, scores = runner(x)
    ref_boxes, ref_scores = _ort(files["fp32"], x)
    assert snr_db(ref_boxes, boxes) > 25 and snr_db(ref_scores, scores) > 15


def test_openvino_runs_the_qdq_file_like_onnx_runtime(files: dict[str, Path]) -> None:
    runner = _openvino(files["int8"], "int8")
    assert runner.precision == "int8" and runner.config["INFERENCE_PRECISION_HINT"] == "f32"
    x = _images()
    boxes, scores = runner(x)
    ref_boxes, ref_scores = _ort(files["int8"], x)
    assert snr_db(ref_boxes, boxes) > 30 and snr_db(ref_scores, scores) > 15
    with pytest.raises(Exception, match="has Q/DQ nodes"):
        _openvino(files["int8"], "fp32")


def test_throughput_hint_splits_the_batch_and_keeps_the_order(files: dict[str, Path]) -> None:
    latency, throughput = _openvino(files["fp32"], "fp32"), _openvino(files["fp32"], "fp32", "throughput")
    x = _images(8)
    for a, b in zip(latency(x), throughput(x), strict=True):
        assert a.shape == b.shape and snr_db(a, b) > 60
    assert throughput.config["PERFORMANCE_HINT"] == "THROUGHPUT"


def test_eval_through_openvino_scores_like_onnx_runtime(tmp_path: Path) -> None:
    from repquant.tasks import evaluate
    from repquant.tasks.config import EvalConfig

    root = Path(__file__).resolve().parents[1]
    model = root / "benchmarks" / "checkpoints" / "yolov6n_bccd.safetensors"
    onnx_path = export_onnx(load_model(model), tmp_path / "n.onnx", 128, dynamic_batch=True)
    sample = root / "recipes" / "data" / "bccd_sample.yaml"
    results = {b: evaluate.run(EvalConfig(str(onnx_path), sample, backend=b), progress=False).result
               for b in ("ort", "openvino")}
    assert results["ort"].map50_95 > 0.2  # a trained model: the comparison means something
    assert results["openvino"].map50_95 == pytest.approx(results["ort"].map50_95, abs=2e-3)


def test_quantize_evaluates_and_times_in_openvino(tmp_path: Path) -> None:
    from repquant.tasks import quantize
    from repquant.tasks.quant_config import QuantizeConfig
    from repquant.tasks.quantize_report import validate_summary

    root = Path(__file__).resolve().parents[1]
    cfg = QuantizeConfig(model=str(root / "benchmarks/checkpoints/yolov6n_bccd.safetensors"),
                         data=root / "recipes/data/bccd_sample.yaml", output=tmp_path / "q", img_size=128,
                         calib_images=4, isolated_images=2, max_keep_float=0, batch_sizes=(1, 2), bench_warmup=0,
                         bench_iters=1, bench_min_seconds=0.0, qat="never", backend="openvino")
    summary = quantize.run(cfg).summary
    validate_summary(summary)
    assert summary["speed"]["backend"] == "openvino" and "--backend openvino" in summary["commands"]["int8_map"]
    assert "OpenVINO" in (tmp_path / "q" / "report.md").read_text()
