"""Activation calibrators: how a per-tensor ``amax`` is chosen from calibration data, by name.

Weights are always calibrated per output channel with their max; a calibrator decides the activation
quantizers. Adding one is a class here decorated with ``@register_calibrator`` plus its name in
``repquant.vocab.CALIBRATORS`` (the CLI's list); ``calibrate(..., method=name)`` then uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from repquant.errors import CalibrationError
from repquant.quant import _modelopt

ForwardLoop = Callable[[nn.Module], Any]


@dataclass(frozen=True)
class CalibrationOptions:
    """Knobs of the histogram calibrators: ``percentile`` (in %) and the histogram size (2048 as TensorRT;
    entropy costs O(num_bins^2) per quantizer)."""

    percentile: float = 99.99
    num_bins: int = 2048


class Calibrator(Protocol):
    """Sets ``amax`` of every enabled quantizer of ``model`` from ``forward_loop(model)``."""

    name: str

    def calibrate(self, model: nn.Module, forward_loop: ForwardLoop, options: CalibrationOptions) -> None: ...


_CALIBRATORS: dict[str, Calibrator] = {}


def register_calibrator(cls: type[Any]) -> type[Any]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    instance = cls()
    if instance.name in _CALIBRATORS:
        raise CalibrationError(f"calibrator registry: {instance.name!r} is registered twice")
    _CALIBRATORS[instance.name] = instance
    return cls


def unregister_calibrator(name: str) -> None:
    """Remove a registered calibrator (tests that register a toy one)."""
    _CALIBRATORS.pop(name, None)


def get_calibrator(name: str) -> Calibrator:
    """The registered calibrator ``name``; an unknown name lists the valid ones."""
    try:
        return _CALIBRATORS[name]
    except KeyError:
        valid = ", ".join(_CALIBRATORS)
        raise CalibrationError(f"unknown calibration method {name!r}; valid methods: {valid}") from None


def calibrator_names() -> tuple[str, ...]:
    """Registered calibrator names, in registration order."""
    return tuple(_CALIBRATORS)


def use_max_calibrators(model: nn.Module) -> None:
    """Give every quantizer a max calibrator again (undoes an earlier histogram calibration)."""
    for _, q in _modelopt.iter_quantizers(model):
        if _modelopt.quantizer_info(q)["calibrator"] == "HistogramCalibrator":
            _modelopt.set_max_calibrator(q)


@register_calibrator
class MaxCalibrator:
    """The running absolute max of each activation (TensorRT's and modelopt's default)."""

    name = "max"

    def calibrate(self, model: nn.Module, forward_loop: ForwardLoop, options: CalibrationOptions) -> None:
        use_max_calibrators(model)
        _modelopt.calibrate_max(model, forward_loop)


class HistogramMethod:
    """A 2048-bin histogram of |x| per enabled per-tensor quantizer, finished by modelopt's ``method``."""

    name = ""

    def calibrate(self, model: nn.Module, forward_loop: ForwardLoop, options: CalibrationOptions) -> None:
        use_max_calibrators(model)
        for _, q in _modelopt.iter_quantizers(model):
            info = _modelopt.quantizer_info(q)
            if info["axis"] is None and info["enabled"]:
                _modelopt.set_histogram_calibrator(q, options.num_bins)
        _modelopt.calibrate_collect(model, forward_loop, self.name, options.percentile)


@register_calibrator
class PercentileCalibrator(HistogramMethod):
    """amax at the ``percentile`` % point of |x|."""

    name = "percentile"


@register_calibrator
class EntropyCalibrator(HistogramMethod):
    """amax minimising the KL divergence between the float and the INT8 histogram (TensorRT's entropy)."""

    name = "entropy"


@register_calibrator
class MseCalibrator(HistogramMethod):
    """amax minimising the mean squared quantization error over the histogram."""

    name = "mse"
