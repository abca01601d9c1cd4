"""Weight and activation statistics per conv layer: how quantization friendly a deployed model is.

RepOpt's claim (2205.15242 Sec. 4.4; YOLOv6 v2 report) is that the plain model trained with gradient
masks has fused weights/activations with smaller ranges and lighter tails than a re-parameterized
RepVGG, hence less INT8 PTQ loss. These statistics measure that on the DEPLOYED model (call
``repquant.reparam.reparameterize`` first: the convs seen here are then the ones that get quantized).

Definitions (stated because tools disagree):
- ``*_absmax``: ``max |v|``.
- ``*_p9999``: the 99.99th percentile of ``|v|`` with linear interpolation between order statistics
  (numpy's default ``method="linear"``). For weights it is computed on all values. For activations it
  is computed EXACTLY from the largest ``top_k`` values of ``|v|`` kept across batches: the linear
  99.99th percentile of ``n`` values only needs the top ``ceil((n - 1) * 1e-4) + 1`` of them, so it is
  exact while ``n <= ~1e4 * top_k`` (default ``top_k = 2**18``: 2.6e9 pooled values per layer). Past
  that, ``act_p9999_exact`` is False and the value is an upper bound (the smallest value kept).
- ``*_kurtosis``: EXCESS kurtosis ``m4 / m2**2 - 3`` with population (biased) central moments, i.e.
  ``scipy.stats.kurtosis(v, fisher=True, bias=True)``; 0 for a Gaussian, -1.2 for uniform,
  ``nan`` (JSON ``null``) for constant input. Activations pool every element of every image (signed
  values, not ``|v|``), merged batch by batch with Pebay's (2008) update formulas in float64.
- ``weight_int8_snr_db``: ``snr_db`` (``repquant.quant.metrics``) of the weight against its INT8
  fake-quantized copy as the deployed QDQ graph quantizes it: symmetric, per output channel (axis 0;
  axis 1 for transposed convs), ``scale = max|w| / 127`` per channel, range [-127, 127]. Range and
  kurtosis do not say how much a per-channel scale loses; this does (higher is better).
- Activation = the conv INPUT (what the input quantizer of that conv sees), captured with forward
  pre-hooks in eval mode under ``torch.no_grad``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from repquant.errors import RepquantError
from repquant.io import atomic_write_text
from repquant.quant.metrics import snr_db

PERCENTILE = 99.99
DEFAULT_TOP_K = 2**18


@dataclass
class MomentAccumulator:
    """Streaming count, mean and central moment sums M2, M3, M4 (float64), mergeable exactly."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    def update(self, values: Tensor) -> None:
        x = values.detach().reshape(-1).double()
        nb = x.numel()
        if nb == 0:
            return
        mean_b = x.mean()
        d = x - mean_b
        d2 = d * d
        self.merge(MomentAccumulator(nb, mean_b.item(), d2.sum().item(), (d2 * d).sum().item(),
                                     (d2 * d2).sum().item()))

    def merge(self, other: MomentAccumulator) -> None:
        """Pebay's pairwise combination of central moment sums (exact up to rounding)."""
        na, nb = self.n, other.n
        if nb == 0:
            return
        if na == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = other.n, other.mean, other.m2, other.m3, other.m4
            return
        n = na + nb
        delta = other.mean - self.mean
        m2 = self.m2 + other.m2 + delta**2 * na * nb / n
        m3 = (self.m3 + other.m3 + delta**3 * na * nb * (na - nb) / n**2
              + 3 * delta * (na * other.m2 - nb * self.m2) / n)
        m4 = (self.m4 + other.m4 + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
              + 6 * delta**2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
              + 4 * delta * (na * other.m3 - nb * self.m3) / n)
        self.n, self.mean, self.m2, self.m3, self.m4 = n, self.mean + delta * nb / n, m2, m3, m4

    @property
    def excess_kurtosis(self) -> float:
        if self.n == 0 or self.m2 <= 0.0:
            return math.nan
        return self.n * self.m4 / (self.m2 * self.m2) - 3.0


