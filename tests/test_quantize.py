"""``repquant quantize`` end to end on real data (the committed YOLOv6-N BCCD checkpoint, the embedded BCCD
sample, small images): summary.json against its schema, the INT8 file it names is the one evaluated, a rerun
reuses every stage and writes the same summary, the QAT branch, the report is self-contained."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from repquant.cli import cli
from repquant.errors import RepquantError
from repquant.tasks import evaluate, quantize
from repquant.tasks.config import EvalConfig
from repquant.tasks.quant_config import QuantizeConfig
from repquant.tasks.quantize_report import validate_summary
from repquant.tasks.stages import StageCache, file_sha256

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "benchmarks" / "checkpoints" / "yolov6n_bccd.safetensors"
SAMPLE = ROOT / "recipes" / "data" / "bccd_sample.yaml"


def _tiny(output: Path, **changes: object) -> QuantizeConfig:
    cfg = QuantizeConfig(model=str(MODEL), data=SAMPLE, output=output, img_size=128, calib_images=8,
                         isolated_images=4, max_keep_float=2, batch_sizes=(1, 2), bench_warmup=0, bench_iters=1,
                         bench_min_seconds=0.0, qat="never")
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> quantize.QuantizeResult:
    return quantize.run(_tiny(tmp_path_factory.mktemp("quantize") / "run"))


def test_summary_matches_its_schema_and_names_the_evaluated_int8_file(first_run: quantize.QuantizeResult) -> None:
    summary = json.loads((first_run.output / "summary.json").read_text())
    validate_summary(summary)
    int8 = summary["int8"]
    named = first_run.output / int8["onnx"]
    assert file_sha256(named) == int8["sha256"] == file_sha256(first_run.output / int8["evaluated_onnx"])
    # Evaluating the named file again gives the recorded numbers exactly: it is the file that was evaluated.
    again = evaluate.run(EvalConfig(str(named), SAMPLE), progress=False).result
    assert again.map50_95 == int8["map50_95"] and again.map50 == int8["map50"]
    assert int8["num_images"] == 48
    assert summary["tried"][-1]["keep_float"] == int8["keep_float"] or int8["meets_budget"]
    ranking = summary["sensitivity"]["ranking"]
    assert int8["keep_float_layers"] == ranking[:int8["keep_float"]]
    assert set(summary["speed"]["int8"]) == {"bs1", "bs2"}


def test_ptq_search_stops_at_the_first_keep_float_count_within_budget(first_run: quantize.QuantizeResult) -> None:
    tried = first_run.summary["tried"]
    budget = first_run.summary["budget"]["max_ap_drop"]
    assert [t["keep_float"] for t in tried] == list(range(len(tried)))
    assert all(t["drop"] > budget for t in tried[:-1])
    assert tried[-1]["drop"] <= budget or len(tried) == 3  # max_keep_float 2: K = 0, 1, 2


def test_rerun_reuses_every_stage_and_writes_the_same_summary(first_run: quantize.QuantizeResult) -> None:
    before = (first_run.output / "summary.json").read_bytes()
    again = quantize.run(_tiny(first_run.output))
    assert again.stages and all(stage["cached"] for stage in again.stages.values()), again.stages
    assert {"calibration", "sensitivity"} <= set(again.stages)
    assert (first_run.output / "summary.json").read_bytes() == before
    log = json.loads((first_run.output / "run_log.json").read_text())
    assert log["stages"]["sensitivity"]["cached"] is True


def test_reproduce_command_rebuilds_the_same_run(first_run: quantize.QuantizeResult) -> None:
    import shlex

    command = shlex.split(first_run.summary["commands"]["quantize"])
    assert command[:2] == ["repquant", "quantize"]
    out = CliRunner().invoke(cli, ["--log-level", "warning", *command[1:]])
    assert out.exit_code == 0, out.output
    log = json.loads((first_run.output / "run_log.json").read_text())
    assert all(stage["cached"] for stage in log["stages"].values()), log


def test_report_html_is_self_contained(first_run: quantize.QuantizeResult) -> None:
    page = first_run.paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r'src="(?!data:)', page)
    markdown = first_run.paths["markdown"].read_text()
    for needle in ("Files tried", "Per-class AP", "Calibration", "Engine and machine", "repquant quantize --model"):
        assert needle in markdown and needle in page


def test_qat_branch_runs_and_its_file_is_evaluated(tmp_path: Path) -> None:
    result = quantize.run(_tiny(tmp_path / "run", qat="always", qat_epochs=1, qat_batch_size=8, calib_images=4,
                                max_keep_float=0, batch_sizes=(1,)))
    summary = result.summary
    validate_summary(summary)
    qat_rows = [t for t in summary["tried"] if t["source"] == "qat"]
    assert len(qat_rows) == 1 and qat_rows[0]["onnx"] == "qat/int8_qat.onnx"
    assert (tmp_path / "run" / "qat" / "qat.safetensors").is_file()
    assert file_sha256(result.output / summary["int8"]["onnx"]) == summary["int8"]["sha256"]


def test_changed_settings_rerun_only_what_depends_on_them(first_run: quantize.QuantizeResult,
                                                         tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(first_run.output, out)  # a moved folder keeps working: its records use relative paths
    result = quantize.run(_tiny(out, bench_iters=2))
    assert all(result.stages[s]["cached"] for s in ("fp32", "calibration", "sensitivity", "ptq_k0"))
    assert result.stages["speed"]["cached"] is False


def _summary(first_run: quantize.QuantizeResult) -> dict:
    return copy.deepcopy(json.loads((first_run.output / "summary.json").read_text()))


@pytest.mark.parametrize("break_it, field", [
    (lambda s: s.pop("speed"), "missing key 'speed'"),
    (lambda s: s["int8"].update(map50_95="0.5"), "summary.int8.map50_95"),
    (lambda s: s["tried"][0].update(keep_float=True), "summary.tried[0].keep_float"),
    (lambda s: s["speed"]["int8"]["bs1"].pop("img_s"), "summary.speed.int8.bs1"),
    (lambda s: s.update(schema="repquant.quantize/0"), "summary.schema"),
    (lambda s: s["int8"].update(evaluated_onnx="elsewhere.onnx"), "summary.int8.evaluated_onnx"),
    (lambda s: s["int8"].update(drop=s["int8"]["drop"] + 0.01), "summary.int8.drop"),
])
def test_validate_summary_names_the_offending_field(first_run: quantize.QuantizeResult, break_it, field) -> None:
    summary = _summary(first_run)
    break_it(summary)
    with pytest.raises(RepquantError, match=re.escape(field)):
        validate_summary(summary)


def test_choose_final_prefers_fewest_float_layers_within_budget() -> None:
    rows = [{"keep_float": 0, "map50_95": 0.40, "drop": 0.02}, {"keep_float": 2, "map50_95": 0.415, "drop": 0.005},
            {"keep_float": 3, "map50_95": 0.418, "drop": 0.002}]
    assert quantize.choose_final(rows, 0.005)["keep_float"] == 2
    assert quantize.choose_final(rows, 0.001)["keep_float"] == 3  # none within: the most accurate


def test_stage_cache_recomputes_on_a_new_key_a_missing_artefact_or_an_interrupted_stage(tmp_path: Path) -> None:
    calls = []

    def compute(value: int):
        def inner() -> dict:
            calls.append(value)
            (tmp_path / "artefact").write_text(str(value))
            return {"value": value, "file": "artefact"}
        return inner

    def stage(value: int, key: str) -> dict:
        return StageCache(tmp_path).run("s", key, compute(value), lambda r: str(r["value"]), lambda r: [r["file"]])

    assert stage(1, "a") == {"value": 1, "file": "artefact"} and stage(2, "a")["value"] == 1
    assert stage(3, "b")["value"] == 3
    (tmp_path / "artefact").unlink()
    assert stage(4, "b")["value"] == 4
    assert calls == [1, 3, 4]

    def interrupted() -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageCache(tmp_path).run("s", "c", interrupted, str)
    assert stage(5, "c")["value"] == 5  # nothing was recorded for key c


def test_quantize_cli_prints_the_headline_table(first_run: quantize.QuantizeResult) -> None:
    args = ["--log-level", "warning", "quantize", "--model", str(MODEL), "--data", str(SAMPLE), "--output",
            str(first_run.output), "--img-size", "128", "--calib-images", "8", "--isolated-images", "4",
            "--max-keep-float", "2", "--batch", "1", "--batch", "2", "--bench-warmup", "0", "--bench-iters", "1",
            "--bench-min-seconds", "0", "--qat", "never"]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    log = json.loads((first_run.output / "run_log.json").read_text())
    assert all(stage["cached"] for stage in log["stages"].values())  # the flags built the same config
    assert "| FP32 |" in out.output and "INT8 vs FP32 throughput: bs1" in out.output
    assert "Float layers (" in out.output and "report.html" in out.output


@pytest.mark.parametrize("args, message", [
    (["--max-ap-drop", "5"], "max_ap_drop must be in [0, 1)"),
    (["--qat-lr", "0"], "qat_lr must be > 0"),
    (["--img-size", "100"], "multiple of 32"),
])
def test_quantize_cli_rejects_bad_settings(tmp_path: Path, args: list[str], message: str) -> None:
    out = CliRunner().invoke(cli, ["quantize", "--model", str(MODEL), "--data", str(SAMPLE), "--output",
                                   str(tmp_path / "o"), *args])
    assert out.exit_code == 2 and message in out.output, out.output


def test_embedded_bccd_sample_is_small_licensed_and_listed() -> None:
    folder = SAMPLE.parent / "bccd_sample"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 3 * 1024 * 1024
    val = sorted(p.stem for p in (folder / "images" / "val").glob("*.jpg"))
    train = sorted(p.stem for p in (folder / "images" / "train").glob("*.jpg"))
    assert len(val) >= 40 and len(train) >= 40
    assert val == sorted(p.stem for p in (folder / "labels" / "val").glob("*.txt"))
    assert "Copyright (c) 2017 shenggan" in (folder / "LICENSE").read_text()
    readme = (folder / "README.md").read_text()
    assert "Shenggan/BCCD_Dataset" in readme and all(name in readme for name in val + train)
