"""PTQ vs full QAT vs partial QAT vs partial QAT + CWD on a committed BCCD checkpoint, evaluated as real
INT8 in ONNX Runtime (ORT layout), QAT rows for several seeds. Prints a Markdown table and writes
``benchmarks/results/bench_qat_<checkpoint>.json``.

    python benchmarks/bench_qat.py benchmarks/checkpoints/yolov6n_bccd.safetensors --epochs 3 --seeds 0 1 \
        --sensitivity benchmarks/results/sensitivity_yolov6n_bccd_320/sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from repquant.checkpoint import load_checkpoint
from repquant.deploy.qdq import export_quantized_checkpoint
from repquant.deploy.timing import environment_info
from repquant.io import atomic_write_text
from repquant.tasks import evaluate, ptq, qat
from repquant.tasks.config import EvalConfig, PTQConfig, QATConfig


def _map(model: Path, data: Path) -> float:
    return evaluate.run(EvalConfig(str(model), data), progress=False).result.map50_95

ROOT = Path(__file__).resolve().parents[1]
# name -> (keep-float layers, CWD, learnable scales, RepOpt masks for RepOpt-trained models)
VARIANTS = {"full QAT": (0, False, False, True), "partial QAT": (6, False, False, True),
            "partial QAT + CWD": (6, True, False, True), "partial QAT + CWD + learned scales": (6, True, True, True),
            "partial QAT + CWD, RepOpt masks off": (6, True, False, False)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT / "recipes" / "data" / "bccd.yaml")
    parser.add_argument("--sensitivity", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scale-lr", type=float, default=1e-3, help="Adam lr of log(amax) (learned-scales row)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS)[:4],
                        metavar="NAME", help=f"QAT rows to run, of {list(VARIANTS)} (default: the first four)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    _, meta = load_checkpoint(args.checkpoint)
    img_size = int(meta["img_size"])
    rows: list[dict] = [{"variant": "FP32 (torch)", "map50_95": _map(args.checkpoint, args.data)}]
    with tempfile.TemporaryDirectory(prefix="bench-qat-") as tmp_dir:
        tmp = Path(tmp_dir)
        ptq_result = ptq.run(PTQConfig(str(args.checkpoint), args.data, tmp / "ptq.onnx", keep_float=6,
                                       sensitivity_json=args.sensitivity, calib_images=args.calib_images,
                                       img_size=img_size, layout="ort"), progress=False)
        rows.append({"variant": "PTQ K=6", "map50_95": _map(ptq_result.onnx_path, args.data)})
        for name in args.variants:
            keep, cwd, learn_scales, repopt_masks = VARIANTS[name]
            per_seed = []
            for seed in args.seeds:
                out = tmp / f"{name.replace(' ', '_').replace('+', '')}_{seed}.safetensors"
                config = QATConfig(model=str(args.checkpoint), data=args.data, output=out, keep_float=keep,
                                   sensitivity_json=args.sensitivity,
                                   cw_distill=cwd, learn_scales=learn_scales, scale_lr=args.scale_lr,
                                   repopt_masks=repopt_masks,
                                   epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                   img_size=img_size, calib_images=args.calib_images, layout="ort", seed=seed,
                                   device="cpu")
                result = qat.run(config, progress=False)
                onnx_path = export_quantized_checkpoint(out, tmp / f"{out.stem}.onnx", img_size)
                ort_map = _map(onnx_path, args.data)
                per_seed.append({"seed": seed, "map50_95": ort_map, "fake_quant_best": result.best_map50_95,
                                 "best_epoch": result.best_epoch, "history": result.history,
                                 "wall_s": result.wall_time_s})
                print(f"{name} seed {seed}: ORT INT8 mAP@.5:.95 {ort_map:.4f} ({result.wall_time_s:.0f} s)", flush=True)
            maps = [r["map50_95"] for r in per_seed]
            rows.append({"variant": name, "map50_95": statistics.mean(maps), "per_seed": per_seed,
                         "spread": max(maps) - min(maps)})
    fp32 = rows[0]["map50_95"]
    report = {"schema": "repquant.bench_qat/1", "checkpoint": str(args.checkpoint), "img_size": img_size,
              "epochs": args.epochs, "lr": args.lr, "scale_lr": args.scale_lr, "batch_size": args.batch_size,
              "seeds": args.seeds,
              "calib_images": args.calib_images,
              "sensitivity_json": str(args.sensitivity) if args.sensitivity else None,
              "evaluation": "INT8 rows: QDQ ONNX (ORT layout) run by ONNX Runtime CPU, pycocotools mAP on val",
              "environment": environment_info(), "results": rows}
    output = args.output or ROOT / "benchmarks" / "results" / f"bench_qat_{args.checkpoint.stem}.json"
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    print("| variant | mAP@.5:.95 | vs FP32 | seeds |\n|---|---|---|---|")
    for r in rows:
        seeds = ", ".join(f"{s['map50_95']:.4f}" for s in r.get("per_seed", [])) or "-"
        print(f"| {r['variant']} | {r['map50_95']:.4f} | {r['map50_95'] - fp32:+.4f} | {seeds} |")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
