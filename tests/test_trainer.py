"""Trainer: overfitting a fixed batch, LR schedule inside the loop, determinism, and SIGKILL + resume.

Training runs go through a subprocess (one thread) so that the runs compared bit for bit share the
same environment, and so that one of them can be SIGKILLed mid-epoch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from repquant.checkpoint import load_model
from repquant.data import make_synthetic_dataset
from repquant.errors import CheckpointError, RepquantError
from repquant.io import torch_load_weights_only
from repquant.train.config import DistillConfig, TrainConfig
from repquant.train.fit import make_trainer, train
from repquant.train.schedule import cosine_lr_factor
from repquant.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCH, NUM_TRAIN = 2, 2, 4
RUN_SETTINGS = dict(
    model="yolov6n",
    img_size=64,
    epochs=EPOCHS,
    batch_size=BATCH,
    nominal_batch=4,
    workers=0,
    device="cpu",
    warmup_epochs=1.0,
    min_warmup_iters=2,
    eval_interval=1,
    close_mosaic_epochs=1,
    seed=3,
)

RUNNER = r"""
import json, shutil, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from repquant.train.config import DistillConfig, TrainConfig
from repquant.train.fit import train

args = json.loads(sys.argv[1])
settings = dict(args["settings"], data=Path(args["data"]), output_dir=Path(args["out"]))
record = {"start_epoch": None, "lrs": [], "mosaic": []}

def on_train_start(t):
    record["start_epoch"] = t.state.epoch + 1

def on_epoch_start(t):
    record["mosaic"].append(t.train_set.mosaic_enabled)

def on_batch_end(t):
    groups = t.parts.optimizer.param_groups
    record["lrs"].append([t.epoch, t.step + t.iters_per_epoch * t.epoch, t.warmup_iters]
                         + [g["lr"] for g in groups] + [groups[0]["momentum"]])
    if args.get("block_epoch") == t.epoch:
        Path(args["marker"]).write_text("blocked")
        time.sleep(600)

def on_epoch_end(t):
    shutil.copy(t.state_path, t.state_path.with_name(f"epoch{t.epoch}.pt"))

result = train(TrainConfig(**settings), resume=args["resume"],
               callbacks={"on_train_start": on_train_start, "on_epoch_start": on_epoch_start,
                          "on_batch_end": on_batch_end, "on_epoch_end": on_epoch_end})
record.update(best=str(result.best_checkpoint), final=result.final_metrics, epochs_run=result.epochs_run)
print("RESULT " + json.dumps(record))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(
    tmp: Path, data: Path, out: Path, resume: bool = False, block_epoch: int | None = None
) -> dict | None:
    """Run training in a subprocess; with ``block_epoch`` SIGKILL it inside that epoch and return None."""
    script = tmp / "runner.py"
    script.write_text(RUNNER)
    marker = tmp / f"{out.name}.blocked"
    args = {
        "settings": RUN_SETTINGS,
        "data": str(data),
        "out": str(out),
        "resume": resume,
        "block_epoch": block_epoch,
        "marker": str(marker),
    }
    cmd = [sys.executable, str(script), json.dumps(args)]
    if block_epoch is None:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        return json.loads(line.removeprefix("RESULT "))
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while not marker.exists():
        assert proc.poll() is None, f"training exited early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "training never reached the blocking hook"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return None


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(
        root, num_train=NUM_TRAIN, num_val=2, img_size=(64, 64), num_classes=3, seed=0
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_yaml: Path) -> dict:
    """An uninterrupted run, and a run killed in epoch 1 then resumed, same seed."""
    tmp = tmp_path_factory.mktemp("runs")
    full = _run(tmp, data_yaml, tmp / "full")
    assert _run(tmp, data_yaml, tmp / "killed", block_epoch=1) is None
    killed_state = torch_load_weights_only(tmp / "killed" / "weights" / "last.pt")
    resumed = _run(tmp, data_yaml, tmp / "killed", resume=True)
    return {"tmp": tmp, "full": full, "resumed": resumed, "killed_state": killed_state}


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and a["last_opt_step"] == b["last_opt_step"]
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["ema"]["ema"], b["ema"]["ema"], "ema")
    assert a["ema"]["updates"] == b["ema"]["updates"]
    moments_a = {str(k): v["momentum_buffer"] for k, v in a["optimizers"][0]["state"].items()}
    moments_b = {str(k): v["momentum_buffer"] for k, v in b["optimizers"][0]["state"].items()}
    _assert_same_tensors(moments_a, moments_b, "optimizer momentum")
    assert a["history"] == b["history"]


