"""Resumable sensitivity sweeps: after every finished calibration batch the sweep's pooled sums are written
atomically (JSON keeps Python floats exactly), with the calibrated amax beside them, so a sweep killed at any
moment resumes at the next batch and ends with the same numbers as an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from repquant.errors import CalibrationError
from repquant.io import atomic_write_text, read_safetensors, write_safetensors
from repquant.quant.calibrate import restore_amax
from repquant.quant.metrics import ErrorAccumulator

_FIELDS = ("sum_sq_err", "sum_sq_ref", "sum_sq_q", "dot", "count")


def sweep_key(batches: Sequence[Tensor], *settings: Any) -> str:
    """Identifies a sweep: the settings and a fingerprint of every calibration batch (shape, sum, sum of squares)."""
    prints = [(tuple(b.shape), float(b.double().sum()), float(b.double().square().sum())) for b in batches]
    return hashlib.sha256(json.dumps([prints, settings], default=str).encode()).hexdigest()[:20]


def _sums(acc: ErrorAccumulator) -> list[float | int]:
    return [getattr(acc, f) for f in _FIELDS]


def _restore(acc: ErrorAccumulator, sums: list[float | int]) -> None:
    for name, value in zip(_FIELDS, sums, strict=True):
        setattr(acc, name, value)


class SweepProgress:
    """The progress file of one sweep (``path``) and its amax (``path`` + ``.amax.safetensors``)."""

    def __init__(self, path: str | os.PathLike, key: str) -> None:
        self.path, self.key = Path(path), key
        self.amax_path = Path(f"{self.path}.amax.safetensors")

    def load(self, sweep: Any, qmodel: nn.Module) -> tuple[int, int, int] | None:
        """Restore ``sweep``'s sums and ``qmodel``'s amax; ``(batches done, images seen, isolated images)``, or
        None when there is no progress of this sweep to resume."""
        if not (self.path.is_file() and self.amax_path.is_file()):
            return None
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            raise CalibrationError(f"{self.path}: unreadable sensitivity progress file ({err}); delete it") from None
        if doc.get("key") != self.key:
            raise CalibrationError(f"{self.path}: progress of a different sensitivity sweep (other model, data or "
                                   "settings); delete it or choose another output folder")
        state, _ = read_safetensors(self.amax_path)
        restore_amax(qmodel, state)
        for key, sums in doc["acc"].items():
            name, _, mode = key.rpartition("|")
            _restore(sweep.acc[name, mode], sums)
        for name, sums in doc["extra"].items():
            _restore(sweep.extra_acc[name], sums)
        _restore(sweep.output_acc, doc["output"])
        sweep.timings.update(doc["timings"])
        return doc["batches_done"], doc["seen"], doc["iso_seen"]

    def save(self, sweep: Any, qmodel: nn.Module, batches_done: int, seen: int, iso_seen: int) -> None:
        if not self.amax_path.is_file():
            amax = {k: v.detach().clone() for k, v in qmodel.state_dict().items() if k.endswith("._amax")}
            write_safetensors(self.amax_path, amax, {"sweep": self.key})
        doc = {"key": self.key, "batches_done": batches_done, "seen": seen, "iso_seen": iso_seen,
               "timings": sweep.timings, "output": _sums(sweep.output_acc),
               "acc": {f"{name}|{mode}": _sums(acc) for (name, mode), acc in sweep.acc.items()},
               "extra": {name: _sums(acc) for name, acc in sweep.extra_acc.items()}}
        atomic_write_text(self.path, json.dumps(doc))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.amax_path.unlink(missing_ok=True)
