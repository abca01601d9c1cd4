"""The committed BCCD checkpoints reproduce the mAP recorded in their metadata, from torch and from ONNX.

The metadata mAP was measured by benchmarks/publish_checkpoint.py after the fp16 round trip, with the
same evaluation settings, so the tolerance only absorbs float differences between backends.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from repquant.checkpoint import load_checkpoint, load_model
from repquant.deploy.onnx_export import export_onnx
from repquant.tasks import evaluate
from repquant.tasks.config import EvalConfig

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = sorted(p for p in (ROOT / "benchmarks" / "checkpoints").glob("*_bccd*.safetensors")
                     if not p.name.endswith(".scales.safetensors"))
BCCD = ROOT.parent / "shared" / "data" / "bccd"
DATA_YAML = ROOT / "recipes" / "data" / "bccd.yaml"

pytestmark = pytest.mark.skipif(not BCCD.is_dir(), reason="../shared/data/bccd is not present")


def test_checkpoints_are_committed():
    assert CHECKPOINTS, "benchmarks/checkpoints/*_bccd.safetensors missing"


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=lambda p: p.stem)
def test_eval_reproduces_recorded_map_from_torch_and_onnx(ckpt: Path, tmp_path: Path):
    _, meta = load_checkpoint(ckpt)
    img_size = int(meta["img_size"])
    torch_result = evaluate.run(EvalConfig(str(ckpt), DATA_YAML, img_size=img_size), progress=False).result
    assert torch_result.map50_95 == pytest.approx(meta["map50_95"], abs=0.002)
    assert torch_result.map50 == pytest.approx(meta["map50"], abs=0.002)
    onnx_path = export_onnx(load_model(ckpt), tmp_path / "m.onnx", img_size=img_size, dynamic_batch=True)
    onnx_result = evaluate.run(EvalConfig(str(onnx_path), DATA_YAML), progress=False).result
    assert onnx_result.map50_95 == pytest.approx(meta["map50_95"], abs=0.002)
    assert onnx_result.map50 == pytest.approx(meta["map50"], abs=0.002)


REPOPT_CHECKPOINTS = [p for p in CHECKPOINTS if p.stem.endswith("_repopt")]


def test_repopt_checkpoints_are_committed():
    expected = {"yolov6n_bccd_repopt", "yolov6s_bccd_repopt", "yolov6s-v2_bccd_repopt"}
    assert {p.stem for p in REPOPT_CHECKPOINTS} >= expected


@pytest.mark.parametrize("ckpt", REPOPT_CHECKPOINTS, ids=lambda p: p.stem)
def test_repopt_checkpoint_matches_its_committed_scales(ckpt: Path, monkeypatch):
    """A RepOpt checkpoint was trained with the committed scales file its recipe names (QAT finds it there)."""
    from repquant.train.repopt import load_scales, matched_blocks

    _, meta = load_checkpoint(ckpt)
    scales_path = meta["recipe"]["repopt_scales"]
    assert meta["repquant_config"]["block_mode"] == "repopt"
    assert scales_path == f"benchmarks/checkpoints/{ckpt.stem}.scales.safetensors"
    scales, variant = load_scales(ROOT / scales_path)
    assert variant == meta["repquant_config"]["name"]
    assert len(matched_blocks(load_model(ckpt), scales, scales_path)) == 35
    from repquant.deploy.resolve import open_model
    from repquant.tasks.qat import _recipe_scales_path

    monkeypatch.chdir(ROOT)  # recipe paths are relative to the directory the run started in
    assert _recipe_scales_path(open_model(str(ckpt))) == scales_path  # what `repquant qat` uses by default
