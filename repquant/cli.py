"""The ``repquant`` command line.

Each command parses its options, builds its inputs and calls ONE library function; all logic
lives in the library. Heavy modules (torch, onnx, onnxruntime) are imported inside the command
functions so that ``repquant --help`` answers instantly.

Errors: a :class:`RepquantError` (or an OS error such as a missing directory) prints
``error: <one line>`` on stderr and exits 1; set ``REPQUANT_DEBUG=1`` (or pass ``--debug``) to get
the traceback instead. Usage errors exit 2 (click's convention).

Adding a command: define ``@cli.command()`` below with typed options; never pass the click context
or the whole option set to the library.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from repquant import __version__
from repquant.errors import RepquantError

_MAX_STRIDE = 32


def _debug_enabled(ctx: click.Context | None = None) -> bool:
    flag = bool(ctx and ctx.find_root().params.get("debug"))
    return flag or os.environ.get("REPQUANT_DEBUG", "") not in ("", "0")


class _Group(click.Group):
    """Turns library errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (RepquantError, OSError) as err:
            if _debug_enabled(ctx):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            click.echo(f"error: {message}", err=True)
            ctx.exit(1)


def _img_size(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value is not None and (value <= 0 or value % _MAX_STRIDE):
        raise click.BadParameter(f"must be a positive multiple of {_MAX_STRIDE}, got {value}")
    return value


def _setup_torch(ctx: click.Context) -> None:
    """Apply group options that concern torch; called by commands right before they need it."""
    threads = ctx.find_root().params.get("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)


MODEL_HELP = "Registry name (see `repquant list-models`) or checkpoint path (.safetensors, .pt)"
NUM_CLASSES_HELP = "Classes for a registry name (default 80); a checkpoint must match it"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="repquant")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
@click.option("--debug", is_flag=True, help="Show tracebacks (same as REPQUANT_DEBUG=1).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="What long commands log to stderr (what they do, per-epoch losses).")
def cli(threads: int | None, debug: bool, log_level: str) -> None:
    """YOLOv6 re-parameterized detectors from training to fast INT8 deployment."""
    import logging

    # force=True: rebind to the current stderr on every invocation (tests invoke the CLI many times).
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


@cli.command("list-models")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_models_cmd(as_json: bool) -> None:
    """List the registered model variants."""
    from repquant.models import list_models

    names = list_models()
    click.echo(json.dumps(names) if as_json else "\n".join(names))


@cli.command()
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option(
    "--img-size", type=int, default=640, show_default=True, callback=_img_size, help="Square input size."
)
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help=NUM_CLASSES_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def info(ctx: click.Context, model_spec: str, img_size: int, num_classes: int | None, as_json: bool) -> None:
    """Params, GFLOPs and layer count of the deployed model."""
    _setup_torch(ctx)
    from repquant.checkpoint import resolve_model
    from repquant.models import model_profile

    model = resolve_model(model_spec, num_classes)
    profile = model_profile(model, img_size)
    config = model.config
    data = {
        "model": config.name,
        "num_classes": config.num_classes,
        "block_mode": config.block_mode,
        "reg_max": config.reg_max,
        "params": profile.params,
        "params_m": round(profile.params / 1e6, 3),
        "gflops": round(profile.gflops, 3),
        "img_size": profile.img_size,
        "num_layers": profile.num_layers,
    }
    if as_json:
        click.echo(json.dumps(data))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        click.echo(f"{key:<{width}}  {value}")


@cli.command()
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Output .onnx file.")
@click.option(
    "--img-size", type=int, default=640, show_default=True, callback=_img_size, help="Square input size."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Static batch.")
@click.option("--dynamic-batch", is_flag=True, help="Symbolic batch axis (--batch-size is then ignored).")
@click.option("--opset", type=click.IntRange(min=11), default=17, show_default=True, help="ONNX opset.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help=NUM_CLASSES_HELP)
@click.option("--raw", is_flag=True, help="Export raw cls_logits/reg_dist instead of decoded boxes/scores.")
@click.pass_context
def export(
    ctx: click.Context,
    model_spec: str,
    output: str,
    img_size: int,
    batch_size: int,
    dynamic_batch: bool,
    opset: int,
    num_classes: int | None,
    raw: bool,
) -> None:
    """Re-parameterize and export to ONNX (images -> boxes, scores); a `repquant qat` checkpoint -> QDQ ONNX."""
    _setup_torch(ctx)
    from repquant.checkpoint import resolve_model
    from repquant.deploy.onnx_export import export_onnx
    from repquant.quant.qat import is_quantized_checkpoint

    if is_quantized_checkpoint(model_spec):
        if raw or batch_size != 1 or opset != 17:
            raise click.UsageError("a quantized checkpoint exports decoded outputs at opset 17 with a dynamic "
                                   "or static-1 batch; drop --raw / --batch-size / --opset")
        from repquant.deploy.ptq import export_quantized_checkpoint

        path = export_quantized_checkpoint(model_spec, output, img_size, dynamic_batch=dynamic_batch)
        click.echo(f"wrote {path} (QDQ, {path.stat().st_size / 1e6:.1f} MB, {img_size}x{img_size})")
        return

    model = resolve_model(model_spec, num_classes)
    path = export_onnx(
        model,
        output,
        img_size=img_size,
        batch_size=batch_size,
        dynamic_batch=dynamic_batch,
        opset=opset,
        decoded=not raw,
    )
    size_mb = path.stat().st_size / 1e6
    click.echo(f"wrote {path} ({size_mb:.1f} MB, {model.config.name}, {img_size}x{img_size})")


def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs from ``--set``; values are parsed as YAML scalars (``epochs=3``, ``ema=false``)."""
    import yaml

    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint="--set")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _run_training(recipe: str, resume: bool, pairs: Sequence[str], **fixed: Any) -> None:
    from repquant.train.config import load_train_config
    from repquant.train.trainer import train

    config = load_train_config(recipe, **{**_parse_overrides(pairs), **fixed})
    result = train(config, resume=resume)
    click.echo(
        f"best mAP@.5:.95 {result.best_map50_95:.4f} (epoch {result.best_epoch}); "
        f"{result.epochs_run} epochs in {result.wall_time_s:.0f} s, {result.images_per_s:.1f} img/s; "
        f"best: {result.best_checkpoint}"
    )


_RECIPE = click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
_RESUME = click.option("--resume", is_flag=True, help="Continue the run in the recipe's output_dir.")
_SET = click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE",
                    help="Override a recipe field (repeatable), e.g. --set epochs=3 --set output_dir=runs/x.")


@cli.command("train")
@_RECIPE
@_RESUME
@_SET
@click.pass_context
def train_cmd(ctx: click.Context, recipe: str, resume: bool, pairs: tuple[str, ...]) -> None:
    """Train a model from a recipe YAML (torchrun --nproc_per_node N -m repquant.train.ddp for DDP)."""
    _setup_torch(ctx)
    _run_training(recipe, resume, pairs)


@cli.command("hyper-search")
@_RECIPE
@_RESUME
@_SET
@click.pass_context
def hyper_search_cmd(ctx: click.Context, recipe: str, resume: bool, pairs: tuple[str, ...]) -> None:
    """RepOpt stage 1: train LinearAddBlock scales; writes weights/scales.safetensors in the run folder."""
    _setup_torch(ctx)
    _run_training(recipe, resume, pairs, block_mode="hyper_search")


@cli.command("train-repopt")
@_RECIPE
@click.option("--scales", required=True, type=click.Path(exists=True, dir_okay=False),
              help="scales.safetensors from `repquant hyper-search`.")
@_RESUME
@_SET
@click.pass_context
def train_repopt_cmd(
    ctx: click.Context, recipe: str, scales: str, resume: bool, pairs: tuple[str, ...]
) -> None:
    """RepOpt stage 2: train the plain RealVGG model with the RepOptimizer's gradient masks."""
    _setup_torch(ctx)
    _run_training(recipe, resume, pairs, block_mode="repopt", repopt_scales=Path(scales))


@cli.command("eval")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Checkpoint (.safetensors/.pt) or exported .onnx.")
@click.option("--data", "data_yaml", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Dataset YAML.")
@click.option("--split", default="val", show_default=True)
@click.option("--img-size", type=int, default=None, callback=_img_size,
              help="Default: the size recorded with the model.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--conf-thres", type=float, default=0.03, show_default=True)
@click.option("--iou-thres", type=float, default=0.65, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def eval_cmd(ctx: click.Context, model_path: str, data_yaml: str, split: str, img_size: int | None,
             batch_size: int, conf_thres: float, iou_thres: float, as_json: bool) -> None:
    """COCO mAP (pycocotools) of a checkpoint or an ONNX model, through the same postprocess."""
    _setup_torch(ctx)
    from repquant.deploy.evaluate import evaluate_model

    result, size = evaluate_model(model_path, data_yaml, split=split, img_size=img_size,
                                  batch_size=batch_size, conf_thres=conf_thres, iou_thres=iou_thres,
                                  threads=ctx.find_root().params.get("threads"))
    data = {"model": model_path, "split": split, "img_size": size, "map50_95": round(result.map50_95, 5),
            "map50": round(result.map50, 5), "num_images": result.num_images,
            "per_class_ap50_95": {k: round(v, 5) for k, v in result.per_class_ap50_95.items()}}
    if as_json:
        click.echo(json.dumps(data))
    else:
        click.echo(f"{model_path} @ {size}: mAP@.5:.95 {result.map50_95:.4f}  mAP@.5 {result.map50:.4f} "
                   f"({result.num_images} images, {split})")


@cli.command("act-stats")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--data", "data_yaml", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--split", default="val", show_default=True)
@click.option("--images", "num_images", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--img-size", type=int, default=640, show_default=True, callback=_img_size)
@click.option("--output", "-o", "output_dir", default="runs/act_stats", show_default=True,
              type=click.Path(file_okay=False))
@click.pass_context
def act_stats_cmd(ctx: click.Context, model_spec: str, data_yaml: str, split: str, num_images: int,
                  img_size: int, output_dir: str) -> None:
    """Per-layer weight and activation ranges (max, 99.99th percentile, kurtosis) and the INT8 weight SNR of
    the deployed model."""
    _setup_torch(ctx)
    from repquant.quant.act_stats import act_stats_command

    json_path, md_path = act_stats_command(model_spec, data_yaml, split, num_images, img_size, output_dir)
    click.echo(f"wrote {json_path} and {md_path}")


_METRIC_CHOICES = {"mse": ("mse",), "snr": ("snr_db",), "cosine": ("cosine",), "all": ("mse", "snr_db", "cosine")}


@cli.command("sensitivity")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--data", "data_yaml", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Dataset YAML: calibration images from its train split, --map-check on val.")
@click.option("--metric", type=click.Choice(list(_METRIC_CHOICES)), default="all", show_default=True,
              help="Ranking(s) to write and print; all three are always measured.")
@click.option("--mode", type=click.Choice(["isolated", "accumulated", "local"]), default="isolated",
              show_default=True, help="Mode the rankings use; all three are always measured.")
@click.option("--calib-images", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--calib-method", type=click.Choice(["max", "percentile", "entropy", "mse"]), default="max",
              show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True)
@click.option("--isolated-images", type=click.IntRange(min=0), default=32, show_default=True,
              help="Measure the isolated mode (~25 forward passes per image) on the first N calibration "
                   "images only; 0 = all.")
@click.option("--img-size", type=int, default=640, show_default=True, callback=_img_size)
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration subset.")
@click.option("--map-check", "map_check_top_k", type=click.IntRange(min=0), default=0, show_default=True,
              help="mAP drop on val of each metric's top K layers quantized alone, with Spearman correlations.")
@click.option("--output", "-o", "output_dir", default="runs/sensitivity", show_default=True,
              type=click.Path(file_okay=False))
@click.pass_context
def sensitivity_cmd(ctx: click.Context, model_spec: str, data_yaml: str, metric: str, mode: str, calib_images: int,
                    calib_method: str, percentile: float, isolated_images: int | None, img_size: int,
                    batch_size: int, seed: int, map_check_top_k: int, output_dir: str) -> None:
    """Per-layer INT8 sensitivity (MSE, SNR in dB, cosine; isolated / accumulated / local)."""
    _setup_torch(ctx)
    from repquant.quant.config import QuantConfig
    from repquant.quant.report import sensitivity_command

    config = QuantConfig(calib_method=calib_method, percentile=percentile, num_calib_images=calib_images)
    paths = sensitivity_command(model_spec, data_yaml, output_dir, metrics=_METRIC_CHOICES[metric], mode=mode,
                                calib_images=calib_images, img_size=img_size, map_check_top_k=map_check_top_k,
                                config=config, seed=seed, batch_size=batch_size,
                                isolated_images=isolated_images or None)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def _keep_float_ranking_options(command: Callable) -> Callable:
    """--sensitivity / --metric / --mode: where ptq and qat take the ranking of keep-float layers from."""
    command = click.option("--mode", type=click.Choice(["isolated", "accumulated", "local"]), default="isolated",
                           show_default=True)(command)
    command = click.option("--metric", type=click.Choice(list(_METRIC_CHOICES)[:3]), default="mse",
                           show_default=True)(command)
    return click.option("--sensitivity", "sensitivity_json", type=click.Path(exists=True, dir_okay=False),
                        default=None, help="`repquant sensitivity` JSON to rank layers (default: measure the "
                                           "ranking now).")(command)


@cli.command("ptq")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--data", "data_yaml", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Dataset YAML: calibration images from its train split.")
@click.option("--keep-float", default="6", show_default=True,
              help="Number of most sensitive layers left in float, or 'auto': the smallest number whose "
                   "INT8 mAP on the val split is within --max-ap-drop of FP32.")
@click.option("--max-ap-drop", type=float, default=0.005, show_default=True,
              help="For --keep-float auto: allowed mAP@.5:.95 drop (0.005 = 0.5 AP).")
@click.option("--max-keep-float", type=click.IntRange(min=0), default=12, show_default=True,
              help="For --keep-float auto: largest number of float layers tried.")
@_keep_float_ranking_options
@click.option("--calib-method", type=click.Choice(["max", "percentile", "entropy", "mse"]), default="max",
              show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True)
@click.option("--calib-images", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--img-size", type=int, default=640, show_default=True, callback=_img_size)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration subset.")
@click.option("--layout", type=click.Choice(["tensorrt", "ort"]), default="tensorrt", show_default=True,
              help="tensorrt: Q/DQ on inputs and weights; ort: also conv outputs (ONNX Runtime QLinearConv).")
@click.option("--float-dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Type of the keep-float convs in the file (fp16 for TensorRT 11 strongly typed networks).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="QDQ ONNX file to write.")
@click.pass_context
def ptq_cmd(ctx: click.Context, model_spec: str, data_yaml: str, keep_float: str, max_ap_drop: float,
            max_keep_float: int, sensitivity_json: str | None, metric: str, mode: str, calib_method: str,
            percentile: float, calib_images: int, img_size: int, seed: int, layout: str, float_dtype: str,
            output: str) -> None:
    """Mixed-precision INT8 PTQ: keep the K most sensitive layers float, export TensorRT-ready QDQ ONNX."""
    _setup_torch(ctx)
    from repquant.deploy.ptq import ptq_command

    if keep_float != "auto" and not keep_float.isdigit():
        raise click.BadParameter(f"must be a count >= 0 or 'auto', got {keep_float!r}", param_hint="--keep-float")
    count: int | str = keep_float if keep_float == "auto" else int(keep_float)
    result = ptq_command(model_spec, data_yaml, output, keep_float=count,
                         sensitivity_json=sensitivity_json, metric=_METRIC_CHOICES[metric][0], mode=mode,
                         calib_method=calib_method, percentile=percentile, calib_images=calib_images,
                         img_size=img_size, seed=seed, layout=layout, max_ap_drop=max_ap_drop,
                         max_keep_float=max_keep_float, float_dtype=float_dtype)
    for row in result.auto_search or []:
        label = "FP32" if row["k"] < 0 else f"K={int(row['k'])}"
        click.echo(f"  {label:6s} mAP@.5:.95 {row['map50_95']:.4f}  drop {row['drop']:+.4f}")
    click.echo(f"wrote {result.onnx_path}: {result.quantized_layers} layers INT8, float ({result.float_dtype}): "
               f"{', '.join(result.keep_float_layers) or 'none'}")
    click.echo("fake-quant torch vs ONNX Runtime SNR: " + ", ".join(
        f"{name} {db:.1f} dB (ORT-vs-ORT floor {result.parity.floor_db[name]:.1f} dB)"
        for name, db in result.parity.snr_db.items()))


@cli.command("qat")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--data", "data_yaml", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Dataset YAML: training and calibration images from its train split, mAP on val.")
@click.option("--keep-float", type=click.IntRange(min=0), default=6, show_default=True,
              help="Most sensitive layers left without quantizers (partial QAT); 0 = full QAT.")
@_keep_float_ranking_options
@click.option("--cw-distill", is_flag=True, help="Channel-wise distillation of the neck outputs from the FP32 model.")
@click.option("--cw-tau", type=float, default=1.0, show_default=True, help="CWD temperature.")
@click.option("--cw-weight", type=float, default=10.0, show_default=True,
              help="CWD loss weight (cosine-decayed to 1% over the run).")
@click.option("--kd-cls", is_flag=True, help="Also distill the class logits from the FP32 model.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True, help="SGD learning rate (cosine to 1%).")
@click.option("--learn-scales", is_flag=True,
              help="Train the quantizer scales too (LSQ gradients on log(amax), Adam; shared scales stay tied).")
@click.option("--scale-lr", type=float, default=1e-3, show_default=True,
              help="Adam learning rate of log(amax) with --learn-scales (~ relative change per step).")
@click.option("--repopt-scales", type=click.Path(exists=True, dir_okay=False), default=None,
              help="RepOpt scales file of a train-repopt checkpoint (default: the one its recipe names).")
@click.option("--repopt-masks/--no-repopt-masks", default=True, show_default=True,
              help="Fine-tune a RepOpt-trained model with its gradient masks (folded for the deployed weights).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--img-size", type=int, default=640, show_default=True, callback=_img_size)
@click.option("--calib-method", type=click.Choice(["max", "percentile", "entropy", "mse"]), default="max",
              show_default=True)
@click.option("--calib-images", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--layout", type=click.Choice(["tensorrt", "ort"]), default="tensorrt", show_default=True,
              help="Quantizers trained and exported: tensorrt (inputs + weights) or ort (also conv outputs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 (torchrun: per rank).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run whose state is <output>.state.pt.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Quantized checkpoint to write (.safetensors); `repquant export` turns it into QDQ ONNX.")
@click.pass_context
def qat_cmd(ctx: click.Context, model_spec: str, data_yaml: str, keep_float: int, sensitivity_json: str | None,
            metric: str, mode: str, cw_distill: bool, cw_tau: float, cw_weight: float, kd_cls: bool, epochs: int,
            lr: float, learn_scales: bool, scale_lr: float, repopt_scales: str | None, repopt_masks: bool,
            batch_size: int, img_size: int, calib_method: str, calib_images: int, layout: str, seed: int,
            device: str, workers: int, resume: bool, output: str) -> None:
    """Partial QAT from the calibrated PTQ model, with optional channel-wise self-distillation (CWD)."""
    _setup_torch(ctx)
    from repquant.quant.qat import QATConfig, qat_train

    if not output.endswith(".safetensors"):
        raise click.BadParameter(f"must end in .safetensors, got {output!r}", param_hint="--output")
    config = QATConfig(model=model_spec, data=data_yaml, output=output, keep_float=keep_float,
                       sensitivity_json=sensitivity_json, ranking_mode=mode,
                       ranking_metric=_METRIC_CHOICES[metric][0], cw_distill=cw_distill, cw_tau=cw_tau,
                       cw_weight=cw_weight, kd_cls=kd_cls, epochs=epochs, lr=lr, learn_scales=learn_scales,
                       scale_lr=scale_lr, repopt_scales=repopt_scales, repopt_masks=repopt_masks,
                       batch_size=batch_size,
                       img_size=img_size, calib_images=calib_images, calib_method=calib_method, layout=layout,
                       seed=seed, device=device, workers=workers)
    result = qat_train(config, resume=resume)
    for row in result.history:
        losses = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "map50_95", "map50"))
        click.echo(f"epoch {int(row['epoch'])}: fake-quant mAP@.5:.95 {row['map50_95']:.4f}  {losses}")
    click.echo(f"wrote {result.checkpoint} (best epoch {result.best_epoch}, mAP@.5:.95 {result.best_map50_95:.4f}); "
               f"float: {', '.join(result.keep_float_layers) or 'none'}")


@cli.command()
@click.option("--data", "data_yaml", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Dataset YAML (default: a generated seeded synthetic dataset).")
@click.option("--output", "-o", "output_dir", default="runs/demo", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--model", "model_name", default="yolov6n", show_default=True)
@click.option("--img-size", type=int, default=160, show_default=True, callback=_img_size)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def demo(ctx: click.Context, data_yaml: str | None, output_dir: str, model_name: str, img_size: int,
         epochs: int, batch_size: int, seed: int) -> None:
    """Main job: train, evaluate, export ONNX, evaluate through ONNX Runtime; prints a summary."""
    _setup_torch(ctx)
    from repquant.pipeline import run_demo

    r = run_demo(output_dir, data_yaml, model=model_name, img_size=img_size, epochs=epochs,
                 batch_size=batch_size, seed=seed)
    click.echo(f"data: {r.data}\ntrained {r.epochs} epochs in {r.train_wall_time_s:.0f} s "
               f"({r.train_images_per_s:.1f} img/s)")
    click.echo(f"{'backend':<14}{'mAP@.5:.95':>12}{'mAP@.5':>10}")
    click.echo(f"{'torch':<14}{r.torch_map50_95:>12.4f}{r.torch_map50:>10.4f}")
    click.echo(f"{'onnxruntime':<14}{r.onnx_map50_95:>12.4f}{r.onnx_map50:>10.4f}")
    summary = Path(output_dir) / "demo.json"
    click.echo(f"checkpoint: {r.checkpoint}\nonnx: {r.onnx}\nsummary: {summary}")


@cli.command()
@click.option("--model", "model_spec", required=True,
              help="Registry name, checkpoint, .onnx (ort/tensorrt) or .engine/.plan (tensorrt).")
@click.option("--backend", type=click.Choice(["ort", "torch", "tensorrt"]), default="ort", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--batch", "batch_sizes", type=click.IntRange(min=1), multiple=True, default=(1, 32),
              show_default=True, help="Batch size (repeatable).")
@click.option("--img-size", type=int, default=640, show_default=True, callback=_img_size)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--cuda-graphs", is_flag=True, help="torch on CUDA: replay a captured CUDA graph.")
@click.option("--compare-train-form", is_flag=True, help="torch: also time the train-form model.")
@click.option("--output-json", type=click.Path(dir_okay=False), default=None)
@click.option("--output-md", type=click.Path(dir_okay=False), default=None)
@click.pass_context
def bench(ctx: click.Context, model_spec: str, backend: str, precision: str, batch_sizes: tuple[int, ...],
          img_size: int, warmup: int, iters: int, cuda_graphs: bool, compare_train_form: bool,
          output_json: str | None, output_md: str | None) -> None:
    """Latency (median/p90/p99 ms) and throughput (img/s) of the network forward incl. decode (no NMS)."""
    _setup_torch(ctx)
    from repquant.deploy.benchmark import bench_command

    report = bench_command(model_spec, backend=backend, precision=precision, batch_sizes=batch_sizes,
                           img_size=img_size, warmup=warmup, iters=iters,
                           threads=ctx.find_root().params.get("threads"), output_json=output_json,
                           output_md=output_md, cuda_graphs=cuda_graphs,
                           compare_train_form=compare_train_form)
    click.echo(report.to_markdown())


@cli.command("build-engine")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", "engine_path", default=None, type=click.Path(dir_okay=False),
              help="Engine file (default: the ONNX path with .engine).")
@click.option("--batch", "batch_sizes", type=click.IntRange(min=1), multiple=True, default=(1,),
              show_default=True, help="Static profile per batch size (repeatable).")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), default="int8", show_default=True)
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None)
@click.option("--workspace-mb", type=click.IntRange(min=64), default=4096, show_default=True)
def build_engine_cmd(onnx_path: str, engine_path: str | None, batch_sizes: tuple[int, ...], precision: str,
                     timing_cache: str | None, workspace_mb: int) -> None:
    """Build a TensorRT engine from an ONNX (INT8 from its Q/DQ nodes); needs repquant[tensorrt] and a GPU."""
    from repquant.deploy.tensorrt import build_engine

    info = build_engine(onnx_path, engine_path or str(Path(onnx_path).with_suffix(".engine")),
                        precision=precision, batch_sizes=batch_sizes, workspace_mb=workspace_mb,
                        timing_cache=timing_cache)
    click.echo(f"wrote {info.engine_path} ({info.engine_bytes / 1e6:.1f} MB, "
               f"TensorRT {info.tensorrt_version}, {info.gpu_name}); metadata {info.metadata_path}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``repquant = repquant.cli:main``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="repquant")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
