"""The whole chain on an official YOLOv6 .pt through the CLI (eval, sensitivity, ptq, qat, export, convert),
and fine-tuning from official weights (train --weights): what loads, what is re-initialised."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from repquant.cli import cli
from repquant.data import load_data_config, make_synthetic_dataset
from repquant.models import create_model

OFFICIAL_N = Path(__file__).resolve().parents[2] / "shared" / "data" / "yolov6-official" / "yolov6n_official.pt"
pytestmark = pytest.mark.skipif(not OFFICIAL_N.is_file(), reason="../shared/data/yolov6-official is not present")


@pytest.fixture(scope="module")
def data3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3-class dataset: the official fixtures are 3-class (BCCD) models."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("official_data"), num_train=6, num_val=2,
                                  img_size=(64, 64), num_classes=3, seed=0)


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["--log-level", "warning", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_eval_export_and_convert(data3: Path, tmp_path: Path) -> None:
    report = json.loads(_run("eval", "--model", str(OFFICIAL_N), "--data", str(data3), "--img-size", "64", "--json"))
    assert report["num_images"] == 2 and report["backend"] == "torch"
    onnx_path = tmp_path / "n.onnx"
    _run("export", "--model", str(OFFICIAL_N), "--img-size", "64", "--output", str(onnx_path))
    onnx.checker.check_model(onnx.load(str(onnx_path)))
    converted = tmp_path / "n.safetensors"
    assert "yolov6n (repvgg), 0.4.0 naming" in _run("convert", str(OFFICIAL_N), "-o", str(converted))
    from repquant.checkpoint import read_checkpoint_metadata

    source = read_checkpoint_metadata(converted)["source"]
    assert source["sha256"].startswith("1fe180c56bbb2a0c") and source["naming"] == "0.4.0"


def test_sensitivity_ptq_qat_on_an_official_file(data3: Path, tmp_path: Path) -> None:
    calib = ["--calib-images", "4", "--img-size", "64"]
    _run("sensitivity", "--model", str(OFFICIAL_N), "--data", str(data3), *calib, "--isolated-images", "2",
         "--output", str(tmp_path / "sens"))
    ranking = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())["rankings"]["isolated"]["mse"]
    ptq_out = _run("ptq", "--model", str(OFFICIAL_N), "--data", str(data3), *calib, "--keep-float", "6",
                   "--sensitivity", str(tmp_path / "sens" / "sensitivity.json"), "--output", str(tmp_path / "q.onnx"))
    assert ", ".join(ranking[:6]) in ptq_out
    qat = tmp_path / "qat.safetensors"
    _run("qat", "--model", str(OFFICIAL_N), "--data", str(data3), *calib, "--keep-float", "1", "--epochs", "1",
         "--batch-size", "4", "--device", "cpu", "--cw-distill", "--output", str(qat))
    assert qat.is_file()


def _load_counts(weights: Path, nc: int) -> tuple[int, int, int]:
    from repquant.train.pretrained import load_pretrained

    report = load_pretrained(create_model("yolov6n", num_classes=nc), weights)
    return len(report.loaded), len(report.reinitialized), len(report.skipped)


def test_fine_tuning_loads_every_tensor_or_reinitialises_exactly_the_class_predictions() -> None:
    bccd = Path(__file__).resolve().parents[1] / "recipes" / "data" / "bccd.yaml"
    assert load_data_config(bccd).nc == 3  # BCCD, as the official fixture
    total = len(create_model("yolov6n", num_classes=3).state_dict())
    assert _load_counts(OFFICIAL_N, 3) == (total, 0, 0)
    assert _load_counts(OFFICIAL_N, 5) == (total - 6, 6, 0)  # cls_preds.{0,1,2}.{weight,bias}


def test_train_with_official_weights_through_the_cli(tmp_path: Path) -> None:
    data5 = make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=2, img_size=(64, 64), num_classes=5,
                                   seed=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: yolov6n\ndata: {data5}\nimg_size: 64\nepochs: 1\nbatch_size: 4\nworkers: 0\n"
                      f"device: cpu\noutput_dir: {tmp_path / 'run'}\n")
    result = CliRunner().invoke(cli, ["train", str(recipe), "--weights", str(OFFICIAL_N)])
    assert result.exit_code == 0, result.output
    assert "loaded 748 tensors, re-initialised 6 (class predictions), skipped 0" in result.output
    assert (tmp_path / "run" / "weights" / "last.pt").is_file()
