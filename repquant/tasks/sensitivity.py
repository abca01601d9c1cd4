"""``repquant sensitivity``: per-layer INT8 sensitivity of a model, written as JSON / CSV / Markdown / PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repquant.data import DetectionDataset
from repquant.errors import CalibrationError
from repquant.outputs import check_run_folder
from repquant.provenance import model_identity
from repquant.quant.ranking import map_check
from repquant.quant.report import (
    format_map_check,
    format_top_k,
    result_to_dict,
    write_csv,
    write_json,
    write_markdown,
    write_png,
)
from repquant.quant.sensitivity import SensitivityResult, layer_sensitivity, quantized_copy
from repquant.quant.sensitivity_progress import SweepProgress
from repquant.tasks.config import SensitivityConfig
from repquant.tasks.inputs import load_quant_inputs, quant_config_of
from repquant.vocab import MODES

PROGRESS_FILE = "sensitivity.progress.json"

__all__ = ["SensitivityConfig", "SensitivityReport", "run"]


@dataclass(frozen=True)
class SensitivityReport:
    """The measurement, the files written (by kind: json, csv, md, png_<metric>) and the mAP check."""

    config: SensitivityConfig
    result: SensitivityResult
    paths: dict[str, Path]
    map_check: dict[str, Any] | None

    def summary(self) -> str:
        """The console text: each metric's top layers, the mAP check, the wall time."""
        cfg, result = self.config, self.result
        parts = [format_top_k(result, cfg.mode, metric, cfg.top_k) for metric in cfg.metrics]
        if self.map_check is not None:
            parts.append(format_map_check(self.map_check))
        parts.append(f"SNR in dB, pooled over all {result.num_images} images; wall time {result.wall_time_s:.1f} s")
        return "\n".join(parts)


def run(cfg: SensitivityConfig, progress: bool = True, resume: bool = False) -> SensitivityReport:
    """Load the deployed model, calibrate on the seeded train subset, measure every mode, write the reports
    under ``cfg.output_dir`` (``sensitivity.{json,csv,md}``, one ``sensitivity_<metric>.png`` per metric).

    The sweep writes ``sensitivity.progress.json`` after every batch; ``resume`` continues an interrupted
    sweep from it (without, an interrupted sweep in the folder is refused rather than silently restarted)."""
    out = Path(cfg.output_dir)
    progress_file = out / PROGRESS_FILE
    check_run_folder(out, ["sensitivity.json"], cfg.exist_ok, resume)
    if resume and not progress_file.is_file():
        raise CalibrationError(f"{progress_file}: no interrupted sensitivity sweep to resume")
    if progress_file.is_file() and not resume and not cfg.exist_ok:
        raise CalibrationError(f"{out}: holds an interrupted sensitivity sweep; pass --resume to continue it or "
                               "--exist-ok to start over")
    if not resume:
        SweepProgress(progress_file, "").remove()
    inputs = load_quant_inputs(cfg, cfg.batch_size)
    qconfig = quant_config_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    result = layer_sensitivity(inputs.model, inputs.batches, qconfig, MODES, progress=progress,
                               isolated_images=cfg.isolated_images or None, resume_file=progress_file)
    check = None
    if cfg.map_check_top_k > 0:
        checked = list(dict.fromkeys(n for m in cfg.metrics for n in result.ranking(cfg.mode, m)[:cfg.map_check_top_k]))
        qmodel, placement = quantized_copy(inputs.model, inputs.batches, qconfig)
        val = DetectionDataset(inputs.data, "val", cfg.img_size, augment=False)
        check = map_check(inputs.model, qmodel, placement, val, result, checked, progress=progress)
    doc = result_to_dict(result, cfg.model, inputs.calibration, check, model_identity(inputs.model, cfg.img_size))
    paths = {
        "json": write_json(doc, out / "sensitivity.json"),
        "csv": write_csv(result, out / "sensitivity.csv"),
        "md": write_markdown(result, out / "sensitivity.md", cfg.mode, cfg.metrics, cfg.model, check),
    }
    for metric in cfg.metrics:
        paths[f"png_{metric}"] = write_png(result, out / f"sensitivity_{metric}.png", cfg.mode, metric)
    SweepProgress(progress_file, "").remove()  # every result is written: nothing left to resume
    return SensitivityReport(cfg, result, paths, check)
