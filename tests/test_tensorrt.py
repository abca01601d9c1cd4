"""TensorRT engine builder: argument checks and the missing-dependency path run everywhere; engine
builds and runs need TensorRT and a GPU (markers ``tensorrt`` and ``gpu``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repquant.deploy.tensorrt import (
    build_engine,
    engine_metadata_path,
    onnx_has_fp16_weights,
    onnx_has_qdq,
    read_engine_metadata,
    tensorrt_available,
)
from repquant.deploy.tensorrt_runner import TrtRunner
from repquant.errors import CheckpointError, MissingDependencyError, RepquantError

HAS_TENSORRT = tensorrt_available()
INSTALL_HINT = "pip install 'repquant[tensorrt]'"
IMG = 64


def _qdq_conv_onnx(path: Path, img: int = IMG) -> Path:
    """A tiny explicitly quantized graph: images -> Q/DQ -> Conv(Q/DQ'd int8 weights, per channel) -> out."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(4, 3, 3, 3), dtype=np.int8)
    w_scale = np.full(4, 0.01, np.float32)
    inits = [
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(1 / 127, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["out"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, img, img])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, img, img])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from repquant.deploy.onnx_export import export_onnx
    from repquant.models import create_model

    path = tmp_path_factory.mktemp("trt") / "yolov6n.onnx"
    return export_onnx(create_model("yolov6n", num_classes=3), path, IMG, batch_size=2, dynamic_batch=True)


def test_onnx_inspection(tmp_path: Path, fp32_onnx: Path) -> None:
    qdq = _qdq_conv_onnx(tmp_path / "qdq.onnx")
    assert onnx_has_qdq(qdq) and not onnx_has_qdq(fp32_onnx)
    assert not onnx_has_fp16_weights(fp32_onnx)
    proto = onnx.load(str(qdq))
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float16), "half"))
    onnx.save(proto, str(tmp_path / "half.onnx"))
    assert onnx_has_fp16_weights(tmp_path / "half.onnx")


def test_engine_metadata_path(tmp_path: Path) -> None:
    assert engine_metadata_path("runs/m.engine") == Path("runs/m.engine.json")
    assert read_engine_metadata(tmp_path / "absent.engine") is None
    (tmp_path / "bad.engine.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bad\.engine\.json: unreadable engine metadata"):
        read_engine_metadata(tmp_path / "bad.engine")


# --- checks that come before TensorRT is needed ---------------------------------------------------


def test_build_engine_checks_arguments_first(tmp_path: Path, fp32_onnx: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.onnx: no such ONNX file"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "x.engine", precision="fp32")
    with pytest.raises(RepquantError, match="precision 'int4'"):
        build_engine(fp32_onnx, tmp_path / "x.engine", precision="int4")
    with pytest.raises(RepquantError, match="batch sizes must be >= 1"):
        build_engine(fp32_onnx, tmp_path / "x.engine", precision="fp32", batch_sizes=(0,))
    with pytest.raises(RepquantError, match="INT8 engine needs an ONNX file with Q/DQ nodes"):
        build_engine(fp32_onnx, tmp_path / "x.engine", precision="int8")
    with pytest.raises(RepquantError, match="has Q/DQ nodes; build it with precision 'int8'"):
        build_engine(_qdq_conv_onnx(tmp_path / "q.onnx"), tmp_path / "x.engine", precision="fp16")
    assert not (tmp_path / "x.engine").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-dependency path cannot run")
def test_build_engine_without_tensorrt_names_the_extra(tmp_path: Path, fp32_onnx: Path) -> None:
    with pytest.raises(MissingDependencyError, match="tensorrt is required") as info:
        build_engine(fp32_onnx, tmp_path / "m.engine", precision="fp32", batch_sizes=(1,))
    message = str(info.value)
    assert INSTALL_HINT in message and "\n" not in message
    assert info.value.extra == "tensorrt"
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(MissingDependencyError, match=r"repquant\[tensorrt\]"):
        build_engine(_qdq_conv_onnx(tmp_path / "q.onnx"), tmp_path / "q.engine", precision="int8")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-dependency path cannot run")
def test_runner_and_bench_without_tensorrt(tmp_path: Path, fp32_onnx: Path) -> None:
    from repquant.tasks import bench
    from repquant.tasks.config import BenchConfig

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(MissingDependencyError, match=r"running TensorRT engines.*repquant\[tensorrt\]"):
        TrtRunner(engine)
    with pytest.raises(CheckpointError, match="no such TensorRT engine file"):
        TrtRunner(tmp_path / "absent.engine")
    with pytest.raises(MissingDependencyError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        bench.run(BenchConfig(str(fp32_onnx), backend="tensorrt", precision="fp32", batch_sizes=(1,), warmup=0,
                              iters=1))


# --- the TensorRT API use, type-checked against NVIDIA's published stubs (no TensorRT needed) ----------------

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / ".typestubs" / "tensorrt" / "__init__.pyi"
MODULES = [ROOT / "repquant" / "deploy" / name for name in ("tensorrt.py", "tensorrt_runner.py")]


def _mypy(path: Path, cache: Path) -> tuple[str, int]:
    from mypy import api

    out, err, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache),
                                "--follow-imports", "silent", str(path)])
    return out + err, status


