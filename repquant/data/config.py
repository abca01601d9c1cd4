"""The dataset YAML (``path``, ``train``, ``val``, optional ``test``, ``nc``, ``names``) as a checked
``DataConfig``; each split is a folder of images with YOLO labels beside it, or images plus a COCO json."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from repquant.errors import DataError
from repquant.recipe import yaml_load, yaml_problem

logger = logging.getLogger(__name__)

_YAML_KEYS = ("path", "train", "val", "test", "nc", "names")


# ----------------------------------------------------------------------------------------------------
# dataset YAML


@dataclass(frozen=True)
class SplitSource:
    """One split: an image folder, and a COCO json (``annotations``) or, when None, YOLO txt labels in
    the parallel ``labels`` folder (last ``images`` path component replaced by ``labels``)."""

    images: Path
    annotations: Path | None = None


@dataclass(frozen=True)
class DataConfig:
    """A parsed dataset YAML; every path absolute."""

    root: Path
    train: SplitSource
    val: SplitSource
    nc: int
    names: tuple[str, ...]
    test: SplitSource | None = None
    source: str = "<dict>"  # the YAML file, for error messages

    def split(self, name: str) -> SplitSource:
        """The ``train``, ``val`` or ``test`` split; DataError if absent."""
        if name not in ("train", "val", "test"):
            raise DataError(f"{self.source}: unknown split {name!r}; expected train, val or test")
        source = getattr(self, name)
        if source is None:
            raise DataError(f"{self.source}: no {name!r} split defined")
        return source


def _resolve_root(raw: Any, base: Path, source: str) -> Path:
    """Dataset root: absolute, or relative to the YAML's folder; if that does not exist, relative to
    the working directory (so ``path: ../shared/data/x`` written relative to the project root works
    from a YAML in ``recipes/data/``)."""
    if raw is None:
        return base.resolve()
    if not isinstance(raw, str | Path):
        raise DataError(f"{source}: 'path' must be a string, got {type(raw).__name__}")
    path = Path(raw).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [base / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataError(f"{source}: dataset root {str(raw)!r} not found (looked in {looked})")


def _parse_split(raw: Any, key: str, root: Path, source: str) -> SplitSource:
    if isinstance(raw, str):
        images, annotations = root / raw, None
    elif isinstance(raw, dict) and set(raw) <= {"images", "annotations"} and "images" in raw:
        images = root / str(raw["images"])
        annotations = root / str(raw["annotations"]) if raw.get("annotations") else None
    else:
        raise DataError(f"{source}: '{key}' must be an image folder or {{images: ..., annotations: ...}}, "
                        f"got {raw!r}")
    if not images.is_dir():
        raise DataError(f"{source}: '{key}' image folder {images} does not exist")
    if annotations is not None and not annotations.is_file():
        raise DataError(f"{source}: '{key}' annotation file {annotations} does not exist")
    return SplitSource(images.resolve(), annotations.resolve() if annotations else None)


def _parse_names(raw: Any, nc: Any, source: str) -> tuple[int, tuple[str, ...]]:
    if isinstance(raw, dict):
        if sorted(raw) != list(range(len(raw))):
            raise DataError(f"{source}: 'names' keys must be 0..{len(raw) - 1}, got {sorted(raw)}")
        names = tuple(str(raw[i]) for i in range(len(raw)))
    elif isinstance(raw, list):
        names = tuple(str(n) for n in raw)
    elif raw is None:
        names = ()
    else:
        raise DataError(f"{source}: 'names' must be a list or a mapping, got {type(raw).__name__}")
    if nc is None:
        nc = len(names)
    if isinstance(nc, bool) or not isinstance(nc, int) or nc <= 0:
        raise DataError(f"{source}: 'nc' must be a positive integer, got {nc!r}")
    if not names:
        names = tuple(str(i) for i in range(nc))
    if len(names) != nc:
        raise DataError(f"{source}: 'nc' is {nc} but 'names' has {len(names)} entries")
    return nc, names


def data_config_from_dict(raw: dict[str, Any], base_dir: str | Path, source: str = "<dict>") -> DataConfig:
    """Build a ``DataConfig`` from a YAML-like mapping; relative paths resolve against ``base_dir``."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_YAML_KEYS))
    if unknown:
        raise DataError(f"{source}: unknown key {unknown[0]!r}; expected {', '.join(_YAML_KEYS)}")
    for key in ("train", "val"):
        if raw.get(key) is None:
            raise DataError(f"{source}: missing key {key!r}")
    if raw.get("nc") is None and raw.get("names") is None:
        raise DataError(f"{source}: missing key 'nc' (or 'names')")
    root = _resolve_root(raw.get("path"), Path(base_dir), source)
    nc, names = _parse_names(raw.get("names"), raw.get("nc"), source)
    test = _parse_split(raw["test"], "test", root, source) if raw.get("test") is not None else None
    return DataConfig(root=root, train=_parse_split(raw["train"], "train", root, source),
                      val=_parse_split(raw["val"], "val", root, source), nc=nc, names=names, test=test,
                      source=source)


def load_data_config(path: str | Path) -> DataConfig:
    """Parse a dataset YAML (YOLOv6/Ultralytics style: ``path``, ``train``, ``val``, ``test``, ``nc``,
    ``names``); any problem raises ``DataError`` naming the file."""
    path = Path(path)
    try:
        raw = yaml_load(path.read_text())
    except FileNotFoundError as err:
        raise DataError(f"{path}: dataset YAML not found") from err
    except yaml.YAMLError as err:
        raise DataError(f"{path}: invalid YAML, {yaml_problem(err)}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read dataset YAML ({' '.join(str(err).split())})") from err
    return data_config_from_dict(raw, path.resolve().parent, source=str(path))


