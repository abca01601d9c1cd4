"""Schedule, optimizer groups, EMA and training config: known values from YOLOv6's formulas."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from repquant.errors import RecipeError
from repquant.train.config import DistillConfig, TrainConfig, load_train_config
from repquant.train.ema import ModelEMA
from repquant.train.schedule import (
    accumulate_at,
    accumulate_steps,
    apply_warmup,
    build_optimizer,
    cosine_decay,
    cosine_lr_factor,
    param_groups,
    scaled_weight_decay,
    set_epoch_lr,
    warmup_iterations,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _toy() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2, 1)
    )


# --- learning rate ---------------------------------------------------------------------------------


def test_cosine_lr_factor_known_values() -> None:
    lf = cosine_lr_factor(epochs=300, lrf=0.01)
    assert lf(0) == 1.0
    assert lf(300) == pytest.approx(0.01, abs=1e-15)
    assert lf(150) == pytest.approx((1 + 0.01) / 2, abs=1e-15)
    # one quarter: (1 - cos(pi/4)) / 2 = 0.146446..., times (lrf - 1) plus 1
    assert lf(75) == pytest.approx(1 - 0.99 * (1 - math.sqrt(0.5)) / 2, abs=1e-15)
    values = [lf(e) for e in range(301)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_cosine_decay_endpoints() -> None:
    assert cosine_decay(0.0, 0.01) == 1.0
    assert cosine_decay(1.0, 0.01) == pytest.approx(0.01)
    assert cosine_decay(0.5, 0.01) == pytest.approx(0.505)


def test_warmup_length_and_accumulation() -> None:
    assert warmup_iterations(3.0, 13) == 1000  # YOLOv6's 1000-iteration minimum
    assert warmup_iterations(3.0, 500) == 1500
    assert warmup_iterations(3.0, 13, min_iters=10) == 39
    assert accumulate_steps(16) == 4 and accumulate_steps(64) == 1 and accumulate_steps(128) == 1
    assert accumulate_steps(24) == 3  # round(2.67)
    # numpy's round-half-to-even as in YOLOv6: 2.5 -> 2
    its = (0, 166, 167, 500, 501, 1000, 1001, 5000)
    assert [accumulate_at(i, 1000, 16) for i in its] == [1, 1, 2, 2, 3, 4, 4, 4]
    assert scaled_weight_decay(5e-4, 16) == pytest.approx(5e-4)  # 16 * 4 / 64
    assert scaled_weight_decay(5e-4, 48) == pytest.approx(5e-4 * 48 / 64)  # accumulate 1


def test_param_groups_split_like_yolov6() -> None:
    model = _toy()
    bn_w, w, b = param_groups(model)
    assert [id(p) for p in bn_w] == [id(model[1].weight)]
    assert [id(p) for p in w] == [id(model[0].weight), id(model[2].weight), id(model[4].weight)]
    assert [id(p) for p in b] == [id(model[1].bias), id(model[2].bias), id(model[4].bias)]


def test_param_groups_keep_other_trainables_and_skip_frozen() -> None:
    model = _toy()
    model.scale = nn.Parameter(torch.ones(4))  # e.g. a RepOpt scale vector: no weight decay
    model[0].weight.requires_grad_(False)
    bn_w, w, b = param_groups(model)
    assert any(p is model.scale for p in bn_w)
    assert not any(p is model[0].weight for p in bn_w + w + b)
    assert len(bn_w) + len(w) + len(b) == sum(p.requires_grad for p in model.parameters())


def test_optimizer_decay_only_on_weights() -> None:
    opt = build_optimizer(_toy(), lr0=0.01, momentum=0.937, weight_decay=5e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4, 0.0]
    assert all(g["nesterov"] and g["momentum"] == 0.937 and g["initial_lr"] == 0.01 for g in opt.param_groups)


def test_warmup_interpolation_at_known_iterations() -> None:
    opt = build_optimizer(_toy(), lr0=0.01, momentum=0.937, weight_decay=5e-4)
    lf = cosine_lr_factor(100, 0.01)

    def at(it: int, epoch: int) -> tuple[list[float], float]:
        apply_warmup(opt, it, 1000, lf(epoch), warmup_bias_lr=0.1, warmup_momentum=0.8, momentum=0.937)
        return [g["lr"] for g in opt.param_groups], opt.param_groups[0]["momentum"]

    lrs, mom = at(0, 0)
    assert lrs == [0.0, 0.0, 0.1] and mom == pytest.approx(0.8)
    lrs, mom = at(250, 1)  # a quarter of the way, epoch 1: target 0.01 * lf(1)
    target = 0.01 * lf(1)
    assert lrs[0] == pytest.approx(0.25 * target) and lrs[1] == pytest.approx(0.25 * target)
    assert lrs[2] == pytest.approx(0.1 + 0.25 * (target - 0.1))
    assert mom == pytest.approx(0.8 + 0.25 * 0.137)
    lrs, mom = at(1000, 5)
    assert lrs == pytest.approx([0.01 * lf(5)] * 3) and mom == pytest.approx(0.937)
    set_epoch_lr(opt, lf(50))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * 0.505] * 3)


def test_epoch_lr_matches_torch_lambdalr() -> None:
    model = _toy()
    ours = build_optimizer(model, 0.02, 0.937, 5e-4)
    ref = build_optimizer(model, 0.02, 0.937, 5e-4)
    lf = cosine_lr_factor(20, 0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lr_lambda=lf)
    for epoch in range(20):
        set_epoch_lr(ours, lf(epoch))
        assert [g["lr"] for g in ours.param_groups] == pytest.approx([g["lr"] for g in ref.param_groups])
        ref.step()
        sched.step()


# --- EMA -------------------------------------------------------------------------------------------


def test_ema_decay_formula() -> None:
    ema = ModelEMA(_toy())
    assert ema.decay(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema.decay(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema.decay(10**6) == pytest.approx(0.9999)


def test_ema_update_params_and_buffers_exactly() -> None:
    torch.manual_seed(0)
    model = _toy().double()
    ema = ModelEMA(model)
    start = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items()}
    for n in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked.add_(1)
        ema.update(model)
        d = 0.9999 * (1 - math.exp(-n / 2000))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    got = ema.ema.state_dict()
    assert ema.updates == 3
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-15)
    assert got["1.num_batches_tracked"].item() == 3
    assert not torch.equal(got["1.running_mean"], start["1.running_mean"])  # buffers averaged too
    assert all(not p.requires_grad for p in ema.ema.parameters()) and not ema.ema.training


def test_ema_state_roundtrip_weights_only() -> None:
    model = _toy()
    ema = ModelEMA(model)
    for _ in range(5):
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = ModelEMA(_toy())
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.updates == 5
    for (k, a), b in zip(ema.ema.state_dict().items(), other.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# --- config and recipes ----------------------------------------------------------------------------


def test_defaults_are_yolov6() -> None:
    cfg = TrainConfig()
    assert (cfg.lr0, cfg.lrf, cfg.momentum, cfg.weight_decay) == (0.01, 0.01, 0.937, 5e-4)
    assert (cfg.warmup_epochs, cfg.warmup_momentum, cfg.warmup_bias_lr, cfg.nominal_batch) == (
        3.0,
        0.8,
        0.1,
        64,
    )
    assert TrainConfig(model="yolov6n").resolved_iou_type == "siou"
    assert TrainConfig(model="yolov6s").resolved_iou_type == "giou"
    assert TrainConfig(epochs=300).close_mosaic_at == 285
    assert TrainConfig(epochs=10).close_mosaic_at == 0
    with pytest.raises(ValueError, match="img_size"):
        TrainConfig(img_size=100)


@pytest.mark.parametrize("name", ["yolov6n_bccd", "yolov6s_bccd", "yolov6n_coco128"])
def test_recipes_load_and_point_at_data(name: str) -> None:
    cfg = load_train_config(ROOT / "recipes" / f"{name}.yaml")
    assert cfg.data.is_absolute() and cfg.data.is_file(), cfg.data
    assert cfg.model == name.split("_")[0]
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    from repquant.data import load_data_config

    data = load_data_config(cfg.data)
    assert data.nc == len(data.names) and data.nc in (3, 80)


@pytest.mark.parametrize(
    "name, images", [("bccd", (205, 87)), ("coco128", (128, 128)), ("coco-mini", (80, 76))]
)
def test_data_yamls_resolve_to_shared_data(name: str, images: tuple[int, int]) -> None:
    if not (SHARED_DATA / name).is_dir():
        pytest.skip(f"{SHARED_DATA / name} is absent")
    from repquant.data import load_data_config

    data = load_data_config(ROOT / "recipes" / "data" / f"{name}.yaml")
    for split, count in zip(("train", "val"), images, strict=True):
        folder = data.split(split).images
        assert folder.resolve().is_relative_to(SHARED_DATA.resolve())
        assert len(list(folder.glob("*.jpg"))) == count


def test_recipe_unknown_key_did_you_mean(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: yolov6n\nmomentun: 0.9\n")
    with pytest.raises(RecipeError, match="did you mean 'momentum'"):
        load_train_config(recipe)


def test_recipe_overrides_and_relative_data(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: d/x.yaml\naugment:\n  mosaic: 0.5\ndistill:\n  teacher: t.safetensors\n")
    cfg = load_train_config(recipe, epochs=7)
    assert cfg.data == (tmp_path / "d" / "x.yaml").resolve()
    assert cfg.epochs == 7 and cfg.augment.mosaic == 0.5 and cfg.distill.enabled
    with pytest.raises(RecipeError, match="epoch"):
        load_train_config(recipe, epoch=7)


def test_config_dict_roundtrip() -> None:
    """``to_dict`` (stored in checkpoints, used by ``--set`` overrides) converts back to the same config."""
    from repquant.recipe import recipe_from_dict

    cfg = TrainConfig(model="yolov6s", epochs=5, distill=DistillConfig(teacher=Path("t.safetensors")))
    assert recipe_from_dict(cfg.to_dict(), TrainConfig) == cfg
