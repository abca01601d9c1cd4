"""``repquant quantize``: the whole INT8 chain in one command, resumable, with a report.

Stages (each cached in ``output/stages`` keyed by its inputs, see ``repquant.tasks.stages``):

1. ``fp32``: the deployed model exported to ONNX and evaluated in ONNX Runtime on the val split (the reference
   every INT8 file is held to, in the same engine);
2. ``calibration``: every quantizer of the chosen layout calibrated once on the seeded train subset (amax kept
   per quantizer, before shared-scale unification, so that any keep-float set reproduces ``repquant ptq``);
3. ``sensitivity``: per-layer sensitivity in the ranking mode -> the keep-float order;
4. ``ptq_k<K>``: K = 0, 1, ... keep-float layers exported as QDQ ONNX and evaluated in ONNX Runtime, until
   the mAP@.5:.95 drop is within ``max_ap_drop`` (or ``max_keep_float`` is reached);
5. ``qat``: partial QAT with channel-wise distillation when PTQ misses the budget (or ``qat always``);
6. ``speed``: FP32 and the final INT8 file in ONNX Runtime: batch-1 latency, batch 8/32 throughput.

Then ``summary.json`` (``repquant.tasks.quantize_report.SUMMARY_SCHEMA``), ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repquant.deploy.backends import Runner, RunnerOptions
from repquant.deploy.onnx_export import export_onnx
from repquant.deploy.qdq import QDQExport, export_quantized_checkpoint, export_quantized_onnx, qdq_parity
from repquant.deploy.report import BenchResult
from repquant.deploy.resolve import open_model, open_runner
from repquant.deploy.timing import TimingPlan, compare_runners, environment_info
from repquant.errors import RepquantError
from repquant.io import atomic_write_bytes, read_safetensors, write_safetensors
from repquant.models import YOLOv6
from repquant.outputs import check_run_folder
from repquant.provenance import model_identity
from repquant.quant.calibrate import calibrate, insert_quantizers, restore_amax, unify_shared_scales
from repquant.quant.config import ORT_PLACEMENT, QuantConfig, quant_info
from repquant.quant.placement import QuantPlacement, find_placement
from repquant.quant.report import result_to_dict, write_json
from repquant.quant.sensitivity import layer_sensitivity
from repquant.quant.sensitivity_progress import SweepProgress
from repquant.tasks import evaluate, qat
from repquant.tasks.config import EvalConfig, QATConfig, QuantizeConfig
from repquant.tasks.inputs import QuantInputs, load_quant_inputs, quant_config_of
from repquant.tasks.quant_config import ENGINE_NAMES
from repquant.tasks.quantize_report import write_reports, write_run_log
from repquant.tasks.stages import StageCache, file_sha256, stage_key

__all__ = ["QuantizeConfig", "QuantizeResult", "run"]

logger = logging.getLogger("repquant.quantize")
PARITY_BATCHES = 2
FINAL_ONNX = "int8.onnx"
QDQ_FORMAT = 3  # in the keys of stages that write QDQ files: 2 = INT8 weight initializers, 3 = ORT placement 2
SPEED_METHOD = "interleaved, 3 rounds, iters split"  # in the speed stage's key: a new method measures again


@dataclass
class QuantizeResult:
    """The run's folder, its summary (the ``summary.json`` document), the report files and each stage's time
    and whether it was reused (also in ``run_log.json``: kept out of the summary, which is the same on a rerun)."""

    output: Path
    summary: dict[str, Any]
    paths: dict[str, Path]
    stages: dict[str, Any]


@dataclass
class _Run:
    cfg: QuantizeConfig
    out: Path
    inputs: QuantInputs
    placement: QuantPlacement
    identity: dict[str, Any]
    cache: StageCache


    def rel(self, path: Path) -> str:
        """``path`` relative to the output folder: stage records and the summary stay valid when the folder is
        moved or the command is run from another directory."""
        return Path(path).resolve().relative_to(self.out.resolve()).as_posix()


def _check_folder(cfg: QuantizeConfig) -> Path:
    """A new folder, an earlier quantize run (resumed stage by stage), or with ``exist_ok`` anything."""
    out = Path(cfg.output)
    # Resuming is the point of the folder: only the inputs-among-artefacts check applies here.
    check_run_folder(out, ("fp32.onnx", FINAL_ONNX, "sensitivity.json", "summary.json"), exist_ok=True,
                     inputs=[cfg.model, cfg.data])
    foreign = out.is_dir() and any(out.iterdir()) and not (out / "stages").is_dir()
    if foreign and not cfg.exist_ok:
        raise RepquantError(f"{out}: not empty and not a repquant quantize run; pass --exist-ok to write into it "
                            "or choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _start(cfg: QuantizeConfig) -> _Run:
    out = _check_folder(cfg)
    img_size = cfg.img_size or open_model(cfg.model).recorded_img_size() or 640
    cfg = dataclasses.replace(cfg, img_size=img_size)
    inputs = load_quant_inputs(cfg, batch_size=2)
    images = {k: v for k, v in inputs.calibration.items() if k != "data"}  # the data file is keyed by its hash
    identity = {"model_sha256": file_sha256(cfg.model), "data_sha256": file_sha256(cfg.data), "img_size": img_size,
                "calibration": images}
    return _Run(cfg, out, inputs, find_placement(inputs.model), identity, StageCache(out))


def _evaluate(run: _Run, onnx_path: Path) -> dict[str, Any]:
    report = evaluate.run(EvalConfig(str(onnx_path), run.cfg.data, threads=run.cfg.threads,
                                     backend=run.cfg.backend), progress=False)
    r = report.result
    return {"onnx": run.rel(onnx_path), "sha256": file_sha256(onnx_path), "map50_95": r.map50_95, "map50": r.map50,
            "num_images": r.num_images, "per_class_ap50_95": r.per_class_ap50_95}


def _fp32(run: _Run) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        path = export_onnx(run.inputs.model, run.out / "fp32.onnx", run.cfg.img_size or 640, dynamic_batch=True)
        return _evaluate(run, path)

    return run.cache.run("fp32", stage_key(run.identity, "fp32", run.cfg.backend), compute,
                         lambda r: f"FP32 in {ENGINE_NAMES[run.cfg.backend]}: mAP@.5:.95 {r['map50_95']:.4f} on "
                                   f"{r['num_images']} images",
                         lambda r: [r["onnx"]])


def _quant_config(cfg: QuantizeConfig, keep: tuple[str, ...] = ()) -> QuantConfig:
    return quant_config_of(cfg, keep, cfg.layout)


def _calibration(run: _Run) -> dict[str, Any]:
    cfg = run.cfg

    def compute() -> dict[str, Any]:
        qmodel = insert_quantizers(copy.deepcopy(run.inputs.model).eval(), run.placement, _quant_config(cfg))

        def loop(m: torch.nn.Module) -> None:
            for batch in run.inputs.batches:
                m(batch)

        calibrate(qmodel, loop, cfg.calib_method, percentile=cfg.percentile)  # scales unified per keep-float set
        amax = {k: v.detach().clone() for k, v in qmodel.state_dict().items() if k.endswith("._amax")}
        path = run.out / "calibration" / "amax.safetensors"
        write_safetensors(path, amax, {"calibration": json.dumps(run.inputs.calibration)})
        return {"amax": run.rel(path), "sha256": file_sha256(path), "quantizers": len(amax),
                "calibration": run.inputs.calibration}

    key = stage_key(run.identity, cfg.layout, cfg.calib_method, cfg.percentile, ORT_PLACEMENT)
    return run.cache.run("calibration", key, compute,
                         lambda r: f"{r['quantizers']} quantizers calibrated ({cfg.calib_method}) on "
                                   f"{r['calibration'].get('num_images')} train images", lambda r: [r["amax"]])


def _quantized(run: _Run, calibration: dict[str, Any], keep: tuple[str, ...]) -> YOLOv6:
    """The fake-quant model with ``keep`` float: cached amax restored, shared scales unified over the rest."""
    qmodel = insert_quantizers(copy.deepcopy(run.inputs.model).eval(), run.placement, _quant_config(run.cfg, keep))
    state, _ = read_safetensors(run.out / calibration["amax"])
    restore_amax(qmodel, state)
    unify_shared_scales(qmodel, run.placement.shared_groups)
    return qmodel.eval()


def _sensitivity(run: _Run, calibration: dict[str, Any]) -> dict[str, Any]:
    cfg = run.cfg

    def compute() -> dict[str, Any]:
        calibrated = (_quantized(run, calibration, ()), run.placement)
        progress_file = run.out / "stages" / "sensitivity.progress.json"  # a killed sweep resumes from it
        progress_file.parent.mkdir(parents=True, exist_ok=True)
        result = layer_sensitivity(run.inputs.model, run.inputs.batches, _quant_config(cfg), (cfg.ranking_mode,),
                                   progress=True, isolated_images=cfg.isolated_images or None, calibrated=calibrated,
                                   resume_file=progress_file)
        identity = model_identity(run.inputs.model, cfg.img_size)
        path = write_json(result_to_dict(result, cfg.model, run.inputs.calibration, identity=identity),
                          run.out / "sensitivity.json")
        SweepProgress(progress_file, "").remove()
        ranking = result.ranking(cfg.ranking_mode, cfg.ranking_metric)
        values = {ly.name: getattr(ly.modes[cfg.ranking_mode], cfg.ranking_metric) for ly in result.layers}
        return {"json": run.rel(path), "ranking": ranking, "values": values, "mode": cfg.ranking_mode,
                "metric": cfg.ranking_metric}

    key = stage_key(run.identity, calibration["sha256"], cfg.ranking_mode,
                    cfg.ranking_metric, cfg.isolated_images)
    return run.cache.run("sensitivity", key, compute,
                         lambda r: f"{len(r['ranking'])} layers ranked by {r['mode']}/{r['metric']}, most sensitive "
                                   f"{r['ranking'][0]}", lambda r: [r["json"]])


def _ptq_k(run: _Run, calibration: dict[str, Any], ranking: list[str], k: int, fp32: dict[str, Any]) -> dict[str, Any]:
    cfg, keep = run.cfg, tuple(ranking[:k])

    def compute() -> dict[str, Any]:
        qmodel = _quantized(run, calibration, keep)
        info = quant_info(_quant_config(cfg, keep), cfg.layout, calib_seed=cfg.seed,
                          ranking=f"{cfg.ranking_mode}/{cfg.ranking_metric}" if keep else None)
        path = export_quantized_onnx(qmodel, run.out / "ptq" / f"int8_k{k}.onnx",
                                     QDQExport(cfg.img_size or 640, info, uint8_activations=cfg.layout == "ort"))
        parity = qdq_parity(qmodel, path, torch.cat(run.inputs.batches[:PARITY_BATCHES]))
        row = _evaluate(run, path)
        return {**row, "keep_float": k, "keep_float_layers": list(keep), "drop": fp32["map50_95"] - row["map50_95"],
                "parity_snr_db": parity.snr_db, "parity_floor_db": parity.floor_db, "source": "ptq"}

    key = stage_key(run.identity, calibration["sha256"], keep, cfg.layout, fp32["sha256"], cfg.backend, QDQ_FORMAT)
    return run.cache.run(f"ptq_k{k}", key, compute,
                         lambda r: f"K={k} float: INT8 mAP@.5:.95 {r['map50_95']:.4f}, drop {r['drop']:+.4f}",
                         lambda r: [r["onnx"]])


def _ptq_search(run: _Run, calibration: dict[str, Any], ranking: list[str], fp32: dict[str, Any]) -> list[dict]:
    rows = []
    for k in range(min(run.cfg.max_keep_float, len(ranking)) + 1):
        rows.append(_ptq_k(run, calibration, ranking, k, fp32))
        if rows[-1]["drop"] <= run.cfg.max_ap_drop:
            break
    return rows


def _qat(run: _Run, sensitivity: dict[str, Any], keep_float: int, fp32: dict[str, Any]) -> dict[str, Any]:
    cfg = run.cfg
    folder = run.out / "qat"
    qcfg = QATConfig(model=cfg.model, data=cfg.data, output=folder / "qat.safetensors", keep_float=keep_float,
                     sensitivity_json=run.out / sensitivity["json"], ranking_mode=cfg.ranking_mode,
                     ranking_metric=cfg.ranking_metric, cw_distill=True, epochs=cfg.qat_epochs, lr=cfg.qat_lr,
                     batch_size=cfg.qat_batch_size, img_size=cfg.img_size or 640, calib_images=cfg.calib_images,
                     calib_method=cfg.calib_method, percentile=cfg.percentile, layout=cfg.layout, seed=cfg.seed)

    key = stage_key(run.identity, sensitivity["ranking"], keep_float, cfg.qat_epochs, cfg.qat_lr, cfg.qat_batch_size,
                    cfg.layout, fp32["sha256"], cfg.backend, QDQ_FORMAT)

    def compute() -> dict[str, Any]:
        # An interrupted QAT run resumes from its state file, but only a run of the same settings.
        marker = folder / "stage_key.txt"
        if folder.exists() and (not marker.is_file() or marker.read_text() != key):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
        result = qat.run(qcfg, resume=qcfg.state_path.is_file(), progress=True)
        path = export_quantized_checkpoint(qcfg.output, folder / "int8_qat.onnx", cfg.img_size or 640)
        row = _evaluate(run, path)
        return {**row, "keep_float": keep_float, "keep_float_layers": list(result.keep_float_layers),
                "drop": fp32["map50_95"] - row["map50_95"], "source": "qat", "epochs": cfg.qat_epochs,
                "checkpoint": run.rel(qcfg.output)}
    return run.cache.run("qat", key, compute,
                         lambda r: f"partial QAT + CWD ({r['epochs']} epochs, K={r['keep_float']}): INT8 mAP@.5:.95 "
                                   f"{r['map50_95']:.4f}, drop {r['drop']:+.4f}", lambda r: [r["onnx"]])


def choose_final(candidates: list[dict[str, Any]], max_ap_drop: float) -> dict[str, Any]:
    """Among files within the budget the one with the fewest float layers (then the best mAP); if none is
    within it, the most accurate."""
    within = [c for c in candidates if c["drop"] <= max_ap_drop]
    if within:
        return min(within, key=lambda c: (c["keep_float"], -c["map50_95"]))
    return max(candidates, key=lambda c: c["map50_95"])


def _speed(run: _Run, fp32: dict[str, Any], int8: dict[str, Any], tried: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = run.cfg

    def runner(onnx: str, precision: str) -> Runner:
        options = RunnerOptions(precision=precision, threads=cfg.threads, img_size=cfg.img_size)
        return open_runner(open_model(str(run.out / onnx)), cfg.backend, options)

    def times(results: list[BenchResult]) -> dict[str, Any]:
        return {f"bs{r.batch_size}": {"latency_ms": r.latency_ms.median, "img_s": r.throughput_img_s}
                for r in results}

    def compute() -> dict[str, Any]:
        plan = TimingPlan(tuple(cfg.batch_sizes), cfg.bench_warmup, cfg.bench_iters, cfg.bench_min_seconds)
        main = compare_runners({"fp32": runner(fp32["onnx"], "fp32"), "int8": runner(int8["onnx"], "int8")}, plan)
        result: dict[str, Any] = {"backend": cfg.backend, "fp32": times(main["fp32"]), "int8": times(main["int8"])}
        result["speedup"] = {b: result["int8"][b]["img_s"] / result["fp32"][b]["img_s"] for b in result["fp32"]}
        # Batch-1 latency of every file tried, side by side, for the accuracy-vs-latency plot.
        others = {c["onnx"]: runner(c["onnx"], "int8") for c in tried}
        bs1 = compare_runners(others, dataclasses.replace(plan, batch_sizes=(1,)))
        result["tried_bs1_latency_ms"] = {name: rows[0].latency_ms.median for name, rows in bs1.items()}
        result["environment"] = environment_info()
        return result

    key = stage_key(SPEED_METHOD, fp32["sha256"], int8["sha256"], [c["sha256"] for c in tried], cfg.batch_sizes,
                    cfg.bench_warmup, cfg.bench_iters, cfg.bench_min_seconds, cfg.threads, cfg.backend)
    return run.cache.run("speed", key, compute, lambda r: "INT8 vs FP32 throughput " + ", ".join(
        f"{b} {s:.2f}x" for b, s in r["speedup"].items()))


def _final_file(run: _Run, chosen: dict[str, Any]) -> dict[str, Any]:
    """The chosen INT8 file copied to ``output/int8.onnx`` (the same bytes that were evaluated)."""
    target = run.out / FINAL_ONNX
    if not target.is_file() or file_sha256(target) != chosen["sha256"]:
        atomic_write_bytes(target, (run.out / chosen["onnx"]).read_bytes())
    return {**chosen, "evaluated_onnx": chosen["onnx"], "onnx": FINAL_ONNX,
            "meets_budget": chosen["drop"] <= run.cfg.max_ap_drop}


def _needs_qat(cfg: QuantizeConfig, ptq_best: dict[str, Any]) -> bool:
    return cfg.qat == "always" or (cfg.qat == "auto" and ptq_best["drop"] > cfg.max_ap_drop)


def run(cfg: QuantizeConfig) -> QuantizeResult:
    """The whole chain for ``cfg.model`` on ``cfg.data`` into ``cfg.output`` (see the module docstring)."""
    start = time.perf_counter()
    state = _start(cfg)
    fp32 = _fp32(state)
    calibration = _calibration(state)
    sensitivity = _sensitivity(state, calibration)
    candidates = _ptq_search(state, calibration, sensitivity["ranking"], fp32)
    ptq_best = choose_final(candidates, state.cfg.max_ap_drop)
    tried = list(candidates)
    if _needs_qat(state.cfg, ptq_best):
        # Within budget (qat always): QAT at the chosen K; otherwise at the largest K tried.
        within = ptq_best["drop"] <= state.cfg.max_ap_drop
        tried.append(_qat(state, sensitivity, ptq_best["keep_float"] if within else candidates[-1]["keep_float"],
                          fp32))
    else:
        logger.info("qat: skipped (%s)", "qat never" if state.cfg.qat == "never" else "PTQ meets the budget")
    final = _final_file(state, choose_final(tried, state.cfg.max_ap_drop))
    speed = _speed(state, fp32, final, tried)
    parts = {"fp32": fp32, "calibration": calibration, "sensitivity": sensitivity, "tried": tried, "int8": final,
             "speed": speed}
    summary, paths = write_reports(state.cfg, state.out, state.identity, parts)
    write_run_log(state.out, state.cache.log, time.perf_counter() - start)
    return QuantizeResult(state.out, summary, paths, state.cache.log.to_dict())
