"""The names of every extension point, torch-free, so the CLI can offer them without loading torch.

Each tuple lists the names that a registry in a lower floor implements; ``tests/test_registries.py``
checks that every name here has an implementation and every implementation a name here. Adding a
calibrator, metric, backend or block mode is therefore one class in its module plus one name below.

| names              | implemented (registered) in                 |
|--------------------|---------------------------------------------|
| ``CALIBRATORS``    | ``repquant.quant.calibrators``              |
| ``METRICS``        | ``repquant.quant.metrics``                  |
| ``MODES``          | ``repquant.quant.sensitivity`` (fixed set)  |
| ``BACKENDS``       | ``repquant.deploy.backends``                |
| ``BLOCK_MODES``    | ``repquant.models.blocks``                  |
"""

from __future__ import annotations

# Calibration of activation amax (weights always use per-channel max).
CALIBRATORS = ("max", "percentile", "entropy", "mse")
# Sensitivity metrics (definitions in repquant.quant.metrics), in report order.
METRICS = ("mse", "snr_db", "cosine")
# Sensitivity modes: isolated (one layer quantized, error at the outputs), accumulated, local.
MODES = ("isolated", "accumulated", "local")
# Quantizer layouts of the exported QDQ graph.
LAYOUTS = ("tensorrt", "ort")
# Inference engines behind eval / bench / ptq parity.
BACKENDS = ("ort", "torch", "tensorrt", "openvino")
# bf16: OpenVINO on CPUs with AVX-512 BF16 / AMX (its default for float models there, made explicit).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# Storage type of the keep-float convs in a QDQ file.
FLOAT_DTYPES = ("fp32", "fp16")
# Training forms of the RepVGG-style 3x3 slots.
BLOCK_MODES = ("repvgg", "qarepvgg", "qarepvggv2", "repopt", "hyper_search", "conv_silu")
# CLI spelling of a metric -> the metric names it selects.
METRIC_CHOICES = {"mse": ("mse",), "snr": ("snr_db",), "cosine": ("cosine",), "all": METRICS}
