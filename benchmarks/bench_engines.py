"""INT8 engines side by side on one model: repquant's INT8 files against ONNX Runtime's own ``quantize_static`` and
NNCF, each run in ONNX Runtime and in OpenVINO, with the mAP of every file, so that speed is never shown
without accuracy.

Files (all from the same FP32 export, calibrated on the same seeded train images):
- ``fp32``: the deployed model (OpenVINO runs it explicitly in f32 and, as a separate row, in bf16, its own
  default on CPUs with AVX-512 BF16);
- ``repquant_k0`` / ``repquant_k6``: ``repquant ptq --layout ort`` with 0 and 6 float layers;
- ``ort_static``: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations, MinMax);
- ``nncf``: ``nncf.quantize`` on the ONNX model (mixed preset).

Speed: per engine, every file timed in turn over 3 rounds per batch size (``repquant.deploy.timing.
compare_runners``; the median round), batch-1 latency under OpenVINO's latency hint and batch-32 throughput
under its throughput hint. Writes ``benchmarks/results/bench_engines_<name>.json`` and prints a table.

    python benchmarks/bench_engines.py --checkpoint benchmarks/checkpoints/yolov6s_bccd.safetensors --img-size 320
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from repquant.checkpoint import load_model
from repquant.data.calib import CalibManifest, calibration_batches
from repquant.deploy.backends import RunnerOptions, get_backend
from repquant.deploy.onnx_export import export_onnx
from repquant.deploy.timing import TimingPlan, compare_runners, environment_info
from repquant.io import atomic_write_text
from repquant.tasks import evaluate, ptq
from repquant.tasks.config import EvalConfig, PTQConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data" / "bccd.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "benchmarks/checkpoints/yolov6s_bccd.safetensors")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--sensitivity", type=Path, default=None, help="ranking for K=6 (default: measured)")
    parser.add_argument("--batch", type=int, nargs=2, default=[1, 32], metavar=("LATENCY", "THROUGHPUT"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench_engines")
    parser.add_argument("--name", default=None, help="default: <checkpoint stem>_<img size>")
    return parser.parse_args(argv)


def _calibration_arrays(args: argparse.Namespace) -> list[np.ndarray]:
    manifest = CalibManifest(data=str(args.data), split="train", num_images=args.calib_images, seed=0,
                             img_size=args.img_size, batch_size=1)
    batches, _ = calibration_batches(manifest)
    return [b.numpy() for b in batches]


def _ort_static(fp32: Path, out: Path, arrays: list[np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": a} for a in arrays])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    pre = out.with_name("ort_static_pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _nncf(fp32: Path, out: Path, arrays: list[np.ndarray]) -> Path:
    import nncf
    import onnx

    model = onnx.load(str(fp32))
    quantized = nncf.quantize(model, nncf.Dataset([{"images": a} for a in arrays]),
                              preset=nncf.QuantizationPreset.MIXED, subset_size=len(arrays))
    onnx.save(quantized, str(out))
    return out


def build_files(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    arrays = _calibration_arrays(args)
    files = {"fp32": export_onnx(load_model(args.checkpoint), work / "fp32.onnx", args.img_size, dynamic_batch=True)}
    for keep in (0, 6):
        cfg = PTQConfig(str(args.checkpoint), args.data, work / f"repquant_k{keep}.onnx", keep_float=keep,
                        layout="ort", calib_images=args.calib_images, img_size=args.img_size, overwrite=True,
                        sensitivity_json=args.sensitivity, ranking_mode="isolated" if args.sensitivity else "local")
        files[f"repquant_k{keep}"] = ptq.run(cfg, progress=False).onnx_path
    files["ort_static"] = _ort_static(files["fp32"], work / "ort_static.onnx", arrays)
    files["nncf"] = _nncf(files["fp32"], work / "nncf.onnx", arrays)
    return files


ENGINES = {  # label -> (backend, hint, precision for the fp32 file)
    "ort": ("ort", "latency", "fp32"),
    "openvino f32": ("openvino", None, "fp32"),
    "openvino bf16": ("openvino", None, "bf16"),
}


def _precision(name: str, fp32_precision: str) -> str:
    return fp32_precision if name == "fp32" else "int8"


def measure(files: dict[str, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for engine, (backend, fixed_hint, fp32_precision) in ENGINES.items():
        names = list(files) if fp32_precision == "fp32" else ["fp32"]  # bf16 only changes the float file
        for batch, hint in ((args.batch[0], "latency"), (args.batch[1], "throughput")):
            options = RunnerOptions(hint=fixed_hint or hint)
            runners = {n: get_backend(backend).open(
                files[n], dataclasses.replace(options, precision=_precision(n, fp32_precision))) for n in names}
            plan = TimingPlan((batch,), args.warmup, args.iters, args.min_seconds)
            for name, (result,) in compare_runners(runners, plan).items():
                rows.append({"file": name, "engine": engine, "hint": options.hint, "batch": batch,
                             "latency_ms": result.latency_ms.median, "img_s": result.throughput_img_s,
                             "config": getattr(runners[name], "config", None)})
            print(f"timed {engine} batch {batch}", flush=True)
    return rows


def accuracy(files: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, path in files.items():
        out[name] = {}
        for backend in ("ort", "openvino"):
            result = evaluate.run(EvalConfig(str(path), args.data, backend=backend), progress=False).result
            out[name][backend] = result.map50_95
    return out


def table(rows: list[dict[str, Any]], maps: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    base = {r["batch"]: r["img_s"] for r in rows if r["file"] == "fp32" and r["engine"] == "ort"}
    ov_default = {r["batch"]: r["img_s"] for r in rows if r["file"] == "fp32" and r["engine"] == "openvino bf16"}
    lines = [f"| file | engine | mAP@.5:.95 | bs{args.batch[0]} ms | bs{args.batch[1]} img/s | x ORT FP32 | "
             f"x OpenVINO bf16 FP32 |", "|---|---|---:|---:|---:|---:|---:|"]
    for file in dict.fromkeys(r["file"] for r in rows):
        for engine in ENGINES:
            got = {r["batch"]: r for r in rows if r["file"] == file and r["engine"] == engine}
            if not got:
                continue
            b1, bt = got[args.batch[0]], got[args.batch[1]]
            map_value = maps[file]["ort" if engine == "ort" else "openvino"]
            lines.append(f"| {file} | {engine} | {map_value:.4f} | {b1['latency_ms']:.1f} | {bt['img_s']:.1f} | "
                         f"{bt['img_s'] / base[args.batch[1]]:.2f}x ({b1['img_s'] / base[args.batch[0]]:.2f}x) | "
                         f"{bt['img_s'] / ov_default[args.batch[1]]:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = args.name or f"{args.checkpoint.stem}_{args.img_size}"
    work = args.work_dir / name
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    files = build_files(args, work)
    sizes = {n: p.stat().st_size for n, p in files.items()}
    rows = measure(files, args)
    maps = accuracy(files, args)
    text = table(rows, maps, args)
    doc = {"schema": "repquant.bench_engines/1", "checkpoint": str(args.checkpoint),
           "data": str(args.data), "img_size": args.img_size, "calib_images": args.calib_images,
           "batch": args.batch, "timing": {"warmup": args.warmup, "iters": args.iters, "min_seconds":
                                           args.min_seconds, "method": "compare_runners, 3 interleaved rounds"},
           "file_bytes": sizes, "map50_95": maps, "rows": rows, "table": text,
           "wall_s": round(time.perf_counter() - start, 1), "environment": environment_info()}
    path = ROOT / "benchmarks" / "results" / f"bench_engines_{name}.json"
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
    print(text + "\nfile sizes (MB): " + ", ".join(f"{n} {b / 1e6:.1f}" for n, b in sizes.items())
          + f"\nwrote {path}")


if __name__ == "__main__":
    main()
