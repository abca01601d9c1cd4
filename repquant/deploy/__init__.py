"""Deployment: ONNX export, QDQ files, engine backends (``deploy.backends``), the model resolver, timing.

Names are resolved lazily so that importing one of them does not load the others' heavy
dependencies (``export_onnx`` needs torch, ``OrtDetector`` needs onnxruntime).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": "repquant.deploy.onnx_export",
    "read_onnx_metadata": "repquant.deploy.onnx_export",
    "OrtDetector": "repquant.deploy.backends.ort",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'repquant.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