@pytest.mark.skipif(not STUBS.is_file(), reason="TensorRT stubs absent: run python .ci/tensorrt_stubs.py (CI does)")
def test_tensorrt_module_type_checks_against_the_stubs(tmp_path: Path) -> None:
    """The module passes, and the same module with a wrong TensorRT call (name, argument type) fails:
    proof that the stubs are read, not skipped as an untyped import."""
    for module in MODULES:
        out, status = _mypy(module, tmp_path / "cache")
        assert status == 0, out
    for good, bad, message in [
        ("execute_async_v3(", "execute_async_v4(", r'"IExecutionContext" has no attribute "execute_async_v4"'),
        ("builder.create_network(0)", 'builder.create_network("0")', r'"create_network" of "Builder" has incompatible'),
        ("trt.MemoryPoolType.WORKSPACE,", "trt.MemoryPoolType.WORKSPACES,", r'has no attribute "WORKSPACES"'),
    ]:
        module = next(m for m in MODULES if good in m.read_text())
        broken = tmp_path / "repquant_tensorrt_broken.py"
        broken.write_text(module.read_text().replace(good, bad))
        out, status = _mypy(broken, tmp_path / "cache")
        assert status == 1 and re.search(message, out), out


# --- real engines (TensorRT + GPU) ----------------------------------------------------------------


def _require_trt_gpu() -> None:
    if not HAS_TENSORRT:
        pytest.skip("needs TensorRT")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_onnx_runtime(tmp_path: Path, fp32_onnx: Path, precision: str) -> None:
    _require_trt_gpu()
    import torch

    from repquant.deploy.backends.ort import OrtDetector

    info = build_engine(
        fp32_onnx,
        tmp_path / "m.engine",
        precision=precision,
        batch_sizes=(2, 1),
        timing_cache=tmp_path / "timing.cache",
    )
    assert info.batch_sizes == (1, 2) and (tmp_path / "timing.cache").stat().st_size > 0
    meta = json.loads(engine_metadata_path(info.engine_path).read_text())
    assert meta["precision"] == precision and meta["batch_sizes"] == [1, 2]
    assert len(meta["onnx_sha256"]) == 64 and meta["gpu_name"]
    runner = TrtRunner(info.engine_path)
    assert runner.batch_sizes() == [1, 2]
    images = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    ref_boxes, ref_scores = OrtDetector(fp32_onnx)(images.numpy())
    for batch in (2, 1, 2):  # switching profiles back and forth
        boxes, scores = runner(images[:batch].cuda())
        torch.cuda.synchronize()
        tol = 1e-3 if precision == "fp32" else 2e-2
        np.testing.assert_allclose(scores.float().cpu().numpy(), ref_scores[:batch], atol=tol)
        np.testing.assert_allclose(boxes.float().cpu().numpy(), ref_boxes[:batch], atol=tol * IMG)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_int8_engine_from_qdq_onnx(tmp_path: Path) -> None:
    _require_trt_gpu()
    import onnxruntime as ort
    import torch

    path = _qdq_conv_onnx(tmp_path / "qdq.onnx")
    info = build_engine(path, tmp_path / "q.engine", precision="int8", batch_sizes=(1, 4))
    runner = TrtRunner(info.engine_path)
    x = torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    (out,) = runner(x.cuda())
    torch.cuda.synchronize()
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()}
    )[0]
    # Same int8 inputs and weights; only accumulation order and output rounding differ.
    np.testing.assert_allclose(out.float().cpu().numpy(), ref, atol=1e-2)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_bench_command_tensorrt(tmp_path: Path, fp32_onnx: Path) -> None:
    _require_trt_gpu()
    from repquant.deploy.report import validate_report
    from repquant.tasks import bench
    from repquant.tasks.config import BenchConfig

    report = bench.run(BenchConfig(str(fp32_onnx), backend="tensorrt", precision="fp16", batch_sizes=(1, 2),
                                   warmup=2, iters=5))
    validate_report(report.to_dict())
    assert [r.timer for r in report.results] == ["cuda_events"] * 2


# --- the ready GPU script (benchmarks/gpu/run.sh) --------------------------------------------------------------


# torch's own dependencies, imported lazily by torch itself (sympy for shapes); all present where torch is
TORCH_LAZY_DEPS = {"sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec", "typing_extensions"}


def test_gpu_bench_script_runs_with_only_torch_and_repquant(tmp_path: Path) -> None:
    """The lent GPU machine has no registry: the script must import nothing beyond torch, numpy and repquant's
    model/timing modules. Its CPU smoke mode runs the same code path and writes the JSON schema."""
    import subprocess
    import sys

    script = ROOT / "benchmarks" / "gpu" / "bench_gpu.py"
    out = tmp_path / "bench_gpu.json"
    args = ["--device", "cpu", "--variant", "yolov6n", "--img-size", "64", "--batch", "1", "--batch", "2",
            "--iters", "2", "--warmup", "1", "--rounds", "1", "--output", str(out)]
    probe = (  # what the script imports beyond torch and numpy
        "import json, runpy, sys, numpy, torch\n"
        "base = set(sys.modules)\n"
        f"sys.argv = ['bench_gpu.py', *{args!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert not stop.code, stop.code\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - base})))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = set(json.loads(done.stdout.splitlines()[-1]))
    assert "repquant" in imported
    third_party = imported - set(sys.stdlib_module_names) - {"repquant", "torch", "numpy"}
    assert not third_party - TORCH_LAZY_DEPS, third_party
    report = json.loads(out.read_text())
    assert report["schema"] == "repquant.bench-gpu/1" and report["environment"]["cpu_model"]
    assert [(r["mode"], r["batch_size"]) for r in report["results"]] == [("fp32", 1), ("fp32", 2)]
