"""Quantization error metrics (pure numpy; torch tensors accepted) and their registry.

Definitions (REFERENCE.md, "Error metrics"), ``ref`` = float output y, ``q`` = quantized output y_q:
- ``mse = mean((q - ref)^2)``;
- ``snr_db = 10 * log10(sum(ref^2) / sum((q - ref)^2))`` (higher is better; +inf when exact);
- ``cosine = <ref, q> / (|ref| |q|)`` with no absolute value (in [-1, 1]).
All are *pooled*: sums run over every element of every sample, never averaged per sample. ORT's
``qdq_loss_debug`` SQNR ``20*log10(|x|/|x - y|)`` equals the pooled ``snr_db``.

A metric is one :class:`Metric`: a function of the pooled sums (:class:`PooledSums`, which every
accumulator keeps), its direction and its definition. Adding one is a ``register_metric(Metric(...))``
below plus its name in ``repquant.vocab.METRICS`` (the CLI's list).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from repquant.errors import CalibrationError

ArrayLike = np.ndarray | torch.Tensor


def _f64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def _pair(ref: ArrayLike, q: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    r, y = _f64(ref), _f64(q)
    if r.shape != y.shape:
        raise ValueError(f"metrics: ref has {r.size} elements but q has {y.size}")
    return r, y


@dataclass(frozen=True)
class PooledSums:
    """The sums every metric is computed from: ``sum (q-ref)^2``, ``sum ref^2``, ``sum q^2``,
    ``<ref, q>`` and the element count."""

    sum_sq_err: float
    sum_sq_ref: float
    sum_sq_q: float
    dot: float
    count: int


@dataclass(frozen=True)
class Metric:
    """One error metric: ``finish(sums)`` -> value; ``higher_is_better`` orders rankings (a layer is
    more sensitive when its value is worse); ``definition`` is written into every report."""

    name: str
    finish: Callable[[PooledSums], float]
    higher_is_better: bool
    definition: str


_METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Make ``metric`` available to accumulators, sensitivity rankings and reports."""
    if metric.name in _METRICS:
        raise CalibrationError(f"metric registry: {metric.name!r} is registered twice")
    _METRICS[metric.name] = metric
    return metric


def unregister_metric(name: str) -> None:
    """Remove a registered metric (tests that register a toy one)."""
    _METRICS.pop(name, None)


def get_metric(name: str) -> Metric:
    """The registered metric ``name``; an unknown name lists the valid ones."""
    try:
        return _METRICS[name]
    except KeyError:
        raise CalibrationError(f"unknown metric {name!r}; valid metrics: {', '.join(_METRICS)}") from None


def metric_names() -> tuple[str, ...]:
    """Registered metric names, in registration order."""
    return tuple(_METRICS)


def _snr_from_sums(sum_sq_ref: float, sum_sq_err: float) -> float:
    if sum_sq_err == 0.0:
        return math.inf
    if sum_sq_ref == 0.0:
        return -math.inf
    return 10.0 * math.log10(sum_sq_ref / sum_sq_err)


def _cos_from_sums(dot: float, sum_sq_ref: float, sum_sq_q: float) -> float:
    denom = math.sqrt(sum_sq_ref) * math.sqrt(sum_sq_q)
    if denom == 0.0:
        # Both zero: identical; one zero: no direction to compare.
        return 1.0 if sum_sq_ref == sum_sq_q else 0.0
    return dot / denom


register_metric(Metric("mse", lambda s: s.sum_sq_err / s.count, False,
                       "mean((y_q - y)^2), pooled over every element of every calibration image"))
register_metric(Metric("snr_db", lambda s: _snr_from_sums(s.sum_sq_ref, s.sum_sq_err), True,
                       "10*log10(sum(y^2) / sum((y_q - y)^2)), pooled (= ORT qdq_loss_debug SQNR); "
                       "higher is better"))
register_metric(Metric("cosine", lambda s: _cos_from_sums(s.dot, s.sum_sq_ref, s.sum_sq_q), True,
                       "<y, y_q> / (|y| |y_q|), no absolute value, pooled"))


@dataclass(frozen=True)
class ErrorStats:
    """Pooled error of a quantized tensor against its float reference: ``values[metric]`` for every
    registered metric (also readable as attributes: ``stats.snr_db``)."""

    values: dict[str, float]
    num_elements: int

    def __getattr__(self, name: str) -> float:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"ErrorStats has no metric {name!r}")


def metric_values(sums: PooledSums) -> dict[str, float]:
    """Every registered metric of ``sums``."""
    return {name: metric.finish(sums) for name, metric in _METRICS.items()}


class ErrorAccumulator:
    """Pools sums over batches so the result equals the metric on the concatenated data."""

    def __init__(self) -> None:
        self.sum_sq_err = 0.0
        self.sum_sq_ref = 0.0
        self.sum_sq_q = 0.0
        self.dot = 0.0
        self.count = 0

    def update(self, ref: ArrayLike, q: ArrayLike) -> None:
        """Add one batch (any shape; ``ref`` and ``q`` must have the same number of elements)."""
        r, y = _pair(ref, q)
        d = y - r
        self._add(float(d @ d), float(r @ r), float(y @ y), float(r @ y), r.size)

    def _add(self, sum_sq_err: float, sum_sq_ref: float, sum_sq_q: float, dot: float, count: int) -> None:
        self.sum_sq_err += sum_sq_err
        self.sum_sq_ref += sum_sq_ref
        self.sum_sq_q += sum_sq_q
        self.dot += dot
        self.count += count

    def sums(self) -> PooledSums:
        return PooledSums(self.sum_sq_err, self.sum_sq_ref, self.sum_sq_q, self.dot, self.count)

    def result(self) -> ErrorStats:
        """Every registered metric pooled over everything seen so far."""
        if self.count == 0:
            raise ValueError("ErrorAccumulator.result: no samples were added")
        return ErrorStats(metric_values(self.sums()), self.count)


class TorchErrorAccumulator(ErrorAccumulator):
    """``ErrorAccumulator`` whose sums run in torch on the tensors' device (same pooled definitions).

    numpy's float64 path (copy, then four dot products) took ~70 % of a yolov6s@640 sensitivity sweep;
    torch's float32 ``sum`` uses cascade summation, accurate to ~1e-7 relative over millions of elements.
    """

    def update(self, ref: ArrayLike, q: ArrayLike) -> None:
        r = torch.as_tensor(ref).detach().reshape(-1).float()
        y = torch.as_tensor(q).detach().reshape(-1).float()
        d = y - r
        self._add(float(torch.sum(d * d)), float(torch.sum(r * r)), float(torch.sum(y * y)),
                  float(torch.sum(r * y)), r.numel())


def mse(ref: ArrayLike, q: ArrayLike) -> float:
    """``mean((q - ref)^2)`` over all elements."""
    r, y = _pair(ref, q)
    return float(np.mean((y - r) ** 2))


def snr_db(ref: ArrayLike, q: ArrayLike) -> float:
    """``10 log10(sum ref^2 / sum (q - ref)^2)``; ``inf`` when ``q == ref``."""
    r, y = _pair(ref, q)
    d = y - r
    return _snr_from_sums(float(r @ r), float(d @ d))


def cosine(ref: ArrayLike, q: ArrayLike) -> float:
    """``<ref, q> / (|ref| |q|)`` without absolute value."""
    r, y = _pair(ref, q)
    return _cos_from_sums(float(r @ y), float(r @ r), float(y @ y))
