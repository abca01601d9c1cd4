"""The benchmark report: `repquant quantize` of each committed BCCD checkpoint, collected in one page.

For each committed checkpoint (``benchmarks/checkpoints/*_bccd.safetensors``) this runs the same code as
``repquant quantize`` (``repquant.tasks.quantize``: FP32 and every keep-float count tried until the INT8 file
is within 0.5 AP of FP32 on BCCD val, ORT layout, evaluated and timed in ONNX Runtime; no QAT) into
``--work-dir/<name>`` (a rerun reuses its finished stages), adds torch train-form vs re-parameterized latency,
and writes ``benchmarks/<NAME>.md``, ``benchmarks/results/<name>.json`` and
``benchmarks/results/<name>_pareto.png`` (mAP vs batch-1 latency). Each checkpoint's own quantize report
(report.html) stays in its work folder.

    python benchmarks/report.py --fast    # CI (.ci/run): yolov6n, 32 calibration images, batches 1 and 8
    python benchmarks/report.py           # every checkpoint, 128 calibration images, batches 1 and 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from repquant.checkpoint import load_checkpoint
from repquant.deploy.report import plot_pareto
from repquant.deploy.timing import reparam_speedup
from repquant.io import atomic_write_text
from repquant.tasks import bench, quantize
from repquant.tasks.config import BenchConfig
from repquant.tasks.quant_config import QuantizeConfig
from repquant.tasks.quantize_report import headline_table

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
BCCD = ROOT.parent / "shared" / "data" / "bccd"
DATA_YAML = ROOT / "recipes" / "data" / "bccd.yaml"
SCHEMA = "repquant.report/2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="CI preset (see the module docstring)")
    parser.add_argument("--checkpoints", type=Path, nargs="*", default=None)
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--isolated-images", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs=2, default=[1, 32], metavar=("LATENCY", "THROUGHPUT"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "report", help="quantize run folders")
    parser.add_argument("--output-dir", type=Path, default=BENCH, help="<NAME>.md here, the rest in results/")
    parser.add_argument("--name", default=None, help="file stem (default: report for --fast, report_full)")
    args = parser.parse_args(argv)
    args.name = args.name or ("report" if args.fast else "report_full")
    if args.checkpoints is None:
        found = sorted((BENCH / "checkpoints").glob("*_bccd.safetensors"))
        args.checkpoints = [p for p in found if "yolov6n" in p.name] if args.fast else found
    if args.fast:
        args.calib_images, args.isolated_images, args.batch, args.warmup, args.iters = 32, 8, [1, 8], 2, 5
    return args


def checkpoint_entry(checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The quantize summary of ``checkpoint`` plus torch train-form vs deployed latency."""
    _, meta = load_checkpoint(checkpoint)
    img_size = int(meta["img_size"])
    result = quantize.run(QuantizeConfig(
        model=str(checkpoint), data=DATA_YAML, output=args.work_dir / args.name / checkpoint.stem, qat="never",
        img_size=img_size, calib_images=args.calib_images, isolated_images=args.isolated_images,
        batch_sizes=tuple(args.batch), bench_warmup=args.warmup, bench_iters=args.iters))
    # Train-form vs deployed torch latency: weights do not matter, a fresh model of the variant will do.
    reparam = bench.run(BenchConfig(meta["repquant_config"]["name"], backend="torch", compare_train_form=True,
                                    batch_sizes=tuple(args.batch), img_size=img_size, warmup=args.warmup,
                                    iters=args.iters)).results
    return {"checkpoint": str(checkpoint.relative_to(ROOT)), "img_size": img_size, "quantize": result.summary,
            "quantize_report": str(result.paths["html"]), "stages": result.stages,
            "torch_latency_ms": {f"{r.variant} bs{r.batch_size}": r.latency_ms.median for r in reparam},
            "reparam_speedup": reparam_speedup(reparam)}


def pareto_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """FP32 and every INT8 file tried of every checkpoint, at batch-1 latency."""
    rows = []
    for name, entry in report["checkpoints"].items():
        summary = entry["quantize"]
        short = name.removesuffix("_bccd")
        latency = summary["speed"]["tried_bs1_latency_ms"]
        rows.append({"name": f"{short} FP32", "latency_ms": summary["speed"]["fp32"]["bs1"]["latency_ms"],
                     "map50_95": summary["fp32"]["map50_95"]})
        rows += [{"name": f"{short} K={t['keep_float']}", "latency_ms": latency[t["onnx"]], "map50_95": t["map50_95"]}
                 for t in summary["tried"]]
    return rows


def markdown(report: dict[str, Any]) -> str:
    env = next(iter(report["checkpoints"].values()))["quantize"]["environment"]
    lines = ["# repquant benchmark report", "",
             f"Generated by `{report['command']}` on {report['generated']} ({report['wall_s']:.0f} s): "
             f"`repquant quantize` of each committed BCCD checkpoint (budget 0.5 AP, no QAT) on BCCD val. "
             f"{env['cpu_model']}, {env['cpu_count']} CPUs, onnxruntime {env['versions']['onnxruntime']}, "
             f"torch {env['versions']['torch']}. No GPU here: TensorRT numbers need one (benchmarks/README.md).",
             "", f"![mAP vs latency](results/{report['name']}_pareto.png)", ""]
    for name, entry in report["checkpoints"].items():
        summary = entry["quantize"]
        tried = ", ".join(f"K={t['keep_float']} {100 * t['map50_95']:.2f}" for t in summary["tried"])
        lat = entry["torch_latency_ms"]
        lines += [f"## {name} ({entry['img_size']} px)", "", headline_table(summary),
                  f"Keep-float counts tried (mAP@.5:.95 %): {tried}; float layers chosen: "
                  f"{', '.join(summary['int8']['keep_float_layers']) or 'none'}.", "",
                  "torch CPU latency, train-form vs re-parameterized (deployed): "
                  + "; ".join(f"{b}: {lat[f'train-form {b}']:.1f} -> {lat[f'deployed {b}']:.1f} ms "
                              f"({entry['reparam_speedup'][b]:.2f}x)" for b in entry["reparam_speedup"]), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not BCCD.is_dir():
        print(f"benchmarks/report.py: {BCCD} is missing; the report needs the real BCCD data", file=sys.stderr)
        return 1
    if not args.checkpoints:
        print("benchmarks/report.py: no committed *_bccd.safetensors checkpoint to report on", file=sys.stderr)
        return 1
    start = time.perf_counter()
    report: dict[str, Any] = {"schema": SCHEMA, "name": args.name, "fast": args.fast, "batch": args.batch,
                              "data": str(DATA_YAML.relative_to(ROOT)), "checkpoints": {},
                              "command": "python benchmarks/report.py" + (" --fast" if args.fast else "")}
    for checkpoint in args.checkpoints:
        print(f"report: {checkpoint.name}", file=sys.stderr, flush=True)
        report["checkpoints"][checkpoint.stem] = checkpoint_entry(checkpoint, args)
    report["generated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["wall_s"] = time.perf_counter() - start
    results = args.output_dir / "results"
    plot_pareto(pareto_rows(report), results / f"{args.name}_pareto.png",
                title="BCCD val mAP vs ONNX Runtime CPU batch-1 latency")
    atomic_write_text(results / f"{args.name}.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    atomic_write_text(args.output_dir / f"{args.name.upper()}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
