"""Accuracy and ONNX Runtime CPU speed of FP32 vs mixed-precision INT8 PTQ on a committed checkpoint.

For one checkpoint: FP32 ONNX, INT8 with K = 0 keep-float layers, K = 6 and K = auto
(``--keep-float``), all in the ORT layout (conv outputs quantized too, so ONNX Runtime's CPU
QDQ fusion runs integer ``QLinearConv``). Each file is evaluated on the val split (pycocotools mAP,
the postprocess of `repquant eval`) and timed (forward incl. box decoding; no pre-processing or NMS)
at batch 1 and a throughput batch. Prints a Markdown table, writes ``benchmarks/results/bench_ptq_<name>.json``.

    python benchmarks/bench_ptq.py benchmarks/checkpoints/yolov6n_bccd.safetensors \
        --sensitivity benchmarks/results/sensitivity_yolov6n_bccd_320/sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from repquant.checkpoint import load_checkpoint, load_model
from repquant.deploy.onnx_export import export_onnx
from repquant.deploy.timing import environment_info
from repquant.io import atomic_write_text
from repquant.quant import ort_optimized_op_counts
from repquant.tasks import bench, evaluate, ptq
from repquant.tasks.config import AUTO, BenchConfig, EvalConfig, PTQConfig

ROOT = Path(__file__).resolve().parents[1]


def measure(name: str, path: Path, data: Path, batches: list[int], warmup: int, iters: int, tmp: Path) -> dict:
    report = evaluate.run(EvalConfig(str(path), data), progress=False)
    result, size = report.result, report.img_size
    precision = "int8" if name.startswith("int8") else "fp32"
    timings = bench.run(BenchConfig(str(path), backend="ort", precision=precision, batch_sizes=tuple(batches),
                                    warmup=warmup, iters=iters)).results
    ops = ort_optimized_op_counts(path, tmp / f"{name}.optimized.onnx")
    return {
        "variant": name, "map50_95": result.map50_95, "map50": result.map50, "img_size": size,
        "latency_ms_median": {f"bs{t.batch_size}": t.latency_ms.median for t in timings},
        "images_per_s": {f"bs{t.batch_size}": t.throughput_img_s for t in timings},
        "ort_optimized_ops": {k: v for k, v in ops.items() if k in ("QLinearConv", "Conv", "QuantizeLinear",
                                                                  "DequantizeLinear", "ConvInteger")},
        "q_nodes_in_file": Counter(n.op_type for n in onnx.load(str(path)).graph.node)["QuantizeLinear"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT / "recipes" / "data" / "bccd.yaml")
    parser.add_argument("--sensitivity", type=Path, default=None, help="sensitivity JSON for the ranking")
    parser.add_argument("--metric", default="mse")
    parser.add_argument("--mode", default="isolated")
    parser.add_argument("--keep-float", nargs="+", default=["0", "6", "auto"], help="counts and/or 'auto'")
    parser.add_argument("--max-ap-drop", type=float, default=0.005, help="for auto")
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    _, meta = load_checkpoint(args.checkpoint)
    img_size = int(meta.get("img_size", 640))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ptq-") as tmp_dir:
        tmp = Path(tmp_dir)
        fp32 = export_onnx(load_model(args.checkpoint), tmp / "fp32.onnx", img_size, dynamic_batch=True)
        rows.append(measure("fp32", fp32, args.data, args.batch, args.warmup, args.iters, tmp))
        for k in args.keep_float:
            config = PTQConfig(str(args.checkpoint), args.data, tmp / f"int8_k{k}.onnx",
                               keep_float=AUTO if k == "auto" else int(k), max_ap_drop=args.max_ap_drop,
                               sensitivity_json=args.sensitivity, ranking_metric=args.metric, ranking_mode=args.mode,
                               calib_images=args.calib_images, img_size=img_size, layout="ort")
            res = ptq.run(config, progress=False)
            row = measure(f"int8_k{k}", res.onnx_path, args.data, args.batch, args.warmup, args.iters, tmp)
            row["keep_float_layers"] = list(res.keep_float_layers)
            row["auto_search"] = res.auto_search
            row["parity_snr_db"], row["parity_floor_db"] = res.parity.snr_db, res.parity.floor_db
            rows.append(row)
    base = rows[0]
    for row in rows:
        row["ap_drop"] = base["map50_95"] - row["map50_95"]
        row["speedup_vs_fp32"] = {b: row["images_per_s"][b] / base["images_per_s"][b] for b in base["images_per_s"]}
    report = {"schema": "repquant.bench_ptq/1", "checkpoint": str(args.checkpoint), "data": str(args.data),
              "img_size": img_size, "calib_images": args.calib_images, "ranking": f"{args.mode}/{args.metric}",
              "sensitivity_json": str(args.sensitivity) if args.sensitivity else None,
              "methodology": "ONNX Runtime CPU EP, all graph optimizations; forward incl. box decoding, no "
                             "pre-processing or NMS; median of timed runs after warm-up",
              "environment": environment_info(), "results": rows}
    output = args.output or ROOT / "benchmarks" / "results" / f"bench_ptq_{args.checkpoint.stem}.json"
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    bs = [f"bs{b}" for b in args.batch]
    print("| variant | mAP@.5:.95 | drop | " + " | ".join(f"{b} ms | {b} img/s" for b in bs)
          + " | QLinearConv | ORT vs fake-quant SNR dB (floor) |")
    print("|---" * (5 + 2 * len(bs)) + "|")
    for r in rows:
        cells = " | ".join(f"{r['latency_ms_median'][b]:.1f} | {r['images_per_s'][b]:.1f}" for b in bs)
        floor = r.get("parity_floor_db", {})
        parity = ", ".join(f"{k} {v:.1f} ({floor[k]:.1f})" for k, v in r.get("parity_snr_db", {}).items())
        print(f"| {r['variant']} | {r['map50_95']:.4f} | {r['ap_drop']:+.4f} | {cells} | "
              f"{r['ort_optimized_ops'].get('QLinearConv', 0)} | {parity or '-'} |")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
