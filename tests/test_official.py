"""Official meituan/YOLOv6 checkpoints: read without running pickled code, mapped onto repquant's models
exactly (official outputs reproduced), every tensor accounted for, every release naming and head kind.

The fixtures in ../shared/data/yolov6-official were written by the official code (v3.0 N/S, 0.4.0 naming,
official outputs on fixed inputs). The other releases, variants, heads and forms are written by
tests/official_writer.py from the official layout; the reader must read them back to the same function.
"""

from __future__ import annotations

import io
import lzma
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import randomize, rel_err
from official_writer import write_official

from repquant.deploy.onnx_export import export_onnx
from repquant.errors import CheckpointError
from repquant.modelfile import ModelKind, identify
from repquant.models import create_model
from repquant.models.head import DecodedDetector
from repquant.official import convert_official, read_official
from repquant.reparam import reparameterize

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "yolov6-official"
needs_fixtures = pytest.mark.skipif(not OFFICIAL.is_dir(), reason="../shared/data/yolov6-official is not present")


@pytest.fixture(scope="module")
def official_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not OFFICIAL.is_dir():
        pytest.skip("../shared/data/yolov6-official is not present")
    tmp = tmp_path_factory.mktemp("official")
    files = {"yolov6n": OFFICIAL / "yolov6n_official.pt"}
    for name, compressed in (("yolov6s", "yolov6s_official.pt.xz"), ("onnx", "yolov6n_official_deploy_320.onnx.xz")):
        path = tmp / compressed.removesuffix(".xz")
        path.write_bytes(lzma.open(OFFICIAL / compressed).read())
        files[name] = path
    return files


