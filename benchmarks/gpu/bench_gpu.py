"""GPU speed of the YOLOv6 deploy graphs in torch, for a lent GPU machine (one short run, under 5 minutes).

The lent machine has torch (CUDA), onnx and onnxruntime but no package registry, so this script imports only
torch, numpy and repquant's model, re-parameterization and timing modules (run it from the checkout with
``PYTHONPATH=.``; ``benchmarks/gpu/run.sh`` does). TensorRT cannot be installed there: engines are not timed.

For each of yolov6n/s/m/l (re-parameterized, random weights: speed does not depend on them) at ``--img-size``:
fp32 eager (TF32 off), fp16 eager, fp16 replaying a CUDA graph; bs1 latency and bs32 throughput, timed with
CUDA events, the three modes interleaved in rounds (``repquant.deploy.timing.compare_runners``). Writes one
JSON (schema ``repquant.bench-gpu/1``) and prints a table. ``--device cpu`` runs fp32 only (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from repquant.deploy.backends.torch import TorchRunner
from repquant.deploy.timing import TimingPlan, compare_runners, environment_info
from repquant.io import atomic_write_text
from repquant.models import create_model
from repquant.reparam import reparameterize

SCHEMA = "repquant.bench-gpu/1"
VARIANTS = ("yolov6n", "yolov6s", "yolov6m", "yolov6l")


def _runners(variant: str, img_size: int, device: str) -> dict[str, TorchRunner]:
    model = reparameterize(create_model(variant, num_classes=80).eval())
    if device == "cpu":
        return {"fp32": TorchRunner(model, img_size, "cpu", "fp32")}
    return {"fp32": TorchRunner(model, img_size, "cuda", "fp32"),
            "fp16": TorchRunner(model, img_size, "cuda", "fp16"),
            "fp16+cuda_graph": TorchRunner(model, img_size, "cuda", "fp16", cuda_graphs=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=VARIANTS, help="repeatable; default: all four")
    parser.add_argument("--img-size", type=int, default=640)
    parser.add_argument("--batch", type=int, action="append", help="repeatable; default: 1 and 32")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/gpu"))
                        / "bench_gpu.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 rounds conv inputs to 10 bits
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    plan = TimingPlan(tuple(args.batch or (1, 32)), args.warmup, args.iters)
    rows: list[dict[str, object]] = []
    start = time.perf_counter()
    for variant in args.variant or VARIANTS:
        results = compare_runners(_runners(variant, args.img_size, args.device), plan, rounds=args.rounds)
        for mode, per_batch in results.items():
            for r in per_batch:
                rows.append({"variant": variant, "mode": mode, **r.to_dict()})
                print(f"{variant:8s} {mode:16s} bs{r.batch_size:<3d} median {r.latency_ms.median:8.3f} ms  "
                      f"{r.throughput_img_s:9.1f} img/s", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report = {"schema": SCHEMA, "img_size": args.img_size, "methodology": plan.methodology,
              "tf32": False, "cudnn_benchmark": True, "wall_seconds": round(time.perf_counter() - start, 1),
              "environment": environment_info(), "results": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output} ({report['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
