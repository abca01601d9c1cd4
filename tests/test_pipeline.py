"""The README's main job: ``repquant demo`` (quantize of the committed checkpoint on the embedded sample) and
its training variant end to end on a tiny generated dataset: train -> eval -> ONNX -> ORT eval."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from repquant.cli import cli
from repquant.tasks import demo
from repquant.tasks.config import DemoConfig


def test_demo_runs_end_to_end_and_backends_agree(tmp_path):
    result = demo.train_demo(DemoConfig(tmp_path / "demo", train=True, img_size=64, epochs=2, batch_size=8, workers=0,
                                 synthetic_images=(16, 8)))
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["epochs"] == 2 and summary["img_size"] == 64
    assert (tmp_path / "demo" / "model.onnx").is_file()
    assert (tmp_path / "demo" / "train" / "weights" / "best.safetensors").is_file()
    # One postprocess path for both backends: the same detections, so the same mAP.
    assert result.onnx_map50_95 == pytest.approx(result.torch_map50_95, abs=1e-3)
    assert result.onnx_map50 == pytest.approx(result.torch_map50, abs=1e-3)


def test_demo_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "demo" / "train" / "weights").mkdir(parents=True)
    (tmp_path / "demo" / "train" / "weights" / "last.pt").write_bytes(b"x")
    # --log-level warning: without the INFO progress log (the generated dataset) only the error remains.
    out = CliRunner().invoke(cli, ["--log-level", "warning", "demo", "--train", "--output", str(tmp_path / "demo"),
                                   "--img-size", "64", "--epochs", "1"])
    assert out.exit_code == 1
    assert out.output.count("\n") == 1 and out.output.startswith("error: ")


def test_demo_default_quantizes_the_committed_checkpoint_on_the_embedded_sample(tmp_path):
    out = CliRunner().invoke(cli, ["--log-level", "warning", "demo", "--output", str(tmp_path / "demo"),
                                   "--img-size", "128"])
    assert out.exit_code == 0, out.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["model"]["path"].endswith("yolov6n_bccd.safetensors")
    assert summary["data"]["path"].endswith("bccd_sample.yaml") and summary["fp32"]["num_images"] == 48
    assert f"| FP32 | {100 * summary['fp32']['map50_95']:.2f} |" in out.output
    assert "Float layers (" in out.output and "INT8 vs FP32 throughput" in out.output


def test_train_cli_reports_bad_override_in_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: yolov6n\nimg_size: 64\n")
    out = CliRunner().invoke(cli, ["train", str(recipe), "--set", "imgsz=96"])
    assert out.exit_code == 1
    assert out.output.strip() == "error: TrainConfig: unknown field 'imgsz' (did you mean 'img_size'?)"
