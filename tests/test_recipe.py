"""Recipes: YAML -> frozen dataclasses with strict keys and types."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from repquant.errors import RecipeError
from repquant.recipe import load_recipe, recipe_from_dict, recipe_to_dict


@dataclass(frozen=True)
class Optim:
    lr0: float = 0.01
    momentum: float = 0.937
    nesterov: bool = True


@dataclass(frozen=True)
class Recipe:
    model: str = "yolov6n"
    epochs: int = 10
    img_size: tuple[int, int] = (640, 640)
    optim: Optim = field(default_factory=Optim)
    iou_type: Literal["giou", "siou"] = "giou"
    teacher: str | None = None
    keep_float_layers: tuple[str, ...] = ()
    data: Path | None = None
    class_weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Required:
    name: str
    steps: int = 1


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_full_recipe(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "model: yolov6s\nepochs: 3\nimg_size: [320, 416]\noptim: {lr0: 1, nesterov: false}\n"
        "iou_type: siou\nteacher: runs/t.safetensors\nkeep_float_layers: [head.reg_preds.0, backbone.stem]\n"
        "data: ../shared/data/bccd/data.yaml\nclass_weights: {rbc: 0.5}\n",
    )
    recipe = load_recipe(path, Recipe)
    assert recipe == Recipe(
        model="yolov6s",
        epochs=3,
        img_size=(320, 416),
        optim=Optim(lr0=1.0, nesterov=False),
        iou_type="siou",
        teacher="runs/t.safetensors",
        keep_float_layers=("head.reg_preds.0", "backbone.stem"),
        data=Path("../shared/data/bccd/data.yaml"),
        class_weights={"rbc": 0.5},
    )
    assert isinstance(recipe.optim.lr0, float)  # YAML int accepted for a float field, converted
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.epochs = 5  # type: ignore[misc]


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_recipe(_write(tmp_path, "# only a comment\n"), Recipe) == Recipe()


def test_unknown_key_did_you_mean(tmp_path: Path) -> None:
    path = _write(tmp_path, "epoch: 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, Recipe)
    assert str(err.value) == f"{path}: unknown key 'epoch' (did you mean 'epochs'?)"


def test_unknown_nested_key_did_you_mean(tmp_path: Path) -> None:
    path = _write(tmp_path, "optim:\n  lr: 0.02\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, Recipe)
    assert str(err.value) == f"{path}: unknown key 'optim.lr' (did you mean 'lr0'?)"


def test_unknown_key_without_close_match_lists_keys(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown key 'zzz' \(valid keys: model, epochs, img_size"):
        load_recipe(_write(tmp_path, "zzz: 1\n"), Recipe)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: ten\n", "epochs: expected int, got str 'ten'"),
        ("epochs: 2.5\n", "epochs: expected int, got float 2.5"),
        ("epochs: true\n", "epochs: expected int, got bool True"),
        ("optim: {nesterov: 1}\n", "optim.nesterov: expected bool, got int 1"),
        ("optim: {momentum: fast}\n", "optim.momentum: expected float, got str 'fast'"),
        ("optim: 3\n", "optim: expected a mapping for Optim, got int 3"),
        ("img_size: [320]\n", "img_size: expected 2 items, got 1"),
        ("img_size: [320, big]\n", "img_size[1]: expected int, got str 'big'"),
        ("iou_type: ciou\n", "iou_type: expected one of 'giou', 'siou', got 'ciou'"),
        ("teacher: 3\n", "teacher: expected str, got int 3"),
        ("keep_float_layers: head\n", "keep_float_layers: expected a list, got str 'head'"),
        ("class_weights: {rbc: x}\n", "class_weights.rbc: expected float, got str 'x'"),
    ],
)
def test_wrong_type_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, Recipe)
    assert str(err.value) == f"{path}: {message}"


def test_optional_accepts_null(tmp_path: Path) -> None:
    assert load_recipe(_write(tmp_path, "teacher: null\ndata: null\n"), Recipe) == Recipe()


def test_missing_required_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "steps: 2\n")
    with pytest.raises(RecipeError, match=f"^{path}: missing required key 'name'$"):
        load_recipe(path, Required)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "absent.yaml", Recipe)
    path = _write(tmp_path, "epochs: 3\noptim: {lr0: [1, 2}\n")
    with pytest.raises(RecipeError, match=f"^{path} line 2: "):
        load_recipe(path, Recipe)
    path = _write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(RecipeError, match="top level: expected a mapping for Recipe, got list"):
        load_recipe(path, Recipe)


def test_to_dict_round_trip() -> None:
    recipe = Recipe(img_size=(320, 320), keep_float_layers=("a",), data=Path("d.yaml"))
    plain = recipe_to_dict(recipe)
    assert plain["img_size"] == [320, 320] and plain["data"] == "d.yaml"
    assert recipe_from_dict(plain, Recipe, source="<dict>") == recipe
