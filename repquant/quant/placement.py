"""Where INT8 quantizers go in a deployed network, following TensorRT's explicit-quantization rules.

Found from the graph (``torch.fx`` symbolic trace of the float, deployed model), never from
hand-written layer lists. Rules (REFERENCE.md, "TensorRT explicit quantization rules"):
- every ``Conv2d`` / ``ConvTranspose2d``: a weight quantizer per output channel (Conv axis 0,
  ConvTranspose axis 1) and an input quantizer per tensor (inputs of weighted ops, not outputs);
- a residual ``Add``: quantize its skip input so TensorRT can fuse Conv + Add;
- ``MaxPool2d`` (SPPF): quantize its input, so the pool runs in INT8;
- shared scales: all consumers of one tensor share one scale, and so do all inputs and the output
  of a ``Concat`` and the input and output of a ``MaxPool`` (both commute with quantization);
- layers matching ``exclude`` (the DFL projection, ``*dfl*``) are never quantized.
Also found, for layouts that quantize tensors rather than consumers (ONNX Runtime): each quantized conv whose
only consumer is an ``nn.ReLU`` (``relu_after``), and the activation quantizers whose input is provably
non-negative (a ReLU output, or a MaxPool / Concat of such tensors: ``nonnegative``).
Quantizer names are the modelopt names: ``<layer>.input_quantizer``, ``<layer>.weight_quantizer``,
and ``<block>.skip_quantizer`` (``skip_quantizer_1`` ...) for the residual adds of ``<block>``.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from repquant.errors import ModelError

DEFAULT_EXCLUDE = ("*dfl*",)
_ADD_TARGETS = (operator.add, torch.add, operator.iadd)
_CAT_TARGETS = (torch.cat, torch.concat)
_MUL_TARGETS = (operator.mul, torch.mul)


@dataclass(frozen=True)
class QuantLayer:
    """A quantizable layer: ``name`` is its module FQN; ``kind`` in conv, conv_transpose, maxpool, add."""

    name: str
    kind: str


@dataclass(frozen=True)
class QuantizerSpec:
    """One quantizer: ``name`` its FQN, ``layer`` the owning module FQN, ``role`` in
    weight, input, skip; ``axis`` the per-channel axis (``None`` = per tensor)."""

    name: str
    layer: str
    role: str
    axis: int | None


@dataclass(frozen=True)
class QuantPlacement:
    """Layers, their quantizers, and groups of quantizer names that must share one scale."""

    layers: tuple[QuantLayer, ...]
    quantizers: tuple[QuantizerSpec, ...]
    # Groups that share one scale; they also name the ReLU and MaxPool output quantizers only the ONNX Runtime
    # layout enables.
    shared_groups: tuple[tuple[str, ...], ...]
    relu_after: tuple[tuple[str, str], ...] = ()  # (conv FQN, FQN of the ReLU that is its only consumer)
    silu_after: tuple[tuple[str, str], ...] = ()  # (conv FQN, FQN of the SiLU that is its only consumer)
    nonnegative: tuple[str, ...] = ()  # activation quantizers whose input is >= 0 by construction

    def names(self, role: str | None = None) -> list[str]:
        """Quantizer FQNs, optionally only those of one role."""
        return [q.name for q in self.quantizers if role is None or q.role == role]


class _LeafTracer(fx.Tracer):
    """Traces only the root's own forward; every child module stays a leaf (keeps its class)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace(module: nn.Module, leaf_children: bool = False) -> fx.Graph:
    """fx graph of ``module`` (``leaf_children``: do not trace into child modules)."""
    tracer = _LeafTracer() if leaf_children else fx.Tracer()
    try:
        return tracer.trace(module)
    except Exception as err:  # fx raises many types; name the module and the cause
        raise ModelError(
            f"{type(module).__name__}: torch.fx cannot trace it for quantizer placement: {err}"
        ) from err


def _strip_scale(node: fx.Node) -> fx.Node:
    """The tensor behind ``alpha * x`` (a per-channel/scalar scale is not a new activation)."""
    while node.op == "call_function" and node.target in _MUL_TARGETS:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        if len(tensors) != 1:
            break
        node = tensors[0]
    return node


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def residual_skip(node: fx.Node) -> fx.Node | None:
    """For ``add(a, b)``: the skip input (the one whose source feeds the other branch), else None."""
    if node.op != "call_function" or node.target not in _ADD_TARGETS or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if _strip_scale(a) in _ancestors(b):
        return a
    if _strip_scale(b) in _ancestors(a):
        return b
    return None


def skip_quantizer_name(index: int) -> str:
    """Attribute name of the ``index``-th residual-add skip quantizer of one block."""
    return "skip_quantizer" if index == 0 else f"skip_quantizer_{index}"


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else str(path)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[object, object] = {}

    def find(self, x: object) -> object:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: object, b: object) -> None:
        self.parent[self.find(a)] = self.find(b)


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in exclude)


