"""Recipes: YAML files -> frozen dataclasses, strictly checked.

Each tool (trainer, PTQ, QAT, ...) declares its options as a (frozen) dataclass with defaults; a
recipe YAML holds only what differs from them. :func:`load_recipe` rejects unknown keys with a
did-you-mean, and values of the wrong type naming the file and the dotted key::

    recipes/s.yaml: unknown key 'train.lr' (did you mean 'lr0'?)
    recipes/s.yaml: train.epochs: expected int, got str 'ten'

Supported field types: ``bool``, ``int``, ``float`` (ints accepted), ``str``, ``pathlib.Path``,
nested dataclasses, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``,
``Optional``/``X | None``, other unions (first matching member), ``Literal[...]`` and ``Any``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from repquant.errors import RecipeError

T = TypeVar("T")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float rule: PyYAML follows YAML 1.1, which needs a dot and a
    signed exponent, so ``1e-3`` (how every YOLO recipe writes a learning rate), ``1E5`` or ``.5e1`` would
    come back as strings."""


_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_Yaml12Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
                                          for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
# Integers keep their own (earlier) resolver: "3" stays an int, "3.0" and "1e-3" become floats.
for _first in "-+0123456789":
    _resolvers = _Yaml12Loader.yaml_implicit_resolvers[_first]
    _resolvers.sort(key=lambda pair: pair[0] != "tag:yaml.org,2002:int")


def yaml_load(text: str) -> Any:
    """Parse YAML as repquant reads every file and ``--set`` value: safe, with YAML 1.2 floats."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(err: Exception) -> str:
    """A YAML error in a few words with its line (``line 3: expected ',' or ']', but got ':'``)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or type(err).__name__
    return f"line {mark.line + 1}: {problem}" if mark is not None else str(problem)


def suggest(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """The field a user most likely meant by ``name``: a field that extends it (``lr`` -> ``lr0``) before a
    merely similar one (difflib)."""
    options = sorted(choices)
    extending = [c for c in options if c.startswith(name) and len(c) - len(name) <= 2]
    if extending:
        return min(extending, key=len)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return close[0] if close else None


def load_recipe(path: str | os.PathLike, schema: type[T]) -> T:
    """Read the YAML at ``path`` into an instance of the dataclass ``schema``.

    An empty file gives ``schema()`` (all defaults). Raises :class:`RecipeError` for a missing
    file, invalid YAML, unknown keys, missing required keys and wrongly typed values.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read recipe ({err})") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}{where}: {problem}") from None
    return recipe_from_dict({} if data is None else data, schema, source=str(path))


def recipe_from_dict(data: Any, schema: type[T], source: str = "<recipe>") -> T:
    """Build ``schema`` from plain data (a parsed YAML mapping) with the same checks as files."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    return _convert(data, schema, source, "")


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    """Plain YAML/JSON data for a recipe instance (tuples -> lists, paths -> strings)."""
    return _plain(dataclasses.asdict(recipe))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_recipe"):  # a value type with its own spelling (Auto -> "auto")
        return value.to_recipe()
    return value


# --- conversion -----------------------------------------------------------------------------------


def _fail(source: str, key: str, message: str) -> RecipeError:
    return RecipeError(f"{source}: {key + ': ' if key else ''}{message}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert_dataclass(data: Any, schema: type, source: str, key: str) -> Any:
    if not isinstance(data, dict):
        where = key or "top level"
        raise RecipeError(
            f"{source}: {where}: expected a mapping for {schema.__name__}, got {_describe(data)}"
        )
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    hints = typing.get_type_hints(schema)
    for name in data:
        if name not in fields:
            close = suggest(str(name), list(fields))
            hint = f" (did you mean {close!r}?)" if close else f" (valid keys: {', '.join(fields)})"
            raise RecipeError(f"{source}: unknown key {_join(key, str(name))!r}{hint}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], source, _join(key, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{source}: missing required key {_join(key, name)!r}")
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as err:  # __post_init__ validation of the dataclass itself
        raise _fail(source, key, str(err)) from None


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, source, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value in args and all(type(value) is type(a) for a in args if a == value):
            return value
        choices = ", ".join(repr(a) for a in args)
        raise _fail(source, key, f"expected one of {choices}, got {value!r}")
    if origin in (Union, types.UnionType):
        return _convert_union(value, args, tp, source, key)
    if origin is tuple:
        return _convert_tuple(value, args, source, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _fail(source, key, f"expected a list, got {_describe(value)}")
        return [_convert(v, args[0] if args else Any, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, key, f"expected a mapping, got {_describe(value)}")
        kt, vt = args or (Any, Any)
        return {
            _convert(k, kt, source, key): _convert(v, vt, source, _join(key, str(k)))
            for k, v in value.items()
        }
    return _convert_scalar(value, tp, source, key)


def _convert_union(value: Any, args: tuple, tp: Any, source: str, key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _fail(source, key, f"expected {_type_name(tp)}, got None")
    members = [a for a in args if a is not type(None)]
    errors = []
    for member in members:
        try:
            return _convert(value, member, source, key)
        except RecipeError as err:
            errors.append(err)
    if len(members) == 1:
        raise errors[0]
    raise _fail(source, key, f"expected {_type_name(tp)}, got {_describe(value)}")


def _convert_tuple(value: Any, args: tuple, source: str, key: str) -> tuple:
    if not isinstance(value, list | tuple):
        raise _fail(source, key, f"expected a list, got {_describe(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value))
    if not args:
        return tuple(value)
    if len(value) != len(args):
        raise _fail(source, key, f"expected {len(args)} items, got {len(value)}")
    return tuple(
        _convert(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
    )


def _convert_scalar(value: Any, tp: Any, source: str, key: str) -> Any:
    # bool is an int subclass: never let `true` pass as 1 or 1 as `true`.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        if isinstance(value, str | os.PathLike):  # YAML gives str; library callers and the CLI pass Paths
            return Path(value)
    elif isinstance(tp, type) and hasattr(tp, "from_recipe"):  # a value type with its own spelling (Auto)
        if isinstance(value, tp):
            return value
        try:
            return tp.from_recipe(value)
        except ValueError as err:
            raise _fail(source, key, str(err)) from None
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"unsupported recipe field type {tp!r} at {key!r}")
    raise _fail(source, key, f"expected {_type_name(tp)}, got {_describe(value)}")
