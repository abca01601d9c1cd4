"""Weight/activation statistics: kurtosis and percentile against numpy, streaming equals one-shot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from repquant.errors import RepquantError
from repquant.models import create_model
from repquant.quant.act_stats import (
    MomentAccumulator,
    TailTracker,
    abs_percentile,
    activation_stats,
    excess_kurtosis,
    weight_int8_snr_db,
    write_stats,
)
from repquant.reparam import reparameterize


def np_excess_kurtosis(x: np.ndarray) -> float:
    x = x.astype(np.float64).ravel()
    d = x - x.mean()
    return float(np.mean(d**4) / np.mean(d**2) ** 2 - 3.0)


def test_kurtosis_known_values() -> None:
    # [1, 2, 3, 4]: m2 = 1.25, m4 = 2.5625 -> 2.5625 / 1.5625 - 3 = -1.36 exactly.
    assert excess_kurtosis(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(-1.36, abs=1e-12)
    assert math.isnan(excess_kurtosis(torch.full((5,), 3.0)))
    gen = torch.Generator().manual_seed(0)
    samples = (torch.randn(7, generator=gen), torch.rand(3, 5, generator=gen),
               torch.randn(2, 3, 4, 4, generator=gen) ** 3)
    for x in samples:
        assert excess_kurtosis(x) == pytest.approx(np_excess_kurtosis(x.numpy()), rel=1e-12, abs=1e-12)
    # Large samples approach the distributions' values: Gaussian 0, uniform -1.2, Laplace 3.
    big = torch.Generator().manual_seed(1)
    assert abs(excess_kurtosis(torch.randn(400_000, generator=big))) < 0.05
    assert excess_kurtosis(torch.rand(400_000, generator=big)) == pytest.approx(-1.2, abs=0.02)
    # Laplace by its inverse CDF from the seeded generator (the distributions API draws from the global RNG, which
    # left this test flaky); the estimator's spread is ~0.1 at this size (heavy tails).
    u = torch.rand(400_000, generator=big, dtype=torch.float64) - 0.5
    lap = -torch.sign(u) * torch.log1p(-2 * u.abs())
    assert excess_kurtosis(lap) == pytest.approx(3.0, abs=0.3)


def test_streaming_moments_equal_one_shot() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10_000, generator=gen, dtype=torch.float64) * 3 + 1000.0  # large mean: stability check
    x[::97] += 40.0  # heavy tail
    acc = MomentAccumulator()
    for chunk in torch.split(x, [1, 2, 997, 3000, 6000]):
        acc.update(chunk)
    assert acc.n == x.numel() and acc.mean == pytest.approx(x.mean().item(), rel=1e-14)
    assert acc.excess_kurtosis == pytest.approx(np_excess_kurtosis(x.numpy()), rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 7, 10_001, 54_321])
def test_abs_percentile_matches_numpy(n: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    expected = np.percentile(np.abs(x.numpy()), 99.99)
    assert abs_percentile(x) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert abs_percentile(x, 50.0) == pytest.approx(np.percentile(np.abs(x.numpy()), 50.0), rel=1e-12)


def test_tail_tracker_exact_across_batches_and_flags_overflow() -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 3, 50, 50, generator=gen) * (1 + i) for i in range(5)]
    pooled = np.abs(torch.cat([b.reshape(-1) for b in batches]).double().numpy())  # 150,000 values
    tracker = TailTracker(top_k=64)  # the 99.99th percentile of 150k values needs the top 16
    for b in batches:
        tracker.update(b)
    value, exact = tracker.percentile()
    assert exact and tracker.n == pooled.size
    assert value == pytest.approx(np.percentile(pooled, 99.99), rel=1e-6)
    small = TailTracker(top_k=8)
    for b in batches:
        small.update(b)
    value, exact = small.percentile()
    assert not exact and value >= np.percentile(pooled, 99.99)  # documented upper bound


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_activation_stats_equal_direct_computation() -> None:
    model = _tiny_net()
    gen = torch.Generator().manual_seed(4)
    images = [torch.rand(2, 3, 16, 16, generator=gen) for _ in range(3)]
    stats = activation_stats(model, [(im, None) for im in images])
    assert [s.name for s in stats] == ["0", "2"]
    assert model.training  # mode restored
    inputs = {"0": torch.cat(images), "2": torch.relu(model[0](torch.cat(images))).detach()}
    for s in stats:
        x, w = inputs[s.name].double().numpy(), model.get_submodule(s.name).weight.detach().double().numpy()
        assert s.act_count == x.size
        assert s.act_absmax == pytest.approx(np.abs(x).max(), rel=1e-6)
        assert s.act_p9999 == pytest.approx(np.percentile(np.abs(x), 99.99), rel=1e-5)
        assert s.act_p9999_exact
        assert s.act_kurtosis == pytest.approx(np_excess_kurtosis(x), rel=1e-5)
        assert s.weight_absmax == pytest.approx(np.abs(w).max(), rel=1e-6)
        assert s.weight_p9999 == pytest.approx(np.percentile(np.abs(w), 99.99), rel=1e-6)
        assert s.weight_kurtosis == pytest.approx(np_excess_kurtosis(w), rel=1e-5)
        assert s.weight_int8_snr_db == pytest.approx(np_weight_int8_snr_db(w, 0), abs=1e-3)
        assert s.weight_shape == list(w.shape)


def np_weight_int8_snr_db(w: np.ndarray, axis: int) -> float:
    """Per-channel symmetric INT8 quantization written out in float64, round half to even as torch does."""
    w = np.moveaxis(w.astype(np.float64), axis, 0)
    scale = np.abs(w).reshape(len(w), -1).max(axis=1).reshape(-1, *[1] * (w.ndim - 1)) / 127
    q = np.clip(np.round(w / scale), -127, 127) * scale
    return float(10 * np.log10(np.sum(w**2) / np.sum((q - w) ** 2)))


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 6, 3), nn.ConvTranspose2d(8, 6, 2, 2)], ids=["conv", "transposed"])
def test_weight_int8_snr_db_is_per_output_channel(conv: nn.Module) -> None:
    axis = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
    with torch.no_grad():  # one output channel 100x wider: a per-tensor or wrong-axis scale would crush the rest
        conv.weight.select(axis, 2).mul_(100)
    w = conv.weight.detach().numpy()
    assert weight_int8_snr_db(conv) == pytest.approx(np_weight_int8_snr_db(w, axis), abs=1e-3)
    assert weight_int8_snr_db(conv) > np_weight_int8_snr_db(w, 1 - axis) + 3
    with torch.no_grad():  # weights on the INT8 grid of their channel quantize exactly
        conv.weight.copy_(torch.randint(-127, 128, conv.weight.shape).float() / 64)
        corner = [slice(None) if d == axis else 0 for d in range(conv.weight.dim())]
        conv.weight[tuple(corner)] = 127 / 64  # every channel's max is 127 steps of 1/64
    assert weight_int8_snr_db(conv) == math.inf


def test_activation_stats_layer_selection_and_errors() -> None:
    model = _tiny_net()
    stats = activation_stats(model, [torch.rand(1, 3, 8, 8)], layers=["2"])
    assert [s.name for s in stats] == ["2"]
    with pytest.raises(RepquantError, match="'1' is not a conv layer"):
        activation_stats(model, [], layers=["1"])


def test_deployed_yolov6n_stats_and_files(tmp_path) -> None:
    model = reparameterize(create_model("yolov6n", num_classes=3, block_mode="repopt"))
    stats = activation_stats(model, [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))])
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [s.name for s in stats] == convs
    assert all(s.act_count > 0 and math.isfinite(s.act_absmax) and s.act_p9999 <= s.act_absmax for s in stats)
    stats[0].act_kurtosis = math.nan  # must be written as null, not as the invalid JSON token NaN
    write_stats(tmp_path / "stats.json", tmp_path / "stats.md", stats)
    data = json.loads((tmp_path / "stats.json").read_text())
    assert len(data["layers"]) == len(stats) and data["layers"][0]["act_kurtosis"] is None
    assert "kurtosis" in data["definitions"]
    md = (tmp_path / "stats.md").read_text().splitlines()
    assert md[0].startswith("| layer |") and sum(line.startswith(f"| {convs[0]} ") for line in md) == 1
