"""Training commands (train, hyper-search, train-repopt)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from repquant.cli.core import cli, parse_overrides, setup_torch

_RECIPE = click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
_RESUME = click.option("--resume", is_flag=True, help="Continue the run in the recipe's output_dir.")
_EXIST_OK = click.option("--exist-ok", is_flag=True, help="Replace a finished run in the recipe's output_dir.")
_SET = click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE",
                    help="Override a recipe field (repeatable), e.g. --set epochs=3 --set output_dir=runs/x.")
_WEIGHTS = click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="Fine-tune from an official YOLOv6 .pt or a repquant checkpoint (tensors that fit).")


def _run_training(recipe: str, resume: bool, pairs: Sequence[str], weights: str | None, **fixed: Any) -> None:
    from repquant.tasks import train as task
    from repquant.train.config import load_train_config

    if not fixed.get("exist_ok", True):
        fixed.pop("exist_ok")  # the recipe (or --set) decides unless the flag is given
    if weights is not None:
        fixed["weights"] = Path(weights)
    config = load_train_config(recipe, **{**parse_overrides(pairs), **fixed})
    result = task.run(config, resume=resume)
    click.echo(
        f"best mAP@.5:.95 {result.best_map50_95:.4f} (epoch {result.best_epoch}); "
        f"{result.epochs_run} epochs in {result.wall_time_s:.0f} s, {result.images_per_s:.1f} img/s; "
        f"best: {result.best_checkpoint}"
    )


@cli.command("train")
@_RECIPE
@_RESUME
@_EXIST_OK
@_SET
@_WEIGHTS
@click.pass_context
def train_cmd(ctx: click.Context, recipe: str, resume: bool, exist_ok: bool, pairs: tuple[str, ...],
              weights: str | None) -> None:
    """Train a model from a recipe YAML (torchrun --nproc_per_node N -m repquant.train.ddp for DDP)."""
    setup_torch(ctx)
    _run_training(recipe, resume, pairs, weights, exist_ok=exist_ok)


@cli.command("hyper-search")
@_RECIPE
@_RESUME
@_EXIST_OK
@_SET
@click.pass_context
def hyper_search_cmd(ctx: click.Context, recipe: str, resume: bool, exist_ok: bool, pairs: tuple[str, ...]) -> None:
    """RepOpt stage 1: train LinearAddBlock scales; writes weights/scales.safetensors in the run folder."""
    setup_torch(ctx)
    _run_training(recipe, resume, pairs, None, block_mode="hyper_search", exist_ok=exist_ok)


@cli.command("train-repopt")
@_RECIPE
@click.option("--scales", required=True, type=click.Path(exists=True, dir_okay=False),
              help="scales.safetensors from `repquant hyper-search`.")
@_RESUME
@_EXIST_OK
@_SET
@_WEIGHTS
@click.pass_context
def train_repopt_cmd(ctx: click.Context, recipe: str, scales: str, resume: bool, exist_ok: bool,
                     pairs: tuple[str, ...], weights: str | None) -> None:
    """RepOpt stage 2: train the plain RealVGG model with the RepOptimizer's gradient masks (with --weights:
    fine-tune a RepOpt checkpoint instead of initialising the convs from the scales)."""
    setup_torch(ctx)
    _run_training(recipe, resume, pairs, weights, block_mode="repopt", repopt_scales=Path(scales),
                  exist_ok=exist_ok)
