"""A corpus of bad inputs, one case per kind, through the CLI as a user meets them: each must end with exit
status 1 and one line on stderr that names the offending file (or path) and says what is wrong; never a
traceback, never a silent success. Plus the fixes that must give a correct result instead of an error."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image

from repquant.checkpoint import save_checkpoint
from repquant.cli import cli
from repquant.data import make_synthetic_dataset
from repquant.models import create_model
from repquant.provenance import model_identity

Case = Callable[[Path], tuple[list[str], str]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn
    return register


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    data = make_synthetic_dataset(root / "data", num_train=4, num_val=2, img_size=(64, 64), num_classes=2, seed=0)
    model = create_model("yolov6n", num_classes=2)
    ckpt = save_checkpoint(root / "n2.safetensors", model, extra_metadata={"img_size": 64})
    onnx_path = root / "n2.onnx"
    out = CliRunner().invoke(cli, ["export", "--model", str(ckpt), "-o", str(onnx_path), "--img-size", "64"])
    assert out.exit_code == 0, out.output
    return {"data": data, "ckpt": ckpt, "onnx": onnx_path}


def _dataset(tmp: Path, assets: dict[str, Path]) -> Path:
    """A private copy of the tiny dataset to break."""
    shutil.copytree(assets["data"].parent, tmp / "ds")
    return tmp / "ds" / "data.yaml"


def _eval(assets: dict[str, Path], data: Path | str, model: Path | str | None = None) -> list[str]:
    return ["eval", "--model", str(model or assets["ckpt"]), "--data", str(data), "--img-size", "64"]


# --- images and labels ------------------------------------------------------------------------------------

def _replace_val_image(tmp: Path, assets: dict[str, Path], write: Callable[[Path], None]) -> tuple[list, str]:
    data = _dataset(tmp, assets)
    image = data.parent / "images" / "val" / "000000.jpg"
    write(image)
    return _eval(assets, data), "000000.jpg"


@case("image-corrupt-bytes")
def _(tmp: Path) -> tuple[list, str]:
    return _replace_val_image(tmp, ASSETS, lambda p: p.write_bytes(b"\xff\xd8\xff" + os.urandom(200)))


@case("image-truncated")
def _(tmp: Path) -> tuple[list, str]:
    return _replace_val_image(tmp, ASSETS, lambda p: p.write_bytes(p.read_bytes()[:300]))


@case("image-1x1")
def _(tmp: Path) -> tuple[list, str]:
    return _replace_val_image(tmp, ASSETS, lambda p: Image.new("RGB", (1, 1)).save(p, format="JPEG"))


@case("image-float-mode")
def _(tmp: Path) -> tuple[list, str]:
    return _replace_val_image(tmp, ASSETS, lambda p: Image.fromarray(np.ones((64, 64), np.float32)).save(
        p, format="TIFF"))


@case("image-empty-file")
def _(tmp: Path) -> tuple[list, str]:
    return _replace_val_image(tmp, ASSETS, lambda p: p.write_bytes(b""))


def _label(tmp: Path, text: str) -> tuple[list, str]:
    data = _dataset(tmp, ASSETS)
    (data.parent / "labels" / "val" / "000000.txt").write_text(text)
    return _eval(ASSETS, data), "000000.txt"


@case("label-class-out-of-range")
def _(tmp: Path) -> tuple[list, str]:
    return _label(tmp, "5 0.5 0.5 0.2 0.2\n")


@case("label-four-columns")
def _(tmp: Path) -> tuple[list, str]:
    return _label(tmp, "0 0.5 0.5 0.2\n")


@case("label-not-a-number")
def _(tmp: Path) -> tuple[list, str]:
    return _label(tmp, "0 0.5 abc 0.2 0.2\n")


@case("label-box-outside-image")
def _(tmp: Path) -> tuple[list, str]:
    return _label(tmp, "0 1.5 0.5 0.9 0.2\n")


@case("label-negative-size")
def _(tmp: Path) -> tuple[list, str]:
    return _label(tmp, "0 0.5 0.5 -0.2 0.2\n")


# --- dataset YAML -----------------------------------------------------------------------------------------

def _yaml(tmp: Path, text: str) -> tuple[list, str]:
    data = _dataset(tmp, ASSETS)
    data.write_text(text)
    return _eval(ASSETS, data), "data.yaml"


@case("data-yaml-missing-val")
def _(tmp: Path) -> tuple[list, str]:
    return _yaml(tmp, "path: .\ntrain: images/train\nnc: 2\nnames: [a, b]\n")


@case("data-yaml-names-count")
def _(tmp: Path) -> tuple[list, str]:
    return _yaml(tmp, "path: .\ntrain: images/train\nval: images/val\nnc: 2\nnames: [a, b, c]\n")


@case("data-yaml-missing-folder")
def _(tmp: Path) -> tuple[list, str]:
    return _yaml(tmp, "path: .\ntrain: images/train\nval: images/nowhere\nnc: 2\nnames: [a, b]\n")


@case("data-yaml-syntax")
def _(tmp: Path) -> tuple[list, str]:
    return _yaml(tmp, "path: .\ntrain: [images/train\nval: images/val\n")


@case("data-yaml-list")
def _(tmp: Path) -> tuple[list, str]:
    return _yaml(tmp, "- a\n- b\n")


# --- COCO json --------------------------------------------------------------------------------------------

def _coco(tmp: Path, edit: Callable[[dict], None]) -> tuple[list, str]:
    data = _dataset(tmp, ASSETS)
    images = sorted((data.parent / "images" / "val").glob("*.jpg"))
    doc = {"images": [{"id": i, "file_name": p.name, "height": 64, "width": 64} for i, p in enumerate(images)],
           "annotations": [{"id": 7, "image_id": 0, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 0}],
           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    edit(doc)
    (data.parent / "val.json").write_text(json.dumps(doc))
    data.write_text("path: .\ntrain: images/train\nval: {images: images/val, annotations: val.json}\nnc: 2\n"
                    "names: [a, b]\n")
    return _eval(ASSETS, data), "val.json"


@case("coco-annotation-without-bbox")
def _(tmp: Path) -> tuple[list, str]:
    return _coco(tmp, lambda d: d["annotations"][0].pop("bbox"))


@case("coco-bbox-three-numbers")
def _(tmp: Path) -> tuple[list, str]:
    return _coco(tmp, lambda d: d["annotations"][0].update(bbox=[1, 2, 3]))


@case("coco-unknown-category")
def _(tmp: Path) -> tuple[list, str]:
    return _coco(tmp, lambda d: d["annotations"][0].update(category_id=9))


@case("coco-image-without-file-name")
def _(tmp: Path) -> tuple[list, str]:
    return _coco(tmp, lambda d: d["images"][0].pop("file_name"))


@case("coco-unknown-image-id")
def _(tmp: Path) -> tuple[list, str]:
    return _coco(tmp, lambda d: d["annotations"][0].update(image_id=99))


# --- recipes ----------------------------------------------------------------------------------------------

def _recipe(tmp: Path, text: str, *extra: str) -> tuple[list, str]:
    recipe = tmp / "r.yaml"
    recipe.write_text(f"model: yolov6n\ndata: {ASSETS['data']}\nimg_size: 64\nepochs: 1\nbatch_size: 2\n"
                      f"workers: 0\noutput_dir: {tmp / 'run'}\n{text}")
    return ["train", str(recipe), *extra], "r.yaml"


@case("recipe-unknown-key")
def _(tmp: Path) -> tuple[list, str]:
    return _recipe(tmp, "epoch: 3\n")


@case("recipe-wrong-type")
def _(tmp: Path) -> tuple[list, str]:
    return _recipe(tmp, "momentum: fast\n")


@case("recipe-not-a-mapping")
def _(tmp: Path) -> tuple[list, str]:
    (tmp / "r.yaml").write_text("- 1\n- 2\n")
    return ["train", str(tmp / "r.yaml")], "r.yaml"


@case("recipe-set-unknown-field")
def _(tmp: Path) -> tuple[list, str]:
    args, _ = _recipe(tmp, "")
    return [*args, "--set", "lr=0.01"], "'lr0'"


# --- checkpoints ------------------------------------------------------------------------------------------

def _model_file(tmp: Path, name: str, content: bytes) -> tuple[list, str]:
    path = tmp / name
    path.write_bytes(content)
    return _eval(ASSETS, ASSETS["data"], path), name


@case("checkpoint-random-bytes")
def _(tmp: Path) -> tuple[list, str]:
    return _model_file(tmp, "bad.safetensors", os.urandom(500))


@case("checkpoint-truncated")
def _(tmp: Path) -> tuple[list, str]:
    return _model_file(tmp, "cut.safetensors", ASSETS["ckpt"].read_bytes()[:4000])


@case("checkpoint-text-file")
def _(tmp: Path) -> tuple[list, str]:
    return _model_file(tmp, "notes.pt", b"these are my notes\n")


@case("checkpoint-missing")
def _(tmp: Path) -> tuple[list, str]:
    return _eval(ASSETS, ASSETS["data"], tmp / "nowhere.safetensors"), "nowhere.safetensors"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@case("pickle-payload")
def _(tmp: Path) -> tuple[list, str]:
    path = tmp / "evil.pt"
    torch.save({"model": _Payload(tmp / "PWNED")}, path)
    return _eval(ASSETS, ASSETS["data"], path), "evil.pt"


@case("pickle-unknown-global")
def _(tmp: Path) -> tuple[list, str]:
    path = tmp / "odd.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Path("x")}, f)
    return _eval(ASSETS, ASSETS["data"], path), "odd.pt"


@case("class-count-mismatch-checkpoint")
def _(tmp: Path) -> tuple[list, str]:
    data = _dataset(tmp, ASSETS)
    data.write_text(data.read_text().replace("nc: 2", "nc: 3").replace("- ellipse_1", "- ellipse_1\n- c"))
    return _eval(ASSETS, data), "n2.safetensors"


@case("class-count-mismatch-onnx")
def _(tmp: Path) -> tuple[list, str]:
    data = _dataset(tmp, ASSETS)
    data.write_text(data.read_text().replace("nc: 2", "nc: 3").replace("- ellipse_1", "- ellipse_1\n- c"))
    return _eval(ASSETS, data, ASSETS["onnx"]), "n2.onnx"


# --- sensitivity JSON -------------------------------------------------------------------------------------

def _ptq_with(tmp: Path, doc: object) -> tuple[list, str]:
    path = tmp / "sens.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return ["ptq", "--model", str(ASSETS["ckpt"]), "--data", str(ASSETS["data"]), "--img-size", "64",
            "--calib-images", "2", "--keep-float", "1", "--sensitivity", str(path), "-o", str(tmp / "q.onnx")], \
        "sens.json"


@case("sensitivity-json-other-model")
def _(tmp: Path) -> tuple[list, str]:
    other = model_identity(create_model("yolov6n", num_classes=2), 64)  # same layer names, other weights
    return _ptq_with(tmp, {"model_identity": other,
                           "rankings": {"isolated": {"mse": ["backbone.stem.rbr_reparam"]}}})


@case("sensitivity-json-not-json")
def _(tmp: Path) -> tuple[list, str]:
    return _ptq_with(tmp, "{not json")


@case("sensitivity-json-missing-ranking")
def _(tmp: Path) -> tuple[list, str]:
    return _ptq_with(tmp, {"rankings": {"local": {"mse": ["a"]}}})


# --- ONNX -------------------------------------------------------------------------------------------------

def _graph(outputs: int = 1) -> onnx.ModelProto:
    names = [f"y{i}" for i in range(outputs)]
    nodes = [helper.make_node("Relu", ["x"], [n]) for n in names]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 64, 64]) for n in names])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@case("onnx-foreign-graph")
def _(tmp: Path) -> tuple[list, str]:
    onnx.save(_graph(1), tmp / "relu.onnx")
    return _eval(ASSETS, ASSETS["data"], tmp / "relu.onnx"), "relu.onnx"


@case("onnx-corrupt-bench")
def _(tmp: Path) -> tuple[list, str]:
    (tmp / "junk.onnx").write_bytes(os.urandom(1000))
    return ["bench", "--model", str(tmp / "junk.onnx"), "--batch", "1", "--iters", "1", "--warmup", "0"], "junk.onnx"


def _external(tmp: Path, location: str) -> tuple[list, str]:
    model = _graph(2)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.data_location = TensorProto.EXTERNAL
    del weight.float_data[:]
    weight.external_data.add(key="location", value=location)
    model.graph.initializer.append(weight)
    path = tmp / "model" / "ext.onnx"
    path.parent.mkdir()
    onnx.save(model, path)
    return _eval(ASSETS, ASSETS["data"], path), "ext.onnx"


@case("onnx-external-data-outside-folder")
def _(tmp: Path) -> tuple[list, str]:
    (tmp / "secret.bin").write_bytes(b"\0" * 4)
    return _external(tmp, "../secret.bin")


@case("onnx-external-data-absolute")
def _(tmp: Path) -> tuple[list, str]:
    return _external(tmp, "/etc/passwd")


@case("onnx-external-data-missing")
def _(tmp: Path) -> tuple[list, str]:
    return _external(tmp, "weights.bin")


# --- outputs ----------------------------------------------------------------------------------------------

@case("export-over-its-input")
def _(tmp: Path) -> tuple[list, str]:
    ckpt = Path(shutil.copy(ASSETS["ckpt"], tmp / "m.safetensors"))
    return ["export", "--model", str(ckpt), "-o", str(ckpt)], "m.safetensors"


@case("export-existing-output")
def _(tmp: Path) -> tuple[list, str]:
    (tmp / "out.onnx").write_bytes(b"keep me")
    return ["export", "--model", str(ASSETS["ckpt"]), "-o", str(tmp / "out.onnx")], "--overwrite"


@case("export-under-a-file")
def _(tmp: Path) -> tuple[list, str]:
    (tmp / "afile").write_text("x")
    return ["export", "--model", str(ASSETS["ckpt"]), "-o", str(tmp / "afile" / "m.onnx")], "afile"


@case("ptq-over-its-data")
def _(tmp: Path) -> tuple[list, str]:
    data = _dataset(tmp, ASSETS)
    return ["ptq", "--model", str(ASSETS["ckpt"]), "--data", str(data), "-o", str(data), "--overwrite"], "data.yaml"


@case("train-over-a-finished-run")
def _(tmp: Path) -> tuple[list, str]:
    (tmp / "run" / "weights").mkdir(parents=True)
    shutil.copy(ASSETS["ckpt"], tmp / "run" / "weights" / "best.safetensors")
    args, _ = _recipe(tmp, "")
    return args, "--exist-ok"


@case("qat-resume-without-state")
def _(tmp: Path) -> tuple[list, str]:
    return ["qat", "--model", str(ASSETS["ckpt"]), "--data", str(ASSETS["data"]), "--img-size", "64", "--resume",
            "-o", str(tmp / "q.safetensors")], "q.safetensors.state.pt"


@case("sensitivity-resume-without-progress")
def _(tmp: Path) -> tuple[list, str]:
    return ["sensitivity", "--model", str(ASSETS["ckpt"]), "--data", str(ASSETS["data"]), "--img-size", "64",
            "--resume", "-o", str(tmp / "sens")], "sensitivity.progress.json"


@case("quantize-into-a-foreign-folder")
def _(tmp: Path) -> tuple[list, str]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("x")
    return ["quantize", "--model", str(ASSETS["ckpt"]), "--data", str(ASSETS["data"]), "--img-size", "64",
            "-o", str(tmp / "mine")], "mine"


ASSETS: dict[str, Path] = {}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line_naming_it(name: str, assets: dict[str, Path], tmp_path: Path) -> None:
    ASSETS.update(assets)
    args, named = CASES[name](tmp_path)
    out = CliRunner().invoke(cli, ["--log-level", "error", *args])
    assert out.exit_code == 1, f"{name}: exit {out.exit_code}\n{out.output}"
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {out.stderr!r}"
    assert named in lines[0], f"{name}: {lines[0]!r} does not name {named!r}"
    assert "Traceback" not in out.output
    assert not (tmp_path / "PWNED").exists()


def test_the_corpus_is_large() -> None:
    assert len(CASES) >= 40


def test_a_16_bit_png_decodes_to_its_high_byte(tmp_path: Path) -> None:
    from repquant.data.images import load_image

    values = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image = load_image(tmp_path / "g16.png")
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert np.array_equal(image[..., 0], (values >> 8).astype(np.uint8)) and (image[..., 0] == image[..., 2]).all()
    assert 0 < image.mean() < 255  # not the all-white image PIL's own conversion gives


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "1", "RGBA", "L"])
def test_other_image_modes_decode_like_their_rgb_conversion(tmp_path: Path, mode: str) -> None:
    from repquant.data.images import load_image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    path = tmp_path / f"x.{'tif' if mode == 'CMYK' else 'png'}"
    image.save(path)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(load_image(path), expected)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    from repquant.data.images import load_image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(tmp_path / "r.jpg", exif=exif, quality=100)
    loaded = load_image(tmp_path / "r.jpg")
    assert loaded.shape == (40, 20, 3) and loaded[:10].mean() > 200 and loaded[-10:].mean() < 50


@pytest.mark.parametrize("spelling, value", [("1e-3", 1e-3), ("1E-3", 1e-3), (".5", 0.5), ("5e2", 500.0),
                                             ("+1.5e+1", 15.0)])
def test_recipes_and_set_accept_every_float_spelling(tmp_path: Path, spelling: str, value: float) -> None:
    from repquant.train.config import load_train_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: yolov6n\nlr0: {spelling}\n")
    assert load_train_config(recipe).lr0 == value
    from repquant.cli.core import parse_overrides

    assert parse_overrides([f"lr0={spelling}"]) == {"lr0": value}
    assert parse_overrides(["epochs=3"]) == {"epochs": 3} and isinstance(parse_overrides(["epochs=3"])["epochs"], int)


def test_did_you_mean_prefers_the_field_a_name_abbreviates() -> None:
    from repquant.recipe import suggest

    assert suggest("lr", ["lr0", "lrf", "momentum"]) == "lr0"
    assert suggest("imgsz", ["img_size", "batch_size"]) == "img_size"
    assert suggest("zzz", ["epochs"]) is None


@pytest.mark.parametrize("args, message", [
    (["--conf-thres", "1.5"], "conf_thres"),
    (["--iou-thres", "0"], "iou_thres"),
    (["--img-size", "100"], "multiple of 32"),
])
def test_thresholds_and_sizes_are_range_checked(args: list[str], message: str, assets: dict[str, Path]) -> None:
    out = CliRunner().invoke(cli, ["eval", "--model", str(assets["ckpt"]), "--data", str(assets["data"]), *args])
    assert out.exit_code == 2 and message in out.output, out.output
