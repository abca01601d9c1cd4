"""``repquant demo``, the README's main job: ``repquant quantize`` of the committed YOLOv6-N BCCD checkpoint on
the embedded BCCD sample (real data shipped in ``recipes/data/bccd_sample``, so it runs on a fresh machine);
with ``train``: train -> evaluate -> export ONNX -> evaluate through ONNX Runtime, on generated synthetic data
unless a dataset is given.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from repquant.checkpoint import load_model
from repquant.data import make_synthetic_dataset
from repquant.deploy.onnx_export import export_onnx
from repquant.errors import RepquantError
from repquant.io import atomic_write_text
from repquant.tasks import evaluate, quantize
from repquant.tasks.config import DemoConfig, EvalConfig
from repquant.tasks.quant_config import QuantizeConfig
from repquant.tasks.quantize import QuantizeResult
from repquant.train.config import TrainConfig
from repquant.train.fit import train

LOGGER = logging.getLogger(__name__)
TRAIN_MODEL, TRAIN_IMG_SIZE = "yolov6n", 160


@dataclass(frozen=True)
class DemoResult:
    """Paths and metrics of one demo run (mAP on the validation split)."""

    data: str
    checkpoint: str
    onnx: str
    img_size: int
    epochs: int
    train_wall_time_s: float
    train_images_per_s: float
    torch_map50_95: float
    torch_map50: float
    onnx_map50_95: float
    onnx_map50: float
    summary: str = ""


PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = PROJECT_ROOT / "benchmarks" / "checkpoints" / "yolov6n_bccd.safetensors"
DEMO_DATA = PROJECT_ROOT / "recipes" / "data" / "bccd_sample.yaml"
# Sized so that the demo finishes in under 3 minutes on 2 CPU cores (benchmarks/bench_demo.py measures it):
# every sample train image calibrates, the isolated sensitivity mode runs on 16 of them.
DEMO_CALIB_IMAGES, DEMO_ISOLATED_IMAGES = 64, 16


def run(cfg: DemoConfig) -> QuantizeResult | DemoResult:
    """``repquant quantize`` with the demo defaults, or with ``cfg.train`` the training demo."""
    return train_demo(cfg) if cfg.train else quantize_demo(cfg)


def quantize_demo(cfg: DemoConfig) -> QuantizeResult:
    """``repquant quantize`` of ``cfg.model`` (default ``DEMO_MODEL``) on ``cfg.data`` (default ``DEMO_DATA``)."""
    for given, fallback in ((cfg.model, DEMO_MODEL), (cfg.data, DEMO_DATA)):
        if given is None and not fallback.is_file():
            raise RepquantError(f"{fallback}: the demo's default input is missing (it ships with the source "
                                "checkout: `pip install -e .` from a clone); pass --model and --data")
    config = QuantizeConfig(model=str(cfg.model or DEMO_MODEL), data=Path(cfg.data or DEMO_DATA),
                            output=Path(cfg.output_dir), max_ap_drop=cfg.max_ap_drop, img_size=cfg.img_size,
                            seed=cfg.seed, calib_images=DEMO_CALIB_IMAGES, isolated_images=DEMO_ISOLATED_IMAGES)
    return quantize.run(config)


def train_demo(cfg: DemoConfig) -> DemoResult:
    """Train ``cfg.model`` on ``cfg.data`` (or a generated synthetic set), evaluate, export and re-evaluate.

    Writes ``output_dir/{data,train,model.onnx,demo.json}``. Raises :class:`RepquantError` if
    ``output_dir/train`` already holds a run (pick another ``output_dir``). ``synthetic_images`` is
    the (train, val) image count of the generated dataset.
    """
    out = Path(cfg.output_dir)
    img_size, model = cfg.img_size or TRAIN_IMG_SIZE, cfg.model or TRAIN_MODEL
    data_yaml = cfg.data
    if data_yaml is None:
        data_yaml = make_synthetic_dataset(out / "data", *cfg.synthetic_images,
                                           img_size=(img_size, img_size), num_classes=3, seed=cfg.seed)
        LOGGER.info("no --data given: generated a seeded synthetic dataset at %s", data_yaml)
    config = TrainConfig(
        model=model, data=Path(data_yaml).resolve(), img_size=img_size, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr0=0.02, min_warmup_iters=50, warmup_epochs=2.0,
        close_mosaic_epochs=max(cfg.epochs // 5, 1), eval_interval=max(cfg.epochs // 3, 1), seed=cfg.seed,
        workers=cfg.workers, output_dir=out / "train",
    )
    trained = train(config)
    onnx_path = export_onnx(_best_model(trained.best_checkpoint), out / "model.onnx", img_size=img_size,
                            dynamic_batch=True)
    torch_eval = evaluate.run(EvalConfig(str(trained.best_checkpoint), Path(data_yaml), img_size=img_size),
                              progress=False).result
    onnx_eval = evaluate.run(EvalConfig(str(onnx_path), Path(data_yaml), img_size=img_size),
                             progress=False).result
    result = DemoResult(
        data=str(data_yaml), checkpoint=str(trained.best_checkpoint), onnx=str(onnx_path), img_size=img_size,
        epochs=cfg.epochs, train_wall_time_s=round(trained.wall_time_s, 1),
        train_images_per_s=round(trained.images_per_s, 2),
        torch_map50_95=torch_eval.map50_95, torch_map50=torch_eval.map50,
        onnx_map50_95=onnx_eval.map50_95, onnx_map50=onnx_eval.map50, summary=str(out / "demo.json"),
    )
    atomic_write_text(out / "demo.json", json.dumps(asdict(result), indent=2) + "\n")
    return result


def _best_model(checkpoint: Path) -> Any:
    if not checkpoint.is_file():
        raise RepquantError(f"{checkpoint}: training wrote no best checkpoint")
    return load_model(checkpoint)
