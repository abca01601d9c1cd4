"""Partial QAT (`repquant qat`): one epoch on a tiny model and tiny data, the checkpoint round trip,
frozen quantizer scales, the QDQ export that matches PTQ's, resume, and DDP under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (extra 'quant') not installed")

from repquant.checkpoint import load_model, save_checkpoint  # noqa: E402
from repquant.cli import cli  # noqa: E402
from repquant.deploy.qdq import qdq_parity  # noqa: E402
from repquant.errors import CheckpointError  # noqa: E402
from repquant.io import torch_load_weights_only  # noqa: E402
from repquant.models import create_model  # noqa: E402
from repquant.quant.checkpoint import load_quantized_model  # noqa: E402
from repquant.quant.config import QuantConfig  # noqa: E402
from repquant.quant.sensitivity import quantized_copy  # noqa: E402
from repquant.tasks import qat  # noqa: E402
from repquant.tasks.config import QATConfig, SensitivityConfig  # noqa: E402
from repquant.tasks.inputs import load_quant_inputs  # noqa: E402


def qat_train(config: QATConfig, resume: bool = False, progress: bool = False) -> qat.QATResult:
    return qat.run(config, resume=resume, progress=progress)


def load_for_quantization(model: str, data: Path, calib_images: int, img_size: int):
    inputs = load_quant_inputs(SensitivityConfig(model, data, calib_images=calib_images, img_size=img_size))
    return inputs.model, inputs.data, inputs.batches, inputs.calibration

ROOT = Path(__file__).resolve().parents[1]
KEEP = "neck.Rep_p3.conv1.rbr_reparam"
QAT_ARGS = ["--keep-float", "1", "--cw-distill", "--kd-cls", "--epochs", "1", "--batch-size", "4", "--img-size", "64",
            "--calib-images", "4", "--lr", "0.01", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_yaml(tiny_data_yaml: Path) -> Path:
    return tiny_data_yaml


@pytest.fixture(scope="module")
def start(data_yaml: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A float checkpoint with non-zero prediction weights (YOLOv6 zero-initialises them) and a ranking."""
    tmp = tmp_path_factory.mktemp("qat_start")
    torch.manual_seed(0)
    model = create_model("yolov6n", num_classes=2)
    with torch.no_grad():
        for conv in [*model.head.cls_preds, *model.head.reg_preds]:
            conv.weight.normal_(0.0, 0.05)
    checkpoint = save_checkpoint(tmp / "float.safetensors", model)
    ranking = tmp / "sensitivity.json"
    ranking.write_text(json.dumps({"rankings": {"isolated": {"mse": [KEEP, "backbone.stem.rbr_reparam"]}}}))
    return checkpoint, ranking


