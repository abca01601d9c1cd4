"""Map an official YOLOv6 module tree (``reader.OfficialFile``) onto a repquant model.

The official and repquant trees share their module paths (``backbone.ERBlock_3.1.conv1``); only leaves and
wrappers are named differently, and what differs between official releases is known (read from the
official code, tags 0.2.1, 0.3.0, 0.4.0; facts, not code):

- wrappers: 0.4.0 wraps every Conv+BN+act in ``ConvBNReLU`` / ``ConvBNSiLU`` (``X.block.conv``) and the SPPF
  modules in ``X.sppf`` / ``X.cspsppf``; 0.2.x/0.3.0 name them ``SimConv`` / ``Conv`` (``X.conv``) and
  ``SimSPPF`` / ``SimCSPSPPF`` (``X.cv1``), which is repquant's layout;
- RepVGG leaves: ``rbr_dense.conv|bn`` -> ``conv3x3|bn3x3``, ``rbr_1x1.conv|bn`` -> ``conv1x1|bn1x1``,
  ``rbr_identity`` -> ``bn_identity``; QARepVGG's bare ``rbr_1x1`` conv -> ``conv1x1``;
- heads: ``detect`` -> ``head``; the self-distillation head of N/S (``effidehead_distill_ns``) keeps a DFL
  branch for training only, ``reg_preds`` in 0.3.0 (inference branch ``reg_preds_lrtb``) and
  ``reg_preds_dist`` in 0.4.0 (inference branch ``reg_preds``); the anchor-aided head (``fuse_ab``) infers with
  ``cls_preds_af`` / ``reg_preds_af`` in 0.3.0 and ``cls_preds`` / ``reg_preds`` in 0.4.0, its ``*_ab``
  branches are training only; ``proj`` / ``proj_conv`` are DFL constants;
- folds that keep the function exact: a conv bias in front of a BN (0.2.x/0.3.0 ``Conv`` of YOLOv6-L) goes
  into the BN's running mean; a BN eps other than repquant's 1e-3 into its running variance; the post-sum BN
  that a deployed official QARepVGG block keeps into its ``rbr_reparam`` conv.

Every tensor of the file ends up mapped, folded, listed as training-only or checked as a constant; the
variant is the registered one whose tensor names and shapes the mapped state fits exactly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from repquant.checkpoint import check_state_dict
from repquant.errors import CheckpointError
from repquant.models import YOLOv6, get_config, list_models
from repquant.models.blocks import BN_EPS
from repquant.official.reader import OfficialFile, read_official
from repquant.reparam import fuse_conv_bn, reparameterize

# Official class of the stem (built by get_block(training_mode)) -> repquant block mode.
BLOCK_CLASSES = {
    "RepVGGBlock": "repvgg", "QARepVGGBlock": "qarepvgg", "QARepVGGBlockV2": "qarepvggv2", "RealVGGBlock": "repopt",
    "LinearAddBlock": "hyper_search", "ConvWrapper": "conv_silu", "ConvBNSiLU": "conv_silu",
}
_LEAF_RULES = [
    (re.compile(r"^detect\."), "head."),
    (re.compile(r"\.block\.(conv|bn)\."), r".\1."),
    (re.compile(r"\.(cspsppf|sppf)\."), "."),
    (re.compile(r"\.rbr_dense\.conv\."), ".conv3x3."),
    (re.compile(r"\.rbr_dense\.bn\."), ".bn3x3."),
    (re.compile(r"\.rbr_1x1\.conv\."), ".conv1x1."),
    (re.compile(r"\.rbr_1x1\.bn\."), ".bn1x1."),
    (re.compile(r"\.rbr_1x1\.weight$"), ".conv1x1.weight"),
    (re.compile(r"\.rbr_identity\."), ".bn_identity."),
]


@dataclass
class MappingReport:
    """How a file was read: release ``naming``, head kind, ``variant`` found, and where every tensor went."""

    naming: str
    head: str
    block_mode: str
    deployed: bool
    variant: str = ""
    mapped: int = 0
    folded: list[str] = field(default_factory=list)
    training_only: list[str] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.variant} ({self.block_mode}{', deployed' if self.deployed else ''}), {self.naming} naming, "
                f"{self.head} head: {self.mapped} tensors mapped, {len(self.folded)} folded, "
                f"{len(self.training_only)} training-only, {len(self.constants)} constants")


@dataclass
class ConvertedModel:
    model: YOLOv6
    report: MappingReport
    official: OfficialFile


def _head_kind(f: OfficialFile) -> str:
    cls = f.classes.get("detect", "")
    if "distill_ns" in cls or any(k.startswith(("detect.reg_preds_lrtb.", "detect.reg_preds_dist.")) for k in f.state):
        return "distill_ns"
    if "fuseab" in cls or any(k.startswith("detect.cls_preds_ab.") for k in f.state):
        return "fuse_ab"
    return "plain"


def _naming(f: OfficialFile) -> str:
    """0.4.0 wraps even the head's stems in ConvBNSiLU (``detect.stems.0.block.conv``); before it, v3.0 models
    (BiFPAN neck) come from 0.3.x and v2.0 models from 0.2.x."""
    if any(k.startswith("detect.stems.0.block.") for k in f.state):
        return "0.4.0"
    return "0.3.0" if any(k.startswith("neck.Bifusion") for k in f.state) else "0.2.x"


def _head_branches(f: OfficialFile, head: str, report: MappingReport) -> dict[str, str]:
    """Official head branch prefix -> repquant prefix, for the branches inference uses; the others are
    training-only and listed in the report."""
    if head == "distill_ns":  # 0.3.x: reg_preds_lrtb infers, reg_preds is DFL; 0.4.x: reg_preds, reg_preds_dist
        lrtb = "detect.reg_preds_lrtb.0.weight" in f.state
        infer, train = ("reg_preds_lrtb", "reg_preds") if lrtb else ("reg_preds", "reg_preds_dist")
        report.training_only += [k for k in f.state if k.startswith(f"detect.{train}.")]
        return {f"detect.{infer}.": "head.reg_preds.", f"detect.{train}.": ""}
    if head == "fuse_ab":
        report.training_only += [k for k in f.state if k.startswith(("detect.cls_preds_ab.", "detect.reg_preds_ab."))]
        return {"detect.cls_preds_af.": "head.cls_preds.", "detect.reg_preds_af.": "head.reg_preds.",
                "detect.cls_preds_ab.": "", "detect.reg_preds_ab.": ""}
    return {}


def _translate(name: str, branches: dict[str, str]) -> str | None:
    for prefix, target in branches.items():
        if name.startswith(prefix):
            return target + name[len(prefix):] if target else None
    for pattern, replacement in _LEAF_RULES:
        name = pattern.sub(replacement, name)
    return name


def _fix_bn_eps(f: OfficialFile, state: dict[str, Tensor], report: MappingReport) -> None:
    """BN(x; var, eps) == BN(x; var + eps - 1e-3, 1e-3): repquant's BNs use eps 1e-3 (YOLOv6 initialize_weights)."""
    for path, cls in f.classes.items():
        eps = f.attributes.get(path, {}).get("eps")
        if cls.endswith("BatchNorm2d") and isinstance(eps, float) and eps != BN_EPS and f"{path}.running_var" in state:
            state[f"{path}.running_var"] = state[f"{path}.running_var"] + (eps - BN_EPS)
            report.notes.append(f"{path}: BN eps {eps:g} folded into running_var")


