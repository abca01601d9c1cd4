"""``repquant bench``: latency and throughput of one model on one backend, as a validated JSON report.

``model`` is any model spec: a checkpoint or registry name runs deployed in torch, or is exported to a
temporary ONNX for ONNX engines; an ONNX file runs as it is (int8 needs a Q/DQ file); an engine file runs
on TensorRT. See ``repquant.deploy.timing`` for the methodology.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from repquant.deploy.backends import RunnerOptions
from repquant.deploy.report import BenchReport, BenchResult
from repquant.deploy.resolve import ModelHandle, open_model, open_runner
from repquant.deploy.timing import TimingPlan, environment_info, reparam_speedup, time_runner
from repquant.errors import RepquantError
from repquant.io import atomic_write_text
from repquant.modelfile import ModelKind
from repquant.outputs import check_output_file
from repquant.reparam import is_deployed
from repquant.tasks.config import BenchConfig

__all__ = ["BenchConfig", "run"]


def _plan(cfg: BenchConfig) -> TimingPlan:
    return TimingPlan(tuple(cfg.batch_sizes), cfg.warmup, cfg.iters, cfg.min_seconds)


def _options(cfg: BenchConfig) -> RunnerOptions:
    return RunnerOptions(precision=cfg.precision, threads=cfg.threads, img_size=cfg.img_size,
                         cuda_graphs=cfg.cuda_graphs, hint=cfg.hint)


def _train_form_results(cfg: BenchConfig, handle: ModelHandle) -> list[BenchResult]:
    """Torch latency of the train-form model and of its re-parameterized copy, interleaved per batch size so
    that drift hits both alike (variants ``train-form`` and ``deployed``)."""
    if cfg.backend != "torch":
        raise RepquantError("bench: --compare-train-form times torch models; use --backend torch")
    model = handle.float_model()
    if is_deployed(model):
        raise RepquantError(f"{cfg.model}: model is already deployed; pass the train-form model")
    engine = open_runner(handle, "torch", _options(cfg), deployed=False)
    deployed = open_runner(handle, "torch", _options(cfg))
    results: list[BenchResult] = []
    for batch in cfg.batch_sizes:
        plan = TimingPlan((batch,), cfg.warmup, cfg.iters, cfg.min_seconds)
        results += time_runner(engine, plan, "train-form") + time_runner(deployed, plan, "deployed")
    return results


def run(cfg: BenchConfig) -> BenchReport:
    """Measure ``cfg.model`` on ``cfg.backend``; write the JSON/Markdown reports when asked."""
    for output in (cfg.output_json, cfg.output_md):
        if output is not None:
            check_output_file(output, [cfg.model], cfg.overwrite)
    handle = open_model(cfg.model)
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    notes: dict[str, object] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="repquant-bench-") as tmp:
            if cfg.compare_train_form:
                results = _train_form_results(cfg, handle)
                notes["reparam_speedup"] = reparam_speedup(results)
            else:
                runner = open_runner(handle, cfg.backend, _options(cfg), work_dir=Path(tmp))
                # A given file is named by its file name; a model exported on the fly is "deployed".
                is_file = handle.kind in (ModelKind.ONNX, ModelKind.ENGINE) and handle.path is not None
                variant = handle.path.name if is_file else "deployed"  # type: ignore[union-attr]
                results = time_runner(runner, _plan(cfg), variant)
                if hasattr(runner, "config"):  # OpenVINO: hint and inference precision, never implicit
                    notes["engine_config"] = dict(runner.config)
        environment = environment_info()  # while the requested thread count is still set
    finally:
        torch.set_num_threads(old_threads)
    hw = results[0].img_size
    report = BenchReport(model=str(cfg.model), img_size=hw, methodology=_plan(cfg).methodology,
                         environment=environment, results=results, notes=notes)
    if cfg.output_json is not None:
        report.write_json(cfg.output_json)
    if cfg.output_md is not None:
        atomic_write_text(cfg.output_md, report.to_markdown())
    return report
