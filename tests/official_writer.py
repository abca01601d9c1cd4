"""Official-format YOLOv6 checkpoints written from a repquant model, for the reader's round-trip tests.

The shared fixtures (../shared/data/yolov6-official) were written by the official code but cover v3.0 N/S in
0.4.0 naming only. For the other releases and variants this writer lays a repquant model out the way the
official code names it (facts read from meituan/YOLOv6 at tags 0.2.1, 0.3.0, 0.4.0): module classes under
``yolov6.*``, ``rbr_dense`` / ``rbr_1x1`` / ``rbr_identity`` leaves, the ``ConvBNReLU`` / ``ConvBNSiLU`` (0.4.0)
and ``ConvWrapper`` (0.2.x/0.3.0, with a conv bias before the BN) wrappers, the ``sppf`` / ``cspsppf``
wrappers, the distillation and anchor-aided heads with their training-only branches, DFL constants, fp16
tensors, BatchNorm eps as a module attribute. It pickles real ``torch.nn`` leaves and stand-in ``yolov6.*``
classes registered under fake modules, exactly as ``torch.save`` of an official model records them.
"""

from __future__ import annotations

import copy
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repquant.models.blocks import ConvBNAct, LinearAddBlock, QARepVGGBlock, QARepVGGBlockV2, RealVGGBlock, RepVGGBlock
from repquant.models.layers import CSPSPPF, SPPF

_FAKE_MODULES: dict[str, types.ModuleType] = {}


def _official_class(full_name: str) -> type:
    """A stand-in class importable as ``full_name`` (so pickle records that global)."""
    module_name, _, name = full_name.rpartition(".")
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            sys.modules[sub] = _FAKE_MODULES.setdefault(sub, types.ModuleType(sub))
    module = sys.modules[module_name]
    if not hasattr(module, name):
        setattr(module, name, type(name, (), {"__module__": module_name}))
    return getattr(module, name)


def _node(full_name: str, **attributes: Any) -> Any:
    obj = _official_class(full_name).__new__(_official_class(full_name))
    obj.__dict__.update(training=False, _parameters=OrderedDict(), _buffers=OrderedDict(), _modules=OrderedDict(),
                        _non_persistent_buffers_set=set(), **attributes)
    return obj


_BLOCK_CLASSES = {RepVGGBlock: "RepVGGBlock", QARepVGGBlockV2: "QARepVGGBlockV2", QARepVGGBlock: "QARepVGGBlock",
                  RealVGGBlock: "RealVGGBlock", LinearAddBlock: "LinearAddBlock"}
_COMMON = "yolov6.layers.common."


class OfficialLayout:
    """Where each repquant module goes in the official tree of release ``naming`` with ``head`` kind."""

    def __init__(self, model: nn.Module, naming: str, head: str) -> None:
        self.model, self.naming, self.head = model, naming, head
        self.conv_silu = model.config.block_mode == "conv_silu"
        self.sppf = {p for p, m in model.named_modules() if isinstance(m, SPPF | CSPSPPF)}

    def is_block_slot(self, path: str, module: nn.Module) -> bool:
        """A conv_silu 3x3 block built by get_block (ConvWrapper / ConvBNSiLU), not an explicit conv."""
        if not (self.conv_silu and isinstance(module, ConvBNAct) and module.conv.kernel_size == (3, 3)
                and isinstance(module.act, nn.SiLU)):
            return False
        return not path.startswith("head.") and not any(path.startswith(p + ".") for p in self.sppf)

    def child_name(self, parent: nn.Module, parent_path: str, name: str) -> str:
        if isinstance(parent, QARepVGGBlock):
            return {"conv3x3": "rbr_dense.conv", "bn3x3": "rbr_dense.bn", "conv1x1": "rbr_1x1"}.get(name, name)
        if isinstance(parent, RepVGGBlock):
            return {"conv3x3": "rbr_dense.conv", "bn3x3": "rbr_dense.bn", "conv1x1": "rbr_1x1.conv",
                    "bn1x1": "rbr_1x1.bn", "bn_identity": "rbr_identity"}.get(name, name)
        if isinstance(parent, ConvBNAct) and name in ("conv", "bn"):
            wrapped = self.naming == "0.4.0" or self.is_block_slot(parent_path, parent)
            return f"block.{name}" if wrapped else name
        if isinstance(parent, SPPF | CSPSPPF) and self.naming == "0.4.0":
            return f"{'cspsppf' if isinstance(parent, CSPSPPF) else 'sppf'}.{name}"
        return name

    def head_name(self, name: str) -> str:
        """``cls_preds`` / ``reg_preds`` of the inference branch under this head kind and release."""
        if self.head == "distill_ns" and name == "reg_preds" and self.naming != "0.4.0":
            return "reg_preds_lrtb"
        if self.head == "fuse_ab" and self.naming != "0.4.0" and name in ("cls_preds", "reg_preds"):
            return f"{name}_af"
        return name

    def class_of(self, path: str, module: nn.Module) -> str:
        if path == "":
            return "yolov6.models.yolo.Model"
        if path == "head":
            return {"plain": "yolov6.models.effidehead.Detect",
                    "distill_ns": "yolov6.models.heads.effidehead_distill_ns.Detect",
                    "fuse_ab": "yolov6.models.heads.effidehead_fuseab.Detect"}[self.head]
        if path in ("backbone", "neck"):
            return f"yolov6.models.{'efficientrep' if path == 'backbone' else 'reppan'}.{type(module).__name__}"
        for cls, name in _BLOCK_CLASSES.items():
            if isinstance(module, cls):
                return _COMMON + name
        if isinstance(module, ConvBNAct):
            silu = isinstance(module.act, nn.SiLU)
            if self.is_block_slot(path, module):
                return _COMMON + ("ConvBNSiLU" if self.naming == "0.4.0" else "ConvWrapper")
            if self.naming == "0.4.0":
                return _COMMON + ("ConvBNSiLU" if silu else "ConvBNReLU")
            return _COMMON + ("Conv" if silu else "SimConv")
        return _COMMON + type(module).__name__