def _fold_conv_bias(f: OfficialFile, state: dict[str, Tensor], report: MappingReport) -> None:
    """``BN(conv(x) + b) == BN'(conv(x))`` with running_mean' = running_mean - b (0.2.x/0.3.0 ``Conv`` blocks of
    YOLOv6-L carry a conv bias in front of their BN; repquant's Conv+BN has none)."""
    for name in [k for k in state if k.endswith(".conv.bias")]:
        parent = name[: -len(".conv.bias")]
        if f"{parent}.bn.running_mean" in state:
            state[f"{parent}.bn.running_mean"] = state[f"{parent}.bn.running_mean"] - state.pop(name)
            report.folded.append(name)


def _fold_qa_post_bn(f: OfficialFile, state: dict[str, Tensor], report: MappingReport) -> None:
    """A deployed official QARepVGG block keeps its post-sum BN after ``rbr_reparam``: fold it in."""
    for path, cls in f.classes.items():
        if cls.rsplit(".", 1)[-1].startswith("QARepVGGBlock") and f"{path}.rbr_reparam.weight" in state:
            bn = {k: state.pop(f"{path}.bn.{k}") for k in ("weight", "bias", "running_mean", "running_var")}
            if state.pop(f"{path}.bn.num_batches_tracked", None) is not None:
                report.folded.append(f"{path}.bn.num_batches_tracked")
            eps = float(f.attributes.get(f"{path}.bn", {}).get("eps", BN_EPS))
            w, b = fuse_conv_bn(state[f"{path}.rbr_reparam.weight"], state[f"{path}.rbr_reparam.bias"],
                                bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], eps)
            state[f"{path}.rbr_reparam.weight"], state[f"{path}.rbr_reparam.bias"] = w, b
            report.folded += [f"{path}.bn.{k}" for k in bn]


def _dfl_constants(f: OfficialFile, state: dict[str, Tensor], report: MappingReport) -> None:
    """``proj`` = 0..R and ``proj_conv`` = proj as a 1x1 conv: checked, then dropped (repquant decodes DFL with
    its own 0..R projection)."""
    proj = state.pop("detect.proj", None)
    conv = state.pop("detect.proj_conv.weight", None)
    for name, value in (("detect.proj", proj), ("detect.proj_conv.weight", conv)):
        if value is None:
            continue
        expected = torch.linspace(0, value.numel() - 1, value.numel())
        if not torch.equal(value.reshape(-1), expected) and f.attributes.get("detect", {}).get("use_dfl"):
            raise CheckpointError(f"{f.path}: {name} is not the DFL projection 0..{value.numel() - 1}; this head "
                                  "decodes boxes differently from YOLOv6's")
        report.constants.append(name)


