"""QAT options: learnable quantizer scales (LSQ gradients, tied groups, saved and exported) and RepOptimizer
gradient masks for RepOpt-trained models (folded for the BN-folded weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (extra 'quant') not installed")

from repquant.checkpoint import save_checkpoint  # noqa: E402
from repquant.deploy.qdq import export_quantized_checkpoint, qdq_parity  # noqa: E402
from repquant.errors import CheckpointError, RecipeError  # noqa: E402
from repquant.models import create_model  # noqa: E402
from repquant.models.blocks import RealVGGBlock  # noqa: E402
from repquant.quant import _modelopt  # noqa: E402
from repquant.quant.checkpoint import load_quantized_model  # noqa: E402
from repquant.quant.config import QuantConfig  # noqa: E402
from repquant.quant.learnable_scales import LearnableScales  # noqa: E402
from repquant.quant.sensitivity import quantized_copy  # noqa: E402
from repquant.tasks import qat  # noqa: E402
from repquant.tasks.config import QATConfig, SensitivityConfig  # noqa: E402
from repquant.tasks.inputs import load_quant_inputs  # noqa: E402
from repquant.train import ddp  # noqa: E402
from repquant.train.repopt import RepOptimizer, folded_gradient_masks, save_scales  # noqa: E402
from repquant.train.trainer import Trainer  # noqa: E402


def qat_train(config: QATConfig, resume: bool = False, progress: bool = False) -> qat.QATResult:
    return qat.run(config, resume=resume, progress=progress)


def load_for_quantization(model: str, data: Path, calib_images: int, img_size: int):
    inputs = load_quant_inputs(SensitivityConfig(model, data, calib_images=calib_images, img_size=img_size))
    return inputs.model, inputs.data, inputs.batches, inputs.calibration


class _QATRun:
    """The parts QAT hands to the training loop, and that loop."""

    def __init__(self, config: QATConfig) -> None:
        dist, device = ddp.init_distributed("cpu")
        self.parts, hooks, _ = qat.qat_parts(config, dist, device, progress=False)
        self.optimizer, self.qmodel = self.parts.optimizer, self.parts.model
        self.trainer = Trainer(self.parts, qat.loop_config(config), dist, device, hooks)

    def run(self):
        return self.trainer.run()

TINY = dict(batch_size=4, img_size=64, calib_images=4, device="cpu", epochs=1, lr=0.01)


def _lsq_reference(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """LSQ written out with autograd: s * (x/s rounded by STE), straight-through only where |x| <= amax."""
    s = amax / 127
    v = x / s
    v = torch.where(x.abs() <= amax, v, v.detach())
    return s * (v + (v.detach().round().clamp(-128, 127) - v).detach())


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradient_matches_the_formula(per_channel: bool) -> None:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.conv = nn.Conv2d(3, 4, 3)
    _modelopt.quantize_modules(holder, [{"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0},
                                         "enable": True},
                                        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None},
                                         "enable": True}])
    conv = holder.conv
    w_amax = torch.tensor([0.05, 0.1, 0.2, 0.15]).reshape(4, 1, 1, 1)
    conv.weight_quantizer.amax = w_amax
    conv.input_quantizer.amax = torch.tensor(1.5)
    if not per_channel:
        conv.weight_quantizer.disable()
    scales = LearnableScales(holder)
    x = torch.randn(2, 3, 8, 8) * 1.2  # ~20 % of inputs beyond amax: both branches of the formula are hit
    target = torch.randn(2, 4, 6, 6)
    ((conv(x) - target) ** 2).sum().backward()

    x_amax = torch.tensor(1.5, requires_grad=True)
    w_ref_amax = w_amax.clone().requires_grad_(per_channel)
    weight = _lsq_reference(conv.weight.detach(), w_ref_amax) if per_channel else conv.weight.detach()
    out = nn.functional.conv2d(_lsq_reference(x, x_amax), weight, conv.bias.detach())
    ((out - target) ** 2).sum().backward()
    key = "conv__input_quantizer"
    assert torch.allclose(scales.log_amax[key].grad / 1.5, x_amax.grad, rtol=1e-4)  # d/dlog = amax * d/damax
    if per_channel:
        grad = scales.log_amax["conv__weight_quantizer"].grad
        # atol: a channel whose gradient terms nearly cancel differs in summation order (threads) only
        scale = w_ref_amax.grad.abs().max()
        assert grad.abs().min() > 0 and torch.allclose(grad / w_amax, w_ref_amax.grad, rtol=1e-4, atol=1e-5 * scale)
    else:
        assert "conv__weight_quantizer" not in scales.log_amax  # disabled quantizers are not trained
    with torch.no_grad():
        assert torch.equal(conv(x), conv(x))  # and in eval (no grad) the hook is inert


@pytest.fixture(scope="module")
def data_yaml(tiny_data_yaml: Path) -> Path:
    return tiny_data_yaml


def _float_checkpoint(path: Path, block_mode: str = "repvgg") -> Path:
    torch.manual_seed(0)
    model = create_model("yolov6n", num_classes=2, block_mode=block_mode)
    with torch.no_grad():
        for conv in [*model.head.cls_preds, *model.head.reg_preds]:
            conv.weight.normal_(0.0, 0.05)
        for module in model.modules():  # non-trivial BN folds, so a mask without a^2 would differ
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.running_var.uniform_(0.5, 2.0)
    return save_checkpoint(path, model)


def test_learned_scales_are_trained_tied_saved_and_exported(data_yaml: Path, tmp_path: Path) -> None:
    checkpoint = _float_checkpoint(tmp_path / "float.safetensors")
    out = tmp_path / "lsq.safetensors"
    result = qat_train(QATConfig(model=str(checkpoint), data=str(data_yaml), output=str(out), learn_scales=True,
                                 scale_lr=0.05, **TINY), progress=False)
    assert result.history[0]["scale_mean_abs_log_ratio"] > 1e-3
    model, _, batches, _ = load_for_quantization(str(checkpoint), data_yaml, 4, 64)
    ptq, placement = quantized_copy(model, batches, QuantConfig(num_calib_images=4))
    qmodel, _ = load_quantized_model(out)
    trained, calibrated = qmodel.state_dict(), ptq.state_dict()
    amax_keys = [k for k in trained if k.endswith("_amax")]
    assert sum(not torch.equal(trained[k], calibrated[k]) for k in amax_keys) > len(amax_keys) // 2
    assert all((trained[k] > 0).all() for k in amax_keys)
    quantizers = dict(_modelopt.iter_quantizers(qmodel))
    tied = [g for g in placement.shared_groups if len(g) > 1]
    assert tied
    for group in tied:  # groups that must share one Q/DQ scale still do after training
        values = [quantizers[n].amax for n in group if n in quantizers and quantizers[n].is_enabled]
        assert all(torch.equal(values[0], v) for v in values[1:])
    onnx_path = tmp_path / "lsq.onnx"
    export_quantized_checkpoint(out, onnx_path, img_size=64)
    parity = qdq_parity(qmodel, onnx_path, torch.cat(batches))
    assert parity.exact(), parity  # the exported Q/DQ scales are the trained ones


def test_learned_scales_resume(data_yaml: Path, tmp_path: Path) -> None:
    checkpoint = _float_checkpoint(tmp_path / "float.safetensors")
    base = dict(model=str(checkpoint), data=str(data_yaml), output=str(tmp_path / "r.safetensors"),
                learn_scales=True, **{**TINY, "epochs": 1})
    qat_train(QATConfig(**base), progress=False)
    with pytest.raises(CheckpointError, match="learn_scales=True, this run False; resume with the same settings"):
        qat_train(QATConfig(**{**base, "learn_scales": False, "epochs": 2}), resume=True, progress=False)
    resumed = qat_train(QATConfig(**{**base, "epochs": 2}), resume=True, progress=False)
    assert [int(r["epoch"]) for r in resumed.history] == [0, 1]


@pytest.fixture(scope="module")
def repopt_start(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("repopt_qat")
    checkpoint = _float_checkpoint(tmp / "repopt.safetensors", block_mode="repopt")
    model = create_model("yolov6n", num_classes=2, block_mode="repopt")
    gen = torch.Generator().manual_seed(1)
    scales = {}
    for name, module in model.named_modules():
        if isinstance(module, RealVGGBlock):
            kinds = ["scale_conv", "scale_1x1"] + (["scale_identity"] if module.has_identity else [])
            scales.update({f"{name}.{k}": torch.rand(module.out_channels, generator=gen) + 0.5 for k in kinds})
    save_scales(tmp / "scales.safetensors", scales, "yolov6n")
    return checkpoint, tmp / "scales.safetensors"


def test_repopt_model_is_fine_tuned_with_folded_masks(repopt_start, data_yaml: Path, tmp_path: Path) -> None:
    from repquant.checkpoint import load_model
    from repquant.train.repopt import load_scales

    checkpoint, scales_path = repopt_start
    run = _QATRun(QATConfig(model=str(checkpoint), data=str(data_yaml), output=str(tmp_path / "q.safetensors"),
                            repopt_scales=str(scales_path), keep_float=2, **TINY))
    assert isinstance(run.optimizer, RepOptimizer)
    expected = folded_gradient_masks(load_model(str(checkpoint)), load_scales(scales_path)[0])
    names = {id(p): n for n, p in run.qmodel.named_parameters()}
    got = {names[id(p)]: mask for p, mask in run.optimizer.grad_masks.items()}
    assert got.keys() == expected.keys() and len(got) > 20
    assert all(torch.allclose(got[n], expected[n].float()) for n in got)
    result = run.run()
    assert result.history and all(torch.isfinite(p).all() for p in run.qmodel.parameters())


def test_repopt_scales_errors(repopt_start, data_yaml: Path, tmp_path: Path) -> None:
    checkpoint, scales_path = repopt_start
    base = dict(data=str(data_yaml), output=str(tmp_path / "q.safetensors"), **TINY)
    with pytest.raises(RecipeError, match="was trained with RepOptimizer; pass --repopt-scales"):
        _QATRun(QATConfig(model=str(checkpoint), **base))
    plain = _float_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(RecipeError, match="was not trained with RepOptimizer"):
        _QATRun(QATConfig(model=str(plain), repopt_scales=str(scales_path), **base))
    other = tmp_path / "other.safetensors"
    save_scales(other, {"backbone.stem.scale_conv": torch.ones(3)}, "yolov6s")
    with pytest.raises(CheckpointError, match="other.safetensors: scales do not match the model"):
        _QATRun(QATConfig(model=str(checkpoint), repopt_scales=str(other), **base))


def test_repopt_masks_can_be_switched_off(repopt_start, data_yaml: Path, tmp_path: Path) -> None:
    checkpoint, _ = repopt_start
    run = _QATRun(QATConfig(model=str(checkpoint), data=str(data_yaml), output=str(tmp_path / "q.safetensors"),
                            repopt_masks=False, **TINY))
    assert type(run.optimizer) is torch.optim.SGD  # no scales file needed, no masks applied


def test_repopt_scales_with_masks_off_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="given with the RepOpt masks switched off"):
        QATConfig(model="m.safetensors", data="d.yaml", output=str(tmp_path / "q.safetensors"),
                  repopt_scales="s.safetensors", repopt_masks=False, **TINY)
