"""Wall time of the README's main job, `repquant demo` (quantize of the committed YOLOv6-N BCCD checkpoint on
the embedded BCCD sample), as a user runs it: a fresh process and a fresh output folder each time (import,
model load, every stage, report), then once more into the same folder (every stage reused). Run it with
nothing else running. Prints a table and writes benchmarks/results/bench_demo.json.

    python benchmarks/bench_demo.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repquant.deploy.timing import environment_info
from repquant.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [str(Path(sys.executable).with_name("repquant")), "demo", "--output"]


def timed_demo(output: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([*COMMAND, str(output)], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"repquant demo failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="fresh runs (each into a new folder)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "bench_demo.json")
    args = parser.parse_args(argv)
    fresh, printed = [], ""
    with tempfile.TemporaryDirectory(prefix="repquant-demo-") as tmp:
        for i in range(args.repeats):
            folder = Path(tmp) / f"run{i}"
            seconds, printed = timed_demo(folder)
            fresh.append(seconds)
            if i < args.repeats - 1:
                shutil.rmtree(folder)
        rerun, _ = timed_demo(folder)
        summary = json.loads((folder / "summary.json").read_text())
        stages = json.loads((folder / "run_log.json").read_text())["stages"]
    doc = {"command": "repquant demo --output DIR", "fresh_runs_s": [round(s, 1) for s in fresh],
           "fresh_median_s": round(statistics.median(fresh), 1), "rerun_same_folder_s": round(rerun, 1),
           "rerun_stages_reused": all(s["cached"] for s in stages.values()),
           "fp32_map50_95": summary["fp32"]["map50_95"], "int8_map50_95": summary["int8"]["map50_95"],
           "keep_float_layers": summary["int8"]["keep_float_layers"], "speedup": summary["speed"]["speedup"],
           "printed": printed, "environment": environment_info()}
    atomic_write_text(args.output, json.dumps(doc, indent=2) + "\n")
    print("| run | wall s |\n|---|---:|")
    for i, s in enumerate(fresh):
        print(f"| fresh {i + 1} | {s:.1f} |")
    print(f"| rerun, same folder | {rerun:.1f} |\n\n{printed}\nwrote {args.output}")


if __name__ == "__main__":
    main()
