"""Error hierarchy: every user-facing failure names the file (or object) and the problem in one line."""

from __future__ import annotations


class RepquantError(Exception):
    """Base class. The CLI prints ``str(err)`` on one line and exits 1."""


class DataError(RepquantError):
    """Bad dataset input: corrupt image, malformed label, bad dataset YAML."""


class CheckpointError(RepquantError):
    """Checkpoint missing, unreadable, of another variant, or with mismatched tensors."""


class CalibrationError(RepquantError):
    """Calibration data missing or unusable."""


class RecipeError(RepquantError):
    """Recipe YAML with unknown keys or invalid values."""


class ModelError(RepquantError):
    """Unknown model name or invalid model configuration."""


class MissingDependencyError(RepquantError):
    """An optional dependency (modelopt, tensorrt) is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{package} is required for {purpose} but is not installed; "
            f"install it with: pip install 'repquant[{extra}]'"
        )
        self.package = package
        self.extra = extra
