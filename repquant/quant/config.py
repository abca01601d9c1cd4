"""Quantization settings as one frozen dataclass (filled from a recipe's ``quant:`` section)."""

from __future__ import annotations

from dataclasses import dataclass

from repquant.errors import RecipeError
from repquant.quant.calibrators import calibrator_names


@dataclass(frozen=True)
class QuantConfig:
    """INT8 post-training quantization settings.

    ``calib_method``: a registered calibrator (``repquant.quant.calibrators``): ``max`` (running absolute
    max), or a histogram method over activations: ``percentile`` (at ``percentile`` %), ``entropy`` (KL),
    ``mse``. Weights are always calibrated per output channel with max.
    ``keep_float_layers``: layer FQNs (or quantizer FQNs) left in float.
    ``quantize_conv_outputs``: also quantize every quantized conv's output; TensorRT does not want
    this (it fuses the next layer's input Q/DQ), but ONNX Runtime's CPU QDQ fusion needs
    DQ -> Conv -> Q to run an integer ``QLinearConv``.
    """

    num_bits: int = 8
    calib_method: str = "max"
    percentile: float = 99.99
    num_calib_images: int = 128
    keep_float_layers: tuple[str, ...] = ()
    quantize_conv_outputs: bool = False

    def __post_init__(self) -> None:
        if self.calib_method not in calibrator_names():
            raise RecipeError(
                f"quant.calib_method: {self.calib_method!r} is not one of {list(calibrator_names())}"
            )
        if self.num_bits != 8:
            raise RecipeError(f"quant.num_bits: only 8-bit INT8 is supported, got {self.num_bits}")
        if not 0.0 < self.percentile <= 100.0:
            raise RecipeError(f"quant.percentile: must be in (0, 100], got {self.percentile}")
        if self.num_calib_images < 1:
            raise RecipeError(f"quant.num_calib_images: must be >= 1, got {self.num_calib_images}")
        if isinstance(self.keep_float_layers, str):
            raise RecipeError("quant.keep_float_layers: expected a list of layer names, got a string")
        object.__setattr__(self, "keep_float_layers", tuple(self.keep_float_layers))


def quant_info(config: QuantConfig, layout: str, **extra: object) -> dict[str, object]:
    """The ``repquant_quant`` record (checkpoint and ONNX metadata) that rebuilds the quantizers."""
    return {"keep_float_layers": list(config.keep_float_layers), "calib_method": config.calib_method,
            "percentile": config.percentile, "calib_images": config.num_calib_images, "layout": layout, **extra}