def _leaf(module: nn.Module, bn_eps: float) -> nn.Module:
    leaf = copy.deepcopy(module).half()
    if isinstance(leaf, nn.BatchNorm2d):
        leaf.eps = bn_eps  # as the official code would have it (initialize_weights sets 1e-3)
    return leaf


def _build(layout: OfficialLayout, module: nn.Module, path: str, bn_eps: float) -> Any:
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.BatchNorm2d | nn.ReLU | nn.SiLU | nn.MaxPool2d
                  | nn.AvgPool2d | nn.Identity | nn.Upsample):
        return _leaf(module, bn_eps)
    node = _node(layout.class_of(path, module))
    for name, value in module._parameters.items():
        if value is not None:
            node._parameters[name] = nn.Parameter(value.detach().half(), requires_grad=False)
    for name, value in module._buffers.items():
        if value is not None and name not in module._non_persistent_buffers_set:
            node._buffers[name] = value.detach().half()
    for name, child in module._modules.items():
        if child is None:
            continue
        child_path = f"{path}.{name}" if path else name
        official = layout.child_name(module, path, name)
        if path.startswith("head") and path.count(".") == 0:
            official = layout.head_name(official)
        _attach(node, official, _build(layout, child, child_path, bn_eps))
    return node


def _attach(node: Any, dotted: str, child: Any) -> None:
    """Attach ``child`` at ``dotted`` below ``node``, creating the wrapper modules in between."""
    first, _, rest = dotted.partition(".")
    if not rest:
        node._modules[first] = child
        return
    if first not in node._modules:
        node._modules[first] = _node(_COMMON + "ConvModule")
    _attach(node._modules[first], rest, child)


def _unfold_qa_bn(node: Any, block: QARepVGGBlock, bn_eps: float, generator: torch.Generator) -> None:
    """A deployed official QARepVGG block keeps its post-sum BN: split repquant's fused conv into conv + BN."""
    conv = node._modules["rbr_reparam"]
    c = conv.out_channels
    gamma, beta = torch.rand(c, generator=generator) + 0.5, torch.randn(c, generator=generator) * 0.1
    mean, var = torch.randn(c, generator=generator) * 0.1, torch.rand(c, generator=generator) + 0.5
    scale = gamma / torch.sqrt(var + bn_eps)
    weight, bias = block.rbr_reparam.weight.detach(), block.rbr_reparam.bias.detach()
    with torch.no_grad():
        conv.weight.copy_((weight / scale.reshape(-1, 1, 1, 1)).half())
        conv.bias.copy_(((bias - beta) / scale + mean).half())
    bn = nn.BatchNorm2d(c, eps=bn_eps).half().eval()
    with torch.no_grad():
        bn.weight.copy_(gamma), bn.bias.copy_(beta), bn.running_mean.copy_(mean), bn.running_var.copy_(var)
    node._modules["bn"] = bn