def find_placement(model: nn.Module, exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> QuantPlacement:
    """Quantizer placement for a float (deployed) model; see the module docstring for the rules."""
    graph = trace(model)
    modules = dict(model.named_modules())
    layers: dict[str, QuantLayer] = {}
    specs: dict[str, QuantizerSpec] = {}
    reads: dict[str, list[fx.Node]] = {}
    tensors = _UnionFind()
    add_count: dict[str, int] = {}
    relu_after, silu_after = dict[str, str](), dict[str, str]()
    nonnegative: set[fx.Node] = set()

    def add_quantizer(spec: QuantizerSpec, tensor: fx.Node | None) -> None:
        specs.setdefault(spec.name, spec)
        reads.setdefault(spec.name, []).extend([tensor] if tensor is not None else [])
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[str(node.target)], nn.ReLU):
            nonnegative.add(node)
            if (conv := _only_consumer_of_conv(node, layers)) is not None:
                relu_after[conv] = str(node.target)  # its quantizer reads the ReLU's tensor: the readers' scale
                reads.setdefault(relu_quantizer_name(str(node.target)), []).append(node)
        elif node.op == "call_module" and isinstance(modules[str(node.target)], nn.SiLU):
            silu_after.update({c: str(node.target) for c in [_only_consumer_of_conv(node, layers)] if c})
        elif node.op == "call_module":
            name, mod = str(node.target), modules[str(node.target)]
            if _excluded(name, exclude) or not isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d)):
                continue
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(mod, nn.MaxPool2d):
                layers.setdefault(name, QuantLayer(name, "maxpool"))
                add_quantizer(QuantizerSpec(f"{name}.input_quantizer", name, "input", None), src)
                if src is not None:
                    tensors.union(src, node)  # max commutes with a monotone quantizer: one scale
                    nonnegative.update([node] if src in nonnegative else [])
                    reads.setdefault(pool_output_quantizer_name(name), []).append(node)  # ORT layout only
                continue
            transpose = isinstance(mod, nn.ConvTranspose2d)
            layers.setdefault(name, QuantLayer(name, "conv_transpose" if transpose else "conv"))
            add_quantizer(QuantizerSpec(f"{name}.weight_quantizer", name, "weight", 1 if transpose else 0), None)
            add_quantizer(QuantizerSpec(f"{name}.input_quantizer", name, "input", None), src)
        elif node.op == "call_function" and node.target in _CAT_TARGETS:
            for arg in node.args[0]:
                if isinstance(arg, fx.Node):
                    tensors.union(arg, node)
            nonnegative.update([node] if all(a in nonnegative for a in node.args[0]) else [])
        elif node.op == "call_function" and (skip := residual_skip(node)) is not None:
            owner = _owner(node)
            if _excluded(owner, exclude):
                continue
            if not owner:
                raise ModelError(f"{type(model).__name__}: a residual add in the top-level forward "
                                 "cannot get a skip quantizer; move it into a block")
            index = add_count.get(owner, 0)
            add_count[owner] = index + 1
            layers.setdefault(owner, QuantLayer(owner, "add"))
            add_quantizer(QuantizerSpec(f"{owner}.{skip_quantizer_name(index)}", owner, "skip", None), skip)
    return QuantPlacement(tuple(layers.values()), tuple(specs.values()), _shared_groups(reads, tensors),
                          tuple(relu_after.items()), tuple(silu_after.items()),
                          tuple(q for q, nodes in reads.items() if nodes and all(n in nonnegative for n in nodes)))


def sigmoid_quantizer_name(silu: str) -> str:
    """The quantizer of ``sigmoid(x)`` inside a SiLU (``x * sigmoid(x)``)."""
    return f"{silu}.sigmoid_quantizer"


def pool_output_quantizer_name(pool: str) -> str:
    """The output quantizer of a MaxPool (ONNX Runtime layout: lets the pool run on INT8 between Q and DQ)."""
    return f"{pool}.output_quantizer"


def relu_quantizer_name(relu: str) -> str:
    """The quantizer of a ReLU's output (modelopt's name for the output quantizer of a quantized module)."""
    return f"{relu}.output_quantizer"


def _only_consumer_of_conv(node: fx.Node, layers: dict[str, QuantLayer]) -> str | None:
    """The quantized conv whose output only ``node`` (an activation module called once) reads, else None.
    (A module called on several tensors has one quantizer: it would force one scale on all of them.)"""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if src is None or src.op != "call_module" or len(src.users) != 1:
        return None
    if sum(1 for n in node.graph.nodes if n.op == "call_module" and n.target == node.target) != 1:
        return None
    conv = str(src.target)
    return conv if conv in layers and layers[conv].kind in ("conv", "conv_transpose") else None


def _shared_groups(reads: dict[str, list[fx.Node]], tensors: _UnionFind) -> tuple[tuple[str, ...], ...]:
    """Quantizers reading tensors of one equivalence class share a scale; groups of size >= 2."""
    groups = _UnionFind()
    first_reader: dict[object, str] = {}
    for qname, nodes in reads.items():
        groups.find(qname)
        for n in nodes:
            root = tensors.find(n)
            if root in first_reader:
                groups.union(qname, first_reader[root])
            else:
                first_reader[root] = qname
    members: dict[object, list[str]] = {}
    for qname in reads:
        members.setdefault(groups.find(qname), []).append(qname)
    return tuple(tuple(m) for m in members.values() if len(m) > 1)
