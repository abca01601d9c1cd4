"""The only module that imports NVIDIA ModelOpt (``nvidia-modelopt``, tested with 0.47).

Everything else in ``repquant.quant`` goes through these helpers, so the dependency stays optional
(``pip install 'repquant[quant]'``) and its API surface is pinned in one place.

ModelOpt facts relied on here (read from modelopt/torch/quantization, 0.47):
- ``mtq.quantize(model, {"quant_cfg": [...], "algorithm": None})`` swaps every ``nn.Conv2d``,
  ``nn.ConvTranspose2d`` and ``nn.MaxPool2d`` in place for a quantized twin holding
  ``input_quantizer`` / ``weight_quantizer`` / ``output_quantizer`` (``TensorQuantizer``) children;
  ``algorithm=None`` skips calibration. Module names (FQNs) are unchanged.
- ``quant_cfg`` is an ordered list of ``{"quantizer_name": glob, "cfg": {...}, "enable": bool}``;
  later entries win. ``INT8_DEFAULT_CFG`` = weights ``axis 0`` (per output channel for Conv2d,
  but per *input* channel for ConvTranspose2d, whose weight is (C_in, C_out, kH, kW)), inputs
  ``axis None`` (per tensor), everything else disabled.
- Fake quant is symmetric, zero point 0, ``scale = amax / 127``, range [-128, 127]
  (``narrow_range=False``); ONNX export (TorchScript exporter) emits QuantizeLinear/DequantizeLinear.
- ``calibrator="histogram"`` only works per tensor, and ``mtq.calibrate(..., "max")`` cannot finish a
  histogram calibrator (it calls ``compute_amax()`` without the method), so histogram methods are
  finished here with ``load_calib_amax(method, ...)``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from repquant.errors import CalibrationError, MissingDependencyError

_PURPOSE = "INT8 quantization"
logger = logging.getLogger(__name__)
# modelopt warns (on import, and again on lazy imports of its export code) that transformers is missing;
# repquant never exports Hugging Face modules.
warnings.filterwarnings("ignore", message="Cannot find transformers package", category=UserWarning)


def _mtq() -> Any:
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError("nvidia-modelopt", "quant", _PURPOSE) from err
    return mtq


def _tensor_quantizer_cls() -> type[nn.Module]:
    _mtq()
    from modelopt.torch.quantization.nn import TensorQuantizer

    return TensorQuantizer


def new_tensor_quantizer(num_bits: int = 8) -> nn.Module:
    """A fresh per-tensor ``TensorQuantizer`` (used for residual-add skip inputs)."""
    cls = _tensor_quantizer_cls()
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    # A full attribute config: a partial dict leaves attributes unset (modelopt 0.47).
    return cls(QuantizerAttributeConfig(num_bits=num_bits, axis=None))


def is_quantizer(module: nn.Module) -> bool:
    """True for a modelopt ``TensorQuantizer``."""
    return isinstance(module, _tensor_quantizer_cls())


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(fqn, TensorQuantizer)`` for every quantizer in ``model``, in module order."""
    cls = _tensor_quantizer_cls()
    for name, module in model.named_modules():
        if isinstance(module, cls):
            yield name, module


def _quant_silu_cls() -> type[nn.Module]:
    """``nn.SiLU`` with a quantizer on ``sigmoid(x)`` (``sigmoid_quantizer``) between the Sigmoid and the Mul the
    ONNX export writes for it, so ONNX Runtime can run both as QLinearSigmoid / QLinearMul."""
    from modelopt.torch.quantization.nn import QuantInputBase, TensorQuantizer

    class QuantSiLU(QuantInputBase):
        sigmoid_quantizer: TensorQuantizer

        def _setup(self) -> None:
            super()._setup()
            self._register_temp_attribute("sigmoid_quantizer", TensorQuantizer(self.default_quant_desc_output))
            self.sigmoid_quantizer.disable()

        def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - modelopt's signature
            x = self.input_quantizer(input)
            return self.output_quantizer(x * self.sigmoid_quantizer(torch.sigmoid(x)))

    return QuantSiLU


