"""Checkpoints: safetensors round trips, variant/name/shape checks, corrupt files, weights-only .pt files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from repquant.checkpoint import load_checkpoint, load_model, save_checkpoint
from repquant.errors import CheckpointError
from repquant.io import read_safetensors, write_safetensors
from repquant.models import create_model
from repquant.reparam import is_deployed, reparameterize

IMG = 64


def _randomized(name: str = "yolov6n", num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A model whose BN statistics and (zero-initialised) prediction convs are random, so that
    wrong weights, a skipped re-parameterization or a lost tensor change the outputs."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        for conv in [*model.head.cls_preds, *model.head.reg_preds]:
            conv.weight.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _randomized()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _outputs(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(images)


def test_round_trip_fp32_is_exact(tmp_path: Path, model: torch.nn.Module, images: torch.Tensor) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"map50_95": 0.41, "recipe": {"epochs": 3}})
    loaded = load_model(path, expected_name="yolov6n")
    assert loaded.config == model.config
    assert not is_deployed(loaded)
    expected = model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    for a, b in zip(_outputs(loaded, images), _outputs(model, images), strict=True):
        assert torch.equal(a, b)
    _, metadata = load_checkpoint(path)
    assert metadata["map50_95"] == 0.41
    assert metadata["recipe"] == {"epochs": 3}
    assert metadata["deployed"] is False
    assert metadata["repquant_config"] == model.config.to_dict()
    assert metadata["dtype"] == "float32"


def test_round_trip_fp16_halves_the_file(tmp_path: Path, model: torch.nn.Module) -> None:
    full = save_checkpoint(tmp_path / "fp32.safetensors", model)
    half = save_checkpoint(tmp_path / "fp16.safetensors", model, dtype=torch.float16)
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    state, metadata = load_checkpoint(half)
    assert metadata["dtype"] == "float16"
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert state[key].dtype == torch.float16
            assert torch.equal(state[key], tensor.half()), key
        else:  # BN num_batches_tracked keeps its integer type
            assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    loaded = load_model(half)
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == model.state_dict()[key].dtype
        assert torch.equal(tensor, state[key].to(tensor.dtype)), key


def test_deployed_checkpoint_loads_deployed(
    tmp_path: Path, model: torch.nn.Module, images: torch.Tensor
) -> None:
    deployed = reparameterize(_randomized())
    path = save_checkpoint(tmp_path / "deployed.safetensors", deployed)
    assert load_checkpoint(path)[1]["deployed"] is True
    loaded = load_model(path)
    assert is_deployed(loaded)
    for a, b in zip(_outputs(loaded, images), _outputs(deployed, images), strict=True):
        assert torch.equal(a, b)
    # Deployed form computes the same function as the train form it came from.
    for a, b in zip(_outputs(loaded, images), _outputs(model, images), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_wrong_variant_names_both(tmp_path: Path, model: torch.nn.Module) -> None:
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model)
    with pytest.raises(CheckpointError) as err:
        load_model(path, expected_name="yolov6s")
    assert str(err.value) == f"{path}: checkpoint is yolov6n (num_classes 3), expected yolov6s"
    with pytest.raises(
        CheckpointError, match=r"checkpoint is yolov6n \(num_classes 3\), expected num_classes 80"
    ):
        load_model(path, expected_num_classes=80)


def _rewrite(path: Path, edit) -> None:
    tensors, metadata = read_safetensors(path)
    edit(tensors)
    write_safetensors(path, tensors, metadata)


def test_mismatched_shape_names_the_key(tmp_path: Path, model: torch.nn.Module) -> None:
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model)
    key = "head.cls_preds.1.weight"
    original = tuple(model.state_dict()[key].shape)

    def edit(tensors: dict) -> None:
        tensors[key] = torch.zeros(5, *original[1:])

    _rewrite(path, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert message == (
        f"{path}: tensor {key!r} has shape {(5, *original[1:])} in checkpoint (yolov6n (num_classes 3)), "
        f"model expects {original}"
    )


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, model: torch.nn.Module) -> None:
    path = save_checkpoint(tmp_path / "missing.safetensors", model)
    removed = list(model.state_dict())[5]
    _rewrite(path, lambda tensors: tensors.pop(removed))
    with pytest.raises(CheckpointError, match=f"lacks tensor '{removed}' that the model expects"):
        load_model(path)

    path = save_checkpoint(tmp_path / "extra.safetensors", model)
    _rewrite(path, lambda t: t.update({"head.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="has unexpected tensor 'head.extra.weight'"):
        load_model(path)


def test_truncated_file_is_one_line_naming_it(tmp_path: Path, model: torch.nn.Module) -> None:
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert message.startswith(f"{path}: corrupt or truncated safetensors file")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such checkpoint file"),
        (b"", "not a safetensors or torch checkpoint"),
        (b"name: yolov6n\nepochs: 3\n", "not a safetensors or torch checkpoint"),
        (b"PK\x03\x04garbage", "corrupt or truncated torch checkpoint"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{path}: {expected}"):
        load_checkpoint(path)


def test_safetensors_without_repquant_metadata(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    write_safetensors(path, {"w": torch.zeros(2)}, {"format": "pt"})
    with pytest.raises(CheckpointError, match="not a repquant checkpoint"):
        load_checkpoint(path)


def test_torch_file_through_weights_only(
    tmp_path: Path, model: torch.nn.Module, images: torch.Tensor
) -> None:
    path = tmp_path / "last.pt"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": state, "model_config": model.config.to_dict(), "metadata": {"epoch": 7}}, path)
    _, metadata = load_checkpoint(path)
    assert metadata["epoch"] == 7 and metadata["deployed"] is False
    loaded = load_model(path, expected_name="yolov6n")
    for a, b in zip(_outputs(loaded, images), _outputs(model, images), strict=True):
        assert torch.equal(a, b)


@dataclasses.dataclass
class _Pickled:  # any non-allowlisted class: unpickling it could run code, weights_only refuses
    value: int = 1


def test_torch_file_with_objects_is_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(), "x": _Pickled()}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: refused to load: the pickle references "
                                              "test_checkpoint._Pickled"):
        load_checkpoint(path)
    torch.save({"weights": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="must be a dict with 'model' and 'model_config'"):
        load_checkpoint(path)


def test_save_rejects_reserved_and_non_json_metadata(tmp_path: Path, model: torch.nn.Module) -> None:
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "a.safetensors", model, {"deployed": True})
    with pytest.raises(CheckpointError, match="not JSON-serializable"):
        save_checkpoint(tmp_path / "a.safetensors", model, {"when": object()})
    assert not (tmp_path / "a.safetensors").exists()


def test_resolve_model_name_or_path(tmp_path: Path, model: torch.nn.Module) -> None:
    from repquant.deploy.resolve import open_model
    from repquant.modelfile import ModelKind

    assert open_model("yolov6n").float_model().config.num_classes == 80
    assert open_model("yolov6n").float_model(num_classes=5).config.num_classes == 5
    path = save_checkpoint(tmp_path / "best.safetensors", model)
    assert open_model(str(path)).kind is ModelKind.CHECKPOINT
    assert open_model(str(path)).float_model().config.num_classes == 3
    with pytest.raises(CheckpointError, match="expected num_classes 80"):
        open_model(str(path)).float_model(num_classes=80)
    with pytest.raises(CheckpointError, match="nope.safetensors: no such model file"):
        open_model(str(tmp_path / "nope.safetensors"))
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="an ONNX model is not a torch model"):
        open_model(str(onnx_file)).float_model()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="junk.bin: not a model file"):
        open_model(str(junk))
