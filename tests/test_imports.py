"""``import repquant`` stays light; optional heavy dependencies load only where they are needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnx", "onnxruntime", "modelopt", "tensorrt")


def _loaded_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return which HEAVY modules it left in sys.modules."""
    script = f"import json, sys\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_repquant_is_light() -> None:
    assert _loaded_after("import repquant; repquant.__version__; repquant.RepquantError") == []


def test_import_cli_does_not_import_torch() -> None:
    assert _loaded_after("import repquant.cli") == []


def test_public_api_never_pulls_optional_backends() -> None:
    code = (
        "import repquant\n"
        "m = repquant.create_model('yolov6n', num_classes=2)\n"
        "repquant.reparameterize(m)\n"
        "assert repquant.is_deployed(m)\n"
        "assert 'yolov6n' in repquant.list_models()\n"
        "repquant.load_recipe, repquant.load_model, repquant.save_checkpoint, repquant.export_onnx\n"
    )
    loaded = _loaded_after(code)
    assert "torch" in loaded  # the model functions did load
    assert not {"onnxruntime", "modelopt", "tensorrt"} & set(loaded)


def test_ort_detector_does_not_need_torch() -> None:
    assert _loaded_after("from repquant.deploy import OrtDetector") == ["onnx", "onnxruntime"]


def test_lazy_names() -> None:
    import repquant

    assert {"create_model", "list_models", "reparameterize", "load_recipe", "__version__"} <= set(
        dir(repquant)
    )
    assert set(repquant.__all__) <= set(dir(repquant))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        repquant.nope  # noqa: B018
    from repquant.models import create_model

    assert repquant.create_model is create_model


def test_installed_quant_extra_imports() -> None:
    """The quant tests skip only when the extra is absent: an installed but broken modelopt (a missing
    undeclared dependency) must fail here instead of silently skipping them."""
    from importlib import metadata

    try:
        metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        pytest.skip("nvidia-modelopt (extra 'quant') not installed")
    import modelopt.torch.quantization  # noqa: F401
