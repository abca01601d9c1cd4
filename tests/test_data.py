"""Dataset YAML, label validation, image decoding, DetectionDataset, collate, synthetic data, real data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from repquant.data import (
    AugmentConfig,
    DetectionDataset,
    data_config_from_dict,
    load_data_config,
    load_image,
    make_synthetic_dataset,
    probe_image,
)
from repquant.data.synthetic import class_color
from repquant.errors import DataError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


def _write_image(path: Path, hw=(32, 48), color=(200, 30, 30), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (hw[1], hw[0]), color).convert(mode).save(path)


def _make_yolo(root: Path, labels: dict[str, str], split="train", hw=(32, 48), nc=3) -> Path:
    """Images ``root/images/<split>/<stem>.png`` (lossless) and labels ``root/labels/<split>/<stem>.txt``
    (``None`` text: no label file); returns the dataset YAML."""
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        _write_image(root / "images" / split / f"{stem}.png", hw)
        if text is not None:
            (root / "labels" / split / f"{stem}.txt").write_text(text)
    yaml_path = root / "data.yaml"
    yaml_path.write_text(
        f"path: .\ntrain: images/{split}\nval: images/{split}\nnc: {nc}\nnames: [a, b, c{', d' * (nc - 3)}]\n"
    )
    return yaml_path


def _dataset(yaml_path: Path, img_size=64, **kwargs) -> DetectionDataset:
    return DetectionDataset(load_data_config(yaml_path), "train", img_size, **kwargs)


# ---------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "line, problem",
    [
        ("0 0.5 0.5 0.2", "expected 5 columns (class cx cy w h), got 4"),
        ("0 0.5 0.5 0.2 0.2 0.1", "expected 5 columns (class cx cy w h), got 6"),
        ("0 0.5 abc 0.2 0.2", "non-numeric value 'abc'"),
        ("0 0.5 0.5 nan 0.2", "non-finite value"),
        ("0 0.95 0.5 0.2 0.2", "outside the image [0, 1]"),
        ("0 0.5 -0.01 0.2 0.2", "outside the image [0, 1]"),
        ("3 0.5 0.5 0.2 0.2", "class id 3 out of range [0, 3)"),
        ("-1 0.5 0.5 0.2 0.2", "class id -1 out of range [0, 3)"),
        ("1.5 0.5 0.5 0.2 0.2", "class id 1.5 out of range [0, 3)"),
        ("0 0.5 0.5 0.0 0.2", "non-positive box width/height"),
        ("0 0.5 0.5 0.2 -0.1", "non-positive box width/height"),
    ],
)
def test_bad_label_line_names_file_and_line(tmp_path, line, problem):
    yaml_path = _make_yolo(tmp_path, {"good": "1 0.5 0.5 0.2 0.2\n", "bad": f"1 0.5 0.5 0.2 0.2\n\n{line}\n"})
    with pytest.raises(DataError) as info:
        _dataset(yaml_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'labels' / 'train' / 'bad.txt'} line 3: ")
    assert problem in message and "\n" not in message


def test_box_within_tolerance_is_clipped(tmp_path):
    # x2 = 0.5 + 0.2 + 0.3005 -> 1.0005: 5e-4 past the edge, clipped to the image border
    yaml_path = _make_yolo(tmp_path, {"a": "2 0.8505 0.5 0.3 0.5\n"})
    gt = _dataset(yaml_path).ground_truth()[0]
    np.testing.assert_allclose(gt.boxes, [[0.7005 * 48, 0.25 * 32, 48, 0.75 * 32]], rtol=1e-6)
    assert gt.classes.tolist() == [2] and (gt.width, gt.height) == (48, 32)


def test_label_file_without_image(tmp_path):
    yaml_path = _make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"ghost\.txt: label file without a matching image"):
        _dataset(yaml_path)


def test_empty_split(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/train\nnc: 1\n")
    with pytest.raises(DataError, match=r"images/train: no images found"):
        _dataset(tmp_path / "data.yaml")


def test_background_images_are_counted_and_logged(tmp_path, caplog):
    yaml_path = _make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1\n", "b": "", "c": None})
    with caplog.at_level(logging.INFO, logger="repquant.data.dataset"):
        ds = _dataset(yaml_path)
    assert (ds.stats.images, ds.stats.boxes, ds.stats.background) == (3, 2, 2)
    assert (ds.stats.empty_label_files, ds.stats.missing_label_files) == (1, 1)
    assert "2 background images (1 without label file, 1 with an empty one)" in caplog.text
    assert [len(gt.boxes) for gt in ds.ground_truth()] == [2, 0, 0]
    _, labels, _ = ds[2]
    assert labels.shape == (0, 5)


# ---------------------------------------------------------------------------------------------- images


def test_corrupt_and_truncated_images(tmp_path):
    yaml_path = _make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "images" / "train" / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"trunc\.jpg: cannot decode image"):
        _dataset(yaml_path)
    truncated.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=r"trunc\.jpg: cannot decode image"):
        load_image(truncated)
    with pytest.raises(DataError, match=r"missing\.jpg: image file not found"):
        load_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "CMYK"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    _write_image(path, (10, 12), (90, 90, 90), mode=mode)
    img = load_image(path)
    assert img.shape == (10, 12, 3) and img.dtype == np.uint8


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10) * 4, mode="L").save(path)
    img = load_image(path)
    assert img.shape == (6, 10, 3)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


@needs_shared
def test_coco128_grayscale_image():
    img = load_image(SHARED / "coco128" / "images" / "train2017" / "000000000086.jpg")
    assert img.shape == (640, 512, 3) and (img[..., 0] == img[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white in stored orientation
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    img = load_image(path)
    assert img.shape == (40, 20, 3) and probe_image(path) == (40, 20)
    assert img[:15].mean() > 240 and img[25:].mean() < 15  # the stored left half is now on top


# ---------------------------------------------------------------------------------------------- YAML


def test_yaml_paths_resolve_against_yaml_folder(tmp_path, monkeypatch):
    _make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "cfg").mkdir()
    yaml_path = tmp_path / "cfg" / "d.yaml"
    yaml_path.write_text("path: ../ds\ntrain: images/train\nval: images/train\nnames: {0: x, 1: y}\n")
    monkeypatch.chdir("/")
    cfg = load_data_config(yaml_path)
    assert cfg.root == (tmp_path / "ds").resolve() and cfg.nc == 2 and cfg.names == ("x", "y")
    assert cfg.train.images == (tmp_path / "ds" / "images" / "train").resolve() and cfg.test is None


def test_yaml_root_relative_to_project_root(tmp_path, monkeypatch):
    # recipes/data/bccd.yaml with "path: ../shared/data/bccd", run from the project root
    _make_yolo(tmp_path / "shared" / "data" / "bccd", {"a": "0 0.5 0.5 0.2 0.2\n"})
    recipes = tmp_path / "main" / "recipes" / "data"
    recipes.mkdir(parents=True)
    (recipes / "bccd.yaml").write_text(
        "path: ../shared/data/bccd\ntrain: images/train\nval: images/train\n"
        "nc: 3\nnames: [RBC, WBC, Platelets]\n"
    )
    monkeypatch.chdir(tmp_path / "main")
    cfg = load_data_config("recipes/data/bccd.yaml")
    assert cfg.root == (tmp_path / "shared" / "data" / "bccd").resolve()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"bccd\.yaml: dataset root '../shared/data/bccd' not found"):
        load_data_config(recipes / "bccd.yaml")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("train: images/train\nval: images/train\n", "missing key 'nc' (or 'names')"),
        ("val: images/train\nnc: 1\n", "missing key 'train'"),
        ("train: images/train\nval: images/train\nnc: 1\nnmaes: [a]\n", "unknown key 'nmaes'"),
        (
            "train: images/train\nval: images/train\nnc: 2\nnames: [a]\n",
            "'nc' is 2 but 'names' has 1 entries",
        ),
        ("train: images/train\nval: images/nope\nnc: 1\n", "'val' image folder"),
        (
            "train: images/train\nval: images/train\nnc: 1\n"
            "test: {images: images/train, annotations: x.json}\n",
            "'test' annotation file",
        ),
        ("train: [images/train\n", "invalid YAML, line 2"),
        ("- a\n- b\n", "expected a mapping at the top level"),
    ],
)
def test_bad_yaml(tmp_path, text, problem):
    _make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(DataError) as info:
        load_data_config(tmp_path / "bad.yaml")
    assert str(info.value).startswith(str(tmp_path / "bad.yaml")) and problem in str(info.value)


def test_missing_yaml(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.yaml: dataset YAML not found"):
        load_data_config(tmp_path / "nothere.yaml")


# ---------------------------------------------------------------------------------------------- COCO json


def test_coco_json_split(tmp_path):
    for name in ("b.png", "a.png"):
        _write_image(tmp_path / "imgs" / name, (40, 50))
    coco = {
        "images": [
            {"id": 7, "file_name": "b.png", "width": 50, "height": 40},
            {"id": 3, "file_name": "a.png", "width": 50, "height": 40},
        ],
        "categories": [{"id": 1, "name": "p"}, {"id": 5, "name": "r"}, {"id": 3, "name": "q"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 50, 40], "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 0},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    cfg = data_config_from_dict(
        {"train": {"images": "imgs", "annotations": "ann.json"}, "val": "imgs", "names": ["p", "q", "r"]},
        tmp_path,
    )
    ds = DetectionDataset(cfg, "train", 64)
    gts = ds.ground_truth()
    assert [(g.image_id, g.file_name) for g in gts] == [(3, "a.png"), (7, "b.png")]
    assert gts[0].classes.tolist() == [1] and gts[1].classes.tolist() == [2]  # ids 1, 3, 5 -> 0, 1, 2
    np.testing.assert_array_equal(gts[1].boxes, [[10, 5, 30, 15]])
    assert ds.stats.crowd_skipped == 1
    coco["annotations"][0]["bbox"] = [40, 5, 20, 10]
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"ann\.json annotation id 1: box .* outside the image"):
        DetectionDataset(cfg, "train", 64)


# ---------------------------------------------------------------------------------------------- dataset


def test_letterboxed_sample_meta_and_collate(tmp_path):
    # 32x48 image -> 64: ratio 4/3, 64x43 content (round(42.67)), pad 10 top / 11 bottom
    yaml_path = _make_yolo(
        tmp_path, {"a": "1 0.5 0.5 0.5 0.25\n", "b": "0 0.25 0.25 0.1 0.1\n2 0.5 0.5 1 1\n"}
    )
    ds = _dataset(yaml_path)
    image, labels, meta = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert meta.orig_hw == (32, 48) and meta.pad == (0, 10) and meta.ratio == (43 / 32, 64 / 48)
    assert not meta.augmented and meta.file.endswith("a.png")
    assert (image[:, :10] == 114).all() and (image[:, 53:] == 114).all()
    np.testing.assert_allclose(labels, [[1, 16, 10 + 43 * 0.375, 48, 10 + 43 * 0.625]], rtol=1e-6)
    # mapping input pixels back through the meta gives the ground truth (what scale_to_original does)
    gt = ds.ground_truth()[0]
    back = (labels[:, 1:].numpy() - [0, 10, 0, 10]) / [64 / 48, 43 / 32, 64 / 48, 43 / 32]
    np.testing.assert_allclose(back, gt.boxes, rtol=1e-5)

    images, targets, metas = DetectionDataset.collate_fn([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.max() <= 1 and abs(images[0, 0, 0, 0].item() - 114 / 255) < 1e-7
    assert targets.shape == (3, 6) and targets[:, 0].tolist() == [0, 1, 1]
    assert targets[:, 1].tolist() == [1, 0, 2] and [m.file[-5:] for m in metas] == ["a.png", "b.png"]
    _, no_targets, _ = DetectionDataset.collate_fn([(image, labels[:0], meta)])
    assert no_targets.shape == (0, 6)


def test_augmentation_is_seeded_by_seed_epoch_index(tmp_path):
    yaml_path = make_synthetic_dataset(tmp_path, num_train=6, num_val=2, img_size=(48, 64))
    ds = _dataset(yaml_path, augment=True, aug=AugmentConfig(mixup=0.5))
    twin = _dataset(yaml_path, augment=True, aug=AugmentConfig(mixup=0.5))
    for i in range(len(ds)):
        (a, la, _), (b, lb, _) = ds[i], twin[i]
        assert torch.equal(a, b) and torch.equal(la, lb)
        assert a.shape == (3, 64, 64) and ((la[:, 1:] >= 0) & (la[:, 1:] <= 64)).all()
    first = [ds[i][0] for i in range(len(ds))]
    ds.set_epoch(1)
    assert not all(torch.equal(x, ds[i][0]) for i, x in enumerate(first))
    # DataLoader workers reproduce the main-process samples of the same epoch
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=ds.collate_fn)
    batches = [imgs for imgs, _, _ in loader]
    expected = torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255
    assert torch.equal(torch.cat(batches), expected)


def test_closed_mosaic_without_jitter_equals_letterbox(tmp_path):
    yaml_path = make_synthetic_dataset(tmp_path, num_train=3, num_val=1, img_size=(48, 64))
    still = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=0)
    ds = _dataset(yaml_path, augment=True, aug=still)
    plain = _dataset(yaml_path)
    assert ds.mosaic_enabled and ds[0][2].augmented
    ds.set_mosaic(False)
    for i in range(len(ds)):
        (a, la, meta), (b, lb, _) = ds[i], plain[i]
        assert torch.equal(a, b) and torch.allclose(la, lb) and meta.augmented


def test_bad_split_and_size(tmp_path):
    cfg = load_data_config(_make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"}))
    with pytest.raises(DataError, match="no 'test' split defined"):
        DetectionDataset(cfg, "test", 64)
    with pytest.raises(DataError, match="img_size must be a positive integer"):
        DetectionDataset(cfg, "train", 0)


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_dataset_is_deterministic_and_valid(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", num_train=4, num_val=2, img_size=(40, 56), seed=3)
    second = make_synthetic_dataset(tmp_path / "b", num_train=4, num_val=2, img_size=(40, 56), seed=3)
    other = make_synthetic_dataset(tmp_path / "c", num_train=4, num_val=2, img_size=(40, 56), seed=4)
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*") if p.is_file())
    assert len(files) == 2 * (4 + 2) + 1
    for rel in files:
        assert (first.parent / rel).read_bytes() == (second.parent / rel).read_bytes(), rel
    assert (first.parent / "images/train/000000.jpg").read_bytes() != (
        other.parent / "images/train/000000.jpg"
    ).read_bytes()
    cfg = load_data_config(first)
    assert cfg.nc == 3 and cfg.names == ("rect_0", "ellipse_1", "rect_2")
    for split in ("train", "val"):
        ds = DetectionDataset(cfg, split, 64)
        for gt, file in zip(ds.ground_truth(), ds.files, strict=True):
            assert (gt.width, gt.height) == (56, 40) and 1 <= len(gt.boxes) <= 4
            img = load_image(file).astype(int)
            for (x1, y1, x2, y2), k in zip(gt.boxes, gt.classes, strict=True):
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                # the box center shows the class color, unless another shape covers that point
                if np.abs(img[int(cy), int(cx)] - class_color(int(k), 3)).max() > 40:
                    covering = [b for b in gt.boxes if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
                    assert len(covering) > 1, (file, k)


# ---------------------------------------------------------------------------------------------- real data


@needs_shared
def test_bccd_val():
    cfg = data_config_from_dict(
        {
            "path": str(SHARED / "bccd"),
            "train": "images/train",
            "val": "images/val",
            "nc": 3,
            "names": ["RBC", "WBC", "Platelets"],
        },
        ".",
    )
    ds = DetectionDataset(cfg, "val", 64)
    gts = ds.ground_truth()
    assert len(ds) == 87 and sum(len(g.boxes) for g in gts) == 1137 and ds.stats.background == 0
    assert np.bincount(np.concatenate([g.classes for g in gts])).tolist() == [967, 87, 83]
    assert all((g.width, g.height) == (640, 480) for g in gts)


@needs_shared
def test_coco128_yolo_and_json_agree():
    cfg = data_config_from_dict(
        {
            "path": str(SHARED / "coco128"),
            "train": "images/train2017",
            "val": {"images": "images/train2017", "annotations": "annotations/instances_train2017.json"},
            "nc": 80,
        },
        ".",
    )
    yolo, coco = DetectionDataset(cfg, "train", 64), DetectionDataset(cfg, "val", 64)
    assert len(yolo) == 128 and yolo.stats.missing_label_files == 2 and yolo.stats.background == 2
    assert yolo.stats.boxes == 929 and coco.stats.boxes == 929 and coco.stats.crowd_skipped == 10
    for a, b in zip(yolo.ground_truth(), coco.ground_truth(), strict=True):
        assert (a.image_id, a.file_name, a.width, a.height) == (b.image_id, b.file_name, b.width, b.height)
        assert sorted(a.classes.tolist()) == sorted(b.classes.tolist())
        for box, cls in zip(a.boxes, a.classes, strict=True):  # every YOLO box has its json twin
            dist = np.abs(b.boxes - box).max(1) + 1e9 * (b.classes != cls)
            assert dist.min() < 0.01


@needs_shared
def test_coco_mini_val_from_json():
    cfg = data_config_from_dict(
        {
            "path": str(SHARED / "coco-mini"),
            "train": "images/train2017",
            "val": {"images": "images/val2017", "annotations": "annotations/instances_val2017.json"},
            "nc": 80,
        },
        ".",
    )
    ds = DetectionDataset(cfg, "val", 64)
    assert len(ds) == 76 and ds.stats.boxes == 595 and ds.stats.crowd_skipped == 5
    assert ds.ground_truth()[0].image_id == int(ds.ground_truth()[0].file_name[:-4])
