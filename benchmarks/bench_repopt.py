"""RepOptimizer vs RepVGG training of the same variant and recipe: FP32 mAP, INT8 PTQ mAP (real INT8 in
ONNX Runtime) and the weight / activation range statistics of the deployed convs (the paper's Fig. 4 claim:
RepOpt-trained weights and activations are narrower, so PTQ loses less). Prints a Markdown table and
writes ``benchmarks/results/bench_repopt_<name>.json`` plus one ``act_stats`` folder per model.

    python benchmarks/bench_repopt.py --name yolov6n_bccd \
        --model RepVGG=benchmarks/checkpoints/yolov6n_bccd.safetensors \
        --model RepOpt=benchmarks/checkpoints/yolov6n_bccd_repopt.safetensors \
        --model "hyper-search=runs/hs/weights/best.safetensors"
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from repquant.checkpoint import load_checkpoint
from repquant.deploy.timing import environment_info
from repquant.io import atomic_write_text
from repquant.tasks import act_stats, evaluate, ptq
from repquant.tasks.config import ActStatsConfig, EvalConfig, PTQConfig

ROOT = Path(__file__).resolve().parents[1]
STATS = ("weight_absmax", "weight_p9999", "weight_kurtosis", "weight_int8_snr_db", "act_absmax", "act_p9999",
         "act_kurtosis")


def summarize(stats_json: Path) -> dict[str, dict[str, float]]:
    """Median, min and max over the deployed convs of each statistic (``null`` values, e.g. constant inputs or
    an exactly quantized weight's infinite SNR, skipped)."""
    layers = json.loads(stats_json.read_text())["layers"]
    out = {}
    for key in STATS:
        values = [layer[key] for layer in layers if layer[key] is not None]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def measure(label: str, checkpoint: Path, data: Path, calib_images: int, act_images: int, results_dir: Path,
            tmp: Path) -> dict:
    _, meta = load_checkpoint(checkpoint)
    img_size = int(meta["img_size"])
    fp32 = evaluate.run(EvalConfig(str(checkpoint), data), progress=False).result.map50_95
    result = ptq.run(PTQConfig(str(checkpoint), data, tmp / f"{label}.onnx", keep_float=0, calib_images=calib_images,
                               img_size=img_size, layout="ort"), progress=False)
    int8 = evaluate.run(EvalConfig(str(result.onnx_path), data), progress=False).result.map50_95
    stats_dir = results_dir / f"act_stats_{checkpoint.stem}"
    stats_json = act_stats.run(ActStatsConfig(str(checkpoint), data, "val", act_images, img_size, stats_dir)).json_path
    row = {"model": label, "checkpoint": str(checkpoint), "img_size": img_size,
           "trained_epochs": meta.get("trained_epochs", meta.get("epochs")), "fp32_map50_95": fp32,
           "int8_ptq_k0_map50_95": int8, "ptq_drop": fp32 - int8, "act_stats": str(stats_json),
           "stats": summarize(stats_json)}
    print(f"{label}: FP32 {fp32:.4f}  INT8 PTQ K=0 {int8:.4f}  drop {fp32 - int8:+.4f}", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=CHECKPOINT",
                        help="a model to measure (repeatable), e.g. RepOpt=benchmarks/checkpoints/x.safetensors")
    parser.add_argument("--name", required=True, help="result file stem, e.g. yolov6n_bccd")
    parser.add_argument("--data", type=Path, default=ROOT / "recipes" / "data" / "bccd.yaml")
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--act-images", type=int, default=32, help="val images for the range statistics")
    args = parser.parse_args(argv)
    models = []
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--model {spec!r}: expected LABEL=CHECKPOINT with an existing file")
        models.append((label, Path(path)))
    results_dir = ROOT / "benchmarks" / "results" / f"repopt_{args.name}"
    with tempfile.TemporaryDirectory(prefix="bench-repopt-") as tmp_dir:
        rows = [measure(label, path, args.data, args.calib_images, args.act_images, results_dir, Path(tmp_dir))
                for label, path in models]
    report = {"schema": "repquant.bench_repopt/1", "data": str(args.data), "calib_images": args.calib_images,
              "act_images": args.act_images,
              "evaluation": "pycocotools mAP@.5:.95 on val; FP32 = torch; INT8 = PTQ (max calibration, no layer "
                            "kept float, ORT layout) QDQ ONNX run by ONNX Runtime CPU; statistics of the deployed "
                            "convs (repquant act-stats), median, min and max over layers",
              "environment": environment_info(), "results": rows}
    output = results_dir.parent / f"bench_repopt_{args.name}.json"
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    print("| model | FP32 | INT8 PTQ K=0 | INT8 - FP32 | w max (med / max) | w kurt (med / max) "
          "| w INT8 SNR dB (med / min) | act p99.99 (med / max) | act kurt (med / max) |\n" + "|---" * 9 + "|")
    for r in rows:
        s = r["stats"]
        cells = [f"{s[k]['median']:.3g} / {s[k][end]:.3g}" for k, end in (
            ("weight_absmax", "max"), ("weight_kurtosis", "max"), ("weight_int8_snr_db", "min"),
            ("act_p9999", "max"), ("act_kurtosis", "max"))]
        print(f"| {r['model']} | {r['fp32_map50_95']:.4f} | {r['int8_ptq_k0_map50_95']:.4f} | "
              f"{-r['ptq_drop']:+.4f} | " + " | ".join(cells) + " |")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
