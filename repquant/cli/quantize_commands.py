"""The whole INT8 chain in one command (quantize) and the README's main job (demo), which runs it."""

from __future__ import annotations

from typing import Any

import click

from repquant.cli.core import build_config, check_img_size, cli, default, setup_torch, with_config
from repquant.cli.deploy_commands import MODEL_HELP
from repquant.cli.quant_commands import metric_field
from repquant.tasks.config import DemoConfig
from repquant.tasks.quant_config import QAT_WHEN, QUANTIZE_ENGINES, QuantizeConfig
from repquant.vocab import CALIBRATORS, LAYOUTS, METRIC_CHOICES, MODES

_Q = QuantizeConfig
_RENAME = {"metric": "ranking_metric", "mode": "ranking_mode", "batch": "batch_sizes"}


@cli.command("quantize")
@click.option("--model", help=MODEL_HELP)
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="Dataset YAML: calibration (and QAT) images from its train split, mAP on val.")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Run folder: stages (reused by a rerun), int8.onnx, summary.json, report.md, report.html.")
@click.option("--max-ap-drop", type=float, default=default(_Q, "max_ap_drop"), show_default=True,
              help="Allowed mAP@.5:.95 drop of the INT8 file against FP32, both in ONNX Runtime (0.005 = 0.5 AP).")
@click.option("--max-keep-float", type=click.IntRange(min=0), default=default(_Q, "max_keep_float"),
              show_default=True, help="Most layers PTQ may leave in float before QAT takes over.")
@click.option("--qat", type=click.Choice(QAT_WHEN), default=default(_Q, "qat"), show_default=True,
              help="Partial QAT + channel-wise distillation: when PTQ misses the budget (auto), always or never.")
@click.option("--qat-epochs", type=click.IntRange(min=1), default=default(_Q, "qat_epochs"), show_default=True)
@click.option("--qat-lr", type=float, default=default(_Q, "qat_lr"), show_default=True)
@click.option("--qat-batch-size", type=click.IntRange(min=1), default=default(_Q, "qat_batch_size"),
              show_default=True)
@click.option("--layout", type=click.Choice(LAYOUTS), default=default(_Q, "layout"), show_default=True,
              help="ort: integer QLinearConv in ONNX Runtime (what is evaluated and timed here); tensorrt: Q/DQ on "
                   "inputs and weights only (evaluated in ONNX Runtime too).")
@click.option("--img-size", type=int, default=None, callback=check_img_size,
              help="Default: the size recorded with the model, else 640.")
@click.option("--calib-images", type=click.IntRange(min=1), default=default(_Q, "calib_images"), show_default=True,
              help="Seeded calibration images from the train split.")
@click.option("--calib-method", type=click.Choice(CALIBRATORS), default=default(_Q, "calib_method"),
              show_default=True)
@click.option("--percentile", type=float, default=default(_Q, "percentile"), show_default=True)
@click.option("--seed", type=int, default=default(_Q, "seed"), show_default=True,
              help="Seed of the calibration subset.")
@click.option("--mode", type=click.Choice(MODES), default=default(_Q, "ranking_mode"), show_default=True,
              help="Sensitivity mode that ranks the layers to keep in float.")
@click.option("--metric", type=click.Choice(list(METRIC_CHOICES)[:3]), default=default(_Q, "ranking_metric"),
              show_default=True, callback=metric_field)
@click.option("--isolated-images", type=click.IntRange(min=0), default=default(_Q, "isolated_images"),
              show_default=True, help="Images of the isolated sensitivity mode (0 = all calibration images).")
@click.option("--batch", type=click.IntRange(min=1), multiple=True, default=default(_Q, "batch_sizes"),
              show_default=True, help="Batch sizes timed (repeatable): the first is the latency batch.")
