"""Quantizer placement (TensorRT rules), insertion through modelopt, keep-float, calibration.

The stand-in network has exactly the op kinds of a deployed YOLOv6: conv -> relu, a residual block
with a learnable alpha (BottleRep), an SPPF-like max-pool chain into a concat, a ConvTranspose
upsample, a concat of two branches, and a ``dfl_proj`` layer that must stay float.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_models import Residual
from torch import nn

from repquant.errors import ModelError, RecipeError
from repquant.quant import (
    QuantConfig,
    QuantPlacement,
    calibrate,
    disable_quantizers,
    find_placement,
    insert_quantizers,
    quantizer_state,
    restore_amax,
    unify_shared_scales,
)

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (extra 'quant') not installed")


class StandIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act, self.block = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Residual(8)
        self.pool, self.sppf_out = nn.MaxPool2d(5, 1, 2), nn.Conv2d(24, 8, 1)
        self.up, self.lat, self.head = nn.ConvTranspose2d(8, 6, 2, 2), nn.Conv2d(8, 8, 1), nn.Conv2d(14, 4, 1)
        self.dfl_proj = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.stem(x))
        b = self.block(a)
        y1 = self.pool(b)
        y2 = self.pool(y1)
        c = self.act(self.sppf_out(torch.cat([b, y1, y2], 1)))
        lateral = self.act(self.lat(F.interpolate(a, scale_factor=2.0)))
        return self.dfl_proj(self.head(torch.cat([self.up(c), lateral], 1)))


CONVS = ["stem", "block.conv1", "block.conv2", "sppf_out", "up", "lat", "head"]
EXPECTED = (
    {f"{c}.weight_quantizer" for c in CONVS}
    | {f"{c}.input_quantizer" for c in CONVS}
    | {"block.skip_quantizer", "pool.input_quantizer"}
)


def _net(seed: int = 0) -> StandIn:
    torch.manual_seed(seed)
    return StandIn().eval()


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_placement_finds_exact_quantizers_and_groups() -> None:
    p = find_placement(_net())
    assert set(p.names()) == EXPECTED
    assert len(p.names()) == len(EXPECTED)
    assert set(p.names("skip")) == {"block.skip_quantizer"}
    axes = {q.name: q.axis for q in p.quantizers}
    assert axes["up.weight_quantizer"] == 1  # ConvTranspose2d: per output channel is axis 1
    assert all(axes[f"{c}.weight_quantizer"] == 0 for c in CONVS if c != "up")
    assert all(axes[n] is None for n in p.names("input") + p.names("skip"))
    kinds = {ly.name: ly.kind for ly in p.layers}
    assert kinds == {
        "stem": "conv",
        "block.conv1": "conv",
        "block.conv2": "conv",
        "block": "add",
        "pool": "maxpool",
        "sppf_out": "conv",
        "up": "conv_transpose",
        "lat": "conv",
        "head": "conv",
    }
    assert not any("dfl" in n for n in p.names())
    # The pool's input, its (pooled) outputs and the concat into sppf_out carry one scale.
    assert _consumer_groups(p) == {frozenset({"pool.input_quantizer", "sppf_out.input_quantizer"})}
    # ReLU quantizers (ONNX Runtime layout only) stand in for the conv's output quantizer only where the ReLU
    # module runs once: ``act`` and ``block.act`` run on several tensors (one quantizer, one scale for all).
    # The pool's output quantizer (ONNX Runtime layout) joins the pool's group.
    assert p.relu_after == () and {frozenset(g) for g in p.shared_groups} == {
        frozenset({"pool.input_quantizer", "pool.output_quantizer", "sppf_out.input_quantizer"})}


def _consumer_groups(p: QuantPlacement) -> set[frozenset[str]]:
    """The shared groups without the ReLU and MaxPool output quantizers (only the ONNX Runtime layout has them)."""
    names = set(p.names())
    groups = {frozenset(n for n in g if n in names) for g in p.shared_groups}
    return {g for g in groups if len(g) > 1}


def test_consumers_of_one_tensor_share_a_scale() -> None:
    class TwoConsumers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y) + self.c(y)  # not residual: neither input feeds the other

    p = find_placement(TwoConsumers())
    assert p.names("skip") == []
    assert {frozenset(g) for g in p.shared_groups} == {frozenset({"b.input_quantizer", "c.input_quantizer"})}


def test_placement_on_real_bottlerep_stage() -> None:
    from repquant.models.blocks import block_factory
    from repquant.models.layers import BepC3
    from repquant.reparam import reparameterize

    torch.manual_seed(0)
    stage = reparameterize(BepC3(16, 16, n=4, e=0.5, block=block_factory("repvgg")).eval())
    x = torch.rand(2, 16, 16, 16)
    with torch.no_grad():
        ref = stage(x)
    p = find_placement(stage)
    assert set(p.names("skip")) == {"m.conv1.skip_quantizer", "m.block.0.skip_quantizer"}
    insert_quantizers(stage, p, QuantConfig())
    # Rewritten blocks keep their FQNs and compute the same function with quantizers disabled.
    assert isinstance(stage.get_submodule("m.conv1.conv1.rbr_reparam"), nn.Conv2d)
    disable_quantizers(stage, [n for n, s in quantizer_state(stage).items() if s.enabled])
    with torch.no_grad():
        torch.testing.assert_close(stage(x), ref, rtol=0, atol=0)


def _fake_quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = amax / 127.0  # symmetric INT8, zero point 0, range [-128, 127]
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def test_insert_and_max_calibrate_known_answers() -> None:
    net, x = _net(), _images()
    p = find_placement(net)
    insert_quantizers(net, p, QuantConfig())
    state = quantizer_state(net)
    assert {n for n, s in state.items() if s.enabled} == EXPECTED
    calibrate(net, lambda m: m(x), "max", shared_groups=p.shared_groups)
    state = quantizer_state(net)
    assert state["stem.input_quantizer"].amax.item() == x.abs().max().item()
    w = net.stem.weight.detach()
    torch.testing.assert_close(state["stem.weight_quantizer"].amax.flatten(), w.abs().amax(dim=(1, 2, 3)))
    wt = net.up.weight.detach()  # (C_in, C_out, kH, kW)
    torch.testing.assert_close(state["up.weight_quantizer"].amax.flatten(), wt.abs().amax(dim=(0, 2, 3)))
    # The stem output equals a hand-made fake-quant convolution.
    with torch.no_grad():
        got = net.stem(x)
        want = F.conv2d(
            _fake_quant(x, state["stem.input_quantizer"].amax),
            _fake_quant(w, state["stem.weight_quantizer"].amax.reshape(-1, 1, 1, 1)),
            net.stem.bias,
            padding=1,
        )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_shared_groups_take_the_largest_amax() -> None:
    net, x = _net(), _images()
    p = find_placement(net)
    insert_quantizers(net, p, QuantConfig())
    calibrate(net, lambda m: m(x), "max")
    net.pool.input_quantizer.amax = torch.tensor(2.0)
    net.sppf_out.input_quantizer.amax = torch.tensor(3.5)
    unify_shared_scales(net, p.shared_groups)
    assert net.pool.input_quantizer.amax.item() == 3.5
    assert net.sppf_out.input_quantizer.amax.item() == 3.5


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_clip_below_max(method: str) -> None:
    # Two convs, 512 bins: modelopt's entropy search is an O(bins^2) Python loop per quantizer.
    x = _images(8)
    amax = {}
    for m in ("max", method):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
        insert_quantizers(net, find_placement(net), QuantConfig(calib_method=m))
        calibrate(net, lambda mod: mod(x), m, percentile=99.0, num_bins=512)
        amax[m] = {n: s.amax for n, s in quantizer_state(net).items() if s.enabled}
    assert quantizer_state(net)["2.input_quantizer"].calibrator == "HistogramCalibrator"
    for name in ("0.input_quantizer", "2.input_quantizer"):
        assert 0 < amax[method][name].item() <= amax["max"][name].item() * 1.001
    if method == "percentile":  # the 99th percentile of U(0, 1) inputs is well below their max
        assert amax[method]["0.input_quantizer"].item() < 0.995 * amax["max"]["0.input_quantizer"].item()
    # Weights stay per-channel max in every method.
    torch.testing.assert_close(amax[method]["2.weight_quantizer"], amax["max"]["2.weight_quantizer"])


def test_keep_float_layers_and_unknown_names() -> None:
    net = _net()
    p = find_placement(net)
    insert_quantizers(net, p, QuantConfig(keep_float_layers=("lat", "block.skip_quantizer")))
    state = quantizer_state(net)
    assert not state["lat.input_quantizer"].enabled and not state["lat.weight_quantizer"].enabled
    assert not state["block.skip_quantizer"].enabled
    assert state["block.conv1.input_quantizer"].enabled  # a block name disables only its own quantizers
    with pytest.raises(ModelError, match="'nope'"):
        disable_quantizers(net, ["nope"])


def test_calibrated_state_round_trips_through_state_dict() -> None:
    net, x = _net(), _images()
    p = find_placement(net)
    insert_quantizers(net, p, QuantConfig())
    calibrate(net, lambda m: m(x), "max", shared_groups=p.shared_groups)
    saved = net.state_dict()
    fresh = _net(seed=1)
    insert_quantizers(fresh, find_placement(fresh), QuantConfig())
    assert restore_amax(fresh, saved) == len(EXPECTED)
    fresh.load_state_dict(saved, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_config_validation() -> None:
    with pytest.raises(RecipeError, match="calib_method"):
        QuantConfig(calib_method="minmax")
    with pytest.raises(RecipeError, match="num_bits"):
        QuantConfig(num_bits=4)
    assert QuantConfig(keep_float_layers=["a"]).keep_float_layers == ("a",)


def test_deployed_yolov6n_placement() -> None:
    from repquant.models import create_model
    from repquant.reparam import reparameterize

    model = reparameterize(create_model("yolov6n", num_classes=3).eval())
    p = find_placement(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    transposed = [n for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)]
    pools = [n for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)]
    assert len(transposed) == 2 and len(pools) == 1
    assert set(p.names("weight")) == {f"{n}.weight_quantizer" for n in convs + transposed}
    assert set(p.names("input")) == {f"{n}.input_quantizer" for n in convs + transposed + pools}
    assert all(q.axis == 1 for q in p.quantizers if q.role == "weight" and q.layer in transposed)
    groups = _consumer_groups(p)
    sppf = pools[0].rpartition(".")[0]
    assert frozenset({f"{pools[0]}.input_quantizer", f"{sppf}.cv5.conv.input_quantizer"}) in groups
    # cls and reg branches read the same stem output: one scale.
    assert (
        frozenset({"head.cls_convs.0.conv.input_quantizer", "head.reg_convs.0.conv.input_quantizer"})
        in groups
    )