def test_overfits_a_fixed_batch() -> None:
    """A few dozen SGD steps on one batch must cut the detection loss well down (the loop can learn)."""
    from repquant.models import create_model
    from repquant.train.losses import ComputeLoss
    from repquant.train.schedule import build_optimizer

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared CI cores are oversubscribed; one thread is faster here
    model = create_model("yolov6n", num_classes=3).train()
    images = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 1, 4, 4, 30, 30], [1, 0, 10, 10, 50, 40], [1, 2, 0, 0, 20, 60.0]])
    loss_fn = ComputeLoss(3, 0, (8, 16, 32), "siou", warmup_epoch=0)
    optimizer = build_optimizer(model, lr0=0.01, momentum=0.9, weight_decay=5e-4)
    losses = []
    try:
        for _ in range(24):
            loss, _ = loss_fn(model(images), targets, (64, 64), epoch=0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert min(losses[-4:]) < 0.7 * losses[0], losses


def test_same_seed_gives_identical_weights(runs: dict) -> None:
    """Two runs with one seed (the killed one had completed epoch 0) agree bit for bit after epoch 0."""
    full_epoch0 = torch_load_weights_only(runs["tmp"] / "full" / "weights" / "epoch0.pt")
    assert runs["killed_state"]["epoch"] == 0
    _assert_same_state(full_epoch0, runs["killed_state"])


def test_sigkill_then_resume_continues_and_matches(runs: dict) -> None:
    full, resumed = runs["full"], runs["resumed"]
    assert full["start_epoch"] == 0 and resumed["start_epoch"] == 1
    # close_mosaic_epochs=1: mosaic only in epoch 0, also when the run resumes into the last epoch
    assert full["mosaic"] == [True, False] and resumed["mosaic"] == [False]
    assert resumed["epochs_run"] == EPOCHS - 1
    weights = runs["tmp"] / "killed" / "weights"
    final = torch_load_weights_only(weights / "last.pt")
    assert final["epoch"] == EPOCHS - 1 and len(final["history"]) == EPOCHS
    _assert_same_state(torch_load_weights_only(runs["tmp"] / "full" / "weights" / "last.pt"), final)
    assert resumed["final"] == full["final"]
    assert not list(weights.glob("*.tmp")), "a temp file was left behind"
    model = load_model(resumed["best"], expected_name="yolov6n", expected_num_classes=3)
    assert not model.training


def test_lr_and_momentum_follow_the_schedule(runs: dict) -> None:
    lf = cosine_lr_factor(EPOCHS, TrainConfig().lrf)
    lr0, rows = TrainConfig().lr0, runs["full"]["lrs"]
    assert len(rows) == EPOCHS * (NUM_TRAIN // BATCH)
    for epoch, it, warmup, lr_bn, lr_w, lr_b, momentum in rows:
        target = lr0 * lf(epoch)
        if it <= warmup:
            frac = it / warmup
            expected = [frac * target, frac * target, 0.1 + frac * (target - 0.1)]
            exp_momentum = 0.8 + frac * (0.937 - 0.8)
        else:
            expected, exp_momentum = [target] * 3, 0.937
        np.testing.assert_allclose([lr_bn, lr_w, lr_b], expected, rtol=1e-12, err_msg=f"iteration {it}")
        assert momentum == pytest.approx(exp_momentum)


def test_resume_without_checkpoint_and_overwrite_are_refused(tmp_path: Path, data_yaml: Path) -> None:
    config = TrainConfig(**{**RUN_SETTINGS, "data": data_yaml, "output_dir": tmp_path / "run"})
    with pytest.raises(CheckpointError, match="last.pt: no training state to resume from"):
        train(config, resume=True)
    (tmp_path / "run" / "weights").mkdir(parents=True)
    (tmp_path / "run" / "weights" / "last.pt").write_bytes(b"")
    with pytest.raises(RepquantError, match=r"holds a previous run \(weights/last.pt\); pass --exist-ok"):
        train(config)


def test_unknown_hook_is_refused(tmp_path: Path, data_yaml: Path) -> None:
    config = TrainConfig(**{**RUN_SETTINGS, "data": data_yaml, "output_dir": tmp_path / "run"})
    with pytest.raises(RepquantError, match="unknown hook 'on_step_end'"):
        make_trainer(config, callbacks={"on_step_end": print})


def _train_here(config: TrainConfig, callbacks: dict | None = None) -> Trainer:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = make_trainer(config, callbacks=callbacks)
        trainer.run()
        return trainer
    finally:
        torch.set_num_threads(threads)


def _one_epoch(data_yaml: Path, out: Path, **kw: object) -> TrainConfig:
    settings = {**RUN_SETTINGS, "epochs": 1, "batch_size": NUM_TRAIN, "data": data_yaml, "output_dir": out}
    return TrainConfig(**{**settings, **kw})


def test_self_distillation_with_frozen_teacher(runs: dict, data_yaml: Path, tmp_path: Path) -> None:
    teacher_path = Path(runs["resumed"]["best"])
    config = _one_epoch(data_yaml, tmp_path / "distill", distill=DistillConfig(teacher=teacher_path))
    seen = []

    def on_batch_end(t: Trainer) -> None:
        teacher = t.parts.loss_fn.teacher
        frozen = not any(p.requires_grad for p in teacher.parameters())
        seen.append((dict(t.loss_items), teacher.training, frozen))

    trainer = _train_here(config, {"on_batch_end": on_batch_end})
    items, teacher_training, frozen = seen[0]
    assert items["distill"] > 0 and not teacher_training and frozen
    assert items["total"] == pytest.approx(items["cls"] + items["iou"] + items["dfl"] + items["distill"])
    reference = load_model(teacher_path).state_dict()
    _assert_same_tensors(reference, trainer.parts.loss_fn.teacher.state_dict(), "teacher")  # BN statistics untouched


def test_repopt_hyper_search_then_repopt(data_yaml: Path, tmp_path: Path) -> None:
    from repquant.train.repopt import RepOptimizer, load_scales

    search = _train_here(_one_epoch(data_yaml, tmp_path / "search", block_mode="hyper_search"))
    scales_path = search.parts.save_best.scales_path
    scales, name = load_scales(scales_path)
    assert name == "yolov6n" and scales
    trainer = _train_here(_one_epoch(data_yaml, tmp_path / "repopt", block_mode="repopt", repopt_scales=scales_path))
    assert isinstance(trainer.parts.optimizer, RepOptimizer) and trainer.parts.optimizer.grad_masks
    assert math.isfinite(trainer.state.history[-1]["total"])


def test_truncated_state_is_a_checkpoint_error(tmp_path: Path, data_yaml: Path) -> None:
    config = TrainConfig(**{**RUN_SETTINGS, "data": data_yaml, "output_dir": tmp_path / "run"})
    (tmp_path / "run" / "weights").mkdir(parents=True)
    (tmp_path / "run" / "weights" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="last.pt: unreadable training state"):
        train(config, resume=True)


def test_cli_hyper_search_then_train_repopt(data_yaml: Path, tmp_path: Path) -> None:
    """The two RepOpt commands end to end, as a user runs them (the CLI hands train-repopt a Path)."""
    import yaml

    settings = {**RUN_SETTINGS, "epochs": 1, "batch_size": NUM_TRAIN, "data": str(data_yaml)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(settings))
    search_dir, repopt_dir = tmp_path / "hs", tmp_path / "ro"
    threads = torch.get_num_threads()  # --threads 1 sets it for the whole test process
    try:
        _cli_hyper_search_then_train_repopt(recipe, search_dir, repopt_dir)
    finally:
        torch.set_num_threads(threads)


def _cli_hyper_search_then_train_repopt(recipe: Path, search_dir: Path, repopt_dir: Path) -> None:
    from click.testing import CliRunner

    from repquant.cli import cli
    from repquant.io import read_safetensors_metadata

    res = CliRunner().invoke(cli, ["--threads", "1", "hyper-search", str(recipe), "--set", f"output_dir={search_dir}"])
    assert res.exit_code == 0, res.output
    scales = search_dir / "weights" / "scales.safetensors"
    assert scales.is_file()
    res = CliRunner().invoke(cli, ["--threads", "1", "train-repopt", str(recipe), "--scales", str(scales),
                                   "--set", f"output_dir={repopt_dir}"])
    assert res.exit_code == 0, res.output
    metadata = read_safetensors_metadata(repopt_dir / "weights" / "best.safetensors")
    assert json.loads(metadata["repquant_config"])["block_mode"] == "repopt"
    assert json.loads(metadata["recipe"])["repopt_scales"] == str(scales)
