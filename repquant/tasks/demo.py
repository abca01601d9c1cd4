"""``repquant demo``, the README's main job: train -> evaluate -> export ONNX -> evaluate through ONNX Runtime.

With no dataset given it generates a seeded synthetic one, so it runs on a fresh machine with no data.
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
from repquant.tasks import evaluate
from repquant.tasks.config import DemoConfig, EvalConfig
from repquant.train.config import TrainConfig
from repquant.train.fit import train

LOGGER = logging.getLogger(__name__)


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


def run(cfg: DemoConfig) -> DemoResult:
    """Train ``cfg.model`` on ``cfg.data`` (or a generated synthetic set), evaluate, export and re-evaluate.

    Writes ``output_dir/{data,train,model.onnx,demo.json}``. Raises :class:`RepquantError` if
    ``output_dir/train`` already holds a run (pick another ``output_dir``). ``synthetic_images`` is
    the (train, val) image count of the generated dataset.
    """
    out = Path(cfg.output_dir)
    data_yaml = cfg.data
    if data_yaml is None:
        data_yaml = make_synthetic_dataset(out / "data", *cfg.synthetic_images,
                                           img_size=(cfg.img_size, cfg.img_size), num_classes=3, seed=cfg.seed)
        LOGGER.info("no --data given: generated a seeded synthetic dataset at %s", data_yaml)
    config = TrainConfig(
        model=cfg.model, data=Path(data_yaml).resolve(), img_size=cfg.img_size, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr0=0.02, min_warmup_iters=50, warmup_epochs=2.0,
        close_mosaic_epochs=max(cfg.epochs // 5, 1), eval_interval=max(cfg.epochs // 3, 1), seed=cfg.seed,
        workers=cfg.workers, output_dir=out / "train",
    )
    trained = train(config)
    onnx_path = export_onnx(_best_model(trained.best_checkpoint), out / "model.onnx", img_size=cfg.img_size,
                            dynamic_batch=True)
    torch_eval = evaluate.run(EvalConfig(str(trained.best_checkpoint), Path(data_yaml), img_size=cfg.img_size),
                              progress=False).result
    onnx_eval = evaluate.run(EvalConfig(str(onnx_path), Path(data_yaml), img_size=cfg.img_size),
                             progress=False).result
    result = DemoResult(
        data=str(data_yaml), checkpoint=str(trained.best_checkpoint), onnx=str(onnx_path), img_size=cfg.img_size,
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