def _add_conv_bias(node: Any, generator: torch.Generator) -> None:
    """0.2.x/0.3.0 ConvWrapper: conv with bias b before the BN; the same function when running_mean grows by b."""
    inner = node._modules["block"]
    old, bn = inner._modules["conv"], inner._modules["bn"]
    conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, groups=old.groups,
                     bias=True).half()
    shifted = (bn.running_mean.float() + torch.randn(old.out_channels, generator=generator) * 0.05).half()
    with torch.no_grad():
        conv.weight.copy_(old.weight)
        # The bias stays float32 so that shifted - bias == running_mean exactly: the file computes the same.
        conv.bias = nn.Parameter(shifted.float() - bn.running_mean.float(), requires_grad=False)
        bn.running_mean.copy_(shifted)
    inner._modules["conv"] = conv


def _post_process(layout: OfficialLayout, root: Any, model: nn.Module, bn_eps: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for path, module in model.named_modules():
        node = root
        official = _official_path(layout, model, path)
        for part in official.split(".") if official else []:
            node = node._modules[part]
        if isinstance(module, QARepVGGBlock) and module.rbr_reparam is not None:
            _unfold_qa_bn(node, module, bn_eps, generator)
        if layout.naming != "0.4.0" and layout.is_block_slot(path, module) and module.bn is not None:
            _add_conv_bias(node, generator)


def _official_path(layout: OfficialLayout, model: nn.Module, path: str) -> str:
    parts, official, parent, parent_path = path.split(".") if path else [], [], model, ""
    for depth, name in enumerate(parts):
        step = layout.child_name(parent, parent_path, name)
        if depth == 1 and parts[0] == "head":
            step = layout.head_name(step)
        official.append(step)
        parent = parent._modules[name]
        parent_path = f"{parent_path}.{name}" if parent_path else name
    return ".".join(official).replace("head", "detect", 1) if official and official[0] == "head" else ".".join(official)


def _head_extras(layout: OfficialLayout, detect: Any, model: nn.Module, seed: int) -> None:
    """Training-only branches of the distillation / anchor-aided heads, and the DFL constants."""
    generator = torch.Generator().manual_seed(seed + 1)
    channels = [conv.in_channels for conv in model.head.cls_preds]
    nc, reg_max = model.config.num_classes, model.config.reg_max

    def branch(outputs: int) -> nn.ModuleList:
        convs = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in channels).half()
        for conv in convs:
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.01)
        return convs

    dfl = reg_max or 16  # tags 0.2.1-0.4.0 build Detect with its default reg_max 16 even without DFL
    if layout.head == "distill_ns":
        detect._modules["reg_preds" if layout.naming != "0.4.0" else "reg_preds_dist"] = branch(4 * (dfl + 1))
    if layout.head == "fuse_ab":
        detect._modules["cls_preds_ab"], detect._modules["reg_preds_ab"] = branch(3 * nc), branch(3 * 4)
    proj = torch.linspace(0, dfl, dfl + 1)
    detect._parameters["proj"] = nn.Parameter(proj.half(), requires_grad=False)
    proj_conv = nn.Conv2d(dfl + 1, 1, 1, bias=False).half()
    with torch.no_grad():
        proj_conv.weight.copy_(proj.reshape(1, -1, 1, 1))
    detect._modules["proj_conv"] = proj_conv
    detect.__dict__.update(nc=nc, reg_max=dfl, use_dfl=reg_max > 0, no=nc + 5, nl=3)


def write_official(model: nn.Module, path: str | Path, naming: str = "0.4.0", head: str = "plain",
                   bn_eps: float = 1e-3, seed: int = 0) -> Path:
    """Save ``model`` (train form or deployed) as the official code of release ``naming`` would, with the
    ``plain``, ``distill_ns`` or ``fuse_ab`` head. Computes the same function (up to fp16 storage), except that
    every BatchNorm gets ``bn_eps``."""
    layout = OfficialLayout(model, naming, head)
    root = _build(layout, model, "", bn_eps)
    root._modules["detect"] = root._modules.pop("head")
    _post_process(layout, root, model, bn_eps, seed)
    _head_extras(layout, root._modules["detect"], model, seed)
    root.__dict__.update(nc=model.config.num_classes, names=[f"class{i}" for i in range(model.config.num_classes)])
    import numpy as np

    checkpoint = {"model": root, "optimizer": None, "scheduler": None, "epoch": 3,
                  "results": (np.float64(0.25), np.float64(0.125)), "ema": None, "updates": None}
    path = Path(path)
    torch.save(checkpoint, path)
    return path
