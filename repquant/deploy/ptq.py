"""Mixed-precision post-training quantization to a QDQ ONNX file: the K layers INT8 hurts most stay float.

``ptq_command`` (behind ``repquant ptq``): load and re-parameterize a model, draw the seeded calibration
subset, pick the keep-float layers (from a sensitivity JSON written by ``repquant sensitivity`` or
measured on the spot), calibrate the remaining quantizers, export a QDQ ONNX file that carries the
same ``repquant_*`` metadata as a float export (so ``repquant eval --model X.onnx`` works) plus a
``repquant_quant`` entry recording the keep-float layers and calibration.

Layouts: ``tensorrt`` (inputs + weights quantized; TensorRT fuses the rest) and ``ort`` (also every
quantized conv's output, which ONNX Runtime's CPU QDQ fusion needs to run integer ``QLinearConv``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from repquant.deploy.onnx_export import DECODED_OUTPUTS, INPUT_NAME, export_metadata, set_onnx_metadata
from repquant.errors import CalibrationError
from repquant.io import atomic_write_bytes

logger = logging.getLogger(__name__)

LAYOUTS = ("tensorrt", "ort")


@dataclass(frozen=True)
class PTQResult:
    """What ``ptq_command`` wrote and decided."""

    onnx_path: Path
    keep_float_layers: tuple[str, ...]
    quantized_layers: int
    layout: str
    calibration: dict[str, Any]


def keep_float_from_sensitivity(path: str | os.PathLike, k: int, mode: str, metric: str) -> tuple[str, ...]:
    """The first ``k`` layers of ``rankings[mode][metric]`` in a ``repquant sensitivity`` JSON."""
    path = Path(path)
    try:
        rankings = json.loads(path.read_text())["rankings"]
    except (OSError, ValueError, KeyError) as err:
        raise CalibrationError(f"{path}: not a repquant sensitivity JSON ({type(err).__name__}: {err})") from None
    if mode not in rankings or metric not in rankings[mode]:
        have = [f"{m}/{k}" for m, per in rankings.items() for k in per]
        raise CalibrationError(f"{path}: no ranking {mode}/{metric}; it has {', '.join(have)}")
    ranking = rankings[mode][metric]
    if k > len(ranking):
        raise CalibrationError(f"{path}: --keep-float {k} but the model has only {len(ranking)} quantizable layers")
    return tuple(ranking[:k])


def export_quantized_onnx(qmodel: torch.nn.Module, path: str | os.PathLike, img_hw: tuple[int, int],
                          quant_info: dict[str, Any], dynamic_batch: bool = True) -> Path:
    """Export the calibrated fake-quant YOLOv6 ``qmodel`` with box decoding as QDQ ONNX, with metadata."""
    from repquant.models.head import DecodedDetector
    from repquant.quant.qdq_export import export_qdq_onnx

    path = Path(path)
    wrapper = DecodedDetector(qmodel, img_hw).eval()
    tmp = path.with_name(f".{path.name}.export.tmp")
    try:
        export_qdq_onnx(wrapper, torch.zeros(1, 3, *img_hw), tmp, input_names=(INPUT_NAME,),
                        output_names=DECODED_OUTPUTS, dynamic_batch=dynamic_batch)
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    metadata = export_metadata(qmodel.config, img_hw, 0 if dynamic_batch else 1)
    metadata["repquant_quant"] = json.dumps(quant_info, sort_keys=True)
    set_onnx_metadata(proto, metadata)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def ptq_command(model_path_or_name: str, data_yaml: str | os.PathLike, output: str | os.PathLike,
                keep_float: int = 6, sensitivity_json: str | os.PathLike | None = None,
                metric: str = "mse", mode: str = "isolated", calib_method: str = "max",
                percentile: float = 99.99, calib_images: int = 128, img_size: int = 640, seed: int = 0,
                layout: str = "tensorrt", isolated_images: int | None = 32, batch_size: int = 2,
                progress: bool = True) -> PTQResult:
    """Quantize ``model_path_or_name`` to INT8 except its ``keep_float`` most sensitive layers; write QDQ ONNX.

    Without ``sensitivity_json`` the ranking ``mode``/``metric`` is measured on the calibration images
    (``layer_sensitivity`` restricted to ``mode``).
    """
    from repquant.checkpoint import resolve_model
    from repquant.data import load_data_config
    from repquant.data.calib import CalibManifest, calibration_batches
    from repquant.quant.config import QuantConfig
    from repquant.quant.sensitivity import layer_sensitivity, quantized_copy
    from repquant.reparam import is_deployed, reparameterize

    if layout not in LAYOUTS:
        raise ValueError(f"ptq: layout must be one of {LAYOUTS}, got {layout!r}")
    data_config = load_data_config(data_yaml)
    model = resolve_model(model_path_or_name, num_classes=data_config.nc).eval()
    if not is_deployed(model):
        model = reparameterize(model).eval()
    manifest = CalibManifest(data=str(data_yaml), split="train", num_images=calib_images, seed=seed,
                             img_size=img_size, batch_size=batch_size)
    batches, calibration = calibration_batches(manifest)
    base = QuantConfig(calib_method=calib_method, percentile=percentile, num_calib_images=calib_images)
    if keep_float == 0:
        keep: tuple[str, ...] = ()
    elif sensitivity_json is not None:
        keep = keep_float_from_sensitivity(sensitivity_json, keep_float, mode, metric)
    else:
        logger.info("ptq: measuring %s %s sensitivity to pick %d keep-float layers", mode, metric, keep_float)
        result = layer_sensitivity(model, batches, base, modes=(mode,), progress=progress,
                                   isolated_images=isolated_images)
        keep = tuple(result.ranking(mode, metric)[:keep_float])
    config = QuantConfig(calib_method=calib_method, percentile=percentile, num_calib_images=calib_images,
                         keep_float_layers=keep, quantize_conv_outputs=layout == "ort")
    qmodel, placement = quantized_copy(model, batches, config)
    quant_info = {"keep_float_layers": list(keep), "calib_method": calib_method, "percentile": percentile,
                  "calib_images": calib_images, "calib_seed": seed, "layout": layout,
                  "ranking": None if not keep else f"{mode}/{metric}"}
    path = export_quantized_onnx(qmodel, output, (img_size, img_size), quant_info)
    logger.info("ptq: wrote %s (%d of %d layers INT8, float: %s)", path, len(placement.layers) - len(keep),
                len(placement.layers), ", ".join(keep) or "none")
    return PTQResult(path, keep, len(placement.layers) - len(keep), layout, calibration)
