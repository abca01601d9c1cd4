"""Quantization commands: act-stats, sensitivity, ptq, qat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from repquant.cli.core import build_config, check_img_size, cli, default, setup_torch, with_config
from repquant.cli.deploy_commands import MODEL_HELP
from repquant.tasks.config import ActStatsConfig, PTQConfig, QATConfig, SensitivityConfig
from repquant.vocab import CALIBRATORS, FLOAT_DTYPES, LAYOUTS, METRIC_CHOICES, MODES

# The ranking flags of ptq and qat name config fields differently; --metric takes the CLI spelling (snr).
_RANKING = {"metric": "ranking_metric", "mode": "ranking_mode", "sensitivity": "sensitivity_json"}


def metric_field(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """The config's metric name of a --metric choice (snr -> snr_db)."""
    return METRIC_CHOICES[value][0]


def _calibration_options(schema: type) -> Callable[[Callable], Callable]:
    """--calib-images / --calib-method / --percentile / --img-size / --seed, defaults from ``schema``."""

    def add(command: Callable) -> Callable:
        for option in reversed([
            click.option("--calib-images", type=click.IntRange(min=1), default=default(schema, "calib_images"),
                         show_default=True, help="Seeded calibration images from the train split."),
            click.option("--calib-method", type=click.Choice(CALIBRATORS), default=default(schema, "calib_method"),
                         show_default=True),
            click.option("--percentile", type=float, default=default(schema, "percentile"), show_default=True),
            click.option("--img-size", type=int, default=default(schema, "img_size"), show_default=True,
                         callback=check_img_size),
            click.option("--seed", type=int, default=default(schema, "seed"), show_default=True,
                         help="Seed of the calibration subset."),
        ]):
            command = option(command)
        return command

    return add


def _ranking_options(command: Callable) -> Callable:
    """--sensitivity / --metric / --mode: where ptq and qat take the ranking of keep-float layers from."""
    command = click.option("--mode", type=click.Choice(MODES), default="isolated", show_default=True)(command)
    command = click.option("--metric", type=click.Choice(list(METRIC_CHOICES)[:3]), default="mse",
                           show_default=True, callback=metric_field)(command)
    return click.option("--sensitivity", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="`repquant sensitivity` JSON to rank layers (default: measure the ranking now)."
                        )(command)


_DATA = click.option("--data", type=click.Path(exists=True, dir_okay=False),
                     help="Dataset YAML: calibration (and training) images from its train split, mAP on val.")


