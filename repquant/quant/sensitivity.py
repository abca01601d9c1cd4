"""Per-layer INT8 sensitivity: which layers lose the most when quantized, by three metrics in three modes.

Metrics (``repquant.quant.metrics``; all *pooled* over every element of every calibration image,
never averaged per sample): MSE, SNR_dB = 10 log10(sum y^2 / sum (y_q - y)^2), cosine.
Modes, for a layer k with its own quantizers (conv / conv_transpose: input + weight; maxpool: input;
add: residual skip input):
- ``isolated``: only k's quantizers on; error at the model OUTPUTS. The raw outputs (e.g.
  ``cls_logits`` and ``reg_dist``) are pooled together, i.e. compared as one concatenated vector.
- ``accumulated``: every quantizer on; error of k's output against the float model's k output.
- ``local``: k's own error on float data: ``conv(Q(x), Q(w))`` vs ``conv(x, w)`` with ``x`` the float
  model's input to k. ``input_snr_db`` / ``weight_snr_db`` (extras) are the SNR of ``Q(x)`` vs ``x``
  and of ``Q(w)`` vs ``w`` alone (``input_snr_db`` is what ORT's ``qdq_loss_debug`` SQNR measures).
A layer called several times (the SPPF max-pool) pools all its calls.

Cost: the model is traced once with ``torch.fx`` and run node by node. Per batch the float run keeps
every node's value; the accumulated run substitutes every quantized module; an isolated run of
layer k recomputes only the nodes downstream of k (the rest come from the float cache), and the
same run gives k's local error. Quantizers are modelopt's, calibrated once on a copy of the model.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from repquant.errors import CalibrationError
from repquant.quant import _modelopt
from repquant.quant.calibrate import calibrate, insert_quantizers
from repquant.quant.config import QuantConfig
from repquant.quant.graph_runner import GraphRunner, Substitute, function_of
from repquant.quant.metrics import ErrorAccumulator, TorchErrorAccumulator, get_metric, metric_names, metric_values
from repquant.quant.placement import (
    QuantPlacement,
    find_placement,
    relu_quantizer_name,
    residual_skip,
    sigmoid_quantizer_name,
    skip_quantizer_name,
)
from repquant.quant.sensitivity_progress import SweepProgress, sweep_key
from repquant.vocab import MODES

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=nn.Module)


@dataclass(frozen=True)
class ModeStats:
    """Pooled error of one layer in one mode: ``values[metric]`` for every registered metric (also
    readable as attributes, ``stats.snr_db``); ``signal_power = mean(y^2)``, so that
    ``snr_db == 10 log10(signal_power / mse)``."""

    values: dict[str, float]
    signal_power: float
    num_elements: int

    def __getattr__(self, name: str) -> float:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"ModeStats has no metric {name!r}")

    @classmethod
    def from_accumulator(cls, acc: ErrorAccumulator) -> ModeStats:
        sums = acc.sums()
        return cls(metric_values(sums), sums.sum_sq_ref / sums.count, sums.count)

    @classmethod
    def unmeasured(cls) -> ModeStats:
        return cls(dict.fromkeys(metric_names(), math.nan), math.nan, 0)


@dataclass(frozen=True)
class LayerSensitivity:
    """One quantizable layer: ``name`` (FQN), ``kind``, ``modes`` (mode -> stats), ``extras``
    (``input_snr_db`` / ``weight_snr_db`` of the layer's quantizers alone; None when absent)."""

    name: str
    kind: str
    modes: dict[str, ModeStats]
    extras: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class SensitivityResult:
    """Per-layer results (placement order), rankings ``[mode][metric] -> names most sensitive first``,
    the error of the fully quantized model at its outputs, and timings."""

    layers: tuple[LayerSensitivity, ...]
    modes: tuple[str, ...]
    rankings: dict[str, dict[str, list[str]]]
    output_error: ModeStats
    num_images: int
    isolated_images: int
    config: QuantConfig
    wall_time_s: float
    timings_s: dict[str, float]

    def ranking(self, mode: str, metric: str) -> list[str]:
        """Layer names, most sensitive first."""
        return self.rankings[mode][metric]

    def layer(self, name: str) -> LayerSensitivity:
        return next(ly for ly in self.layers if ly.name == name)


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _module_sub(module: nn.Module) -> Substitute:
    return lambda args, kwargs: module(*args, **kwargs)


def _skip_sub(node: fx.Node, skip: fx.Node, quantizer: nn.Module) -> Substitute:
    index = node.args.index(skip)

    def sub(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args = tuple(quantizer(a) if i == index else a for i, a in enumerate(args))
        return function_of(node.target)(*args, **kwargs)

    return sub


def _layer_nodes(runner: GraphRunner, placement: QuantPlacement, qmodel: nn.Module
                 ) -> dict[str, dict[fx.Node, Substitute]]:
    """Layer FQN -> {graph node computing it: its quantized substitute} (several for a reused pool)."""
    kinds = {ly.name: ly.kind for ly in placement.layers}
    found: dict[str, dict[fx.Node, Substitute]] = {name: {} for name in kinds}
    add_count: dict[str, int] = {}
    for node in runner.nodes:
        if node.op == "call_module" and kinds.get(str(node.target)) in ("conv", "conv_transpose", "maxpool"):
            found[str(node.target)][node] = _module_sub(qmodel.get_submodule(str(node.target)))
        elif node.op == "call_function" and (skip := residual_skip(node)) is not None:
            owner = _owner(node)
            if kinds.get(owner) != "add":
                continue
            index = add_count.get(owner, 0)
            add_count[owner] = index + 1
            quantizer = qmodel.get_submodule(f"{owner}.{skip_quantizer_name(index)}")
            found[owner][node] = _skip_sub(node, skip, quantizer)
    return found


# --- quantized copy --------------------------------------------------------------------------------


def quantized_copy(model: _M, calib_batches: Sequence[Tensor], config: QuantConfig) -> tuple[_M, QuantPlacement]:
    """A calibrated fake-quant deep copy of the float (deployed) ``model``, and its placement."""
    if not calib_batches:
        raise CalibrationError(f"{type(model).__name__}: no calibration batches given")
    placement = find_placement(model)
    qmodel = insert_quantizers(copy.deepcopy(model).eval(), placement, config)

    def forward_loop(m: nn.Module) -> None:
        for batch in calib_batches:
            m(batch.to(_device(m)))

    calibrate(qmodel, forward_loop, config.calib_method, percentile=config.percentile,
              shared_groups=placement.shared_groups)
    return qmodel, placement


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def set_enabled_layers(qmodel: nn.Module, placement: QuantPlacement, layers: Iterable[str] | None) -> None:
    """Enable only the quantizers of ``layers`` (None: every placement layer) that calibration enabled,
    output quantizers (ORT layout, a ReLU's or SiLU's included) included: the other layers are left float as
    ``QuantConfig.keep_float_layers`` leaves them (``calibrate.float_layer_quantizers``).

    Quantizers of keep-float layers (``amax`` never set) stay disabled.
    """
    chosen = {ly.name for ly in placement.layers} if layers is None else set(layers)
    wanted = {q.name for q in placement.quantizers if q.layer in chosen} | {f"{n}.output_quantizer" for n in chosen}
    wanted |= {relu_quantizer_name(relu) for conv, relu in placement.relu_after if conv in chosen}
    wanted |= {sigmoid_quantizer_name(silu) for conv, silu in placement.silu_after if conv in chosen}
    for name, q in _modelopt.iter_quantizers(qmodel):
        calibrated = getattr(q, "_amax", None) is not None
        if name in wanted and calibrated:
            q.enable()
        else:
            q.disable()


# --- the sweep -------------------------------------------------------------------------------------


def _outputs(value: Any) -> list[Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, Tensor)]


class _Sweep:
    """Accumulators of one sensitivity run; ``step`` processes one calibration batch."""

    def __init__(self, model: nn.Module, qmodel: nn.Module, placement: QuantPlacement,
                 modes: tuple[str, ...]) -> None:
        self.runner = GraphRunner(model)
        self.qmodel, self.placement, self.modes = qmodel, placement, modes
        self.layer_nodes = _layer_nodes(self.runner, placement, qmodel)
        self.all_subs = {n: s for subs in self.layer_nodes.values() for n, s in subs.items()}
        self.suffix = {k: self.runner.descendants(subs) for k, subs in self.layer_nodes.items()}
        self.acc = {(k, m): TorchErrorAccumulator() for k in self.layer_nodes for m in modes}
        self.extra_acc = {k: TorchErrorAccumulator() for k in self.layer_nodes}
        self.output_acc = TorchErrorAccumulator()
        self.timings = dict.fromkeys(("float", *modes), 0.0)

    def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.timings[key] += time.perf_counter() - start
        return out

    def step(self, x: Tensor, isolated: bool) -> None:
        ref: dict[fx.Node, Any] = self._timed("float", functools.partial(self.runner.run, x, {}))
        ref_out = _outputs(ref[self.runner.output])
        if "accumulated" in self.modes:
            self._timed("accumulated", functools.partial(self._accumulated, x, ref, ref_out))
        for name, subs in self.layer_nodes.items():
            if isolated and "isolated" in self.modes:
                self._timed("isolated", functools.partial(self._isolated, x, name, subs, ref, ref_out))
            if "local" in self.modes:
                self._timed("local", functools.partial(self._local, x, name, subs, ref))
                self._timed("local", functools.partial(self._input_error, name, subs, ref))

    def _accumulated(self, x: Tensor, ref: dict[fx.Node, Any], ref_out: list[Tensor]) -> None:
        env = self.runner.run(x, self.all_subs)
        for name, subs in self.layer_nodes.items():
            for node in subs:
                self.acc[name, "accumulated"].update(ref[node], env[node])
        for r, q in zip(ref_out, _outputs(env[self.runner.output]), strict=True):
            self.output_acc.update(r, q)

    def _isolated(self, x: Tensor, name: str, subs: dict[fx.Node, Substitute], ref: dict[fx.Node, Any],
                  ref_out: list[Tensor]) -> None:
        env = self.runner.run(x, subs, self.suffix[name], cache=ref)
        for r, q in zip(ref_out, _outputs(env[self.runner.output]), strict=True):
            self.acc[name, "isolated"].update(r, q)

    def _local(self, x: Tensor, name: str, subs: dict[fx.Node, Substitute], ref: dict[fx.Node, Any]) -> None:
        # Node by node on float inputs: a reused pool's second call must not see the first one's error.
        for node, sub in subs.items():
            env = self.runner.run(x, {node: sub}, [node], cache=ref)
            self.acc[name, "local"].update(ref[node], env[node])

    def _input_error(self, name: str, subs: dict[fx.Node, Substitute], ref: dict[fx.Node, Any]) -> None:
        """Q(x) vs x for the layer's activation quantizer (input, or residual skip) on float data."""
        for node in subs:
            quantizer: Any
            if node.op == "call_module":
                quantizer = getattr(self.qmodel.get_submodule(str(node.target)), "input_quantizer", None)
                tensor = ref[node.args[0]]  # type: ignore[index]  # a module's input is a node
            else:
                skip = residual_skip(node)
                assert skip is not None  # the layer's add nodes all have a residual skip
                index = sum(1 for n in subs if self.runner.order[n] < self.runner.order[node])
                quantizer = self.qmodel.get_submodule(f"{name}.{skip_quantizer_name(index)}")
                tensor = ref[skip]
            if quantizer is not None and quantizer.is_enabled:
                self.extra_acc[name].update(tensor, quantizer(tensor))

    def weight_snr_db(self, name: str) -> float | None:
        module: Any = self.qmodel.get_submodule(name)
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not quantizer.is_enabled:
            return None
        acc = TorchErrorAccumulator()
        acc.update(module.weight, quantizer(module.weight))
        return acc.result().snr_db


def rank_layers(layers: Sequence[LayerSensitivity], mode: str, metric: str) -> list[str]:
    """Layer names most sensitive first (MSE descending, SNR and cosine ascending; ties by name)."""
    sign = 1.0 if get_metric(metric).higher_is_better else -1.0  # worst value first
    return [ly.name for ly in sorted(layers, key=lambda ly: (sign * getattr(ly.modes[mode], metric), ly.name))]


def layer_sensitivity(model: nn.Module, calib_batches: Sequence[Tensor], config: QuantConfig | None = None,
                      modes: Sequence[str] = MODES, progress: bool = True, isolated_images: int | None = None,
                      calibrated: tuple[nn.Module, QuantPlacement] | None = None,
                      resume_file: Path | None = None) -> SensitivityResult:
    """Sensitivity of every quantizable layer of the float, deployed ``model`` (see module docstring).

    Args:
        model: float deployed network, ``model(x)`` -> tensor(s); left unchanged.
        calib_batches: ``(B, 3, H, W)`` float batches; used to calibrate and to measure.
        config: quantization settings (calibration method, keep-float layers).
        modes: any of ``isolated``, ``accumulated``, ``local``.
        isolated_images: measure the isolated mode on the first batches holding this many images only
            (its cost is ~#layers suffix passes per image); None: all.
        calibrated: the calibrated fake-quant copy of ``model`` and its placement when already made
            (``quantized_copy``), instead of calibrating here.
        resume_file: progress file (``sensitivity_progress.SweepProgress``): written after every batch,
            resumed from when it holds this sweep; the caller removes it once the results are written.
    """
    start = time.perf_counter()
    config = config or QuantConfig()
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"layer_sensitivity: modes must be a non-empty subset of {list(MODES)}, got {modes}")
    model = model.eval()
    qmodel, placement = calibrated or quantized_copy(model, calib_batches, config)
    set_enabled_layers(qmodel, placement, None)
    calib_time = time.perf_counter() - start
    sweep = _Sweep(model, qmodel, placement, modes)
    saved = None
    if resume_file is not None:
        saved = SweepProgress(resume_file, sweep_key(calib_batches, modes, isolated_images, repr(config)))
    done, seen, iso_seen = _resume(saved, sweep, qmodel)
    device = _device(model)
    with torch.no_grad():
        for i, batch in enumerate(tqdm(calib_batches, desc="sensitivity", disable=not progress, leave=False,
                                       initial=done)):
            if i < done:
                continue  # measured before the interruption
            isolated = isolated_images is None or iso_seen < isolated_images
            sweep.step(batch.to(device), isolated)
            seen += len(batch)
            iso_seen += len(batch) if isolated else 0
            if saved is not None:
                saved.save(sweep, qmodel, i + 1, seen, iso_seen)
    layers = tuple(
        LayerSensitivity(
            ly.name, ly.kind, {m: ModeStats.from_accumulator(sweep.acc[ly.name, m]) for m in modes},
            _extras(sweep, ly.name, ly.kind) if "local" in modes else {},
        )
        for ly in placement.layers
    )
    rankings = {m: {k: rank_layers(layers, m, k) for k in metric_names()} for m in modes}
    output_error = (ModeStats.from_accumulator(sweep.output_acc) if "accumulated" in modes
                    else ModeStats.unmeasured())
    timings = {"calibrate": calib_time, **sweep.timings}
    return SensitivityResult(layers, modes, rankings, output_error, seen, iso_seen if "isolated" in modes else 0,
                             config, time.perf_counter() - start, timings)


def _resume(saved: SweepProgress | None, sweep: _Sweep, qmodel: nn.Module) -> tuple[int, int, int]:
    """(batches done, images seen, isolated images seen) restored from ``saved``, or zeros."""
    state = saved.load(sweep, qmodel) if saved is not None else None
    if state is None:
        if saved is not None:
            saved.remove()  # a half-started sweep (amax written, no batch done) starts over
        return 0, 0, 0
    logger.info("sensitivity: resuming after batch %d (%d images measured) from %s", state[0], state[1],
                saved.path)  # type: ignore[union-attr]
    return state


def _extras(sweep: _Sweep, name: str, kind: str) -> dict[str, float | None]:
    acc = sweep.extra_acc[name]
    return {
        "input_snr_db": acc.result().snr_db if acc.count else None,
        "weight_snr_db": sweep.weight_snr_db(name) if kind in ("conv", "conv_transpose") else None,
    }