@pytest.fixture(scope="module")
def qat_run(data_yaml: Path, start: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    checkpoint, ranking = start
    out = tmp_path_factory.mktemp("qat_run") / "qat.safetensors"
    res = CliRunner().invoke(cli, ["qat", "--model", str(checkpoint), "--data", str(data_yaml), "--sensitivity",
                                   str(ranking), *QAT_ARGS, "--output", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_one_epoch_logs_every_loss_component(qat_run) -> None:
    out, output = qat_run
    assert "epoch 0: fake-quant mAP@.5:.95" in output and f"float: {KEEP}" in output
    for term in ("cls", "iou", "dfl", "cwd", "kd_cls", "total"):
        assert f"{term} " in output
    state = torch_load_weights_only(Path(f"{out}.state.pt"))
    assert state["epoch"] == 0 and state["identity"]["keep_float_layers"] == [KEEP]
    assert state["history"][0]["cwd"] > 0.0


def test_checkpoint_round_trip_trains_weights_and_freezes_scales(qat_run, data_yaml: Path, start) -> None:
    out, _ = qat_run
    qmodel, info = load_quantized_model(out)
    assert info["keep_float_layers"] == [KEEP] and info["layout"] == "tensorrt"
    model, _, batches, _ = load_for_quantization(str(start[0]), data_yaml, 4, 64)
    ptq, _ = quantized_copy(model, batches, QuantConfig(num_calib_images=4, keep_float_layers=(KEEP,)))
    trained, calibrated = qmodel.state_dict(), ptq.state_dict()
    assert trained.keys() == calibrated.keys()
    amax = [k for k in trained if k.endswith("_amax")]
    assert amax and all(torch.equal(trained[k], calibrated[k]) for k in amax)  # scales frozen
    weights = [k for k in trained if k.endswith(".weight")]
    assert any(not torch.equal(trained[k], calibrated[k]) for k in weights)  # weights trained
    assert not dict(qmodel.named_modules())[KEEP].input_quantizer.is_enabled


def test_export_writes_the_ptq_graph_and_matches_torch(qat_run, data_yaml: Path, tmp_path: Path) -> None:
    out, _ = qat_run
    onnx_path = tmp_path / "qat.onnx"
    res = CliRunner().invoke(cli, ["export", "--model", str(out), "--img-size", "64", "--dynamic-batch",
                                   "--output", str(onnx_path)])
    assert res.exit_code == 0, res.output
    proto = onnx.load(str(onnx_path))
    # Weights are stored as INT8 initializers read by a DequantizeLinear (no QuantizeLinear of their own).
    quantized_weights = {n.input[0].removesuffix("_quantized") for n in proto.graph.node
                         if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_quantized")}
    assert f"model.{KEEP}.weight" not in quantized_weights and len(quantized_weights) > 50
    qmodel, _ = load_quantized_model(out)
    counts = Counter(n.op_type for n in proto.graph.node)
    assert counts["QuantizeLinear"] == len(quantized_weights) + 3
    assert counts["DequantizeLinear"] == 2 * len(quantized_weights) + 3
    _, _, batches, _ = load_for_quantization("yolov6n", data_yaml, 4, 64)
    parity = qdq_parity(qmodel, onnx_path, torch.cat(batches))
    assert parity.exact(), parity


def test_float_commands_name_a_quantized_checkpoint(qat_run, start) -> None:
    out, _ = qat_run
    with pytest.raises(CheckpointError, match="a quantized \\(QAT\\) checkpoint"):
        load_model(out)
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized_model(start[0])


def test_resume_continues_and_refuses_to_overwrite(data_yaml: Path, start, tmp_path: Path) -> None:
    checkpoint, ranking = start
    base = dict(model=str(checkpoint), data=str(data_yaml), output=str(tmp_path / "q.safetensors"), keep_float=1,
                sensitivity_json=str(ranking), batch_size=4, img_size=64, calib_images=4, device="cpu")
    first = qat_train(QATConfig(**base, epochs=1), progress=False)
    assert [int(r["epoch"]) for r in first.history] == [0]
    with pytest.raises(CheckpointError, match="already there; resume it"):
        qat_train(QATConfig(**base, epochs=2), progress=False)
    resumed = qat_train(QATConfig(**base, epochs=2), resume=True, progress=False)
    assert [int(r["epoch"]) for r in resumed.history] == [0, 1]


def test_torchrun_two_processes_gloo(data_yaml: Path, start, tmp_path: Path) -> None:
    checkpoint, ranking = start
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "repquant.cli", "qat", "--model", str(checkpoint), "--data", str(data_yaml), "--sensitivity", str(ranking),
           *QAT_ARGS, "--learn-scales", "--output", str(out)]  # learned scales: all-reduced outside DDP
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "DDP rank 0/2" in log and "DDP rank 1/2" in log
    state = torch_load_weights_only(Path(f"{out}.state.pt"))
    assert state["epoch"] == 0 and len(state["history"]) == 1
    assert state["history"][0]["scale_mean_abs_log_ratio"] > 0.0 and state["extra"]["scales"] is not None
    assert load_quantized_model(out)[1]["keep_float_layers"] == [KEEP]


def test_bad_settings_are_one_line_errors(data_yaml: Path, tmp_path: Path) -> None:
    from repquant.errors import RecipeError

    with pytest.raises(RecipeError, match="qat: keep_float must be >= 0, got -1; layout must be one of"):
        QATConfig(model="yolov6n", data=str(data_yaml), output="x.safetensors", keep_float=-1, layout="onnx")
    missing = tmp_path / "never.safetensors"
    with pytest.raises(CheckpointError, match="never.safetensors.state.pt: no QAT state to resume from"):
        qat_train(QATConfig(model="yolov6n", data=str(data_yaml), output=str(missing), img_size=64), resume=True)
    res = CliRunner().invoke(cli, ["qat", "--model", "yolov6n", "--data", str(data_yaml), "--output", "qat.ckpt"])
    assert res.exit_code == 2 and "must end in .safetensors" in res.output
