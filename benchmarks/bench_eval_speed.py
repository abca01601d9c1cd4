"""Where `repquant eval`'s time goes: the forward pass in ONNX Runtime vs the post-process (candidate selection +
class-aware NMS) on the real outputs of a model over a val split, with repquant's greedy pass
(``repquant.ops.nms._greedy``, one box at a time) and a vectorised alternative tried for it (the fixpoint of
``keep[i] = no kept j < i suppresses i``, whole-vector steps): both give the same detections; the table says
which is faster on real detector outputs. Prints a table and writes
benchmarks/results/bench_eval_speed_<name>.json.

    python benchmarks/bench_eval_speed.py --checkpoint benchmarks/checkpoints/yolov6s_bccd.safetensors
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from repquant.checkpoint import load_model
from repquant.data import DetectionDataset, load_data_config
from repquant.deploy.backends import RunnerOptions, get_backend
from repquant.deploy.onnx_export import export_onnx
from repquant.deploy.timing import environment_info
from repquant.eval.predict import postprocess
from repquant.io import atomic_write_text
from repquant.ops import nms as nms_module

ROOT = Path(__file__).resolve().parents[1]


def fixpoint_greedy(suppress: np.ndarray) -> np.ndarray:
    """The vectorised alternative: one matrix-vector product per step until nothing changes (exact: entry i
    depends only on earlier ones); its cost is steps x M^2, and real outputs have long suppression chains."""
    weights = suppress.astype(np.float32)
    keep = np.ones(suppress.shape[0], dtype=bool)
    for _ in range(suppress.shape[0] + 1):
        updated = (keep.astype(np.float32) @ weights) == 0
        if np.array_equal(updated, keep):
            break
        keep = updated
    return np.flatnonzero(keep).astype(np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "benchmarks/checkpoints/yolov6s_bccd.safetensors")
    parser.add_argument("--data", type=Path, default=ROOT / "recipes/data/bccd.yaml")
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    dataset = DetectionDataset(load_data_config(args.data), "val", args.img_size, augment=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(load_model(args.checkpoint), Path(tmp) / "m.onnx", args.img_size, dynamic_batch=True)
        runner = get_backend("ort").open(path, RunnerOptions())
        outputs, forward_s = [], 0.0
        for start in range(0, len(dataset), args.batch_size):
            images = torch.stack([dataset[i][0] for i in range(start, min(start + args.batch_size, len(dataset)))])
            tic = time.perf_counter()
            boxes, scores = runner(images)
            forward_s += time.perf_counter() - tic
            outputs.append((torch.from_numpy(boxes), torch.from_numpy(scores)))
    seconds, detections = {}, {}
    for name, greedy in (("loop", nms_module._greedy), ("vectorised", fixpoint_greedy)):
        original = nms_module._greedy
        nms_module._greedy = greedy  # type: ignore[assignment]
        try:
            tic = time.perf_counter()
            detections[name] = [d for b, s in outputs for d in postprocess(b, s, 0.03, 0.65, 300)]
            seconds[name] = time.perf_counter() - tic
        finally:
            nms_module._greedy = original  # type: ignore[assignment]
    same = all(torch.equal(a, b) for a, b in zip(detections["loop"], detections["vectorised"], strict=True))
    doc = {"checkpoint": str(args.checkpoint), "img_size": args.img_size, "images": len(dataset),
           "forward_s": round(forward_s, 3), "postprocess_s": {k: round(v, 3) for k, v in seconds.items()},
           "identical_detections": same, "environment": environment_info()}
    name = f"{args.checkpoint.stem}_{args.img_size}"
    out = ROOT / "benchmarks" / "results" / f"bench_eval_speed_{name}.json"
    atomic_write_text(out, json.dumps(doc, indent=2) + "\n")
    print(f"| {len(dataset)} images | seconds | share of forward + post-process |\n|---|---:|---:|")
    for label, value in (("forward (ONNX Runtime)", forward_s), ("post-process, repquant's NMS", seconds["loop"]),
                         ("post-process, vectorised fixpoint NMS", seconds["vectorised"])):
        total = forward_s + (value if "post" in label else seconds["loop"])
        print(f"| {label} | {value:.2f} | {value / total:.0%} |")
    print(f"identical detections: {same}\nwrote {out}")


if __name__ == "__main__":
    main()
