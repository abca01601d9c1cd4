"""QDQ ONNX files of calibrated fake-quant models: export with repquant metadata, and the fake-quant vs
ONNX Runtime parity check every export gets.

Layouts (``repquant.vocab.LAYOUTS``): ``tensorrt`` (inputs + weights quantized; TensorRT fuses the rest)
and ``ort`` (placement 2: every quantized tensor once, ReLU / SiLU / MaxPool outputs included, which ONNX
Runtime's CPU QDQ fusion needs to run integer ``QLinearConv`` and friends, with uint8 activations as ORT's x86
kernels want them; see docs/quantize.md).
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
from torch import nn

from repquant.deploy.backends.ort import OrtDetector
from repquant.deploy.onnx_export import DECODED_OUTPUTS, INPUT_NAME, export_metadata, set_onnx_metadata
from repquant.io import atomic_write_bytes
from repquant.models.head import DecodedDetector
from repquant.quant.checkpoint import load_quantized_model
from repquant.quant.metrics import snr_db
from repquant.quant.placement import QuantPlacement
from repquant.quant.qdq_export import (
    activations_to_uint8,
    convs_to_fp16,
    export_qdq_onnx,
    guard_float_convs,
    merge_repeated_qdq,
    weights_to_int8,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QDQExport:
    """How to write a calibrated model: ``info`` is its ``repquant_quant`` record; ``fp16_layers`` conv FQNs
    (keep-float layers) stored as FP16 (``convs_to_fp16``); ``uint8_activations`` writes activation Q/DQ as
    uint8 for ONNX Runtime (``activations_to_uint8``)."""

    img_size: int
    info: dict[str, Any]
    dynamic_batch: bool = True
    fp16_layers: tuple[str, ...] = ()
    uint8_activations: bool = False


def export_quantized_onnx(qmodel: nn.Module, path: str | os.PathLike, how: QDQExport) -> Path:
    """Export the calibrated fake-quant YOLOv6 ``qmodel`` with box decoding as QDQ ONNX, with metadata."""
    path = Path(path)
    img_hw = (how.img_size, how.img_size)
    wrapper = DecodedDetector(qmodel, img_hw).eval()
    tmp = path.with_name(f".{path.name}.export.tmp")
    try:
        export_qdq_onnx(wrapper, torch.zeros(1, 3, *img_hw), tmp, input_names=(INPUT_NAME,),
                        output_names=DECODED_OUTPUTS, dynamic_batch=how.dynamic_batch)
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    if how.fp16_layers:  # the exported graph wraps the network as ``model``
        proto = convs_to_fp16(proto, {f"model.{name}.weight" for name in how.fp16_layers})
    if how.uint8_activations:
        activations_to_uint8(proto)
        merge_repeated_qdq(proto)
        if unguarded := guard_float_convs(proto):  # not seen in YOLOv6 graphs; said, not hidden
            logger.warning("%s: ONNX Runtime may give these float convs INT8 weights of its own: %s", path,
                           ", ".join(unguarded[:5]))
    weights_to_int8(proto)  # after the FP16 rewrite, which reads float weights
    metadata = export_metadata(qmodel.config, img_hw, 0 if how.dynamic_batch else 1)
    metadata["repquant_quant"] = json.dumps(how.info, sort_keys=True)
    set_onnx_metadata(proto, metadata)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def export_quantized_checkpoint(path: str | os.PathLike, output: str | os.PathLike, img_size: int,
                                dynamic_batch: bool = True) -> Path:
    """The QDQ ONNX of a quantized checkpoint written by ``repquant qat``: its quantizers, keep-float
    layers and layout as recorded, so the file matches what ``repquant ptq`` writes for the same model."""
    qmodel, info = load_quantized_model(path)
    how = QDQExport(img_size, info, dynamic_batch=dynamic_batch, uint8_activations=info.get("layout") == "ort")
    return export_quantized_onnx(qmodel, output, how)


def float_convs(placement: QuantPlacement, keep: tuple[str, ...]) -> tuple[str, ...]:
    """The keep-float layers that are convolutions (a float max-pool or add has no weights to store)."""
    kinds = {layer.name: layer.kind for layer in placement.layers}
    return tuple(name for name in keep if kinds[name] in ("conv", "conv_transpose"))


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

    def describe(self) -> str:
        return ", ".join(f"{name} {db:.1f} dB (ORT-vs-ORT floor {self.floor_db[name]:.1f} dB)"
                         for name, db in self.snr_db.items())


def qdq_parity(qmodel: nn.Module, onnx_path: str | os.PathLike, images: torch.Tensor) -> QDQParity:
    """Compare the ONNX Runtime session (CPU, all graph optimizations: integer kernels where ORT
    fuses the QDQ pattern) with the torch fake-quant model on ``images``; see ``QDQParity``."""
    with torch.no_grad():
        reference = DecodedDetector(qmodel, (int(images.shape[2]), int(images.shape[3]))).eval()(images)
    optimized = OrtDetector(onnx_path)(images)
    plain = OrtDetector(onnx_path, graph_optimization="disable")(images)
    parity, floor = {}, {}
    for i, name in enumerate(DECODED_OUTPUTS):
        parity[name] = snr_db(reference[i].numpy(), optimized[i])
        floor[name] = snr_db(plain[i], optimized[i])
    return QDQParity(parity, floor)
