"""The extension points: every name the CLI offers (``repquant.vocab``) has an implementation and every
implementation a name; adding a calibrator, a metric or a backend is one class plus its registration."""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from repquant import vocab


def test_vocab_matches_the_registries() -> None:
    from repquant.deploy.backends import get_backend
    from repquant.models.blocks import block_mode_names
    from repquant.quant.calibrators import calibrator_names
    from repquant.quant.metrics import metric_names

    assert calibrator_names() == vocab.CALIBRATORS
    assert metric_names() == vocab.METRICS
    assert block_mode_names() == vocab.BLOCK_MODES
    for name in vocab.BACKENDS:
        assert get_backend(name).name == name


def test_unknown_names_list_the_valid_ones() -> None:
    from repquant.deploy.backends import get_backend
    from repquant.errors import CalibrationError, ModelError, RepquantError
    from repquant.models.blocks import block_factory
    from repquant.quant.calibrators import get_calibrator
    from repquant.quant.metrics import get_metric

    with pytest.raises(CalibrationError, match="valid methods: max, percentile, entropy, mse"):
        get_calibrator("minmax")
    with pytest.raises(CalibrationError, match="valid metrics: mse, snr_db, cosine"):
        get_metric("sqnr")
    with pytest.raises(RepquantError, match="valid backends: ort, torch, tensorrt"):
        get_backend("onnx")
    with pytest.raises(ModelError, match="expected one of repvgg, qarepvgg"):
        block_factory("repvit")


def test_a_toy_calibrator_is_one_registered_class() -> None:
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (extra 'quant') not installed")
    from repquant.quant import _modelopt
    from repquant.quant.calibrate import calibrate, insert_quantizers
    from repquant.quant.calibrators import MaxCalibrator, register_calibrator, unregister_calibrator
    from repquant.quant.config import QuantConfig
    from repquant.quant.placement import find_placement

    @register_calibrator
    class HalfMaxCalibrator(MaxCalibrator):  # the whole addition: half the running max
        name = "half_max"

        def calibrate(self, model, forward_loop, options) -> None:
            super().calibrate(model, forward_loop, options)
            for _, q in _modelopt.iter_quantizers(model):
                if q.is_enabled and q.axis is None:
                    _modelopt.set_amax(q, q.amax / 2)

    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
        x = torch.rand(2, 3, 16, 16) * 3
        amax = {}
        for method in ("max", "half_max"):
            qmodel = insert_quantizers(copy.deepcopy(model), find_placement(model),
                                       QuantConfig(calib_method=method))
            calibrate(qmodel, lambda m: m(x), method)
            amax[method] = float(qmodel[0].input_quantizer.amax)
        assert amax["max"] == pytest.approx(float(x.abs().max()))
        assert amax["half_max"] == pytest.approx(amax["max"] / 2)
    finally:
        unregister_calibrator("half_max")


def test_a_toy_metric_flows_into_sensitivity_rankings() -> None:
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (extra 'quant') not installed")
    from repquant.quant.metrics import Metric, register_metric, unregister_metric
    from repquant.quant.sensitivity import layer_sensitivity

    register_metric(Metric("nmse", lambda s: s.sum_sq_err / s.sum_sq_ref, False, "sum((y_q-y)^2) / sum(y^2)"))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
        result = layer_sensitivity(model, [torch.rand(2, 3, 16, 16)], modes=("local",), progress=False)
        for layer in result.layers:
            stats = layer.modes["local"]
            assert stats.nmse == pytest.approx(stats.mse / stats.signal_power)
        order = sorted(result.layers, key=lambda ly: -ly.modes["local"].nmse)
        assert result.ranking("local", "nmse") == [ly.name for ly in order]
    finally:
        unregister_metric("nmse")


class _ConstantRunner:
    backend, precision, device, threads, batch_size = "toy", "fp32", "cpu", None, None

    def __init__(self, img_size: int) -> None:
        self.img_size = (img_size, img_size)

    def make_input(self, batch: int) -> np.ndarray:
        return np.zeros((batch, 3, *self.img_size), np.float32)

    def __call__(self, images: object) -> tuple[np.ndarray, np.ndarray]:
        batch = np.asarray(images).shape[0]
        boxes = np.tile(np.array([[[4.0, 4.0, 20.0, 20.0]]], np.float32), (batch, 1, 1))
        return boxes, np.full((batch, 1, 2), 0.9, np.float32)


def test_a_toy_backend_is_one_module(monkeypatch: pytest.MonkeyPatch, tiny_data_yaml: Path) -> None:
    """A backend module exposing ``BACKEND`` and its name in the vocabulary: bench and eval run it."""
    from repquant.deploy.backends import get_backend
    from repquant.tasks import bench, evaluate
    from repquant.tasks.config import BenchConfig, EvalConfig

    module = types.ModuleType("repquant.deploy.backends.toy")

    class ToyBackend:
        name, source = "toy", "torch"

        def open(self, source: object, options: object) -> _ConstantRunner:
            return _ConstantRunner(options.img_size)  # type: ignore[attr-defined]

    module.BACKEND = ToyBackend()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(vocab, "BACKENDS", (*vocab.BACKENDS, "toy"))  # the registration
    assert get_backend("toy").name == "toy"
    report = bench.run(BenchConfig("yolov6n", backend="toy", batch_sizes=(2,), img_size=64, warmup=0, iters=2))
    assert [(r.backend, r.batch_size) for r in report.results] == [("toy", 2)]
    result = evaluate.run(EvalConfig("yolov6n", tiny_data_yaml, img_size=64, backend="toy"), progress=False)
    assert result.backend == "toy" and result.result.num_images == 2