def quantize_modules(model: nn.Module, quant_cfg: list[dict[str, Any]], activations: bool = False) -> nn.Module:
    """Insert modelopt quantizers in place and apply ``quant_cfg``; no calibration.

    ``activations``: also swap every ``nn.ReLU`` for modelopt's ``QuantInputBase`` twin (``input_quantizer`` /
    ``output_quantizer``; ``parent_class`` ``"ReLU"`` in ``quant_cfg``) and every ``nn.SiLU`` for a twin with a
    ``sigmoid_quantizer`` too (``"SiLU"``). modelopt's registration is process-wide, so it is undone
    afterwards: other models keep plain activations.
    """
    mtq = _mtq()
    printed = io.StringIO()
    if activations:
        from modelopt.torch.quantization.nn import QuantInputBase

        mtq.register(original_cls=nn.ReLU, quantized_cls=QuantInputBase)
        mtq.register(original_cls=nn.SiLU, quantized_cls=_quant_silu_cls())
    try:
        with contextlib.redirect_stdout(printed):  # modelopt prints "Inserted N quantizers" on stdout
            model = mtq.quantize(model, {"quant_cfg": quant_cfg, "algorithm": None})
    finally:
        if activations:
            mtq.unregister(nn.ReLU)
            mtq.unregister(nn.SiLU)
    logger.debug("modelopt: %s", printed.getvalue().strip())
    return model


def set_histogram_calibrator(quantizer: Any, num_bins: int = 2048) -> None:
    """Give a per-tensor quantizer a fresh histogram calibrator (for percentile / entropy / mse).

    modelopt's entropy search is an O(num_bins^2) Python loop per quantizer (seconds each at 2048).
    """
    _mtq()
    from modelopt.torch.quantization.calib import HistogramCalibrator

    quantizer._calibrator = HistogramCalibrator(
        num_bits=quantizer.num_bits, axis=None, unsigned=quantizer.unsigned, num_bins=num_bins
    )


def set_max_calibrator(quantizer: Any) -> None:
    """Give a quantizer a fresh max calibrator with its own axis (undoes ``set_histogram_calibrator``)."""
    _mtq()
    from modelopt.torch.quantization.calib import MaxCalibrator

    quantizer._calibrator = MaxCalibrator(
        num_bits=quantizer.num_bits, axis=quantizer.axis, unsigned=quantizer.unsigned
    )


def calibrate_max(model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> None:
    """modelopt max calibration: weights from the tensors, activations from ``forward_loop``."""
    _mtq().calibrate(model, "max", forward_loop)


def calibrate_collect(
    model: nn.Module, forward_loop: Callable[[nn.Module], Any], method: str, percentile: float
) -> None:
    """Collect statistics with each quantizer's calibrator, then load amax.

    Histogram calibrators compute amax with ``method`` (``percentile`` / ``entropy`` / ``mse``);
    max calibrators (weights, per channel) take the running max.
    """
    _mtq()
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.model_calib import enable_stats_collection

    was_training = model.training
    model.eval()
    enable_stats_collection(model)
    with torch.no_grad():
        forward_loop(model)
    for name, q in iter_quantizers(model):
        if q._disabled:
            continue
        try:
            if isinstance(q._calibrator, HistogramCalibrator):
                kwargs = {"percentile": percentile} if method == "percentile" else {}
                q.load_calib_amax(method, **kwargs)
            else:
                q.load_calib_amax()
        except RuntimeError as err:  # "Calibrator returned None": the quantizer saw no tensor
            raise CalibrationError(f"{name}: no amax after calibration ({err})") from err
        q.enable_quant()
        q.disable_calib()
    model.train(was_training)


def quantizer_info(quantizer: Any) -> dict[str, Any]:
    """Plain-data view of one quantizer: enabled, num_bits, axis, amax, calibrator, unsigned."""
    amax = quantizer.amax if hasattr(quantizer, "_amax") else None
    return {
        "enabled": bool(quantizer.is_enabled),
        "num_bits": quantizer.num_bits,
        "axis": quantizer.axis,
        "unsigned": bool(quantizer.unsigned),
        "amax": None if amax is None else amax.detach().cpu().clone(),
        "calibrator": type(quantizer._calibrator).__name__ if quantizer._calibrator is not None else None,
    }


def set_amax(quantizer: Any, amax: torch.Tensor) -> None:
    """Overwrite a calibrated quantizer's amax (same shape)."""
    quantizer.amax = amax


def print_summary(model: nn.Module) -> None:
    """``mtq.print_quant_summary``: one line per quantizer."""
    _mtq().print_quant_summary(model)