def excess_kurtosis(values: Tensor) -> float:
    """Population excess kurtosis of all elements (module docstring); ``nan`` for constant input."""
    acc = MomentAccumulator()
    acc.update(values)
    return acc.excess_kurtosis


def percentile_from_top(top_desc: Tensor, n: int, q: float = PERCENTILE) -> float:
    """Linear-interpolated ``q``-th percentile of ``n`` values given their largest ones, descending.

    Ascending position ``h = (n - 1) * q / 100``; counted from the top it is ``j = (n - 1) - h``,
    so the result interpolates ``top[floor(j)]`` and ``top[ceil(j)]``; needs ``len(top) > ceil(j)``.
    """
    j = (n - 1) * (1.0 - q / 100.0)
    lo, hi = math.floor(j), math.ceil(j)
    if hi >= top_desc.numel():
        raise ValueError(f"percentile_from_top: need the top {hi + 1} of {n} values, got {top_desc.numel()}")
    upper, lower = top_desc[lo].item(), top_desc[hi].item()  # upper >= lower (descending order)
    return upper + (j - lo) * (lower - upper)


def abs_percentile(values: Tensor, q: float = PERCENTILE) -> float:
    """Exact linear-interpolated ``q``-th percentile of ``|values|`` (numpy ``method='linear'``)."""
    a = values.detach().reshape(-1).abs().double()
    need = min(a.numel(), math.ceil((a.numel() - 1) * (1.0 - q / 100.0)) + 1)
    return percentile_from_top(torch.topk(a, need).values, a.numel(), q)


class TailTracker:
    """The largest ``top_k`` values of ``|x|`` over all batches, and the count of values seen."""

    def __init__(self, top_k: int = DEFAULT_TOP_K) -> None:
        self.top_k = top_k
        self.n = 0
        self.top = torch.empty(0, dtype=torch.float32)

    def update(self, values: Tensor) -> None:
        a = values.detach().reshape(-1).abs().float()
        self.n += a.numel()
        if self.top.numel() == self.top_k:  # only values above the current floor can enter
            a = a[a > self.top[-1].to(a.device)]
        if a.numel() > self.top_k:
            a = torch.topk(a, self.top_k).values
        merged = torch.cat((self.top, a.cpu()))
        self.top = torch.sort(merged, descending=True).values[: self.top_k]

    def percentile(self, q: float = PERCENTILE) -> tuple[float, bool]:
        """(value, exact). Inexact (an upper bound, the smallest kept value) only past ``top_k``."""
        if self.n == 0:
            return math.nan, True
        need = math.ceil((self.n - 1) * (1.0 - q / 100.0)) + 1
        if need <= self.top.numel():
            return percentile_from_top(self.top, self.n, q), True
        return self.top[-1].item(), False


@dataclass
class LayerStats:
    """Statistics of one conv layer (definitions in the module docstring)."""

    name: str
    kind: str  # module class name, e.g. "Conv2d"
    weight_shape: list[int]
    weight_absmax: float
    weight_p9999: float
    weight_kurtosis: float
    weight_int8_snr_db: float
    act_absmax: float = math.nan
    act_p9999: float = math.nan
    act_kurtosis: float = math.nan
    act_count: int = 0
    act_p9999_exact: bool = True


def weight_int8_snr_db(module: nn.modules.conv._ConvNd) -> float:
    """SNR (dB) of ``module.weight`` after per-output-channel symmetric INT8 fake quantization (docstring)."""
    w = module.weight.detach().float().cpu()
    axis = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
    reduce_dims = [d for d in range(w.dim()) if d != axis]
    amax = w.abs().amax(dim=reduce_dims)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # all-zero channel: exact either way
    zero_point = torch.zeros_like(amax, dtype=torch.int32)
    q = torch.fake_quantize_per_channel_affine(w, scale, zero_point, axis, -127, 127)
    return snr_db(w.numpy().ravel(), q.numpy().ravel())


