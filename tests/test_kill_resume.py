"""``repquant sensitivity`` and ``repquant qat`` survive SIGKILL: each is killed three times at different
moments (during start-up, mid-way, near the end), resumed with ``--resume``, and must end with the same
results as an uninterrupted run, leaving no unreadable file behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from repquant.checkpoint import save_checkpoint
from repquant.data import make_synthetic_dataset
from repquant.io import read_safetensors
from repquant.models import create_model

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "repquant", "--log-level", "warning", *args]


def _run(args: list[str]) -> None:
    proc = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_when(args: list[str], ready: Callable[[], bool], delay_s: float = 0.0) -> None:
    """Start the command, SIGKILL it ``delay_s`` after ``ready()`` holds (it must not finish first)."""
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "never reached the kill point"
        time.sleep(0.05)
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the command ended before it could be killed"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill")
    data = make_synthetic_dataset(root / "data", num_train=16, num_val=2, img_size=(64, 64), num_classes=2, seed=0)
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "n.safetensors", create_model("yolov6n", num_classes=2),
                           extra_metadata={"img_size": 64})
    return {"root": root, "data": data, "ckpt": ckpt}


# --- sensitivity ------------------------------------------------------------------------------------------

def _sensitivity_args(inputs: dict[str, Path], out: Path) -> list[str]:
    return ["sensitivity", "--model", str(inputs["ckpt"]), "--data", str(inputs["data"]), "--img-size", "64",
            "--calib-images", "16", "--batch-size", "2", "--isolated-images", "0", "-o", str(out)]


def _batches_done(out: Path) -> int:
    try:
        return int(json.loads((out / "sensitivity.progress.json").read_text())["batches_done"])
    except (OSError, ValueError, KeyError):
        return 0


def _comparable(path: Path) -> dict:
    doc = json.loads(path.read_text())
    for key in ("wall_time_s", "timings_s"):  # wall-clock facts of each run
        doc.pop(key)
    return doc


def test_sensitivity_killed_three_times_ends_like_an_uninterrupted_run(inputs: dict[str, Path]) -> None:
    full, killed = inputs["root"] / "sens_full", inputs["root"] / "sens_killed"
    _run(_sensitivity_args(inputs, full))
    args = _sensitivity_args(inputs, killed)
    _kill_when(args, lambda: _batches_done(killed) >= 2)
    first = _batches_done(killed)
    _kill_when([*args, "--resume"], lambda: True, delay_s=1.0)  # during start-up (imports, calibration)
    assert _batches_done(killed) >= first  # the progress file survived, readable
    _kill_when([*args, "--resume"], lambda: _batches_done(killed) >= first + 2)
    assert 0 < _batches_done(killed) < 8 and not (killed / "sensitivity.json").exists()
    _run([*args, "--resume"])
    assert _comparable(killed / "sensitivity.json") == _comparable(full / "sensitivity.json")
    assert not (killed / "sensitivity.progress.json").exists()


def test_an_interrupted_sweep_is_not_restarted_silently(inputs: dict[str, Path]) -> None:
    out = inputs["root"] / "sens_refuse"
    args = _sensitivity_args(inputs, out)
    _kill_when(args, lambda: _batches_done(out) >= 1)
    proc = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 1 and "--resume" in proc.stderr and proc.stderr.count("\n") == 1


# --- QAT --------------------------------------------------------------------------------------------------

def _qat_args(inputs: dict[str, Path], out: Path) -> list[str]:
    return ["qat", "--model", str(inputs["ckpt"]), "--data", str(inputs["data"]), "--img-size", "64",
            "--calib-images", "4", "--keep-float", "1", "--mode", "local", "--epochs", "3", "--batch-size", "4",
            "--cw-distill", "--workers", "0", "--device", "cpu", "-o", str(out)]


def _state_epoch(out: Path) -> int:
    from repquant.io import torch_load_weights_only

    state = Path(f"{out}.state.pt")
    try:
        return int(torch_load_weights_only(state)["epoch"])  # type: ignore[index]
    except Exception:  # not written yet, or being replaced
        return -1


def test_qat_killed_three_times_ends_bit_identical(inputs: dict[str, Path]) -> None:
    full, killed = inputs["root"] / "qat_full.safetensors", inputs["root"] / "qat_killed.safetensors"
    _run(_qat_args(inputs, full))
    args = _qat_args(inputs, killed)
    _kill_when(args, lambda: _state_epoch(killed) >= 0, delay_s=0.5)  # mid epoch 2
    _kill_when([*args, "--resume"], lambda: True, delay_s=1.0)  # during start-up
    assert _state_epoch(killed) >= 0  # the state survived the kills, readable
    _kill_when([*args, "--resume"], lambda: _state_epoch(killed) >= 1, delay_s=0.5)  # mid epoch 3
    _run([*args, "--resume"])
    ours, _ = read_safetensors(killed)
    theirs, _ = read_safetensors(full)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
