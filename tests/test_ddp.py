"""DDP through torchrun: two CPU processes (gloo) train one epoch on a tiny synthetic dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from repquant.data import make_synthetic_dataset
from repquant.io import torch_load_weights_only
from repquant.train.ddp import DistInfo, init_distributed

ROOT = Path(__file__).resolve().parents[1]


def test_without_torchrun_is_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info, device = init_distributed("cpu")
    assert info == DistInfo(0, 0, 1) and info.is_main and not info.distributed
    assert device.type == "cpu"


def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=2, img_size=(64, 64), seed=0)
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(
        f"model: yolov6n\ndata: {data}\nimg_size: 64\nepochs: 1\nbatch_size: 4\nnominal_batch: 4\n"
        f"workers: 0\ndevice: cpu\nmin_warmup_iters: 1\nclose_mosaic_epochs: 0\n"
        f"output_dir: {tmp_path / 'run'}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "repquant.train.ddp", str(recipe)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "DDP rank 0/2" in log and "DDP rank 1/2" in log
    state = torch_load_weights_only(tmp_path / "run" / "weights" / "last.pt")
    assert state["epoch"] == 0 and len(state["history"]) == 1 and "map50_95" in state["history"][0]
    # one global batch of 4 = 2 per process: one optimizer step, one EMA update (rank 0 only)
    assert state["last_opt_step"] == 0 and state["ema"]["updates"] == 1
    assert (tmp_path / "run" / "weights" / "best.safetensors").is_file()
