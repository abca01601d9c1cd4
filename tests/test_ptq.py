"""Mixed-precision PTQ: keep-float layers carry no Q/DQ, the QDQ file evaluates through `repquant eval`'s
path, ONNX Runtime runs integer convolutions in the ORT layout, and rankings come from a sensitivity JSON."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (extra 'quant') not installed")

from repquant.cli import cli  # noqa: E402
from repquant.deploy.onnx_export import read_onnx_metadata  # noqa: E402
from repquant.errors import CalibrationError  # noqa: E402
from repquant.quant import ort_optimized_op_counts  # noqa: E402
from repquant.quant.ranking import keep_float_from_sensitivity  # noqa: E402
from repquant.tasks import evaluate, ptq  # noqa: E402
from repquant.tasks.config import AUTO, EvalConfig, PTQConfig  # noqa: E402


def ptq_command(model: str, data: Path, output: Path, mode: str = "isolated", metric: str = "mse", **settings):
    if settings.get("keep_float") == "auto":
        settings["keep_float"] = AUTO
    progress = settings.pop("progress", False)
    config = PTQConfig(model=model, data=data, output=output, ranking_mode=mode, ranking_metric=metric, **settings)
    return ptq.run(config, progress=progress)


def evaluate_model(path: Path, data: Path, progress: bool = False):
    report = evaluate.run(EvalConfig(str(path), data), progress=progress)
    return report.result, report.img_size


@pytest.fixture(scope="module")
def data_yaml(tiny_data_yaml: Path) -> Path:
    return tiny_data_yaml


def _quantized_weights(proto: onnx.ModelProto) -> set[str]:
    """Layer FQNs whose weight is quantized: stored as INT8 ``model.<fqn>.weight_quantized`` read by a
    DequantizeLinear (the exported graph wraps the network in ``DecodedDetector``)."""
    return {n.input[0].removeprefix("model.").removesuffix(".weight_quantized") for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_quantized")}


def test_keep_float_layers_have_no_qdq_and_the_file_evaluates(data_yaml: Path, tmp_path: Path) -> None:
    full = ptq_command("yolov6n", data_yaml, tmp_path / "k0.onnx", keep_float=0, calib_images=4, img_size=64,
                       progress=False)
    mixed = ptq_command("yolov6n", data_yaml, tmp_path / "k2.onnx", keep_float=2, mode="local", calib_images=4,
                        img_size=64, progress=False)
    assert full.keep_float_layers == () and len(mixed.keep_float_layers) == 2
    assert mixed.quantized_layers == full.quantized_layers - 2
    p_full, p_mixed = onnx.load(str(full.onnx_path)), onnx.load(str(mixed.onnx_path))
    assert _quantized_weights(p_full) - _quantized_weights(p_mixed) == set(mixed.keep_float_layers)
    full_ops, mixed_ops = Counter(n.op_type for n in p_full.graph.node), Counter(n.op_type for n in p_mixed.graph.node)
    assert full_ops["QuantizeLinear"] - mixed_ops["QuantizeLinear"] == 2  # the input of each keep-float conv
    assert full_ops["DequantizeLinear"] - mixed_ops["DequantizeLinear"] == 4  # its input and its INT8 weight
    for name in mixed.keep_float_layers:  # its Conv reads a float tensor and a float weight
        conv = next(n for n in p_mixed.graph.node if n.op_type == "Conv" and f"model.{name}.weight" in n.input)
        producers = {o: n.op_type for n in p_mixed.graph.node for o in n.output}
        assert producers.get(conv.input[0]) != "DequantizeLinear"
    meta = read_onnx_metadata(mixed.onnx_path)
    assert meta["img_size"] == (64, 64) and meta["num_classes"] == 2
    quant = json.loads({p.key: p.value for p in p_mixed.metadata_props}["repquant_quant"])
    assert quant["keep_float_layers"] == list(mixed.keep_float_layers) and quant["ranking"] == "local/mse"
    result, size = evaluate_model(mixed.onnx_path, data_yaml, progress=False)
    assert size == 64 and result.num_images == 2
    assert set(mixed.parity.snr_db) == set(mixed.parity.floor_db) == {"boxes", "scores"}
    assert min(mixed.parity.snr_db.values()) >= 30.0, mixed.parity


def test_float_dtype_fp16_stores_keep_float_convs_in_fp16(data_yaml: Path, tmp_path: Path) -> None:
    ranking = tmp_path / "sensitivity.json"  # keep one backbone conv and the ConvTranspose of the neck float
    keep = ["backbone.ERBlock_3.0.rbr_reparam", "neck.Bifusion0.upsample.upsample_transpose"]
    ranking.write_text(json.dumps({"rankings": {"isolated": {"mse": keep}}}))
    fp32 = ptq_command("yolov6n", data_yaml, tmp_path / "fp32.onnx", keep_float=2, sensitivity_json=ranking,
                       calib_images=4, img_size=64, progress=False)
    fp16 = ptq_command("yolov6n", data_yaml, tmp_path / "fp16.onnx", keep_float=2, sensitivity_json=ranking,
                       calib_images=4, img_size=64, float_dtype="fp16", progress=False)
    assert fp16.keep_float_layers == fp32.keep_float_layers == tuple(keep) and fp16.float_dtype == "fp16"
    proto = onnx.load(str(fp16.onnx_path))
    half = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert {n.removesuffix("_fp16") for n in half if n.endswith(".weight_fp16")} == {
        f"model.{name}.weight" for name in fp16.keep_float_layers}
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers = {i: n for n in proto.graph.node for i in n.input}
    for name in fp16.keep_float_layers:
        conv = next(n for n in proto.graph.node if f"model.{name}.weight_fp16" in n.input)
        assert producers[conv.input[0]].op_type == "Cast" and consumers[conv.output[0]].op_type == "Cast"
    # Everything else is unchanged: same Q/DQ nodes; outputs agree with the FP32 keep-float file.
    assert Counter(n.op_type for n in proto.graph.node)["QuantizeLinear"] == Counter(
        n.op_type for n in onnx.load(str(fp32.onnx_path)).graph.node)["QuantizeLinear"]
    assert json.loads({p.key: p.value for p in proto.metadata_props}["repquant_quant"])["float_dtype"] == "fp16"
    assert min(fp16.parity.snr_db.values()) >= 30.0, fp16.parity
    result, _ = evaluate_model(fp16.onnx_path, data_yaml, progress=False)
    assert result.num_images == 2


def test_ort_layout_runs_integer_convolutions(data_yaml: Path, tmp_path: Path) -> None:
    res = ptq_command("yolov6n", data_yaml, tmp_path / "ort.onnx", keep_float=0, calib_images=4, img_size=64,
                      layout="ort", progress=False)
    counts = ort_optimized_op_counts(res.onnx_path, tmp_path / "optimized.onnx")
    assert counts["QLinearConv"] > 0


def test_keep_float_from_sensitivity_json(tmp_path: Path) -> None:
    path = tmp_path / "sens.json"
    path.write_text(json.dumps({"rankings": {"isolated": {"mse": ["a", "b", "c"]}}}))
    assert keep_float_from_sensitivity(path, 2, "isolated", "mse") == ("a", "b")
    with pytest.raises(CalibrationError, match="no ranking local/mse; it has isolated/mse"):
        keep_float_from_sensitivity(path, 2, "local", "mse")
    with pytest.raises(CalibrationError, match="--keep-float 4 but the model has only 3"):
        keep_float_from_sensitivity(path, 4, "isolated", "mse")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="bad.json: not a repquant sensitivity JSON"):
        keep_float_from_sensitivity(bad, 1, "isolated", "mse")


def test_ptq_cli_with_sensitivity_json(data_yaml: Path, tmp_path: Path) -> None:
    from repquant.checkpoint import save_checkpoint
    from repquant.data import load_data_config
    from repquant.models import create_model

    # One model for both commands: the JSON records the weights it was measured on and ptq checks them (a
    # registry name would be a fresh random model each time).
    model = str(save_checkpoint(tmp_path / "m.safetensors", create_model("yolov6n",
                                                                         num_classes=load_data_config(data_yaml).nc)))
    sens = tmp_path / "sens"
    runner = CliRunner()
    res = runner.invoke(cli, ["sensitivity", "--model", model, "--data", str(data_yaml), "--calib-images", "4",
                              "--img-size", "64", "--isolated-images", "2", "--output", str(sens)])
    assert res.exit_code == 0, res.output
    ranking = json.loads((sens / "sensitivity.json").read_text())["rankings"]["local"]["snr_db"]
    out = tmp_path / "int8.onnx"
    res = runner.invoke(cli, ["ptq", "--model", model, "--data", str(data_yaml), "--keep-float", "3",
                              "--sensitivity", str(sens / "sensitivity.json"), "--mode", "local", "--metric", "snr",
                              "--calib-images", "4", "--img-size", "64", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert ", ".join(ranking[:3]) in res.output
    assert set(ranking[:3]).isdisjoint(_quantized_weights(onnx.load(str(out))))


def test_keep_float_auto_picks_the_smallest_k_within_the_drop(data_yaml: Path, tmp_path: Path) -> None:
    # Any drop is allowed: K=0 after one FP32 and one INT8 evaluation.
    res = ptq_command("yolov6n", data_yaml, tmp_path / "auto.onnx", keep_float="auto", mode="local",
                      calib_images=4, img_size=64, max_ap_drop=1.0, max_keep_float=2, progress=False)
    assert res.keep_float_layers == () and [row["k"] for row in res.auto_search] == [-1, 0]
    # No drop can be negative beyond -1: every K is tried, then a one-line error.
    with pytest.raises(CalibrationError, match=r"no K <= 2 keeps the mAP drop within -1.0"):
        ptq_command("yolov6n", data_yaml, tmp_path / "never.onnx", keep_float="auto", mode="local",
                    calib_images=4, img_size=64, max_ap_drop=-1.0, max_keep_float=2, progress=False)
    assert not (tmp_path / "never.onnx").exists()
    res = CliRunner().invoke(cli, ["ptq", "--model", "yolov6n", "--data", str(data_yaml), "--keep-float", "many",
                                   "--output", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "must be a count >= 0 or 'auto'" in res.output

