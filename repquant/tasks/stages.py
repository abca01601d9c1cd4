"""Resumable stages of a long workflow, cached in its output folder and keyed by their inputs.

A stage's key is the sha256 of its inputs (settings, upstream keys, file hashes) as canonical JSON. After a
stage finishes, ``<dir>/stages/<name>.json`` records its key, its result (plain JSON) and its wall time,
written atomically after its artefacts; a later run with the same key returns the recorded result without
running it again (a changed input, a missing artefact or an interrupted stage runs it again). Each stage logs
one line: what it decided and how long it took (or that it was reused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repquant.io import atomic_write_text

logger = logging.getLogger("repquant.quantize")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_key(*parts: Any) -> str:
    """The key of a stage whose inputs are ``parts`` (JSON-able; paths as strings)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class StageLog:
    """Wall time of each stage of a run and whether it was reused."""

    seconds: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {name: {"seconds": round(s, 2), "cached": self.cached[name]} for name, s in self.seconds.items()}


class StageCache:
    """Run or reuse the stages of one output folder (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "stages"
        self.log = StageLog()

    def _record(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def run(self, name: str, key: str, compute: Callable[[], dict[str, Any]], describe: Callable[[dict[str, Any]], str],
            artefacts: Callable[[dict[str, Any]], Iterable[str | os.PathLike]] = lambda result: ()) -> dict[str, Any]:
        """``compute()`` unless a finished run with ``key`` is recorded and its ``artefacts`` still exist
        (paths relative to the output folder)."""
        start = time.perf_counter()
        recorded = self._load(name)
        if recorded is not None and recorded.get("key") == key:
            result = recorded["result"]
            if all((self.root / p).exists() for p in artefacts(result)):
                self.log.seconds[name], self.log.cached[name] = time.perf_counter() - start, True
                logger.info("%s: %s (reused, computed in %.1f s before)", name, describe(result), recorded["seconds"])
                return result
        result = compute()
        seconds = time.perf_counter() - start
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._record(name), json.dumps({"key": key, "seconds": round(seconds, 2), "result": result},
                                                         indent=2, default=str) + "\n")
        self.log.seconds[name], self.log.cached[name] = seconds, False
        logger.info("%s: %s (%.1f s)", name, describe(result), seconds)
        return result

    def _load(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._record(name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
