"""``repquant act-stats``: per-layer weight and activation ranges (max, 99.99th percentile, kurtosis) and the
INT8 weight SNR of the deployed model, on the first images of a split (letterboxed, no augmentation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from repquant.data import DetectionDataset, load_data_config
from repquant.deploy.resolve import open_model
from repquant.outputs import check_run_folder
from repquant.quant.act_stats import activation_stats, write_stats
from repquant.tasks.config import ActStatsConfig

__all__ = ["ActStatsConfig", "ActStatsResult", "run"]


@dataclass(frozen=True)
class ActStatsResult:
    json_path: Path
    md_path: Path


def run(cfg: ActStatsConfig) -> ActStatsResult:
    """Write ``act_stats.json`` and ``act_stats.md`` under ``cfg.output_dir``."""
    check_run_folder(cfg.output_dir, ["act_stats.json"], cfg.exist_ok)
    data = load_data_config(cfg.data)
    model = open_model(cfg.model).deployed_model(num_classes=data.nc)
    dataset = DetectionDataset(data, cfg.split, img_size=cfg.img_size, augment=False)
    subset = Subset(dataset, range(min(cfg.num_images, len(dataset))))
    loader = DataLoader(subset, batch_size=8, shuffle=False, collate_fn=dataset.collate_fn)
    stats = activation_stats(model, loader)
    out = Path(cfg.output_dir)
    json_path, md_path = out / "act_stats.json", out / "act_stats.md"
    write_stats(json_path, md_path, stats)
    return ActStatsResult(json_path, md_path)
