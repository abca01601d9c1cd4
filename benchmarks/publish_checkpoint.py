"""Publish a trained run as a committed checkpoint: fp16 safetensors whose metadata holds the mAP that
`repquant eval` reproduces from it (measured AFTER the fp16 round trip), the eval settings and the recipe.

    python benchmarks/publish_checkpoint.py runs/train/yolov6n_bccd_320/weights/best.safetensors \
        --data recipes/data/bccd.yaml --img-size 320 --output benchmarks/checkpoints/yolov6n_bccd.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import torch
import yaml

from repquant.checkpoint import load_checkpoint, load_model, save_checkpoint
from repquant.io import atomic_write_text
from repquant.tasks import evaluate
from repquant.tasks.config import EvalConfig


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def publish(run_checkpoint: Path, data_yaml: Path, img_size: int, output: Path) -> dict:
    _, run_meta = load_checkpoint(run_checkpoint)
    model = load_model(run_checkpoint)
    recipe = dict(run_meta.get("recipe", {}))
    if "data" in recipe:  # the run recorded an absolute path; relative to the recipe file, as recipes are
        recipe["data"] = os.path.relpath(Path(recipe["data"]).resolve(), output.resolve().parent)
    metadata = {
        "img_size": img_size,
        "data": str(data_yaml),
        "split": "val",
        "eval": {"conf_thres": 0.03, "iou_thres": 0.65, "max_det": 300, "batch_size": 8},
        "trained_epochs": run_meta.get("epochs"),
        "best_epoch": run_meta.get("epoch"),
        "train_map50_95_fp32": run_meta.get("map50_95"),
        "recipe": recipe,
        "git_commit": _git_commit(),
    }
    save_checkpoint(output, model, extra_metadata=metadata, dtype=torch.float16)
    result = evaluate.run(EvalConfig(str(output), data_yaml, img_size=img_size), progress=False).result
    metadata.update(map50_95=result.map50_95, map50=result.map50)
    save_checkpoint(output, model, extra_metadata=metadata, dtype=torch.float16)
    atomic_write_text(output.with_suffix(".recipe.yaml"), yaml.safe_dump(recipe, sort_keys=False))
    return metadata


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--img-size", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    meta = publish(args.run_checkpoint, args.data, args.img_size, args.output)
    print(json.dumps({k: meta[k] for k in ("map50_95", "map50", "img_size", "trained_epochs", "best_epoch")}))


if __name__ == "__main__":
    main()