@click.option("--bench-warmup", type=click.IntRange(min=0), default=default(_Q, "bench_warmup"), show_default=True)
@click.option("--bench-iters", type=click.IntRange(min=1), default=default(_Q, "bench_iters"), show_default=True)
@click.option("--backend", type=click.Choice(QUANTIZE_ENGINES), default=default(_Q, "backend"), show_default=True,
              help="CPU engine that evaluates and times every file (openvino: repquant[openvino]).")
@click.option("--exist-ok", is_flag=True, help="Write into a non-empty folder that is not a quantize run.")
@click.option("--bench-min-seconds", type=click.FloatRange(min=0), default=default(_Q, "bench_min_seconds"),
              show_default=True, help="Keep timing each batch size until this much timed work has passed.")
@with_config
@click.pass_context
def quantize_cmd(ctx: click.Context, **options: Any) -> None:
    """Sensitivity -> mixed-precision PTQ with the fewest float layers within --max-ap-drop -> partial QAT + CWD
    if PTQ misses it -> INT8 ONNX, FP32 vs INT8 mAP and speed in ONNX Runtime, and a report (HTML, Markdown,
    JSON). Finished stages are reused when the command is run again."""
    setup_torch(ctx)
    from repquant.tasks import quantize as task
    from repquant.tasks.quantize_report import console_summary

    options["threads"] = ctx.find_root().params.get("threads")
    result = task.run(build_config(ctx, QuantizeConfig, options, rename=_RENAME, force=("threads",)))
    click.echo(console_summary(result.summary, result.paths))


@cli.command()
@click.option("--output", "-o", "output_dir", default=str(default(DemoConfig, "output_dir")), show_default=True,
              type=click.Path(file_okay=False))
@click.option("--model", default=None, help="Default: the committed yolov6n_bccd checkpoint (with --train: yolov6n).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Dataset YAML (default: the embedded BCCD sample; with --train: generated synthetic data).")
@click.option("--max-ap-drop", type=float, default=default(DemoConfig, "max_ap_drop"), show_default=True)
@click.option("--train", is_flag=True, help="The training demo instead: train --model from scratch, evaluate, "
                                            "export ONNX, evaluate in ONNX Runtime.")
@click.option("--img-size", type=int, default=None, callback=check_img_size,
              help="Default: the checkpoint's size (with --train: 160).")
@click.option("--epochs", type=click.IntRange(min=1), default=default(DemoConfig, "epochs"), show_default=True,
              help="With --train.")
@click.option("--batch-size", type=click.IntRange(min=1), default=default(DemoConfig, "batch_size"),
              show_default=True, help="With --train.")
@click.option("--seed", type=int, default=default(DemoConfig, "seed"), show_default=True)
@click.pass_context
def demo(ctx: click.Context, **options: Any) -> None:
    """Main job: `repquant quantize` of the committed YOLOv6-N BCCD checkpoint on the embedded BCCD sample
    (FP32 vs INT8 mAP, the float layers chosen, the speed-up, a report); --train: the training demo."""
    setup_torch(ctx)
    from repquant.tasks import demo as task
    from repquant.tasks.quantize import QuantizeResult
    from repquant.tasks.quantize_report import console_summary

    r = task.run(build_config(ctx, DemoConfig, options))
    if isinstance(r, QuantizeResult):
        click.echo(console_summary(r.summary, r.paths))
        return
    click.echo(f"data: {r.data}\ntrained {r.epochs} epochs in {r.train_wall_time_s:.0f} s "
               f"({r.train_images_per_s:.1f} img/s)")
    click.echo(f"{'backend':<14}{'mAP@.5:.95':>12}{'mAP@.5':>10}")
    click.echo(f"{'torch':<14}{r.torch_map50_95:>12.4f}{r.torch_map50:>10.4f}")
    click.echo(f"{'onnxruntime':<14}{r.onnx_map50_95:>12.4f}{r.onnx_map50:>10.4f}")
    click.echo(f"checkpoint: {r.checkpoint}\nonnx: {r.onnx}\nsummary: {r.summary}")
