"""Error metrics against hand-computed values (REFERENCE.md definitions, pooled)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from repquant.quant.metrics import ErrorAccumulator, cosine, mse, snr_db

REF = [1.0, 2.0, 3.0, 4.0]
Q = [1.0, 2.0, 3.0, 5.0]  # error (0, 0, 0, 1)


def test_mse_exact() -> None:
    assert mse(REF, Q) == 0.25  # 1 / 4
    assert mse(np.array([[0.0, 0.0]]), np.array([[3.0, -4.0]])) == 12.5  # (9 + 16) / 2


def test_snr_db_exact() -> None:
    # sum ref^2 = 1 + 4 + 9 + 16 = 30, sum err^2 = 1
    assert snr_db(REF, Q) == pytest.approx(10 * math.log10(30.0), abs=1e-12)
    assert snr_db([10.0], [9.0]) == pytest.approx(20.0, abs=1e-12)  # 100 / 1 -> 20 dB
    assert snr_db(REF, REF) == math.inf


def test_cosine_exact_and_signed() -> None:
    # <ref, q> = 1 + 4 + 9 + 20 = 34; |q|^2 = 1 + 4 + 9 + 25 = 39
    assert cosine(REF, Q) == pytest.approx(34.0 / math.sqrt(30.0 * 39.0), abs=1e-15)
    assert cosine([1.0, 0.0], [0.0, 2.0]) == 0.0
    assert cosine(REF, [-v for v in REF]) == pytest.approx(-1.0, abs=1e-15)  # no absolute value


def test_torch_and_numpy_inputs_agree() -> None:
    t_ref, t_q = torch.tensor(REF).reshape(2, 2), torch.tensor(Q).reshape(2, 2)
    assert snr_db(t_ref, t_q) == snr_db(REF, Q)
    assert mse(t_ref, t_q) == mse(REF, Q)


def test_accumulator_pools_over_batches() -> None:
    acc = ErrorAccumulator()
    acc.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))  # exact batch
    acc.update(np.array([3.0, 4.0]), np.array([3.0, 5.0]))  # batch with error 1
    stats = acc.result()
    assert stats.num_elements == 4
    assert stats.mse == 0.25
    assert stats.snr_db == pytest.approx(10 * math.log10(30.0), abs=1e-12)
    assert stats.cosine == pytest.approx(34.0 / math.sqrt(30.0 * 39.0), abs=1e-15)
    # Pooled, not a mean of per-batch SNRs (those would be inf and 10*log10(25)).
    assert stats.snr_db != pytest.approx(10 * math.log10(25.0))


def test_accumulator_rejects_mismatch_and_empty() -> None:
    acc = ErrorAccumulator()
    with pytest.raises(ValueError, match="no samples"):
        acc.result()
    with pytest.raises(ValueError, match="elements"):
        acc.update([1.0, 2.0], [1.0])
