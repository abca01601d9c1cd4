"""Insert, disable and calibrate INT8 quantizers (modelopt underneath, layered like modelopt).

``insert_quantizers`` -> ``disable_quantizers`` (keep-float layers) -> ``calibrate`` (forward loop)
-> export QDQ. Each verb is public and works on a model in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import nn

from repquant.errors import CalibrationError, ModelError
from repquant.quant import _modelopt
from repquant.quant.calibrators import CalibrationOptions, ForwardLoop, get_calibrator
from repquant.quant.config import QuantConfig
from repquant.quant.placement import (
    QuantPlacement,
    pool_output_quantizer_name,
    relu_quantizer_name,
    residual_skip,
    sigmoid_quantizer_name,
    skip_quantizer_name,
    trace,
)

_M = TypeVar("_M", bound=nn.Module)


@dataclass(frozen=True)
class QuantizerState:
    """Inspection view of one quantizer; ``amax`` is per tensor (shape ()) or per channel."""

    enabled: bool
    num_bits: int
    axis: int | tuple[int, ...] | None
    unsigned: bool
    amax: torch.Tensor | None
    calibrator: str | None


def _insert_skip_quantizers(model: nn.Module, placement: QuantPlacement, num_bits: int) -> None:
    """Rewrite each block that owns a residual add so its skip input goes through a quantizer.

    The block (only its own forward; children stay intact) becomes an ``fx.GraphModule`` at the same
    FQN, so every layer name is unchanged and the model class is untouched.
    """
    owners = sorted({q.layer for q in placement.quantizers if q.role == "skip"})
    for owner in owners:
        block = model.get_submodule(owner)
        graph = trace(block, leaf_children=True)
        gm = fx.GraphModule(block, graph, class_name=f"Quant{type(block).__name__}")
        adds = [(n, s) for n in gm.graph.nodes if (s := residual_skip(n)) is not None]
        for index, (add, skip) in enumerate(adds):
            qname = skip_quantizer_name(index)
            gm.add_submodule(qname, _modelopt.new_tensor_quantizer(num_bits))
            with gm.graph.inserting_before(add):
                qnode = gm.graph.call_module(qname, (skip,))
            add.replace_input_with(skip, qnode)
        gm.recompile()
        parent_name, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent_name), child, gm)


def _quant_cfg(config: QuantConfig) -> list[dict[str, Any]]:
    """modelopt ``quant_cfg`` by wildcard; quantizers outside the placement are disabled afterwards.

    (One entry per quantizer name also works but costs O(entries x modules) fnmatch calls.)
    """
    act: dict[str, Any] = {"num_bits": config.num_bits, "axis": None}  # calibrator: see calibrate()
    cfg: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": config.num_bits, "axis": 0}},
        # ConvTranspose2d weights are (C_in, C_out, kH, kW): per output channel is axis 1.
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.ConvTranspose2d",
         "cfg": {"num_bits": config.num_bits, "axis": 1}},
        {"quantizer_name": "*input_quantizer", "cfg": act},
        {"quantizer_name": "*skip_quantizer*", "cfg": act},
    ]
    if config.quantize_conv_outputs:
        for parent in ("nn.Conv2d", "nn.ConvTranspose2d"):
            cfg.append({"quantizer_name": "*output_quantizer", "parent_class": parent, "cfg": act})
    if config.quantize_relu_outputs:
        unsigned = {**act, "unsigned": True}
        cfg.append({"quantizer_name": "*output_quantizer", "parent_class": "ReLU", "cfg": unsigned})
        cfg.append({"quantizer_name": "*sigmoid_quantizer", "parent_class": "SiLU", "cfg": unsigned})
        cfg.append({"quantizer_name": "*output_quantizer", "parent_class": "nn.MaxPool2d", "cfg": act})
    return cfg


def _wanted_quantizers(placement: QuantPlacement, config: QuantConfig) -> set[str]:
    names = set(placement.names())
    if config.quantize_conv_outputs:
        convs = [ly.name for ly in placement.layers if ly.kind in ("conv", "conv_transpose")]
        names |= {f"{name}.output_quantizer" for name in convs}
    if config.quantize_relu_outputs:  # the ReLU's quantizer replaces the conv's
        names -= {f"{conv}.output_quantizer" for conv, _ in placement.relu_after}
        names |= {relu_quantizer_name(relu) for _, relu in placement.relu_after}
        names |= {sigmoid_quantizer_name(silu) for _, silu in placement.silu_after}
        names |= {pool_output_quantizer_name(ly.name) for ly in placement.layers if ly.kind == "maxpool"}
    return names


def float_layer_quantizers(placement: QuantPlacement, layers: Iterable[str]) -> list[str]:
    """What keep-float ``layers`` leave in float under the ONNX Runtime layout's placement 2: their own quantizers
    and the ReLU / sigmoid quantizer of their output (whose readers then quantize it themselves). The tensor they
    read stays the INT8 tensor its other readers share (the export guards the read: ``guard_float_convs``)."""
    relu_of, silu_of = dict(placement.relu_after), dict(placement.silu_after)
    names = list(layers)
    return (names + [relu_quantizer_name(relu_of[n]) for n in names if n in relu_of]
            + [sigmoid_quantizer_name(silu_of[n]) for n in names if n in silu_of])


def insert_quantizers(model: _M, placement: QuantPlacement, config: QuantConfig) -> _M:
    """Insert (uncalibrated) fake-quant quantizers as ``placement`` says; keep-float layers disabled.

    In place; returns ``model``. Conv / ConvTranspose / MaxPool modules become modelopt quantized
    modules (same FQNs); blocks with residual adds become GraphModules with a ``skip_quantizer``.
    """
    quant_cfg, relu = _quant_cfg(config), config.quantize_relu_outputs  # ReLU and SiLU quantizers
    # Convert modules first: modelopt treats a model that already holds a TensorQuantizer as
    # quantized and would skip the conversion. Re-applying the config then sets the skip quantizers.
    _modelopt.quantize_modules(model, quant_cfg, relu)
    if any(q.role == "skip" for q in placement.quantizers):
        _insert_skip_quantizers(model, placement, config.num_bits)
        _modelopt.quantize_modules(model, quant_cfg, relu)
    wanted = _wanted_quantizers(placement, config)
    quantizers = dict(_modelopt.iter_quantizers(model))
    missing = sorted(wanted - quantizers.keys())
    if missing:
        raise ModelError(
            f"{type(model).__name__}: placement names quantizers modelopt did not create: {missing[:3]}"
        )
    for name, q in quantizers.items():
        if name not in wanted:
            q.disable()  # excluded layers (DFL), pools outside the placement, conv outputs
        elif relu and name in placement.nonnegative:
            q.unsigned = True  # the tensor is >= 0: all 8 bits over [0, amax], as the ReLU quantizer
    if config.keep_float_layers:
        keep = config.keep_float_layers
        disable_quantizers(model, float_layer_quantizers(placement, keep) if relu else keep)
    return model


def disable_quantizers(model: nn.Module, layer_names: Iterable[str]) -> list[str]:
    """Leave layers in float: disable the quantizers owned directly by each layer FQN.

    A name may also be a quantizer FQN. Returns the disabled quantizer names; an unknown name raises.
    """
    quantizers = dict(_modelopt.iter_quantizers(model))
    disabled: list[str] = []
    for layer in layer_names:
        hits = [n for n in quantizers if n == layer or n.rpartition(".")[0] == layer]
        if not hits:
            raise ModelError(f"keep_float_layers: {layer!r} is not a quantized layer or quantizer")
        for n in hits:
            quantizers[n].disable()
        disabled.extend(hits)
    return disabled


def calibrate(
    model: nn.Module,
    forward_loop: ForwardLoop,
    method: str = "max",
    *,
    percentile: float = 99.99,
    num_bins: int = 2048,
    shared_groups: Iterable[Iterable[str]] = (),
) -> nn.Module:
    """Calibrate every enabled quantizer with ``forward_loop(model)`` (runs under no_grad, eval mode).

    ``method``: a registered calibrator (``repquant.quant.calibrators``: ``max``, or the histogram methods
    ``percentile`` at ``percentile`` %, ``entropy``, ``mse`` over a ``num_bins`` histogram of |x|; weights
    per channel always use max). Then every group in ``shared_groups`` gets one scale: the largest amax of
    its enabled members.
    """
    calibrator = get_calibrator(method)
    if not any(True for _ in _modelopt.iter_quantizers(model)):
        raise CalibrationError(
            f"calibrate: {type(model).__name__} has no quantizers; call insert_quantizers first"
        )
    calibrator.calibrate(model, forward_loop, CalibrationOptions(percentile=percentile, num_bins=num_bins))
    unify_shared_scales(model, shared_groups)
    return model


def unify_shared_scales(model: nn.Module, shared_groups: Iterable[Iterable[str]]) -> None:
    """Set each group's enabled, calibrated per-tensor quantizers to the group's largest amax."""
    quantizers = dict(_modelopt.iter_quantizers(model))
    for group in shared_groups:
        members = [quantizers[n] for n in group if n in quantizers]
        live = [q for q in members if q.is_enabled and getattr(q, "_amax", None) is not None]
        if len(live) < 2:
            continue
        top = torch.stack([q.amax.detach().reshape(()) for q in live]).max()
        for q in live:
            _modelopt.set_amax(q, top.reshape(q.amax.shape))


def restore_amax(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> int:
    """Set quantizer amax from ``<quantizer>._amax`` entries of a saved state dict; returns the count.

    modelopt registers ``_amax`` buffers only at calibration, so ``load_state_dict`` on a freshly
    inserted model reports them as unexpected; call this first, then ``load_state_dict(strict=True)``.
    """
    quantizers = dict(_modelopt.iter_quantizers(model))
    count = 0
    for key, value in state_dict.items():
        name, _, attr = key.rpartition(".")
        if attr != "_amax":
            continue
        if name not in quantizers:
            raise ModelError(f"state dict: {key!r} names no quantizer of {type(model).__name__}")
        _modelopt.set_amax(quantizers[name], value)
        count += 1
    return count


def quantizer_state(model: nn.Module) -> dict[str, QuantizerState]:
    """Every quantizer of ``model`` by FQN: enabled, bits, axis, amax, calibrator."""
    return {
        name: QuantizerState(**_modelopt.quantizer_info(q)) for name, q in _modelopt.iter_quantizers(model)
    }
