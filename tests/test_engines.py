"""Deployable INT8 files and the OpenVINO backend: weights stored as INT8 compute exactly what the QuantizeLinear
did; OpenVINO runs FP32 (f32 or bf16, always explicit) and Q/DQ files like ONNX Runtime, with the latency and
throughput hints giving the same outputs; eval through OpenVINO scores like ONNX Runtime."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from engine_files import build_files, images, run_ort

from repquant.quant.qdq_export import weights_to_int8


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_files(tmp_path_factory.mktemp("engines"), raw=True)


# --- INT8 weights ------------------------------------------------------------------------------------------

def test_int8_weights_compute_exactly_what_the_quantize_node_did(files: dict[str, Path], tmp_path: Path) -> None:
    proto = onnx.load(str(files["raw"]))
    weights = {i.name for i in proto.graph.initializer}
    quantized_weights = sum(n.op_type == "QuantizeLinear" and n.input[0] in weights for n in proto.graph.node)
    folded = copy.deepcopy(proto)
    assert weights_to_int8(folded) == quantized_weights > 0
    onnx.checker.check_model(folded, full_check=True)
    path = tmp_path / "folded.onnx"
    onnx.save(folded, path)
    for level in ("none", "all"):
        for a, b in zip(run_ort(files["raw"], images(2), level), run_ort(path, images(2), level), strict=True):
            assert np.array_equal(a, b), level  # bit for bit, with and without ORT's fusions


def test_exported_int8_file_stores_int8_weights_and_is_a_quarter_of_fp32(files: dict[str, Path]) -> None:
    proto = onnx.load(str(files["int8"]))
    initializers = {i.name: i for i in proto.graph.initializer}
    assert not [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in initializers]
    conv_weights = [initializers[n.input[0]] for n in proto.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert conv_weights and all(w.data_type == onnx.TensorProto.INT8 for w in conv_weights)
    assert files["int8"].stat().st_size <= 0.30 * files["fp32"].stat().st_size


# --- OpenVINO ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino (extra 'openvino') not installed")
def test_openvino_backend_cases_in_their_own_process() -> None:
    """tests/openvino_cases.py (f32/bf16/int8 against ONNX Runtime, hints, eval, quantize --backend openvino)
    in a child pytest: see that module's docstring for why."""
    import subprocess
    import sys

    cases = Path(__file__).with_name("openvino_cases.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                          capture_output=True, text=True, timeout=900, cwd=cases.parents[1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-500:]
