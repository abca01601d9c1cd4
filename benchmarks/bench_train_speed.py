"""CPU training speed of the real trainer (img/s) at several image sizes.

Runs the real training loop (``repquant.train.fit.make_trainer``) on a dataset (default: BCCD from
../shared/data through
recipes/data/bccd.yaml; Mosaic on, as in the first training epochs), times the training iterations
after a warm-up (forward, loss with TAL assignment, backward, optimizer step when the gradient
accumulation says so, EMA, and data loading with the recipe's workers), and stops. Prints a Markdown
table and writes ``benchmarks/results/bench_train_speed.json``.

    python benchmarks/bench_train_speed.py                       # yolov6n at 320 and 640
    python benchmarks/bench_train_speed.py --model yolov6s --img 320 --iters 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from repquant.deploy.timing import environment_info
from repquant.io import atomic_write_text
from repquant.train.config import load_train_config
from repquant.train.fit import make_trainer
from repquant.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "bench_train_speed.json"


class _Done(Exception):
    """Raised from the batch hook once enough iterations are timed."""


def measure(recipe: Path, img_size: int, iters: int, warmup: int, batch_size: int) -> dict:
    stamps: list[float] = []

    def on_batch_end(trainer: Trainer) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) > warmup + iters:
            raise _Done

    with tempfile.TemporaryDirectory() as out:
        config = load_train_config(recipe, img_size=img_size, batch_size=batch_size, epochs=300,
                                   eval_interval=1000, output_dir=out)
        trainer = make_trainer(config, callbacks={"on_batch_end": on_batch_end})
        try:
            trainer.run()
        except _Done:
            pass
    steps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:], strict=False)]
    if len(steps) < iters:
        raise SystemExit(f"{recipe}: only {len(steps)} timed iterations (one epoch is shorter than warmup + iters)")
    median = statistics.median(steps)
    return {"model": config.model, "img_size": img_size, "batch_size": batch_size, "timed_iters": len(steps),
            "warmup_iters": warmup, "s_per_iter_median": median, "images_per_s": batch_size / median,
            "s_per_iter_all": steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "yolov6n_bccd.yaml")
    parser.add_argument("--img", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--iters", type=int, default=6, help="timed iterations per size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(args.recipe, size, args.iters, args.warmup, args.batch_size) for size in args.img]
    report = {"schema": "repquant.bench_train_speed/1", "recipe": str(args.recipe.relative_to(ROOT))
              if args.recipe.is_relative_to(ROOT) else str(args.recipe), "environment": environment_info(),
              "methodology": "median seconds per training iteration after warm-up, data loading included; "
                             "img/s = batch / median", "results": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    print("| model | img | batch | s/iter (median) | img/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['img_size']} | {r['batch_size']} | {r['s_per_iter_median']:.2f} | "
              f"{r['images_per_s']:.1f} |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
