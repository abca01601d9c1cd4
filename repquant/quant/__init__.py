"""INT8 quantization on NVIDIA ModelOpt: config -> placement -> insert/disable -> calibrate -> QDQ export.

Importing this package does not import modelopt; only ``repquant.quant._modelopt`` does, lazily.
"""

from repquant.quant.calibrate import (
    QuantizerState,
    calibrate,
    disable_quantizers,
    insert_quantizers,
    quantizer_state,
    restore_amax,
    unify_shared_scales,
)
from repquant.quant.config import QuantConfig
from repquant.quant.metrics import ErrorAccumulator, ErrorStats, cosine, mse, snr_db
from repquant.quant.placement import QuantizerSpec, QuantLayer, QuantPlacement, find_placement
from repquant.quant.qdq_export import activations_to_uint8, convs_to_fp16, export_qdq_onnx
from repquant.quant.qdq_inspect import ort_optimized_op_counts, qdq_nodes

__all__ = [
    "ErrorAccumulator",
    "ErrorStats",
    "QuantConfig",
    "QuantLayer",
    "QuantPlacement",
    "QuantizerSpec",
    "QuantizerState",
    "activations_to_uint8",
    "calibrate",
    "convs_to_fp16",
    "cosine",
    "disable_quantizers",
    "export_qdq_onnx",
    "find_placement",
    "insert_quantizers",
    "mse",
    "ort_optimized_op_counts",
    "qdq_nodes",
    "quantizer_state",
    "restore_amax",
    "snr_db",
    "unify_shared_scales",
]
