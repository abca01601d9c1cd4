"""Deployment latency of one YOLOv6 variant on this machine's CPU.

Measures, per batch size: torch train-form vs re-parameterized (deployed) latency, and ONNX Runtime
FP32 latency/throughput of the deployed export. Prints a Markdown table and writes a JSON report
(schema: benchmarks/README.md) to ``benchmarks/results/bench_deploy.json``.

    python benchmarks/bench_deploy.py --fast                 # CI: 320x320, batches 1 and 4, few iters
    python benchmarks/bench_deploy.py --img 640 --batch 1 32 --threads 8

Weights are freshly initialised: latency does not depend on their values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repquant.deploy.report import BenchReport
from repquant.deploy.timing import reparam_speedup
from repquant.tasks import bench
from repquant.tasks.config import BenchConfig

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "bench_deploy.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov6n", help="registry name or checkpoint path")
    parser.add_argument("--img", type=int, default=640, help="square input size (multiple of 32)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads")
    parser.add_argument(
        "--fast", action="store_true", help="CI preset: --img 320 --batch 1 4, 2 warm-up, 5 iters"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON report path")
    args = parser.parse_args(argv)
    if args.fast:
        args.img, args.batch, args.warmup, args.iters = 320, [1, 4], 2, 5
    return args


def run(args: argparse.Namespace) -> BenchReport:
    common = dict(batch_sizes=tuple(args.batch), img_size=args.img, warmup=args.warmup, iters=args.iters,
                  threads=args.threads)
    torch_report = bench.run(BenchConfig(args.model, backend="torch", compare_train_form=True, **common))
    ort_report = bench.run(BenchConfig(args.model, backend="ort", **common))
    results = torch_report.results + ort_report.results
    torch_deployed = {
        r.batch_size: r.latency_ms.median for r in results if r.variant == "deployed" and r.backend == "torch"
    }
    ort_speedup = {
        f"bs{r.batch_size}": round(torch_deployed[r.batch_size] / r.latency_ms.median, 3)
        for r in results
        if r.backend == "ort"
    }
    return BenchReport(
        model=args.model,
        img_size=torch_report.img_size,
        methodology=torch_report.methodology,
        environment=ort_report.environment,
        results=results,
        notes={"reparam_speedup": reparam_speedup(results), "ort_speedup_vs_torch_deployed": ort_speedup},
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    report.write_json(args.output)
    print(report.to_markdown())
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
