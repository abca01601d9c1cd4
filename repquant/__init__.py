"""repquant: YOLOv6 re-parameterized detectors from training to fast INT8 deployment.

The public names below are resolved lazily (PEP 562) so that ``import repquant`` costs almost
nothing: torch is loaded on first use of a model function, and onnxruntime, modelopt and TensorRT
only by the modules that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

from repquant.errors import (
    CalibrationError,
    CheckpointError,
    DataError,
    MissingDependencyError,
    ModelError,
    RecipeError,
    RepquantError,
)

__version__ = "0.1.0"  # keep equal to pyproject.toml [project].version

_LAZY = {
    "create_model": "repquant.models",
    "list_models": "repquant.models",
    "ModelConfig": "repquant.models",
    "DecodedDetector": "repquant.models",
    "model_profile": "repquant.models",
    "reparameterize": "repquant.reparam",
    "is_deployed": "repquant.reparam",
    "load_recipe": "repquant.recipe",
    "save_checkpoint": "repquant.checkpoint",
    "load_checkpoint": "repquant.checkpoint",
    "load_model": "repquant.checkpoint",
    "export_onnx": "repquant.deploy.onnx_export",
}

__all__ = [
    "CalibrationError",
    "CheckpointError",
    "DataError",
    "MissingDependencyError",
    "ModelError",
    "RecipeError",
    "RepquantError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'repquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