def official_layout(boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """repquant (xyxy boxes, scores) -> the official head output rows [cx, cy, w, h, 1, scores]."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2],
                      torch.ones_like(scores[..., :1]), scores], dim=-1)


def _outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return official_layout(*DecodedDetector(model, tuple(images.shape[2:])).eval()(images))


def _assert_official(ours: torch.Tensor, ref: np.ndarray) -> None:
    ref_t = torch.from_numpy(ref).to(ours.dtype)
    scale = ref_t[..., :4].abs().max()
    assert (ours[..., :4] - ref_t[..., :4]).abs().max() <= 1e-4 * scale, "boxes"
    assert (ours[..., 4:] - ref_t[..., 4:]).abs().max() <= 5e-4, "scores"


@needs_fixtures
@pytest.mark.parametrize("name", ["yolov6n", "yolov6s"])
def test_official_outputs_reproduced_in_every_form(official_files: dict[str, Path], name: str) -> None:
    converted = convert_official(official_files[name])
    report = converted.report
    assert (report.variant, report.naming, report.head, report.deployed) == (name, "0.4.0", "plain", False)
    assert converted.official.source == "model" and converted.model.config.num_classes == 3
    ref = np.load(OFFICIAL / f"{name}_official_outputs_320.npz")
    images = torch.from_numpy(ref["images"])
    _assert_official(_outputs(converted.model, images), ref["raw_outputs"])  # training form, float32
    with torch.no_grad():
        necks = converted.model.neck(converted.model.backbone(images))
    for i, neck in enumerate(necks):
        assert torch.allclose(neck, torch.from_numpy(ref[f"raw_neck{i}"]), atol=1e-4, rtol=1e-4)
    double = convert_official(official_files[name]).model.double()
    ours64 = _outputs(double, images.double())
    assert rel_err(torch.from_numpy(ref["raw_outputs_fp64"]), ours64) < 1e-9  # float64: the same computation
    _assert_official(_outputs(reparameterize(converted.model), images), ref["deploy_outputs"])


@needs_fixtures
def test_export_runs_like_the_official_onnx(official_files: dict[str, Path], tmp_path: Path) -> None:
    import onnxruntime as ort

    ref = np.load(OFFICIAL / "yolov6n_official_outputs_320.npz")
    images = ref["images"][:1]
    official = ort.InferenceSession(str(official_files["onnx"]), providers=["CPUExecutionProvider"])
    (theirs,) = official.run(None, {official.get_inputs()[0].name: images})
    path = export_onnx(convert_official(official_files["yolov6n"]).model, tmp_path / "n.onnx", 320)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores = session.run(None, {"images": images})
    _assert_official(official_layout(torch.from_numpy(boxes), torch.from_numpy(scores)), theirs)


@needs_fixtures
def test_every_tensor_is_accounted_for(official_files: dict[str, Path]) -> None:
    converted = convert_official(official_files["yolov6n"])
    report, official = converted.report, converted.official
    assert report.mapped == len(converted.model.state_dict())
    accounted = report.mapped + len(report.folded) + len(report.training_only) + len(report.constants)
    assert accounted == len(official.state) == 756
    assert report.constants == ["detect.proj", "detect.proj_conv.weight"]
    assert identify(official_files["yolov6n"]).kind is ModelKind.OFFICIAL


# --- safety ----------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path, call: object) -> None:
        self.marker, self.call = marker, call

    def __reduce__(self) -> tuple:
        return (self.call, (f"touch {self.marker}",))


@pytest.mark.parametrize("call", [os.system, __import__("subprocess").getoutput], ids=["os.system", "subprocess"])
def test_a_reduce_payload_never_runs(tmp_path: Path, call: object) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker, call), "ema": None}, path)
    with pytest.raises(CheckpointError, match="evil.pt: refused to load: the pickle references"):
        read_official(path)
    assert not marker.exists()
    # A payload hidden next to yolov6.* classes is refused the same way (the whole pickle is scanned).
    with zipfile.ZipFile(path) as archive:
        assert any(name.endswith("data.pkl") for name in archive.namelist())


def test_an_unknown_global_is_refused_by_name(tmp_path: Path) -> None:
    import argparse

    model = create_model("yolov6n", num_classes=2).eval()
    path = write_official(model, tmp_path / "n.pt")
    checkpoint = torch.load(path, weights_only=False)  # our own file, written just above
    checkpoint["args"] = argparse.Namespace(lr=0.01)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"n.pt: refused to load: the pickle references argparse.Namespace"):
        read_official(path)


def test_refusal_is_one_line_through_the_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from repquant.cli import cli

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"yolov6": _Payload(marker, os.system)}}, path)
    result = CliRunner().invoke(cli, ["info", "--model", str(path)])
    assert result.exit_code == 1 and not marker.exists()
    assert result.stderr.count("\n") == 1 and "refused to load" in result.stderr


def test_pickle_scan_reads_protocol_2_and_4(tmp_path: Path) -> None:
    from repquant.modelfile import pickle_globals

    for protocol in (2, 4):
        path = tmp_path / f"p{protocol}.pt"
        torch.save({"x": torch.zeros(1), "c": io.BytesIO}, path, pickle_protocol=protocol)
        assert "_io.BytesIO" in pickle_globals(path)
    assert pickle.HIGHEST_PROTOCOL >= 4


# --- every release naming, head kind and form, written from the official layout ----------------------

CASES = [  # variant, release naming, head, deployed, BN eps in the file
    ("yolov6n", "0.3.0", "distill_ns", False, 1e-3),
    ("yolov6s", "0.4.0", "distill_ns", False, 1e-3),
    ("yolov6n", "0.4.0", "fuse_ab", True, 1e-3),
    ("yolov6s", "0.3.0", "fuse_ab", False, 1e-5),
    ("yolov6m", "0.3.0", "plain", False, 1e-3),
    ("yolov6l", "0.3.0", "plain", False, 1e-3),
    ("yolov6l", "0.4.0", "plain", True, 1e-3),
    ("yolov6n-v2", "0.2.x", "plain", False, 1e-3),
    ("yolov6t-v2", "0.2.x", "plain", True, 1e-3),
    ("yolov6m-v2", "0.2.x", "plain", False, 1e-3),
    ("yolov6l-v2", "0.2.x", "plain", False, 1e-3),
    ("yolov6n-qa", "0.4.0", "plain", False, 1e-3),
    ("yolov6s-qa", "0.4.0", "plain", True, 1e-3),
]


@pytest.mark.parametrize(("name", "naming", "head", "deployed", "eps"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}{'-deployed' if c[3] else ''}" for c in CASES])
def test_official_layouts_read_back_to_the_same_model(tmp_path: Path, name: str, naming: str, head: str,
                                                      deployed: bool, eps: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    model = create_model(name, num_classes=4)
    randomize(model, x, seed=1)
    if deployed:
        reparameterize(model)
    model = model.half().float()  # official files store fp16: compare against the same rounded weights
    path = write_official(model, tmp_path / f"{name}.pt", naming=naming, head=head, bn_eps=eps)
    for bn in model.modules():  # the file's function: its BatchNorms use its eps
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.eps = eps
    converted = convert_official(path)
    report = converted.report
    assert (report.variant, report.naming, report.head, report.deployed) == (name, naming, head, deployed)
    assert converted.model.config.block_mode == model.config.block_mode
    accounted = report.mapped + len(report.folded) + len(report.training_only) + len(report.constants)
    assert accounted == len(read_official(path).state)
    with torch.no_grad():
        expected, got = model(x), converted.model(x)
    # A deployed official QARepVGG block stores conv and post-BN separately: the writer's split is re-rounded
    # to fp16, so that file computes the model only to fp16 precision (the fold itself is checked below).
    tolerance = 5e-3 if name.endswith("-qa") and deployed else 1e-4
    for a, b in zip(expected, got, strict=True):
        assert rel_err(a, b) < tolerance


def test_a_file_that_fits_no_variant_names_the_closest_and_the_first_misfit(tmp_path: Path) -> None:
    model = create_model("yolov6n", num_classes=2).eval()
    path = write_official(model, tmp_path / "n.pt")
    checkpoint = torch.load(path, weights_only=False)  # our own file, written just above
    del checkpoint["model"]._modules["neck"]._modules["Rep_p4"]._modules["conv1"]._modules["rbr_1x1"]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"matches no repquant variant; closest is yolov6n \(repvgg, 6 "
                                              r"differences, first: missing neck.Rep_p4.conv1.conv1x1.weight"):
        convert_official(path)


def test_an_unsupported_block_is_named(tmp_path: Path) -> None:
    model = create_model("yolov6l", num_classes=2).eval()
    path = write_official(model, tmp_path / "l.pt", naming="0.4.0")
    checkpoint = torch.load(path, weights_only=False)  # our own file, written just above
    stem = checkpoint["model"]._modules["backbone"]._modules["stem"]
    from official_writer import _official_class

    stem.__class__ = _official_class("yolov6.layers.common.ConvBNReLU")  # conv_relu training mode
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="the stem is a ConvBNReLU"):
        convert_official(path)


def test_the_post_bn_of_a_deployed_official_qarepvgg_block_is_folded_exactly(tmp_path: Path) -> None:
    model = reparameterize(create_model("yolov6n-qa", num_classes=2).eval())
    path = write_official(model, tmp_path / "qa.pt")
    state = read_official(path).state
    x = torch.rand(1, 16, 12, 12, dtype=torch.float64)
    prefix = "backbone.ERBlock_2.0"  # conv -> BN as the official deployed block runs it
    conv = torch.nn.functional.conv2d(x, state[f"{prefix}.rbr_reparam.weight"].double(),
                                      state[f"{prefix}.rbr_reparam.bias"].double(), stride=2, padding=1)
    bn = {k: state[f"{prefix}.bn.{k}"].double() for k in ("running_mean", "running_var", "weight", "bias")}
    official = torch.nn.functional.batch_norm(conv, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"],
                                              eps=1e-3)
    block = convert_official(path).model.backbone.ERBlock_2[0].double()
    assert rel_err(official.relu(), block(x)) < 1e-6
