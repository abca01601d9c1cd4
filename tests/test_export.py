"""ONNX export + ONNX Runtime: the exported graph computes what the torch model computes."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from repquant.deploy.backends.ort import OrtDetector
from repquant.deploy.onnx_export import export_onnx, read_onnx_metadata
from repquant.errors import CheckpointError, ModelError, RepquantError
from repquant.models import DecodedDetector, YOLOv6, create_model, get_config
from repquant.reparam import is_deployed, reparameterize

IMG = 128  # smallest size that keeps all three levels non-trivial (16x16, 8x8, 4x4)
SCORE_ATOL = 1e-4  # probabilities
BOX_ATOL_PER_100PX = 1e-4  # boxes are pixels; float32 rounding grows with the coordinate


def _randomized(
    name: str, num_classes: int = 3, seed: int = 0, reg_max: int | None = None
) -> torch.nn.Module:
    """Random BN statistics and prediction convs (zero at init) so every branch matters."""
    torch.manual_seed(seed)
    if reg_max is None:
        model = create_model(name, num_classes=num_classes)
    else:  # a small network with a DFL head: the decode path of the M/L models at nano cost
        model = YOLOv6(dataclasses.replace(get_config(name), num_classes=num_classes, reg_max=reg_max))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        for conv in model.head.cls_preds:
            conv.weight.normal_(0, 0.5)  # logits spread over several units: scores vary
            conv.bias.normal_(0, 1.0)  # instead of the prior bias, which pins every score near 0.01
        for conv in model.head.reg_preds:
            conv.weight.normal_(0, 0.05)
    return model.eval()


def _torch_reference(deployed: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    detector = DecodedDetector(deployed, (IMG, IMG)).eval()
    with torch.no_grad():
        boxes, scores = detector(images)
    return boxes.numpy(), scores.numpy()


def _assert_matches(got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> None:
    (boxes, scores), (ref_boxes, ref_scores) = got, ref
    assert boxes.shape == ref_boxes.shape and scores.shape == ref_scores.shape
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    box_err = np.abs(boxes - ref_boxes).max()
    assert box_err <= BOX_ATOL_PER_100PX * max(1.0, np.abs(ref_boxes).max() / 100), box_err
    assert np.abs(scores - ref_scores).max() <= SCORE_ATOL
    assert ref_scores.std() > 0.05  # the check above is not vacuous


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def nano() -> torch.nn.Module:
    return _randomized("yolov6n")


@pytest.fixture(scope="module")
def nano_deployed(nano: torch.nn.Module) -> torch.nn.Module:
    """Exporting a deployed model skips the (slow) re-parameterization inside export_onnx."""
    return reparameterize(copy.deepcopy(nano))


@pytest.fixture(scope="module")
def nano_reference(nano_deployed: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return _torch_reference(nano_deployed, images)


def test_dynamic_batch_matches_torch(tmp_path: Path, nano, images, nano_reference) -> None:
    path = export_onnx(nano, tmp_path / "n.onnx", img_size=IMG, dynamic_batch=True)
    assert not is_deployed(nano)  # the caller's model is left in train form
    detector = OrtDetector(path)
    assert detector.img_size == (IMG, IMG) and detector.num_classes == 3 and detector.batch_size is None
    _assert_matches(detector(images), nano_reference)
    _assert_matches(detector(images[:1].numpy()), tuple(r[:1] for r in nano_reference))
    num_anchors = (IMG // 8) ** 2 + (IMG // 16) ** 2 + (IMG // 32) ** 2
    assert nano_reference[0].shape == (4, num_anchors, 4)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_static_batch_matches_torch(
    tmp_path: Path, nano_deployed, images, nano_reference, batch_size: int
) -> None:
    path = export_onnx(nano_deployed, tmp_path / "n.onnx", img_size=IMG, batch_size=batch_size)
    proto = onnx.load(path)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [batch_size, 3, IMG, IMG]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores"]
    detector = OrtDetector(path, intra_op_threads=1)
    assert detector.batch_size == batch_size
    _assert_matches(detector(images[:batch_size]), tuple(r[:batch_size] for r in nano_reference))
    with pytest.raises(ModelError, match=f"static batch {batch_size}, got batch 2"):
        detector(images[:2])


def _check_dfl_model(tmp_path: Path, model: torch.nn.Module, images: torch.Tensor) -> None:
    assert model.config.reg_max == 16
    path = export_onnx(model, tmp_path / "dfl.onnx", img_size=IMG, dynamic_batch=True)
    reference = _torch_reference(reparameterize(model), images)
    detector = OrtDetector(path)
    _assert_matches(detector(images), reference)
    _assert_matches(detector(images[:1]), tuple(r[:1] for r in reference))


def test_dfl_head_matches_torch(tmp_path: Path, images) -> None:
    _check_dfl_model(tmp_path, _randomized("yolov6n", reg_max=16), images)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov6m", "yolov6l"])
def test_dfl_variant_matches_torch(tmp_path: Path, images, name: str) -> None:
    _check_dfl_model(tmp_path, _randomized(name), images)  # CSPBep backbone, DFL head (reg_max 16)


def test_raw_export_matches_model(tmp_path: Path, nano_deployed, images) -> None:
    path = export_onnx(nano_deployed, tmp_path / "raw.onnx", img_size=IMG, dynamic_batch=True, decoded=False)
    detector = OrtDetector(path)
    with torch.no_grad():
        cls_logits, reg_dist = nano_deployed(images)
    got_cls, got_reg = detector(images)
    np.testing.assert_allclose(got_cls, cls_logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_reg, reg_dist.numpy(), atol=1e-4, rtol=0)
    assert read_onnx_metadata(path)["decoded"] is False


def test_metadata_describes_the_model(tmp_path: Path, nano, nano_deployed) -> None:
    path = export_onnx(nano_deployed, tmp_path / "n.onnx", img_size=(IMG, 2 * IMG), opset=13)
    meta = read_onnx_metadata(path)
    assert meta == {
        "config": nano.config.to_dict(),
        "img_size": (IMG, 2 * IMG),
        "num_classes": 3,
        "batch_size": 1,
        "decoded": True,
        "quant": None,
    }
    assert onnx.load(path).opset_import[0].version == 13
    detector = OrtDetector(path)
    with pytest.raises(ModelError, match=f"exported for {IMG}x{2 * IMG} images, got {IMG}x{IMG}"):
        detector(np.zeros((1, 3, IMG, IMG), np.float32))


def test_bad_inputs(tmp_path: Path, nano) -> None:
    with pytest.raises(ModelError, match="multiples of 32"):
        export_onnx(nano, tmp_path / "x.onnx", img_size=100)
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        OrtDetector(tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(CheckpointError, match=f"^{corrupt}: not a readable ONNX model"):
        OrtDetector(corrupt)
    with pytest.raises(CheckpointError, match=f"^{corrupt}: "):
        read_onnx_metadata(corrupt)
    with pytest.raises(RepquantError, match="provider NopeExecutionProvider is not available"):
        OrtDetector(corrupt, providers=("NopeExecutionProvider",))
    with pytest.raises(RepquantError, match="graph_optimization 'max'"):
        OrtDetector(corrupt, graph_optimization="max")
