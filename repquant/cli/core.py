"""The CLI's group, its one-line error handling, and how flags become a task config.

A command maps its flags to the fields of its task config (``repquant.tasks.config``), calls the task's
``run`` and prints the result; nothing else. Flags keep the config's defaults (read from the dataclass, so
``--help`` shows them without importing torch); a flag given on the command line overrides ``--config
FILE`` (a recipe YAML with only what differs), and ``--set key=value`` overrides both.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from repquant import __version__
from repquant.errors import RecipeError, RepquantError

T = TypeVar("T")
MAX_STRIDE = 32


def debug_enabled(ctx: click.Context | None = None) -> bool:
    flag = bool(ctx and ctx.find_root().params.get("debug"))
    return flag or os.environ.get("REPQUANT_DEBUG", "") not in ("", "0")


class Group(click.Group):
    """Turns library errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (RepquantError, OSError) as err:
            if debug_enabled(ctx):
                raise
            click.echo(f"error: {describe_error(err)}", err=True)
            ctx.exit(1)


def describe_error(err: Exception) -> str:
    """One line for an error: a RepquantError's own message; an OS error as ``<path>: <what went wrong>``,
    naming the path that failed (and why a path under a file cannot be created)."""
    if isinstance(err, OSError) and err.filename is not None:
        path = os.fsdecode(err.filename)
        reason = {errno.ENOTDIR: "a component of this path is a file, not a folder",
                  errno.EEXIST: "exists and is not a folder",
                  errno.EACCES: "permission denied", errno.ENOSPC: "no space left on the device"}
        return f"{path}: {reason.get(err.errno or 0, err.strerror or type(err).__name__)}"
    return " ".join(str(err).split()) or type(err).__name__


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="repquant")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
@click.option("--debug", is_flag=True, help="Show tracebacks (same as REPQUANT_DEBUG=1).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="What long commands log to stderr (what they do, per-epoch losses).")
def cli(threads: int | None, debug: bool, log_level: str) -> None:
    """YOLOv6 re-parameterized detectors from training to fast INT8 deployment."""
    # force=True: rebind to the current stderr on every invocation (tests invoke the CLI many times).
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def setup_torch(ctx: click.Context) -> None:
    """Apply group options that concern torch; called by commands right before they need it."""
    threads = ctx.find_root().params.get("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)


def check_img_size(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and (value <= 0 or value % MAX_STRIDE):
        raise click.BadParameter(f"must be a positive multiple of {MAX_STRIDE}, got {value}")
    return value


def default(schema: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``schema`` (what a flag shows and falls back to)."""
    field = next(f for f in dataclasses.fields(schema) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs from ``--set``; values are parsed as YAML scalars (``epochs=3``, ``ema=false``,
    ``lr0=1e-3``)."""
    from repquant.recipe import yaml_load

    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint="--set")
        overrides[key.strip()] = yaml_load(value)
    return overrides


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def build_config(ctx: click.Context, schema: type[T], options: dict[str, Any],
                 rename: dict[str, str] | None = None, force: Sequence[str] = ()) -> T:
    """``schema`` from ``--config`` + the flags given on the command line + ``--set`` pairs.

    ``options`` are the command's keyword arguments (``config`` and ``pairs`` included); ``rename`` maps a
    flag's parameter name to its config field when they differ; ``force`` names options taken whatever
    their source (group options such as ``--threads``). A required field that is nowhere given is a usage
    error naming its flag; so are settings that do not go together (exit 2).
    """
    from repquant.tasks.config import load_task_config

    rename = rename or {}
    recipe, pairs = options.pop("config", None), options.pop("pairs", ())
    given = {}
    for name, value in options.items():
        source = ctx.get_parameter_source(name)
        if name in force or source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None):
            given[rename.get(name, name)] = _plain(value)
    given.update(parse_overrides(pairs))
    if recipe is None:
        flags = {rename.get(p.name, p.name): p.opts[0] for p in ctx.command.params if p.name}
        for field in dataclasses.fields(schema):  # type: ignore[arg-type]
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required and field.name not in given:
                raise click.UsageError(f"Missing option '{flags.get(field.name, field.name)}'.")
    try:
        return load_task_config(recipe, schema, given)
    except RecipeError as err:
        if recipe is not None:
            raise  # a bad recipe file is a bad input: one line naming it, exit 1
        raise click.UsageError(str(err)) from None  # flags that do not go together: exit 2


CONFIG = click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="Recipe YAML with the settings of this command (flags and --set override it).")
SET = click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE",
                   help="Override a setting (repeatable), e.g. --set calib_images=256.")


def with_config(command: Callable) -> Callable:
    """``--config FILE`` and ``--set KEY=VALUE`` on a task command."""
    return CONFIG(SET(command))