def map_state(f: OfficialFile) -> tuple[dict[str, Tensor], MappingReport]:
    """The official state in repquant names (folds applied), and the report of where every tensor went."""
    stem = f.classes.get("backbone.stem", "").rsplit(".", 1)[-1]
    if stem not in BLOCK_CLASSES:
        raise CheckpointError(f"{f.path}: the stem is a {stem or 'missing module'}; repquant reads official models "
                              f"built from {', '.join(sorted(BLOCK_CLASSES))} blocks")
    stem_state = [k for k in f.state if k.startswith("backbone.stem.")]
    deployed = any(".rbr_reparam." in k for k in stem_state) or (
        stem in ("ConvWrapper", "ConvBNSiLU") and not any(".bn." in k for k in stem_state))
    report = MappingReport(_naming(f), _head_kind(f), BLOCK_CLASSES[stem], deployed)
    state = dict(f.state)
    _dfl_constants(f, state, report)
    _fix_bn_eps(f, state, report)
    _fold_conv_bias(f, state, report)
    _fold_qa_post_bn(f, state, report)
    branches = _head_branches(f, report.head, report)
    mapped: dict[str, Tensor] = {}
    for name, tensor in state.items():
        target = _translate(name, branches)
        if target is None:
            continue  # a training-only branch, listed in the report
        if target in mapped:
            raise CheckpointError(f"{f.path}: {name} and another tensor both map to {target}")
        mapped[target] = tensor
    report.mapped = len(mapped)
    return mapped, report


def _candidates(state: dict[str, Tensor], report: MappingReport, num_classes: int, reg_max: int) -> list[YOLOv6]:
    """The registered architectures with the file's stem width and neck type, built (on the meta device) with
    its classes, DFL and block mode."""
    stem = next((v for k, v in state.items() if k.startswith("backbone.stem.") and v.ndim == 4), None)
    bifpan = any(k.startswith("neck.Bifusion") for k in state)
    models = []
    for name in list_models():
        base = get_config(name)
        if name.endswith("-qa") != (report.block_mode == "qarepvggv2") or ("BiFPAN" in base.neck) != bifpan:
            continue
        if stem is not None and base.channels[0] != stem.shape[0]:
            continue
        config = dataclasses.replace(base, num_classes=num_classes, reg_max=reg_max, block_mode=report.block_mode)
        with torch.device("meta"):
            model = YOLOv6(config)
            models.append(reparameterize(model) if report.deployed else model)
    return models


def _mismatches(expected: dict[str, Tensor], found: dict[str, Tensor]) -> list[str]:
    out = [f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in found]
    out += [f"unexpected {k}" for k in found if k not in expected]
    out += [f"{k} has shape {tuple(found[k].shape)}, expected {tuple(v.shape)}" for k, v in expected.items()
            if k in found and tuple(found[k].shape) != tuple(v.shape)]
    return out


def _match_variant(f: OfficialFile, state: dict[str, Tensor], report: MappingReport) -> YOLOv6:
    try:
        num_classes = int(state["head.cls_preds.0.weight"].shape[0])
        reg_max = int(state["head.reg_preds.0.weight"].shape[0]) // 4 - 1
    except KeyError as err:
        raise CheckpointError(f"{f.path}: no detection head tensor {err.args[0]} after mapping") from None
    scored = []
    for meta_model in _candidates(state, report, num_classes, reg_max):
        problems = _mismatches(meta_model.state_dict(), state)
        if not problems:
            report.variant = meta_model.config.name
            model = YOLOv6(meta_model.config)
            return reparameterize(model) if report.deployed else model
        scored.append((len(problems), meta_model.config.name, problems[0]))
    if not scored:
        raise CheckpointError(f"{f.path}: no repquant variant has this stem width and neck ({report.block_mode}, "
                              f"{report.naming} naming)")
    count, name, first = min(scored)
    raise CheckpointError(f"{f.path}: matches no repquant variant; closest is {name} ({report.block_mode}, "
                          f"{count} differences, first: {first})")


def convert_official(path: str | os.PathLike) -> ConvertedModel:
    """An official checkpoint as a repquant model (eval mode, float32), with the mapping report."""
    official = read_official(path)
    state, report = map_state(official)
    model = _match_variant(official, state, report)
    check_state_dict(Path(path), model.config.name, model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return ConvertedModel(model.eval(), report, official)


def load_official_model(path: str | os.PathLike, expected_num_classes: int | None = None) -> YOLOv6:
    """The repquant model of an official checkpoint; ``expected_num_classes`` guards against another dataset."""
    model = convert_official(path).model
    if expected_num_classes is not None and model.config.num_classes != expected_num_classes:
        raise CheckpointError(f"{path}: official checkpoint is {model.config.name} (num_classes "
                              f"{model.config.num_classes}), expected num_classes {expected_num_classes}")
    return model
