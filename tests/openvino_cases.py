"""OpenVINO backend cases, run by ``tests/test_engines.py`` in their own pytest process: OpenVINO's thread
pool in the main test process made a later fork (a test that spawns a subprocess) crash with SIGSEGV, and users
of the backend run it in their own process anyway.

    python -m pytest tests/openvino_cases.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_files import IMG, build_files, images, run_ort

from repquant.checkpoint import load_model
from repquant.deploy.onnx_export import export_onnx
from repquant.quant.metrics import snr_db

pytest.importorskip("openvino", reason="openvino (extra 'openvino') not installed")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_files(tmp_path_factory.mktemp("engines"))


def _openvino(path: Path, precision: str, hint: str = "latency"):
    from repquant.deploy.backends import RunnerOptions, get_backend

    return get_backend("openvino").open(path, RunnerOptions(precision=precision, hint=hint))


def test_openvino_f32_matches_onnx_runtime(files: dict[str, Path]) -> None:
    runner = _openvino(files["fp32"], "fp32")
    assert runner.config["INFERENCE_PRECISION_HINT"] == "f32" and runner.precision == "fp32"
    assert (runner.img_size, runner.num_classes) == ((IMG, IMG), 3)
    x = images()
    for ours, theirs in zip(runner(x), run_ort(files["fp32"], x), strict=True):
        assert snr_db(theirs, ours) > 60  # the same float network, other kernels


def test_openvino_bf16_is_explicit_and_close(files: dict[str, Path]) -> None:
    runner = _openvino(files["fp32"], "bf16")
    assert runner.config["INFERENCE_PRECISION_HINT"] == "bf16" and runner.precision == "bf16"
    x = images()
    boxes, scores = runner(x)
    ref_boxes, ref_scores = run_ort(files["fp32"], x)
    assert snr_db(ref_boxes, boxes) > 25 and snr_db(ref_scores, scores) > 15


def test_openvino_runs_the_qdq_file_like_onnx_runtime(files: dict[str, Path]) -> None:
    runner = _openvino(files["int8"], "int8")
    assert runner.precision == "int8" and runner.config["INFERENCE_PRECISION_HINT"] == "f32"
    x = images()
    boxes, scores = runner(x)
    ref_boxes, ref_scores = run_ort(files["int8"], x)
    assert snr_db(ref_boxes, boxes) > 30 and snr_db(ref_scores, scores) > 15
    with pytest.raises(Exception, match="has Q/DQ nodes"):
        _openvino(files["int8"], "fp32")


def test_throughput_hint_splits_the_batch_and_keeps_the_order(files: dict[str, Path]) -> None:
    latency, throughput = _openvino(files["fp32"], "fp32"), _openvino(files["fp32"], "fp32", "throughput")
    x = images(8)
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
