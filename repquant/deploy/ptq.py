"""Mixed-precision post-training quantization to a QDQ ONNX file: the K layers INT8 hurts most stay float.

``ptq_command`` (behind ``repquant ptq``): load and re-parameterize a model, draw the seeded calibration
subset, pick the keep-float layers (from a sensitivity JSON written by ``repquant sensitivity`` or
measured on the spot), calibrate the remaining quantizers, export a QDQ ONNX file that carries the
same ``repquant_*`` metadata as a float export (so ``repquant eval --model X.onnx`` works) plus a
``repquant_quant`` entry recording the keep-float layers and calibration.

Layouts: ``tensorrt`` (inputs + weights quantized; TensorRT fuses the rest) and ``ort`` (also every
quantized conv's output, which ONNX Runtime's CPU QDQ fusion needs to run integer ``QLinearConv``,
with uint8 activations as ORT's x86 kernels want them).
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
from repquant.quant.config import LAYOUTS, quant_info
from repquant.quant.report import keep_float_from_sensitivity, rank_keep_float

__all__ = ["FLOAT_DTYPES", "LAYOUTS", "PTQResult", "QDQParity", "export_quantized_checkpoint",
           "export_quantized_onnx", "keep_float_from_sensitivity",
           "ptq_command", "qdq_parity", "search_keep_float"]

logger = logging.getLogger(__name__)

FLOAT_DTYPES = ("fp32", "fp16")
PARITY_BATCHES = 4  # calibration batches compared between torch fake-quant and ONNX Runtime


@dataclass(frozen=True)
class PTQResult:
    """What ``ptq_command`` wrote and decided."""

    onnx_path: Path
    keep_float_layers: tuple[str, ...]
    quantized_layers: int
    layout: str
    calibration: dict[str, Any]
    auto_search: list[dict[str, float]] | None = None
    parity: QDQParity | None = None
    float_dtype: str = "fp32"


def search_keep_float(model: torch.nn.Module, qmodel: torch.nn.Module, placement: Any, ranking: list[str],
                      val_dataset: Any, max_ap_drop: float, max_keep_float: int,
                      progress: bool = False) -> tuple[int, list[dict[str, float]]]:
    """Smallest K <= ``max_keep_float`` whose INT8 mAP@.5:.95 on ``val_dataset`` is within ``max_ap_drop``
    of FP32, keeping ``ranking[:K]`` float; and the evaluations made (``k``, ``map50_95``, ``drop``).

    ``qmodel`` is calibrated once with every quantizer: max / histogram calibration observes float
    activations, so a layer's scales do not depend on which other layers are quantized.
    """
    from repquant.eval import evaluate
    from repquant.models.head import DecodedDetector
    from repquant.quant.sensitivity import set_enabled_layers

    img_hw = (val_dataset.img_size, val_dataset.img_size)
    fp32 = evaluate(DecodedDetector(model, img_hw).eval(), val_dataset, progress=progress).map50_95
    evaluations: list[dict[str, float]] = [{"k": -1, "map50_95": fp32, "drop": 0.0}]
    all_layers = [ly.name for ly in placement.layers]
    try:
        for k in range(0, min(max_keep_float, len(ranking)) + 1):
            float_layers = set(ranking[:k])
            set_enabled_layers(qmodel, placement, [n for n in all_layers if n not in float_layers])
            int8 = evaluate(DecodedDetector(qmodel, img_hw).eval(), val_dataset, progress=progress).map50_95
            evaluations.append({"k": k, "map50_95": int8, "drop": fp32 - int8})
            logger.info("ptq auto: K=%d keep-float -> mAP@.5:.95 %.4f (FP32 %.4f, drop %.4f)", k, int8, fp32,
                        fp32 - int8)
            if fp32 - int8 <= max_ap_drop:
                return k, evaluations
    finally:
        set_enabled_layers(qmodel, placement, None)
    best = min(evaluations[1:], key=lambda e: e["drop"])
    raise CalibrationError(
        f"ptq --keep-float auto: no K <= {max_keep_float} keeps the mAP drop within {max_ap_drop} "
        f"(FP32 {fp32:.4f}; best K={int(best['k'])} drops {best['drop']:.4f}); raise --max-keep-float or --max-ap-drop"
    )


def export_quantized_onnx(qmodel: torch.nn.Module, path: str | os.PathLike, img_hw: tuple[int, int],
                          info: dict[str, Any], dynamic_batch: bool = True,
                          fp16_layers: tuple[str, ...] = (), uint8_activations: bool = False) -> Path:
    """Export the calibrated fake-quant YOLOv6 ``qmodel`` with box decoding as QDQ ONNX, with metadata.

    ``fp16_layers``: conv FQNs (keep-float layers) written as FP16 (``convs_to_fp16``);
    ``uint8_activations``: activation Q/DQ as uint8 for ONNX Runtime (``activations_to_uint8``).
    """
    from repquant.models.head import DecodedDetector
    from repquant.quant.qdq_export import activations_to_uint8, convs_to_fp16, export_qdq_onnx

    path = Path(path)
    wrapper = DecodedDetector(qmodel, img_hw).eval()
    tmp = path.with_name(f".{path.name}.export.tmp")
    try:
        export_qdq_onnx(wrapper, torch.zeros(1, 3, *img_hw), tmp, input_names=(INPUT_NAME,),
                        output_names=DECODED_OUTPUTS, dynamic_batch=dynamic_batch)
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    if fp16_layers:  # the exported graph wraps the network as ``model``
        proto = convs_to_fp16(proto, {f"model.{name}.weight" for name in fp16_layers})
    if uint8_activations:
        activations_to_uint8(proto)
    metadata = export_metadata(qmodel.config, img_hw, 0 if dynamic_batch else 1)
    metadata["repquant_quant"] = json.dumps(info, sort_keys=True)
    set_onnx_metadata(proto, metadata)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


@dataclass(frozen=True)
class QDQParity:
    """Per output (``boxes``, ``scores``): ``snr_db`` of ONNX Runtime (all graph optimizations) against
    torch fake-quant, and ``floor_db``, the SNR of that session against ONNX Runtime running the same
    file with graph optimizations off. An INT8 network amplifies float rounding differences (a value on
    a rounding boundary flips one step and the flip propagates), so even one runtime with two kernel
    choices agrees with itself only to the floor; parity near it means the export is exact up to
    float rounding, and a wrong scale, axis or zero point falls far below it."""

    snr_db: dict[str, float]
    floor_db: dict[str, float]

    def exact(self, margin_db: float = 3.0, enough_db: float = 60.0) -> bool:
        """Every output within ``margin_db`` of its floor, or above ``enough_db`` (agreement beyond which
        nothing is left to compare)."""
        return all(db >= min(self.floor_db[name] - margin_db, enough_db) for name, db in self.snr_db.items())


def qdq_parity(qmodel: torch.nn.Module, onnx_path: str | os.PathLike, images: torch.Tensor) -> QDQParity:
    """Compare the ONNX Runtime session (CPU, all graph optimizations: integer kernels where ORT
    fuses the QDQ pattern) with the torch fake-quant model on ``images``; see ``QDQParity``."""
    from repquant.deploy.ort import OrtDetector
    from repquant.models.head import DecodedDetector
    from repquant.quant.metrics import snr_db

    with torch.no_grad():
        reference = DecodedDetector(qmodel, tuple(images.shape[2:])).eval()(images)
    optimized = OrtDetector(onnx_path)(images)
    plain = OrtDetector(onnx_path, graph_optimization="disable")(images)
    parity, floor = {}, {}
    for i, name in enumerate(DECODED_OUTPUTS):
        parity[name] = snr_db(reference[i].numpy(), optimized[i])
        floor[name] = snr_db(plain[i], optimized[i])
    return QDQParity(parity, floor)


def export_quantized_checkpoint(path: str | os.PathLike, output: str | os.PathLike, img_size: int,
                                dynamic_batch: bool = True) -> Path:
    """The QDQ ONNX of a quantized checkpoint written by ``repquant qat``: its quantizers, keep-float
    layers and layout as recorded, so the file matches what ``repquant ptq`` writes for the same model."""
    from repquant.quant.qat import load_quantized_model

    qmodel, info = load_quantized_model(path)
    return export_quantized_onnx(qmodel, output, (img_size, img_size), info, dynamic_batch=dynamic_batch,
                                 uint8_activations=info.get("layout") == "ort")


def ptq_command(model_path_or_name: str, data_yaml: str | os.PathLike, output: str | os.PathLike,
                keep_float: int | str = 6, sensitivity_json: str | os.PathLike | None = None,
                metric: str = "mse", mode: str = "isolated", calib_method: str = "max",
                percentile: float = 99.99, calib_images: int = 128, img_size: int = 640, seed: int = 0,
                layout: str = "tensorrt", isolated_images: int | None = 32, batch_size: int = 2,
                max_ap_drop: float = 0.005, max_keep_float: int = 12, float_dtype: str = "fp32",
                progress: bool = True) -> PTQResult:
    """Quantize ``model_path_or_name`` to INT8 except its ``keep_float`` most sensitive layers; write QDQ ONNX.

    Without ``sensitivity_json`` the ranking ``mode``/``metric`` is measured on the calibration images
    (``layer_sensitivity`` restricted to ``mode``). ``keep_float="auto"``: the smallest K whose INT8
    mAP@.5:.95 on the val split is within ``max_ap_drop`` of FP32, measured with torch fake-quant in
    the exported ``layout``. ``float_dtype="fp16"`` writes the keep-float convs as FP16.
    The result carries the fake-quant vs ONNX Runtime parity (``QDQParity``) on the first calibration batches.
    """
    from repquant.quant.config import QuantConfig
    from repquant.quant.report import load_for_quantization
    from repquant.quant.sensitivity import quantized_copy

    if layout not in LAYOUTS:
        raise ValueError(f"ptq: layout must be one of {LAYOUTS}, got {layout!r}")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"ptq: float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
    model, data_config, batches, calibration = load_for_quantization(model_path_or_name, data_yaml, calib_images,
                                                                     img_size, seed, batch_size)
    base = QuantConfig(calib_method=calib_method, percentile=percentile, num_calib_images=calib_images)
    auto = keep_float == "auto"
    if not auto and not (isinstance(keep_float, int) and keep_float >= 0):
        raise CalibrationError(f"ptq: --keep-float must be a count >= 0 or 'auto', got {keep_float!r}")
    wanted = max_keep_float if auto else int(keep_float)
    search: list[dict[str, float]] | None = None
    ranking = list(rank_keep_float(model, batches, base, wanted, sensitivity_json, mode, metric, isolated_images,
                                   progress))
    if auto:
        from repquant.data import DetectionDataset

        # Searched in the layout that is exported: the ORT layout also quantizes conv outputs.
        searched = QuantConfig(calib_method=calib_method, percentile=percentile, num_calib_images=calib_images,
                               quantize_conv_outputs=layout == "ort")
        qmodel, placement = quantized_copy(model, batches, searched)
        val = DetectionDataset(data_config, "val", img_size, augment=False)
        k, search = search_keep_float(model, qmodel, placement, ranking, val, max_ap_drop, max_keep_float, progress)
        ranking = ranking[:k]
    keep = tuple(ranking)
    config = QuantConfig(calib_method=calib_method, percentile=percentile, num_calib_images=calib_images,
                         keep_float_layers=keep, quantize_conv_outputs=layout == "ort")
    qmodel, placement = quantized_copy(model, batches, config)
    info = quant_info(config, layout, calib_seed=seed, ranking=None if not keep else f"{mode}/{metric}",
                      auto_search=search, max_ap_drop=max_ap_drop if auto else None, float_dtype=float_dtype)
    path = export_quantized_onnx(qmodel, output, (img_size, img_size), info,
                                 fp16_layers=_float_convs(placement, keep) if float_dtype == "fp16" else (),
                                 uint8_activations=layout == "ort")
    parity = qdq_parity(qmodel, path, torch.cat(batches[:PARITY_BATCHES]))
    logger.info("ptq: wrote %s (%d of %d layers INT8, float %s: %s); fake-quant vs ORT SNR %s", path,
                len(placement.layers) - len(keep), len(placement.layers), float_dtype, ", ".join(keep) or "none",
                ", ".join(f"{k} {v:.1f} dB (floor {parity.floor_db[k]:.1f})" for k, v in parity.snr_db.items()))
    return PTQResult(path, keep, len(placement.layers) - len(keep), layout, calibration, search, parity, float_dtype)


def _float_convs(placement: Any, keep: tuple[str, ...]) -> tuple[str, ...]:
    """The keep-float layers that are convolutions (a float max-pool or add has no weights to store)."""
    kinds = {layer.name: layer.kind for layer in placement.layers}
    return tuple(name for name in keep if kinds[name] in ("conv", "conv_transpose"))
