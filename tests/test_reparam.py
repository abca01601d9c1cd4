"""Re-parameterization is exact: pure functions, every block form, every variant and block mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import randomize, rel_err
from torch import nn

from repquant.models import create_model, get_config, list_models
from repquant.models.blocks import (
    ConvBNAct,
    LinearAddBlock,
    QARepVGGBlock,
    RealVGGBlock,
    RepVGGBlock,
    block_factory,
)
from repquant.models.layers import SPPF, BepC3, BiFusion, BottleRep, SimCSPSPPF
from repquant.reparam import (
    fuse_conv_bn,
    identity_kernel,
    is_deployed,
    merge_branches,
    pad_kernel,
    reparameterize,
)

REP_MODES = ("repvgg", "qarepvgg", "qarepvggv2", "repopt", "hyper_search")
F64_TOL = 1e-9
F32_TOL = 1e-4


# ---------------------------------------------------------------- pure functions


def test_fuse_conv_bn_matches_eval_batchnorm():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = nn.BatchNorm2d(6, eps=1e-3).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    w, b = fuse_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert rel_err(bn(conv(x)), F.conv2d(x, w, b, padding=1)) < 1e-12
    assert w.dtype == torch.float64


def test_fuse_conv_bn_without_bias_or_affine():
    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25])
    w, b = fuse_conv_bn(torch.ones(2, 1, 1, 1), None, mean, var, None, None, eps=0.0)
    assert torch.allclose(w.flatten(), torch.tensor([0.5, 2.0]))
    assert torch.allclose(b, torch.tensor([-0.5, 4.0]))


@pytest.mark.parametrize("stride", [1, 2])
def test_pad_kernel_1x1_equals_centered_3x3(stride):
    torch.manual_seed(1)
    k1 = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    k3 = pad_kernel(k1)
    assert k3.shape == (5, 3, 3, 3) and k3[:, :, 1, 1].equal(k1[:, :, 0, 0])
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert torch.equal(F.conv2d(x, k1, stride=stride), F.conv2d(x, k3, stride=stride, padding=1))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_identity_kernel_is_identity(groups):
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    kernel = identity_kernel(8, groups, 3, dtype=torch.float64)
    assert kernel.shape == (8, 8 // groups, 3, 3) and kernel.sum() == 8
    assert torch.equal(F.conv2d(x, kernel, padding=1, groups=groups), x)


def test_merge_branches_equals_sum_of_convs():
    torch.manual_seed(2)
    k3, k1 = torch.randn(4, 4, 3, 3, dtype=torch.float64), torch.randn(4, 4, 1, 1, dtype=torch.float64)
    b3 = torch.randn(4, dtype=torch.float64)
    kernel, bias = merge_branches([(k3, b3), (k1, None)])
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    expected = F.conv2d(x, k3, b3, padding=1) + F.conv2d(x, k1)
    assert rel_err(expected, F.conv2d(x, kernel, bias, padding=1)) < 1e-12


# ---------------------------------------------------------------- single blocks

BLOCKS = [RepVGGBlock, QARepVGGBlock, RealVGGBlock, LinearAddBlock]
# (in, out, stride, groups): identity branch, stride 2, in != out, grouped with and without identity
SHAPES = [
    (8, 8, 1, 1),
    (8, 8, 2, 1),
    (4, 8, 1, 1),
    (8, 16, 2, 1),
    (8, 8, 1, 2),
    (8, 16, 1, 4),
]


@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "in{}-out{}-s{}-g{}".format(*s))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_block_reparameterization_exact(cls, shape, dtype, tol):
    cin, cout, stride, groups = shape
    torch.manual_seed(3)
    block = cls(cin, cout, stride, groups).to(dtype)
    x = torch.randn(2, cin, 9, 9, dtype=dtype)
    randomize(block, x, seed=4)
    expected = block(x)
    block.reparameterize()
    assert block.deployed and is_deployed(block)
    conv = block.rbr_reparam
    assert (conv.kernel_size, conv.stride, conv.groups, conv.weight.dtype) == (
        (3, 3),
        (stride, stride),
        groups,
        dtype,
    )
    assert [n for n, _ in block.named_children()] == ["act", "rbr_reparam"]
    assert rel_err(expected, block(x)) < tol
    block.reparameterize()  # idempotent
    assert rel_err(expected, block(x)) < tol


@pytest.mark.parametrize("act", ["relu", "silu", "none"])
@pytest.mark.parametrize("kernel_size,stride", [(1, 1), (3, 2)])
def test_conv_bn_act_folds_bn(act, kernel_size, stride):
    torch.manual_seed(5)
    block = ConvBNAct(6, 10, kernel_size, stride, act=act).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    randomize(block, x)
    expected = block(x)
    reparameterize(block)
    assert block.bn is None and block.conv.bias is not None and is_deployed(block)
    assert rel_err(expected, block(x)) < 1e-12


@pytest.mark.parametrize("mode", REP_MODES + ("conv_silu",))
@pytest.mark.parametrize("kind", ["bepc3", "bottlerep", "bifusion", "cspsppf", "sppf"])
def test_composite_blocks_reparameterize_exactly(kind, mode):
    torch.manual_seed(8)
    block = block_factory(mode)
    if kind == "bepc3":
        module, inputs = BepC3(8, 12, 4, 2 / 3, block, act="silu"), [torch.randn(2, 8, 10, 10)]
    elif kind == "bottlerep":
        module, inputs = BottleRep(8, 8, block, weight=True), [torch.randn(2, 8, 10, 10)]
    elif kind == "bifusion":
        module = BiFusion((12, 6), 8)
        inputs = [[torch.randn(2, 8, 4, 4), torch.randn(2, 12, 8, 8), torch.randn(2, 6, 16, 16)]]
    elif kind == "cspsppf":
        module, inputs = SimCSPSPPF(16, 16), [torch.randn(2, 16, 6, 6)]
    else:
        module, inputs = SPPF(16, 8), [torch.randn(2, 16, 6, 6)]
    module = module.double()
    inputs = [[t.double() for t in i] if isinstance(i, list) else i.double() for i in inputs]
    randomize(module, inputs[0])
    with torch.no_grad():
        expected = module(*inputs)
        reparameterize(module)
        assert is_deployed(module)
        assert rel_err(expected, module(*inputs)) < 1e-12


def test_identity_branch_only_when_shapes_allow():
    assert RepVGGBlock(8, 8, 1).bn_identity is not None
    assert RepVGGBlock(8, 8, 2).bn_identity is None
    assert RepVGGBlock(4, 8, 1).bn_identity is None
    assert LinearAddBlock(8, 8, 1).scale_identity is not None
    assert LinearAddBlock(8, 16, 1).scale_identity is None


# ---------------------------------------------------------------- whole models


# Default run: every variant in its own block mode, plus every mode on the two nano models (one per
# neck family); the rest of the matrix (~5-40 s per case in float64 on a busy 2-core CPU) is `slow`.
FAST_ALL_MODES = ("yolov6n", "yolov6n-v2")


def _cases():
    """Every variant x every block mode; M/L cases beyond their default mode are marked slow."""
    for name in list_models():
        default = get_config(name).block_mode
        modes = REP_MODES + (("conv_silu",) if name.startswith("yolov6l") else ())
        for mode in modes:
            marks = [] if mode == default or name in FAST_ALL_MODES else [pytest.mark.slow]
            yield pytest.param(name, mode, id=f"{name}-{mode}", marks=marks)


def _check_model(name: str, mode: str, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(6)
    model = create_model(name, num_classes=5, block_mode=mode).to(dtype)
    x = torch.rand(1, 3, 64, 64, dtype=dtype)
    randomize(model, x, seed=7)
    assert not is_deployed(model)
    with torch.no_grad():
        cls_train, reg_train = model(x)
    assert reparameterize(model) is model and is_deployed(model)
    with torch.no_grad():
        cls_dep, reg_dep = model(x)
    assert cls_dep.dtype == dtype and cls_dep.shape == cls_train.shape and reg_dep.shape == reg_train.shape
    assert rel_err(cls_train, cls_dep) < tol, "cls_logits differ after reparameterize"
    assert rel_err(reg_train, reg_dep) < tol, "reg_dist differ after reparameterize"


@pytest.mark.parametrize("name,mode", list(_cases()))
def test_model_reparameterization_float64(name, mode):
    _check_model(name, mode, torch.float64, F64_TOL)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in FAST_ALL_MODES else [pytest.mark.slow]) for n in list_models()]
)
def test_model_reparameterization_float32(name):
    _check_model(name, "repvgg", torch.float32, F32_TOL)


def test_all_block_modes_deploy_to_the_same_graph():
    """RepOpt (RealVGG) and hyper-search models deploy to exactly the RepVGG model's layers."""
    layouts = []
    for mode in REP_MODES:
        model = reparameterize(create_model("yolov6n", num_classes=3, block_mode=mode))
        layouts.append([(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    assert all(layout == layouts[0] for layout in layouts[1:])