@cli.command("act-stats")
@click.option("--model", help=MODEL_HELP)
@click.option("--data", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", default=default(ActStatsConfig, "split"), show_default=True)
@click.option("--images", "num_images", type=click.IntRange(min=1), default=default(ActStatsConfig, "num_images"),
              show_default=True)
@click.option("--img-size", type=int, default=default(ActStatsConfig, "img_size"), show_default=True,
              callback=check_img_size)
@click.option("--output", "-o", "output_dir", default=str(default(ActStatsConfig, "output_dir")), show_default=True,
              type=click.Path(file_okay=False))
@click.option("--exist-ok", is_flag=True, help="Replace the results of an earlier run in the output folder.")
@with_config
@click.pass_context
def act_stats_cmd(ctx: click.Context, **options: Any) -> None:
    """Per-layer weight and activation ranges (max, 99.99th percentile, kurtosis) and the INT8 weight SNR of
    the deployed model."""
    setup_torch(ctx)
    from repquant.tasks import act_stats as task

    result = task.run(build_config(ctx, ActStatsConfig, options))
    click.echo(f"wrote {result.json_path} and {result.md_path}")


@cli.command("sensitivity")
@click.option("--model", help=MODEL_HELP)
@_DATA
@click.option("--metric", type=click.Choice(list(METRIC_CHOICES)), default="all", show_default=True,
              callback=lambda ctx, p, v: METRIC_CHOICES[v], help="Ranking(s) to write and print; all are measured.")
@click.option("--mode", type=click.Choice(MODES), default=default(SensitivityConfig, "mode"), show_default=True,
              help="Mode the rankings use; all three are always measured.")
@_calibration_options(SensitivityConfig)
@click.option("--isolated-images", type=click.IntRange(min=0), default=default(SensitivityConfig, "isolated_images"),
              show_default=True, help="Measure the isolated mode (~25 forward passes per image) on the first N "
                                      "calibration images only; 0 = all.")
@click.option("--batch-size", type=click.IntRange(min=1), default=default(SensitivityConfig, "batch_size"),
              show_default=True)
@click.option("--map-check", "map_check_top_k", type=click.IntRange(min=0), default=0, show_default=True,
              help="mAP drop on val of each metric's top K layers quantized alone, with Spearman correlations.")
@click.option("--output", "-o", "output_dir", default=str(default(SensitivityConfig, "output_dir")),
              show_default=True, type=click.Path(file_okay=False))
@click.option("--exist-ok", is_flag=True, help="Replace the results of an earlier run in the output folder.")
@click.option("--resume", is_flag=True, help="Continue the interrupted sweep in the output folder.")
@with_config
@click.pass_context
def sensitivity_cmd(ctx: click.Context, resume: bool, **options: Any) -> None:
    """Per-layer INT8 sensitivity (MSE, SNR in dB, cosine; isolated / accumulated / local)."""
    setup_torch(ctx)
    from repquant.tasks import sensitivity as task

    report = task.run(build_config(ctx, SensitivityConfig, options, rename={"metric": "metrics"}), resume=resume)
    click.echo(report.summary())
    click.echo("wrote " + ", ".join(str(p) for p in report.paths.values()))


def _keep_float(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    if value != "auto" and not value.isdigit():
        raise click.BadParameter(f"must be a count >= 0 or 'auto', got {value!r}")
    return value if value == "auto" else int(value)


@cli.command("ptq")
@click.option("--model", help=MODEL_HELP)
@_DATA
@click.option("--keep-float", default=str(default(PTQConfig, "keep_float")), show_default=True, callback=_keep_float,
              help="Number of most sensitive layers left in float, or 'auto': the smallest number whose INT8 mAP "
                   "on the val split is within --max-ap-drop of FP32.")
@click.option("--max-ap-drop", type=float, default=default(PTQConfig, "max_ap_drop"), show_default=True,
              help="For --keep-float auto: allowed mAP@.5:.95 drop (0.005 = 0.5 AP).")
@click.option("--max-keep-float", type=click.IntRange(min=0), default=default(PTQConfig, "max_keep_float"),
              show_default=True, help="For --keep-float auto: largest number of float layers tried.")
@_ranking_options
@_calibration_options(PTQConfig)
@click.option("--layout", type=click.Choice(LAYOUTS), default=default(PTQConfig, "layout"), show_default=True,
              help="tensorrt: Q/DQ on inputs and weights; ort: also conv outputs (ONNX Runtime QLinearConv).")
@click.option("--float-dtype", type=click.Choice(FLOAT_DTYPES), default=default(PTQConfig, "float_dtype"),
              show_default=True, help="Type of the keep-float convs in the file (fp16 for TensorRT 11 strongly "
                                      "typed networks).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="QDQ ONNX file to write.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists (never an input).")
@with_config
@click.pass_context
def ptq_cmd(ctx: click.Context, **options: Any) -> None:
    """Mixed-precision INT8 PTQ: keep the K most sensitive layers float, export TensorRT-ready QDQ ONNX."""
    setup_torch(ctx)
    from repquant.tasks import ptq as task

    result = task.run(build_config(ctx, PTQConfig, options, rename=_RANKING))
    for row in result.auto_search or []:
        label = "FP32" if row["k"] < 0 else f"K={int(row['k'])}"
        click.echo(f"  {label:6s} mAP@.5:.95 {row['map50_95']:.4f}  drop {row['drop']:+.4f}")
    click.echo(f"wrote {result.onnx_path}: {result.quantized_layers} layers INT8, float ({result.float_dtype}): "
               f"{', '.join(result.keep_float_layers) or 'none'}")
    click.echo("fake-quant torch vs ONNX Runtime SNR: " + result.parity.describe())


@cli.command("qat")
@click.option("--model", help=MODEL_HELP)
@_DATA
@click.option("--keep-float", type=click.IntRange(min=0), default=default(QATConfig, "keep_float"), show_default=True,
              help="Most sensitive layers left without quantizers (partial QAT); 0 = full QAT.")
@_ranking_options
@click.option("--cw-distill", is_flag=True, help="Channel-wise distillation of the neck outputs from the FP32 model.")
@click.option("--cw-tau", type=float, default=default(QATConfig, "cw_tau"), show_default=True, help="CWD temperature.")
@click.option("--cw-weight", type=float, default=default(QATConfig, "cw_weight"), show_default=True,
              help="CWD loss weight (cosine-decayed to 1% over the run).")
@click.option("--kd-cls", is_flag=True, help="Also distill the class logits from the FP32 model.")
@click.option("--epochs", type=click.IntRange(min=1), default=default(QATConfig, "epochs"), show_default=True)
@click.option("--lr", type=float, default=default(QATConfig, "lr"), show_default=True,
              help="SGD learning rate (cosine to 1%).")
@click.option("--learn-scales", is_flag=True,
              help="Train the quantizer scales too (LSQ gradients on log(amax), Adam; shared scales stay tied).")
@click.option("--scale-lr", type=float, default=default(QATConfig, "scale_lr"), show_default=True,
              help="Adam learning rate of log(amax) with --learn-scales (~ relative change per step).")
@click.option("--repopt-scales", type=click.Path(exists=True, dir_okay=False), default=None,
              help="RepOpt scales file of a train-repopt checkpoint (default: the one its recipe names).")
@click.option("--repopt-masks/--no-repopt-masks", default=True, show_default=True,
              help="Fine-tune a RepOpt-trained model with its gradient masks (folded for the deployed weights).")
@click.option("--batch-size", type=click.IntRange(min=1), default=default(QATConfig, "batch_size"), show_default=True)
@_calibration_options(QATConfig)
@click.option("--layout", type=click.Choice(LAYOUTS), default=default(QATConfig, "layout"), show_default=True,
              help="Quantizers trained and exported: tensorrt (inputs + weights) or ort (also conv outputs).")
@click.option("--device", default=default(QATConfig, "device"), show_default=True,
              help="auto, cpu, cuda, cuda:1 (torchrun: per rank).")
@click.option("--workers", type=click.IntRange(min=0), default=default(QATConfig, "workers"), show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run whose state is <output>.state.pt.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists (never an input).")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Quantized checkpoint to write (.safetensors); `repquant export` turns it into QDQ ONNX.")
@with_config
@click.pass_context
def qat_cmd(ctx: click.Context, resume: bool, **options: Any) -> None:
    """Partial QAT from the calibrated PTQ model, with optional channel-wise self-distillation (CWD)."""
    setup_torch(ctx)
    from repquant.tasks import qat as task

    result = task.run(build_config(ctx, QATConfig, options, rename=_RANKING), resume=resume)
    for row in result.history:
        losses = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "map50_95", "map50"))
        click.echo(f"epoch {int(row['epoch'])}: fake-quant mAP@.5:.95 {row['map50_95']:.4f}  {losses}")
    click.echo(f"wrote {result.checkpoint} (best epoch {result.best_epoch}, mAP@.5:.95 {result.best_map50_95:.4f}); "
               f"float: {', '.join(result.keep_float_layers) or 'none'}")
