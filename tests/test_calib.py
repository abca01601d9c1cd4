"""Calibration subset: seeded and deterministic, without replacement, letterboxed, never augmented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from repquant.data import DetectionDataset, letterbox, load_data_config, load_image, make_synthetic_dataset
from repquant.data.calib import (
    CalibManifest,
    calibration_batches,
    calibration_loader,
    load_calib_manifest,
    select_calibration_images,
)
from repquant.errors import CalibrationError, RecipeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Non-square images so the letterbox pads.
    return make_synthetic_dataset(tmp_path_factory.mktemp("calib"), num_train=10, num_val=3,
                                  img_size=(48, 64), num_classes=2, seed=3)


def test_selection_is_seeded_distinct_and_sorted() -> None:
    data = list(range(50))
    a = select_calibration_images(data, 20, seed=7)
    assert a == select_calibration_images(data, 20, seed=7)
    assert a != select_calibration_images(data, 20, seed=8)
    assert len(set(a)) == 20 and a == sorted(a) and all(0 <= i < 50 for i in a)
    # Known answer: numpy's Generator(PCG64) choice without replacement.
    expected = sorted(int(i) for i in np.random.default_rng(7).choice(50, size=20, replace=False))
    assert a == expected
    assert select_calibration_images(data, 50, seed=0) == list(range(50))  # all of them


def test_selection_errors_name_the_source(data_yaml: Path) -> None:
    ds = DetectionDataset(load_data_config(data_yaml), "val", 64)
    with pytest.raises(CalibrationError, match=r"data\.yaml \(val\): calibration asks for 5 images but the split "
                                               r"has only 3"):
        select_calibration_images(ds, 5, seed=0)
    with pytest.raises(CalibrationError, match="calib/x.yaml: no images to calibrate with"):
        select_calibration_images([], 1, seed=0, source="calib/x.yaml")


def test_loader_yields_letterboxed_unaugmented_batches(data_yaml: Path) -> None:
    manifest = CalibManifest(data=str(data_yaml), split="train", num_images=5, seed=1, img_size=64, batch_size=2)
    batches = list(calibration_loader(manifest))
    assert [b.shape for b in batches] == [(2, 3, 64, 64), (2, 3, 64, 64), (1, 3, 64, 64)]
    assert all(b.dtype == torch.float32 for b in batches)
    ds = DetectionDataset(load_data_config(data_yaml), "train", 64)
    indices = select_calibration_images(ds, 5, seed=1)
    # Exactly the inference letterbox of the chosen files, in index order (no augmentation).
    expected = []
    for i in indices:
        image, _, _ = letterbox(load_image(ds.files[i]), 64)
        expected.append(torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255.0)
    torch.testing.assert_close(torch.cat(batches), torch.stack(expected), rtol=0, atol=0)
    # Gray pad rows above the 48x64 -> 48x64 content (centered: 8 rows top).
    assert torch.all(torch.cat(batches)[:, :, :8] == 114 / 255.0)
    again, record = calibration_batches(manifest)
    torch.testing.assert_close(torch.cat(again), torch.cat(batches), rtol=0, atol=0)
    assert record["files"] == [ds.files[i].name for i in indices]
    assert record["num_images"] == 5 and record["letterbox"]["augment"] is False


def test_manifest_file_resolves_data_relative_to_itself(tmp_path: Path, data_yaml: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(f"data: {data_yaml}\nnum_images: 4\nseed: 2\nimg_size: 64\n")
    m = load_calib_manifest(path)
    assert m == CalibManifest(data=str(data_yaml), num_images=4, seed=2, img_size=64)
    (tmp_path / "bad.yaml").write_text("data: x.yaml\nnum_imgs: 4\n")
    with pytest.raises(RecipeError, match="num_imgs"):
        load_calib_manifest(tmp_path / "bad.yaml")
    with pytest.raises(CalibrationError, match="multiple of 32"):
        CalibManifest(data="x.yaml", img_size=100)


def test_shipped_manifest_loads() -> None:
    m = load_calib_manifest(ROOT / "calib" / "bccd_train128.yaml")
    assert (m.split, m.num_images, m.seed, m.img_size) == ("train", 128, 0, 640)
    assert Path(m.data).name == "bccd.yaml"
    if not (ROOT.parent / "shared" / "data" / "bccd").is_dir():
        pytest.skip("../shared/data/bccd is absent")
    ds = DetectionDataset(load_data_config(m.data), m.split, 64)
    assert len(select_calibration_images(ds, m.num_images, m.seed)) == 128
