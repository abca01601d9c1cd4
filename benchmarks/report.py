"""The benchmark report: accuracy and ONNX Runtime CPU speed of the committed BCCD checkpoints.

For each committed checkpoint (``benchmarks/checkpoints/*_bccd.safetensors``): FP32, INT8 PTQ with
K = 0, 6 and auto keep-float layers (ORT layout: real integer ``QLinearConv``), and QAT where a QAT
checkpoint is committed next to it (``<name>_qat*.safetensors``), each evaluated on the BCCD val split
(pycocotools mAP through `repquant eval`'s postprocess) and timed at batch 1 and a throughput batch; plus
torch train-form vs re-parameterized latency. Writes ``benchmarks/<NAME>.md``,
``benchmarks/results/<name>.json`` and ``benchmarks/results/<name>_pareto.png`` (mAP vs latency).

    python benchmarks/report.py --fast    # CI (.ci/run): yolov6n, 32 images, batches 1 and 8 -> REPORT.md
    python benchmarks/report.py           # every checkpoint, 128 images, batches 1 and 32 -> REPORT_FULL.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless CI
import matplotlib.pyplot as plt  # noqa: E402
from bench_ptq import measure  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from repquant.checkpoint import load_checkpoint, load_model  # noqa: E402
from repquant.deploy.onnx_export import export_onnx  # noqa: E402
from repquant.deploy.qdq import export_quantized_checkpoint  # noqa: E402
from repquant.deploy.timing import environment_info, reparam_speedup  # noqa: E402
from repquant.io import atomic_write_text  # noqa: E402
from repquant.tasks import bench, ptq  # noqa: E402
from repquant.tasks.config import AUTO, BenchConfig, PTQConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
BCCD = ROOT.parent / "shared" / "data" / "bccd"
DATA_YAML = ROOT / "recipes" / "data" / "bccd.yaml"
SCHEMA = "repquant.report/1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="CI preset (see the module docstring)")
    parser.add_argument("--checkpoints", type=Path, nargs="*", default=None)
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs=2, default=[1, 32], metavar=("LATENCY", "THROUGHPUT"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--output-dir", type=Path, default=BENCH, help="<NAME>.md here, the rest in results/")
    parser.add_argument("--name", default=None, help="file stem (default: report for --fast, report_full)")
    args = parser.parse_args(argv)
    args.name = args.name or ("report" if args.fast else "report_full")
    if args.checkpoints is None:
        found = sorted((BENCH / "checkpoints").glob("*_bccd.safetensors"))
        args.checkpoints = [p for p in found if "yolov6n" in p.name] if args.fast else found
    if args.fast:
        args.calib_images, args.batch, args.warmup, args.iters = 32, [1, 8], 2, 5
    return args


def sensitivity_json(checkpoint: Path, img_size: int) -> Path | None:
    path = BENCH / "results" / f"sensitivity_{checkpoint.stem}_{img_size}" / "sensitivity.json"
    return path if path.is_file() else None


def checkpoint_rows(checkpoint: Path, args: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict]:
    _, meta = load_checkpoint(checkpoint)
    img_size = int(meta["img_size"])
    sens = sensitivity_json(checkpoint, img_size)
    timing = (args.batch, args.warmup, args.iters, tmp)
    fp32 = export_onnx(load_model(checkpoint), tmp / f"{checkpoint.stem}_fp32.onnx", img_size, dynamic_batch=True)
    rows = [measure("FP32", fp32, DATA_YAML, *timing)]
    for keep in (0, 6, "auto"):
        config = PTQConfig(str(checkpoint), DATA_YAML, tmp / f"{checkpoint.stem}_k{keep}.onnx",
                           keep_float=AUTO if keep == "auto" else keep, sensitivity_json=sens,
                           ranking_mode="isolated" if sens else "local", calib_images=args.calib_images,
                           img_size=img_size, layout="ort")
        res = ptq.run(config, progress=False)
        row = measure(f"INT8 PTQ K={len(res.keep_float_layers) if keep == 'auto' else keep}"
                      + (" (auto)" if keep == "auto" else ""), res.onnx_path, DATA_YAML, *timing)
        row.update(keep_float_layers=list(res.keep_float_layers), parity_snr_db=res.parity.snr_db,
                   parity_floor_db=res.parity.floor_db)
        rows.append(row)
    for qat in sorted(checkpoint.parent.glob(f"{checkpoint.stem.removesuffix('_bccd')}_qat*.safetensors")):
        onnx_path = export_quantized_checkpoint(qat, tmp / f"{qat.stem}.onnx", img_size)
        rows.append(measure(f"INT8 QAT ({qat.stem})", onnx_path, DATA_YAML, *timing))
    for row in rows:
        row["ap_drop"] = rows[0]["map50_95"] - row["map50_95"]
        row["speedup_vs_fp32"] = {b: row["images_per_s"][b] / rows[0]["images_per_s"][b] for b in row["images_per_s"]}
    # Train-form vs deployed torch latency: weights do not matter, a fresh model of the variant will do.
    reparam = bench.run(BenchConfig(meta["repquant_config"]["name"], backend="torch", compare_train_form=True,
                                    batch_sizes=tuple(args.batch), img_size=img_size, warmup=args.warmup,
                                    iters=args.iters)).results
    torch_rows = {f"{r.variant} bs{r.batch_size}": r.latency_ms.median for r in reparam}
    return rows, {"img_size": img_size, "sensitivity_json": str(sens.relative_to(ROOT)) if sens else None,
                  "torch_latency_ms": torch_rows, "reparam_speedup": reparam_speedup(reparam)}


def pareto_plot(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, entry in report["checkpoints"].items():
        points = [(r["latency_ms_median"][f"bs{report['batch'][0]}"], r["map50_95"], r["variant"])
                  for r in entry["rows"]]
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=name)
        for x, y, label in points:
            ax.annotate(label.replace("INT8 ", ""), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"ONNX Runtime CPU latency, batch {report['batch'][0]} (ms)")
    ax.set_ylabel("mAP@.5:.95 (BCCD val)")
    ax.set_title("Accuracy vs latency (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    b1, bt = (f"bs{b}" for b in report["batch"])
    env = report["environment"]
    lines = [
        "# repquant benchmark report", "",
        f"Generated by `{report['command']}` on {report['generated']} ({report['wall_s']:.0f} s). "
        f"{env['cpu_model']}, {env['cpu_count']} CPUs, onnxruntime {env['versions']['onnxruntime']}, "
        f"torch {env['versions']['torch']}. No GPU here: TensorRT numbers need one (benchmarks/README.md).", "",
        f"Methodology: {report['methodology']}", "",
        f"![mAP vs latency](results/{report['name']}_pareto.png)", "",
    ]
    for name, entry in report["checkpoints"].items():
        lines += [f"## {name} ({entry['img_size']} px)", "",
                  f"| variant | mAP@.5:.95 | vs FP32 | {b1} ms | {bt} img/s | speed-up {bt} | QLinearConv | "
                  "ORT vs fake-quant SNR dB (floor) |", "|---|---|---|---|---|---|---|---|"]
        for r in entry["rows"]:
            parity = ", ".join(f"{k} {v:.1f} ({r['parity_floor_db'][k]:.1f})"
                               for k, v in (r.get("parity_snr_db") or {}).items()) or "-"
            qlinear = r["ort_optimized_ops"].get("QLinearConv", 0)
            lines.append(f"| {r['variant']} | {r['map50_95']:.4f} | {-r['ap_drop']:+.4f} | "
                         f"{r['latency_ms_median'][b1]:.1f} | {r['images_per_s'][bt]:.1f} | "
                         f"{r['speedup_vs_fp32'][bt]:.2f}x | {qlinear} | {parity} |")
        lat = entry["torch_latency_ms"]
        lines += ["", "torch CPU latency, train-form vs re-parameterized (deployed): "
                  + "; ".join(f"{b}: {lat[f'train-form {b}']:.1f} -> {lat[f'deployed {b}']:.1f} ms "
                              f"({entry['reparam_speedup'][b]:.2f}x)" for b in (b1, bt)), ""]
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
    report: dict = {"schema": SCHEMA, "name": args.name, "fast": args.fast, "batch": args.batch,
                    "calib_images": args.calib_images,
                    "data": str(DATA_YAML.relative_to(ROOT)), "environment": environment_info(), "checkpoints": {},
                    "command": "python benchmarks/report.py" + (" --fast" if args.fast else ""),
                    "methodology": f"ONNX Runtime CPU EP, all graph optimizations; forward incl. box decoding, "
                                   f"no pre-processing or NMS; median of {args.iters} timed runs after "
                                   f"{args.warmup} warm-up runs; INT8 = ORT layout (uint8 activations, int8 "
                                   f"per-channel weights), max calibration on {args.calib_images} seeded train "
                                   "images; keep-float ranking isolated/mse from the committed sensitivity JSON"}
    with tempfile.TemporaryDirectory(prefix="repquant-report-") as tmp_dir:
        for checkpoint in args.checkpoints:
            print(f"report: {checkpoint.name}", file=sys.stderr, flush=True)
            rows, extra = checkpoint_rows(checkpoint, args, Path(tmp_dir))
            report["checkpoints"][checkpoint.stem] = {"checkpoint": str(checkpoint.relative_to(ROOT)), "rows": rows,
                                                      **extra}
    report["generated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["wall_s"] = time.perf_counter() - start
    results = args.output_dir / "results"
    pareto_plot(report, results / f"{args.name}_pareto.png")
    atomic_write_text(results / f"{args.name}.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    atomic_write_text(args.output_dir / f"{args.name.upper()}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
