"""Quantization error metrics (pure numpy; torch tensors accepted).

Definitions (REFERENCE.md, "Error metrics"), ``ref`` = float output y, ``q`` = quantized output y_q:
- ``mse = mean((q - ref)^2)``;
- ``snr_db = 10 * log10(sum(ref^2) / sum((q - ref)^2))`` (higher is better; +inf when exact);
- ``cosine = <ref, q> / (|ref| |q|)`` with no absolute value (in [-1, 1]).
All three are *pooled*: sums run over every element of every sample, never averaged per sample.
ORT's ``qdq_loss_debug`` SQNR ``20*log10(|x|/|x - y|)`` equals the pooled ``snr_db``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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
class ErrorStats:
    """Pooled error of a quantized tensor against its float reference."""

    mse: float
    snr_db: float
    cosine: float
    num_elements: int


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
        self.sum_sq_err += float(d @ d)
        self.sum_sq_ref += float(r @ r)
        self.sum_sq_q += float(y @ y)
        self.dot += float(r @ y)
        self.count += r.size

    def result(self) -> ErrorStats:
        """mse, snr_db, cosine pooled over everything seen so far."""
        if self.count == 0:
            raise ValueError("ErrorAccumulator.result: no samples were added")
        return ErrorStats(
            mse=self.sum_sq_err / self.count,
            snr_db=_snr_from_sums(self.sum_sq_ref, self.sum_sq_err),
            cosine=_cos_from_sums(self.dot, self.sum_sq_ref, self.sum_sq_q),
            num_elements=self.count,
        )


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
