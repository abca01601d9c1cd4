"""The ``repquant`` command line: info, export, list-models, error reporting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from repquant.cli import cli
from repquant.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_info_json(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["info", "--model", "yolov6s", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"params", "gflops", "img_size", "num_layers"} <= set(data)
    assert data["model"] == "yolov6s" and data["num_classes"] == 80 and data["img_size"] == 640
    # Official YOLOv6-S v3.0 (README): 18.5 M parameters, 45.3 GFLOPs at 640 (deployed).
    assert abs(data["params"] / 1e6 - 18.5) < 0.1
    assert abs(data["gflops"] - 45.3) / 45.3 < 0.02
    assert isinstance(data["num_layers"], int) and data["num_layers"] > 0


def test_info_table_and_img_size(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["info", "--model", "yolov6n", "--img-size", "320", "--num-classes", "3"])
    assert result.exit_code == 0, result.output
    rows = dict(line.split(maxsplit=1) for line in result.stdout.splitlines())
    assert rows["model"] == "yolov6n" and rows["img_size"] == "320" and rows["num_classes"] == "3"


def test_bad_model_name_is_one_line_exit_1(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["info", "--model", "yolov6x"])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unknown model 'yolov6x'; valid names: ")
    for name in ("yolov6n", "yolov6s", "yolov6m", "yolov6l"):
        assert name in lines[0]


def test_debug_env_reraises(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["info", "--model", "yolov6x"], env={"REPQUANT_DEBUG": "1"})
    assert isinstance(result.exception, ModelError)
    result = runner.invoke(cli, ["--debug", "info", "--model", "yolov6x"])
    assert isinstance(result.exception, ModelError)


def test_missing_checkpoint_and_bad_size(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "best.safetensors"
    result = runner.invoke(cli, ["export", "--model", str(missing), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1
    assert result.stderr == f"error: {missing}: no such model file\n"
    result = runner.invoke(cli, ["info", "--model", "yolov6n", "--img-size", "100"])
    assert result.exit_code == 2  # usage error, click's convention
    assert "multiple of 32" in result.stderr


def test_list_models(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["list-models"])
    assert result.exit_code == 0
    names = result.stdout.split()
    assert {"yolov6n", "yolov6s", "yolov6m", "yolov6l", "yolov6n-v2"} <= set(names)
    assert json.loads(runner.invoke(cli, ["list-models", "--json"]).stdout) == names


def test_export_from_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    from repquant.checkpoint import save_checkpoint
    from repquant.deploy.backends.ort import OrtDetector
    from repquant.models import create_model

    ckpt = save_checkpoint(tmp_path / "best.safetensors", create_model("yolov6n", num_classes=2))
    out = tmp_path / "out" / "n.onnx"
    args = ["export", "--model", str(ckpt), "-o", str(out), "--img-size", "64", "--dynamic-batch"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out} (")
    detector = OrtDetector(out)
    assert detector.img_size == (64, 64) and detector.num_classes == 2 and detector.batch_size is None
    result = runner.invoke(cli, [*args, "--num-classes", "80", "--overwrite"])
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"error: {ckpt}: checkpoint is yolov6n (num_classes 2), expected num_classes 80"
    )


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from repquant.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print([m for m in ('torch', 'onnx', 'onnxruntime', 'modelopt') if m in sys.modules])\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "Commands:" in proc.stdout and "export" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "repquant", "info", "--model", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: unknown model 'nope'") and proc.stderr.count("\n") == 1
