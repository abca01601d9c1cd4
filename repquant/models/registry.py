"""Name -> variant configuration registry. Variants register themselves in ``repquant.models.yolov6``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from repquant.errors import ModelError

if TYPE_CHECKING:
    from repquant.models.yolov6 import ModelConfig

_REGISTRY: dict[str, ModelConfig] = {}


def register(config: ModelConfig) -> ModelConfig:
    """Register ``config`` under ``config.name``; a second registration of a name is a bug."""
    if config.name in _REGISTRY:
        raise ModelError(f"model registry: {config.name!r} is registered twice")
    _REGISTRY[config.name] = config
    return config


def list_models() -> list[str]:
    """The registered variant names, sorted."""
    return sorted(_REGISTRY)


def get_config(name: str) -> ModelConfig:
    """The registered base configuration of variant ``name``; unknown names list the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None
