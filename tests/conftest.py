"""Fixtures shared across test files: the tiny generated dataset of the quantization tests, and the real
data that lives beside the project (``../shared/data``; tests that need it skip with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BCCD_YAML = ROOT / "recipes" / "data" / "bccd.yaml"


@pytest.fixture(scope="session")
def tiny_data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 train and 2 val images of 64x64, 2 classes, seed 0: big enough to calibrate, train one QAT epoch
    and evaluate, small enough for every CI run."""
    from repquant.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("tiny"), num_train=6, num_val=2, img_size=(64, 64),
                                  num_classes=2, seed=0)


@pytest.fixture(scope="session")
def bccd_yaml() -> Path:
    """The dataset YAML of the real BCCD data in ../shared/data (skips when it is not there)."""
    if not (SHARED_DATA / "bccd").is_dir():
        pytest.skip("../shared/data/bccd is not present")
    return BCCD_YAML
