"""Quantization settings as one frozen dataclass (filled from a recipe's ``quant:`` section)."""

from __future__ import annotations

import dataclasses
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
    ``quantize_relu_outputs`` (with ``quantize_conv_outputs``; ONNX Runtime placement 2): a conv whose only
    consumer is a ReLU is quantized after the ReLU instead (unsigned, 8 bits over [0, amax]), and every activation
    quantizer of a non-negative tensor is unsigned. ORT then drops the ReLU into the QLinearConv (a uint8 zero
    point 0 clamps at 0) and reads one INT8 tensor where the consumers' quantizers repeat the same scale.
    """

    num_bits: int = 8
    calib_method: str = "max"
    percentile: float = 99.99
    num_calib_images: int = 128
    keep_float_layers: tuple[str, ...] = ()
    quantize_conv_outputs: bool = False
    quantize_relu_outputs: bool = False

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


ORT_PLACEMENT = 2  # 1: conv outputs quantized before the ReLU (files without ``ort_placement``); 2: after it


def quant_info(config: QuantConfig, layout: str, **extra: object) -> dict[str, object]:
    """The ``repquant_quant`` record (checkpoint and ONNX metadata) that rebuilds the quantizers."""
    info: dict[str, object] = {
        "keep_float_layers": list(config.keep_float_layers), "calib_method": config.calib_method,
        "percentile": config.percentile, "calib_images": config.num_calib_images, "layout": layout, **extra}
    if config.quantize_relu_outputs:
        info["ort_placement"] = ORT_PLACEMENT
    return info


def with_layout(config: QuantConfig, layout: str | None, ort_placement: int = ORT_PLACEMENT) -> QuantConfig:
    """``config`` with the quantizers of ``layout`` (``ort_placement`` 1 rebuilds files written before placement
    2 existed)."""
    ort = layout == "ort"
    return dataclasses.replace(config, quantize_conv_outputs=ort, quantize_relu_outputs=ort and ort_placement >= 2)
