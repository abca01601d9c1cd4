"""Commands that describe, export, evaluate and time models: list-models, info, export, eval, bench,
build-engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from repquant.cli.core import build_config, check_img_size, cli, default, setup_torch, with_config
from repquant.tasks.config import BenchConfig, ConvertConfig, EvalConfig, ExportConfig, InfoConfig
from repquant.vocab import BACKENDS, PRECISIONS

MODEL_HELP = ("Registry name (see `repquant list-models`), repquant checkpoint, quantized checkpoint, official "
              "YOLOv6 .pt")
NUM_CLASSES_HELP = "Classes for a registry name (default 80); a checkpoint must match it"


@cli.command("list-models")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_models_cmd(as_json: bool) -> None:
    """List the registered model variants."""
    from repquant.models import list_models

    names = list_models()
    click.echo(json.dumps(names) if as_json else "\n".join(names))


@cli.command()
@click.option("--model", help=MODEL_HELP)
@click.option("--img-size", type=int, default=default(InfoConfig, "img_size"), show_default=True,
              callback=check_img_size, help="Square input size.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help=NUM_CLASSES_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@with_config
@click.pass_context
def info(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Params, GFLOPs and layer count of the deployed model."""
    setup_torch(ctx)
    from repquant.tasks import info as task

    data = task.run(build_config(ctx, InfoConfig, options))
    if as_json:
        click.echo(json.dumps(data))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        click.echo(f"{key:<{width}}  {value}")


@cli.command()
@click.option("--model", help=MODEL_HELP)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Output .onnx file.")
@click.option("--img-size", type=int, default=default(ExportConfig, "img_size"), show_default=True,
              callback=check_img_size, help="Square input size.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Static batch.")
@click.option("--dynamic-batch", is_flag=True, help="Symbolic batch axis (--batch-size is then ignored).")
@click.option("--opset", type=click.IntRange(min=11), default=default(ExportConfig, "opset"), show_default=True,
              help="ONNX opset.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help=NUM_CLASSES_HELP)
@click.option("--raw", is_flag=True, help="Export raw cls_logits/reg_dist instead of decoded boxes/scores.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists (never an input).")
@with_config
@click.pass_context
def export(ctx: click.Context, **options: Any) -> None:
    """Re-parameterize and export to ONNX (images -> boxes, scores); a `repquant qat` checkpoint -> QDQ ONNX."""
    setup_torch(ctx)
    from repquant.tasks import export as task

    result = task.run(build_config(ctx, ExportConfig, options))
    kind = "QDQ, " if result.quantized else ""
    click.echo(f"wrote {result.path} ({kind}{result.size_mb:.1f} MB, {result.model_name}, "
               f"{result.img_size}x{result.img_size})")


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="repquant checkpoint to write.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists (never an input).")
@click.pass_context
def convert(ctx: click.Context, model: str, output: str, overwrite: bool) -> None:
    """An official meituan/YOLOv6 .pt as a repquant checkpoint (read safely; source sha256 and naming recorded)."""
    setup_torch(ctx)
    from repquant.tasks import convert as task

    result = task.run(ConvertConfig(model, Path(output), overwrite))
    click.echo(f"wrote {result.path}: {result.report.summary()}")


@cli.command("eval")
@click.option("--model", help=MODEL_HELP + ", ONNX file or TensorRT engine.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="Dataset YAML.")
@click.option("--split", default=default(EvalConfig, "split"), show_default=True)
@click.option("--img-size", type=int, default=None, callback=check_img_size,
              help="Default: the size recorded with the model.")
@click.option("--batch-size", type=click.IntRange(min=1), default=default(EvalConfig, "batch_size"), show_default=True)
@click.option("--conf-thres", type=float, default=default(EvalConfig, "conf_thres"), show_default=True)
@click.option("--iou-thres", type=float, default=default(EvalConfig, "iou_thres"), show_default=True)
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="auto: torch for checkpoints (fake-quant for a quantized one), ort for ONNX files.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_config
@click.pass_context
def eval_cmd(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """COCO mAP (pycocotools) of a checkpoint or an exported model, through the same postprocess."""
    setup_torch(ctx)
    from repquant.tasks import evaluate as task

    options["threads"] = ctx.find_root().params.get("threads")
    report = task.run(build_config(ctx, EvalConfig, options, force=("threads",)))
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    r = report.result
    click.echo(f"{report.config.model} @ {report.img_size}: mAP@.5:.95 {r.map50_95:.4f}  mAP@.5 {r.map50:.4f} "
               f"({r.num_images} images, {report.config.split}, {report.backend})")


@cli.command()
@click.option("--model", help=MODEL_HELP + ", .onnx (ort/tensorrt) or .engine/.plan (tensorrt).")
@click.option("--backend", type=click.Choice(BACKENDS), default=default(BenchConfig, "backend"), show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=default(BenchConfig, "precision"),
              show_default=True)
@click.option("--batch", "batch_sizes", type=click.IntRange(min=1), multiple=True,
              default=default(BenchConfig, "batch_sizes"), show_default=True, help="Batch size (repeatable).")
@click.option("--img-size", type=int, default=default(BenchConfig, "img_size"), show_default=True,
              callback=check_img_size)
@click.option("--warmup", type=click.IntRange(min=0), default=default(BenchConfig, "warmup"), show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=default(BenchConfig, "iters"), show_default=True)
@click.option("--min-seconds", type=click.FloatRange(min=0), default=default(BenchConfig, "min_seconds"),
              show_default=True, help="Keep timing each batch size until this much timed work has passed.")
@click.option("--cuda-graphs", is_flag=True, help="torch on CUDA: replay a captured CUDA graph.")
@click.option("--hint", type=click.Choice(["latency", "throughput"]), default=default(BenchConfig, "hint"),
              show_default=True, help="openvino: performance hint (throughput splits a batch over parallel requests).")
@click.option("--compare-train-form", is_flag=True, help="torch: also time the train-form model.")
@click.option("--output-json", type=click.Path(dir_okay=False), default=None)
@click.option("--output-md", type=click.Path(dir_okay=False), default=None)
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists (never an input).")
@with_config
@click.pass_context
def bench(ctx: click.Context, **options: Any) -> None:
    """Latency (median/p90/p99 ms) and throughput (img/s) of the network forward incl. decode (no NMS)."""
    setup_torch(ctx)
    from repquant.tasks import bench as task

    options["threads"] = ctx.find_root().params.get("threads")
    report = task.run(build_config(ctx, BenchConfig, options, force=("threads",)))
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
@click.option("--overwrite", is_flag=True, help="Replace the engine file if it exists (never an input).")
def build_engine_cmd(onnx_path: str, engine_path: str | None, batch_sizes: tuple[int, ...], precision: str,
                     timing_cache: str | None, workspace_mb: int, overwrite: bool) -> None:
    """Build a TensorRT engine from an ONNX (INT8 from its Q/DQ nodes); needs repquant[tensorrt] and a GPU."""
    from repquant.deploy.tensorrt import build_engine
    from repquant.outputs import check_output_file

    check_output_file(engine_path or Path(onnx_path).with_suffix(".engine"), [onnx_path, timing_cache], overwrite)

    built = build_engine(onnx_path, engine_path or str(Path(onnx_path).with_suffix(".engine")), precision=precision,
                         batch_sizes=batch_sizes, workspace_mb=workspace_mb, timing_cache=timing_cache)
    click.echo(f"wrote {built.engine_path} ({built.engine_bytes / 1e6:.1f} MB, "
               f"TensorRT {built.tensorrt_version}, {built.gpu_name}); metadata {built.metadata_path}")
