"""RepOptimizer: exact equivalence with SGD on the linear multi-branch block, scale files, name matching."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repquant.errors import CheckpointError, RepquantError
from repquant.models import create_model
from repquant.models.blocks import LinearAddBlock, RealVGGBlock
from repquant.reparam import identity_kernel, pad_kernel
from repquant.train.repopt import (
    RepOptimizer,
    build_repopt_optimizer,
    extract_scales,
    folded_gradient_masks,
    gradient_mask,
    init_from_scales,
    load_scales,
    match_scales,
    save_scales,
)
from repquant.train.schedule import param_groups

DT = torch.float64


class LinearMultiBranch(nn.Module):
    """y = s_conv*conv3x3(x; Wc) + s_1x1*conv1x1(x; W1) [+ d*x], constant scales, trainable Wc, W1, d.

    ``d`` is the identity branch's trainable per-channel diagonal, initialised to ``s_id``.
    """

    def __init__(self, cin: int, cout: int, stride: int, gen: torch.Generator) -> None:
        super().__init__()
        self.stride = stride
        self.wc = nn.Parameter(torch.randn(cout, cin, 3, 3, generator=gen, dtype=DT) * 0.3)
        self.w1 = nn.Parameter(torch.randn(cout, cin, 1, 1, generator=gen, dtype=DT) * 0.3)
        self.sc = torch.rand(cout, generator=gen, dtype=DT) + 0.5
        self.s1 = torch.rand(cout, generator=gen, dtype=DT) + 0.2
        self.has_identity = cin == cout and stride == 1
        self.sid = torch.rand(cout, generator=gen, dtype=DT) + 0.5 if self.has_identity else None
        self.d = nn.Parameter(self.sid.clone()) if self.has_identity else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def col(s: torch.Tensor) -> torch.Tensor:
            return s.view(1, -1, 1, 1)

        y = col(self.sc) * F.conv2d(x, self.wc, stride=self.stride, padding=1)
        y = y + col(self.s1) * F.conv2d(x, self.w1, stride=self.stride)
        if self.d is not None:
            y = y + col(self.d) * x
        return y

    @torch.no_grad()
    def merged(self) -> torch.Tensor:
        def col(s: torch.Tensor) -> torch.Tensor:
            return s.view(-1, 1, 1, 1)

        w = col(self.sc) * self.wc + pad_kernel(col(self.s1) * self.w1)
        if self.d is not None:
            w = w + col(self.d) * identity_kernel(self.wc.shape[0], 1, 3, dtype=DT)
        return w

    def mask(self) -> torch.Tensor:
        return gradient_mask(self.wc.shape, self.sc, self.s1, self.sid)


def _run_equivalence(
    cin: int, cout: int, stride: int, momentum: float, weight_decay: float, nesterov: bool, steps: int = 6
) -> float:
    gen = torch.Generator().manual_seed(cin * 100 + cout * 10 + stride)
    multi = LinearMultiBranch(cin, cout, stride, gen)
    start = multi.merged().clone()
    single = nn.Parameter(start.clone())
    hyper = dict(lr=0.002, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    # Weight decay on EVERY branch parameter, the identity diagonal included: the condition under
    # which g*M + wd*W' on the merged weight is exact.
    opt_multi = torch.optim.SGD(list(multi.parameters()), **hyper)
    opt_single = RepOptimizer([single], {single: multi.mask()}, **hyper)
    out_hw = (7 - 1) // stride + 1
    for _ in range(steps):
        x = torch.randn(2, cin, 7, 7, generator=gen, dtype=DT)
        target = torch.randn(2, cout, out_hw, out_hw, generator=gen, dtype=DT)
        for opt, out in ((opt_multi, multi(x)), (opt_single, F.conv2d(x, single, stride=stride, padding=1))):
            opt.zero_grad()
            (0.5 * ((out - target) ** 2).sum()).backward()
            opt.step()
    assert (single.detach() - start).abs().max().item() > 1e-2, (
        "weights did not move: the test proves nothing"
    )
    return (multi.merged() - single.detach()).abs().max().item()


@pytest.mark.parametrize("cin,cout,stride", [(4, 4, 1), (3, 5, 1), (4, 6, 2)])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_repopt_equals_sgd_on_linear_multibranch(
    cin: int, cout: int, stride: int, momentum: float, nesterov: bool, weight_decay: float
) -> None:
    assert _run_equivalence(cin, cout, stride, momentum, weight_decay, nesterov) < 1e-10


def test_wrong_identity_term_breaks_equivalence() -> None:
    """Guard for the derivation: with s_id^2 (not +1) at the identity taps the trajectories part."""
    gen = torch.Generator().manual_seed(0)
    multi = LinearMultiBranch(4, 4, 1, gen)
    single = nn.Parameter(multi.merged().clone())
    bad_mask = multi.mask() + identity_kernel(4, 1, 3, dtype=DT) * (multi.sid.view(-1, 1, 1, 1) ** 2 - 1)
    opt_multi = torch.optim.SGD(multi.parameters(), lr=0.05)
    opt_single = RepOptimizer([single], {single: bad_mask}, lr=0.05)
    for _ in range(3):
        x = torch.randn(2, 4, 7, 7, generator=gen, dtype=DT)
        for opt, out in ((opt_multi, multi(x)), (opt_single, F.conv2d(x, single, padding=1))):
            opt.zero_grad()
            (out**2).sum().backward()
            opt.step()
    assert (multi.merged() - single.detach()).abs().max().item() > 1e-6


def test_gradient_mask_values() -> None:
    sc, s1, sid = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 1.0]), torch.tensor([7.0, 7.0])
    m = gradient_mask((2, 2, 3, 3), sc, s1, sid)
    assert m[0, 1, 0, 2] == 4.0 and m[1, 0, 2, 2] == 9.0
    assert m[0, 1, 1, 1] == 4.0 + 0.25 and m[1, 0, 1, 1] == 9.0 + 1.0  # off-diagonal centre: no identity
    assert m[0, 0, 1, 1] == 4.0 + 0.25 + 1.0 and m[1, 1, 1, 1] == 9.0 + 1.0 + 1.0  # +1, not s_id^2
    m_no_id = gradient_mask((2, 3, 3, 3), sc, s1, None)
    assert m_no_id[1, 1, 1, 1] == 10.0


def _randomize_scales(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".scale_" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


@pytest.fixture(scope="module")
def n_scales() -> dict[str, torch.Tensor]:
    hs = create_model("yolov6n", num_classes=3, block_mode="hyper_search")
    _randomize_scales(hs, 0)
    return extract_scales(hs)


def test_extract_save_load_roundtrip(n_scales: dict[str, torch.Tensor], tmp_path) -> None:
    hs = create_model("yolov6n", num_classes=3, block_mode="hyper_search")
    blocks = {n for n, m in hs.named_modules() if isinstance(m, LinearAddBlock)}
    assert {k.rsplit(".", 1)[0] for k in n_scales} == blocks
    assert any(k.endswith(".scale_identity") for k in n_scales)
    path = tmp_path / "scales.safetensors"
    save_scales(path, n_scales, "yolov6n")
    loaded, model_name = load_scales(path)
    assert model_name == "yolov6n" and loaded.keys() == n_scales.keys()
    assert all(torch.equal(loaded[k], n_scales[k]) for k in n_scales)


def test_match_real_model_and_train(n_scales: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = create_model("yolov6n", num_classes=3, block_mode="repopt")
    masks = match_scales(model, n_scales, source="n.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    real = {n for n, m in model.named_modules() if isinstance(m, RealVGGBlock)}
    assert {names[id(p)] for p in masks} == {f"{b}.conv.weight" for b in real}
    for p, mask in masks.items():
        block = names[id(p)].rsplit(".", 2)[0]
        sc, s1 = n_scales[f"{block}.scale_conv"], n_scales[f"{block}.scale_1x1"]
        identity = 1.0 if f"{block}.scale_identity" in n_scales else 0.0
        assert mask.shape == p.shape
        assert torch.allclose(mask[:, :, 0, 0], (sc**2).view(-1, 1).expand(p.shape[:2]))
        centre = (sc**2 + s1**2).view(-1, 1).expand(p.shape[:2])
        if identity:
            centre = centre + torch.eye(p.shape[0])
        assert torch.allclose(mask[:, :, 1, 1], centre)
    init_from_scales(model, n_scales, seed=1)
    opt = build_repopt_optimizer(model, masks, lr0=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(1, 3, 64, 64)
    for _ in range(2):
        opt.zero_grad()
        cls, reg = model(x)[:2]
        (cls.sigmoid().mean() + reg.abs().mean()).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scales_from_other_variant_name_first_mismatch(n_scales: dict[str, torch.Tensor]) -> None:
    hs = create_model("yolov6s", num_classes=3, block_mode="hyper_search")
    s_scales = extract_scales(hs)
    model = create_model("yolov6n", num_classes=3, block_mode="repopt")
    first = next(n for n, m in model.named_modules() if isinstance(m, RealVGGBlock))
    expected_shape = (model.get_submodule(first).out_channels,)
    with pytest.raises(CheckpointError) as err:
        match_scales(model, s_scales, source="yolov6s_scales.safetensors")
    msg = str(err.value)
    assert "yolov6s_scales.safetensors" in msg and first in msg
    assert str(tuple(s_scales[f"{first}.scale_conv"].shape)) in msg and str(expected_shape) in msg


def test_missing_and_extra_scales_named(n_scales: dict[str, torch.Tensor]) -> None:
    model = create_model("yolov6n", num_classes=3, block_mode="repopt")
    victim = sorted(n_scales)[5]
    partial = {k: v for k, v in n_scales.items() if k != victim}
    with pytest.raises(CheckpointError, match=victim.rsplit(".", 1)[0]):
        match_scales(model, partial, source="f.safetensors")
    extra = dict(n_scales, **{"neck.ghost.scale_conv": torch.ones(4)})
    with pytest.raises(CheckpointError, match="neck.ghost.scale_conv"):
        match_scales(model, extra)


def test_load_scales_rejects_other_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such scales file"):
        load_scales(tmp_path / "missing.safetensors")
    from repquant.io import write_safetensors

    other = tmp_path / "model.safetensors"
    write_safetensors(other, {"w": torch.ones(2)}, {"repquant_config": "{}"})
    with pytest.raises(CheckpointError, match="not a RepOpt scales file"):
        load_scales(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_scales(junk)


def test_extract_scales_needs_hyper_search_model() -> None:
    with pytest.raises(RepquantError, match="hyper_search"):
        extract_scales(nn.Sequential(RealVGGBlock(4, 4)))


def test_init_from_scales_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(RealVGGBlock(4, 4), RealVGGBlock(4, 6, stride=2))
    gen = torch.Generator().manual_seed(3)
    scales = {
        "0.scale_conv": torch.rand(4, generator=gen) + 0.5,
        "0.scale_1x1": torch.rand(4, generator=gen),
        "0.scale_identity": torch.rand(4, generator=gen) + 0.5,
        "1.scale_conv": torch.rand(6, generator=gen) + 0.5,
        "1.scale_1x1": torch.rand(6, generator=gen),
    }
    w0 = [model[i].conv.weight.detach().clone() for i in range(2)]
    twin = copy.deepcopy(model)
    init_from_scales(model, scales, seed=7)
    init_from_scales(twin, scales, seed=7)
    for i, cin in enumerate((4, 4)):
        w = model[i].conv.weight.detach()
        assert torch.equal(w, twin[i].conv.weight)  # seeded
        base = w0[i] * scales[f"{i}.scale_conv"].view(-1, 1, 1, 1)
        border = torch.ones(3, 3, dtype=torch.bool)
        border[1, 1] = False
        assert torch.allclose(w[:, :, border], base[:, :, border], atol=1e-7, rtol=0)
        centre = w[:, :, 1, 1] - base[:, :, 1, 1]
        if i == 0:
            centre = centre - torch.diag(scales["0.scale_identity"])
        u = centre / scales[f"{i}.scale_1x1"].view(-1, 1)
        assert u.abs().max() <= cin**-0.5 + 1e-6 and u.abs().max() > 0.1 * cin**-0.5


def _tiny_repopt_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(RealVGGBlock(3, 8, stride=2), RealVGGBlock(8, 8), nn.Conv2d(8, 2, 1))
    gen = torch.Generator().manual_seed(1)
    scales = {f"{i}.{kind}": torch.rand(8, generator=gen) + 0.5
              for i in (0, 1) for kind in ("scale_conv", "scale_1x1")}
    scales["1.scale_identity"] = torch.rand(8, generator=gen) + 0.5
    return model, scales


def test_state_dict_roundtrip_resumes_identically() -> None:
    model, scales = _tiny_repopt_model()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(2, 3, 16, 16, generator=gen) for _ in range(4)]

    def step(m: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
        opt.zero_grad()
        (m(x) ** 2).mean().backward()
        opt.step()

    opt = build_repopt_optimizer(model, match_scales(model, scales), 0.01, 0.9, 5e-4)
    for x in xs[:2]:
        step(model, opt, x)
    resumed = copy.deepcopy(model)
    opt2 = build_repopt_optimizer(resumed, match_scales(resumed, scales), 0.01, 0.9, 5e-4)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert len(opt2.state) == len(list(model.parameters()))  # momentum buffers restored
    for x in xs[2:]:
        step(model, opt, x)
        step(resumed, opt2, x)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_build_repopt_optimizer_groups(n_scales: dict[str, torch.Tensor]) -> None:
    model = create_model("yolov6n", num_classes=3, block_mode="repopt")
    masks = match_scales(model, n_scales)
    opt = build_repopt_optimizer(model, masks, 0.02, 0.937, 5e-4)
    bn_w, w, b = param_groups(model)
    assert [len(g["params"]) for g in opt.param_groups] == [len(bn_w), len(w), len(b)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4, 0.0]
    assert all(g["nesterov"] and g["initial_lr"] == 0.02 for g in opt.param_groups)
    with pytest.raises(RepquantError, match="not in any parameter group"):
        RepOptimizer([nn.Parameter(torch.ones(1))], masks, lr=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_repopt_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    multi = LinearMultiBranch(4, 4, 1, gen)
    mask = multi.mask()
    results = []
    for device in ("cpu", "cuda"):
        w = nn.Parameter(multi.merged().clone().to(device))
        opt = RepOptimizer([w], {w: mask}, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(2, 4, 7, 7, generator=g, dtype=DT).to(device)
            opt.zero_grad()
            (F.conv2d(x, w, padding=1) ** 2).sum().backward()
            opt.step()
        results.append(w.detach().cpu())
    assert (results[0] - results[1]).abs().max().item() < 1e-10


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_folded_masks_follow_the_train_form_repopt_steps(weight_decay: float) -> None:
    """k RepOptimizer steps on the train-form block (BN frozen) == k steps with the folded mask on the
    deployed conv: the BN-folded weights agree to 1e-10 (float64)."""
    gen = torch.Generator().manual_seed(3)
    block = RealVGGBlock(4, 4).to(DT).eval()
    with torch.no_grad():
        block.bn.weight.copy_(torch.rand(4, generator=gen, dtype=DT) * 2 + 0.1)
        block.bn.bias.copy_(torch.randn(4, generator=gen, dtype=DT))
        block.bn.running_mean.copy_(torch.randn(4, generator=gen, dtype=DT))
        block.bn.running_var.copy_(torch.rand(4, generator=gen, dtype=DT) * 3 + 0.05)
    block.bn.requires_grad_(False)
    holder = nn.Module()
    holder.blk = block
    scales = {"blk.scale_conv": torch.rand(4, generator=gen) + 0.5, "blk.scale_1x1": torch.rand(4, generator=gen),
              "blk.scale_identity": torch.rand(4, generator=gen)}
    ((folded_name, folded_mask),) = folded_gradient_masks(holder, scales).items()
    assert folded_name == "blk.rbr_reparam.weight"
    deployed = copy.deepcopy(holder)
    deployed.blk.reparameterize()
    deployed.blk.rbr_reparam.bias.requires_grad_(False)
    w_train, w_dep = block.conv.weight, deployed.blk.rbr_reparam.weight
    hyper = dict(lr=0.01, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    train_mask = gradient_mask(w_train.shape, *(scales[f"blk.{k}"].to(DT) for k in ("scale_conv", "scale_1x1",
                                                                                "scale_identity")))
    opt_train = RepOptimizer([w_train], {w_train: train_mask}, **hyper)
    opt_dep = RepOptimizer([w_dep], {w_dep: folded_mask.to(DT)}, **hyper)
    start = w_dep.detach().clone()
    for _ in range(5):
        x = torch.randn(2, 4, 6, 6, generator=gen, dtype=DT)
        target = torch.randn(2, 4, 6, 6, generator=gen, dtype=DT)
        for opt, net in ((opt_train, holder), (opt_dep, deployed)):
            opt.zero_grad()
            (0.5 * ((net.blk(x) - target) ** 2).sum()).backward()
            opt.step()
    assert (w_dep.detach() - start).abs().max().item() > 1e-2, "weights did not move: the test proves nothing"
    refolded = copy.deepcopy(holder)
    refolded.blk.reparameterize()
    assert (refolded.blk.rbr_reparam.weight - w_dep).abs().max().item() < 1e-10
    # the unscaled mask (what feeding the train-form masks to the folded model would do) drifts off
    assert not torch.allclose(folded_mask, train_mask)


def test_folded_mask_names_are_deployed_parameters(n_scales: dict[str, torch.Tensor]) -> None:
    from repquant.reparam import reparameterize

    model = create_model("yolov6n", num_classes=3, block_mode="repopt").eval()
    masks = folded_gradient_masks(model, n_scales)
    params = dict(reparameterize(copy.deepcopy(model)).named_parameters())
    assert len(masks) == sum(isinstance(m, RealVGGBlock) for m in model.modules())
    assert all(name in params and params[name].shape == mask.shape for name, mask in masks.items())