def _conv_layers(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, _ConvNd]]:
    convs: list[tuple[str, _ConvNd]] = [(n, m) for n, m in model.named_modules() if isinstance(m, _ConvNd)]
    if layers is None:
        return convs
    by_name = dict(convs)
    missing = [n for n in layers if n not in by_name]
    if missing:
        raise RepquantError(f"activation_stats: {missing[0]!r} is not a conv layer of {type(model).__name__}")
    return [(n, by_name[n]) for n in layers]


def _images(batch: object) -> Tensor:
    """Accept a bare ``(B, 3, H, W)`` tensor or a loader tuple whose first item is the images."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise RepquantError(f"activation_stats: expected image tensors, got {type(batch).__name__}")
    return batch


@torch.no_grad()
def activation_stats(model: nn.Module, images_iter: Iterable[object], layers: Sequence[str] | None = None,
                     top_k: int = DEFAULT_TOP_K) -> list[LayerStats]:
    """Weight and input-activation statistics of every conv layer (or of ``layers``), model order.

    ``images_iter`` yields ``(B, 3, H, W)`` float images in [0, 1] (or ``(images, ...)`` tuples, as the
    detection loader does); they are moved to the model's device. The model is run in eval mode and
    its train/eval mode is restored afterwards. Pass a deployed model (module docstring).
    """
    convs = _conv_layers(model, layers)
    moments = {name: MomentAccumulator() for name, _ in convs}
    tails = {name: TailTracker(top_k) for name, _ in convs}
    absmax = dict.fromkeys(moments, 0.0)

    def make_hook(name: str):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            moments[name].update(x)
            tails[name].update(x)
            absmax[name] = max(absmax[name], x.detach().abs().max().item())
        return hook

    device = next(model.parameters()).device
    was_training = model.training
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in convs]
    try:
        model.eval()
        for batch in images_iter:
            model(_images(batch).to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats = []
    for name, module in convs:
        w = module.weight.detach()
        s = LayerStats(name, type(module).__name__, list(w.shape), w.abs().max().item(), abs_percentile(w),
                       excess_kurtosis(w), weight_int8_snr_db(module))
        if moments[name].n:
            s.act_absmax = absmax[name]
            s.act_p9999, s.act_p9999_exact = tails[name].percentile()
            s.act_kurtosis = moments[name].excess_kurtosis
            s.act_count = moments[name].n
        stats.append(s)
    return stats


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_stats(path_json: str | os.PathLike, path_md: str | os.PathLike,
                stats: Sequence[LayerStats]) -> None:
    """Write ``stats`` as JSON (``{"definitions", "layers"}``, nan -> null) and as a Markdown table."""
    definitions = {
        "p9999": f"{PERCENTILE}th percentile of |v|, linear interpolation (numpy default)",
        "kurtosis": "excess kurtosis m4/m2^2 - 3, population moments, signed values",
        "weight_int8_snr_db": "10 log10(sum w^2 / sum (q(w) - w)^2), q = symmetric per-output-channel INT8, "
                              "scale max|w|/127, range [-127, 127]",
        "activation": "conv input, pooled over all images and elements, eval mode",
    }
    rows = [{k: _jsonable(v) for k, v in asdict(s).items()} for s in stats]
    atomic_write_text(path_json, json.dumps({"definitions": definitions, "layers": rows}, indent=2) + "\n")
    lines = ["| layer | weight shape | w max | w p99.99 | w kurt | w INT8 SNR dB | act max | act p99.99 | act kurt |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in stats:
        p = f"{s.act_p9999:.4g}" + ("" if s.act_p9999_exact else " (<=)")
        lines.append(f"| {s.name} | {'x'.join(map(str, s.weight_shape))} | {s.weight_absmax:.4g} | "
                     f"{s.weight_p9999:.4g} | {s.weight_kurtosis:.3g} | {s.weight_int8_snr_db:.1f} | "
                     f"{s.act_absmax:.4g} | {p} | "
                     f"{s.act_kurtosis:.3g} |")
    notes = [f"- {k}: {v}" for k, v in definitions.items()]
    atomic_write_text(path_md, "\n".join(lines + [""] + notes) + "\n")
