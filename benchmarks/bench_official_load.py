"""Time to read an official meituan/YOLOv6 checkpoint into a repquant model (safe reader + mapping), median of
several loads, for the official fixtures in ../shared/data/yolov6-official (compressed ones are unpacked to a
temporary folder first, outside the timing). Prints a table and writes benchmarks/results/bench_official_load.json.

    python benchmarks/bench_official_load.py
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import tempfile
import time
from pathlib import Path

from repquant.deploy.timing import environment_info
from repquant.io import atomic_write_text
from repquant.official import convert_official

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "data" / "yolov6-official"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "bench_official_load.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("yolov6n_official.pt", "yolov6s_official.pt.xz"):
            path = FIXTURES / name
            if name.endswith(".xz"):
                path = Path(tmp) / name.removesuffix(".xz")
                path.write_bytes(lzma.open(FIXTURES / name).read())
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                converted = convert_official(path)
                seconds.append(time.perf_counter() - start)
            rows.append({"file": name, "bytes": path.stat().st_size, "variant": converted.report.variant,
                         "median_s": statistics.median(seconds), "max_s": max(seconds), "runs_s": seconds})
    report = {"schema": "repquant.bench_official_load/1", "repeats": args.repeats,
              "methodology": "wall time of repquant.official.convert_official (pickle scan, weights-only load, sha256, "
                             "mapping, variant match, state load) on an uncompressed file in the page cache",
              "environment": environment_info(), "results": rows}
    atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    print("| file | variant | MB | median s | max s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['variant']} | {r['bytes'] / 1e6:.1f} | {r['median_s']:.3f} | {r['max_s']:.3f} |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
