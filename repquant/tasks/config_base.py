"""Shared pieces of the task configs: the ``Auto`` value type, the one-line validation helper, the checks of
the calibration and ranking fields, and loading a config from a recipe YAML with overrides. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from repquant.errors import RecipeError
from repquant.recipe import recipe_from_dict
from repquant.vocab import CALIBRATORS, METRICS, MODES

T = TypeVar("T")
MAX_STRIDE = 32


class Auto:
    """"Choose automatically" as a type (``keep_float: int | Auto``); spelled ``auto`` in recipes and flags.
    One instance, ``AUTO``."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Auto)

    def __hash__(self) -> int:
        return hash("auto")

    def __repr__(self) -> str:
        return "AUTO"

    @classmethod
    def from_recipe(cls, value: Any) -> Auto:
        if value == "auto":
            return AUTO
        raise ValueError(f"expected a count or 'auto', got {value!r}")

    def to_recipe(self) -> str:
        return "auto"

    def __str__(self) -> str:
        return "auto"


AUTO = Auto()


class Problems(list[str]):
    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)

    def choice(self, name: str, value: object, allowed: tuple[str, ...]) -> None:
        self.check(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    def img_size(self, value: int | None) -> None:
        self.check(value is None or (value > 0 and value % MAX_STRIDE == 0),
                   f"img_size must be a positive multiple of {MAX_STRIDE}, got {value}")

    def raise_for(self, what: str) -> None:
        if self:
            raise RecipeError(f"{what}: " + "; ".join(self))


def check_calibration(p: Problems, cfg: Any, img_size_optional: bool = False) -> None:
    """The calibration fields shared by sensitivity, ptq and qat: the seeded calibration subset of the train
    split (``calib_images``, ``seed``, letterboxed at ``img_size``, never augmented) and ``calib_method``."""
    p.check(cfg.calib_images >= 1, f"calib_images must be >= 1, got {cfg.calib_images}")
    p.choice("calib_method", cfg.calib_method, CALIBRATORS)
    p.check(0.0 < cfg.percentile <= 100.0, f"percentile must be in (0, 100], got {cfg.percentile}")
    if not (img_size_optional and cfg.img_size is None):
        p.img_size(cfg.img_size)


def check_ranking(p: Problems, cfg: Any) -> None:
    """The keep-float ranking fields of ptq and qat: a sensitivity JSON, or measured now in mode/metric."""
    p.choice("ranking_metric", cfg.ranking_metric, METRICS)
    p.choice("ranking_mode", cfg.ranking_mode, MODES)
    p.check(cfg.isolated_images >= 0, f"isolated_images must be >= 0, got {cfg.isolated_images}")


def load_task_config(path: str | os.PathLike | None, schema: type[T], overrides: dict[str, Any] | None = None,
                     source: str = "command line") -> T:
    """``schema`` from a recipe YAML (optional; only what differs from the defaults) with ``overrides`` on
    top; unknown keys and mistyped values are refused naming the key."""
    data = _recipe_mapping(path) if path is not None else {}
    merged = {**data, **(overrides or {})}
    where = f"{path} + {source}" if path is not None and overrides else str(path) if path is not None else source
    return recipe_from_dict(merged, schema, source=where)


def _recipe_mapping(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    from repquant.recipe import yaml_load, yaml_problem

    path = Path(path)
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML, {yaml_problem(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read recipe ({type(err).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data
