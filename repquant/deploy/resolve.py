"""The one resolver: any model spec (registry name, repquant checkpoint, quantized checkpoint, official
YOLOv6 ``.pt``, ONNX file, TensorRT engine) -> a :class:`ModelHandle` that eval, export, bench, ptq and qat
use to get the torch model or a runner on an engine. What a spec is comes from ``repquant.modelfile``
(by content); nothing else looks at suffixes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repquant.checkpoint import load_checkpoint, load_model
from repquant.deploy.backends import Runner, RunnerOptions, get_backend
from repquant.deploy.onnx_export import export_onnx, read_onnx_metadata
from repquant.errors import CheckpointError
from repquant.modelfile import ModelKind, ModelSpec, identify
from repquant.models import YOLOv6, create_model
from repquant.official import load_official_model
from repquant.quant.checkpoint import QUANT_METADATA_KEY, load_quantized_model
from repquant.reparam import is_deployed, reparameterize


@dataclass(frozen=True)
class ModelHandle:
    """A resolved model spec; loading happens in the methods, on demand."""

    spec: ModelSpec

    @property
    def kind(self) -> ModelKind:
        return self.spec.kind

    @property
    def path(self) -> Path | None:
        return self.spec.path

    def float_model(self, num_classes: int | None = None) -> YOLOv6:
        """The float torch model as stored (train-form or deployed), eval mode. A registry name builds a
        fresh model with ``num_classes`` (default 80); a file must have ``num_classes`` when it is given."""
        kind, path = self.spec.kind, self.spec.path
        if kind is ModelKind.REGISTRY:
            return create_model(self.spec.text, num_classes=80 if num_classes is None else num_classes).eval()
        if kind is ModelKind.CHECKPOINT:
            return load_model(self._file(), expected_num_classes=num_classes)
        if kind is ModelKind.OFFICIAL:
            return load_official_model(self._file(), expected_num_classes=num_classes)
        if kind is ModelKind.QUANTIZED:
            raise CheckpointError(f"{path}: a quantized (QAT) checkpoint; `repquant export` and `repquant eval` "
                                  "read it, float-model commands do not")
        raise CheckpointError(f"{path}: an {kind.value} is not a torch model; pass a registry name or a checkpoint")

    def deployed_model(self, num_classes: int | None = None) -> YOLOv6:
        """The float model re-parameterized for deployment (plain convs), eval mode."""
        model = self.float_model(num_classes)
        return model if is_deployed(model) else reparameterize(model).eval()

    def torch_model(self) -> tuple[YOLOv6, dict[str, Any] | None]:
        """The model to run in torch: the fake-quant model of a quantized checkpoint (and its
        ``repquant_quant`` record), else the float model (record None)."""
        if self.spec.kind is ModelKind.QUANTIZED:
            return load_quantized_model(self._file())
        return self.float_model(), None

    def _file(self) -> Path:
        if self.spec.path is None:
            raise CheckpointError(f"{self.spec}: a registry name, not a file")
        return self.spec.path

    def recorded_img_size(self) -> int | None:
        """The image size the model was trained / exported / quantized at, when the file records it."""
        path, kind = self.spec.path, self.spec.kind
        if kind is ModelKind.ONNX:
            return read_onnx_metadata(path)["img_size"][0]  # type: ignore[arg-type]
        if kind in (ModelKind.CHECKPOINT, ModelKind.QUANTIZED) and path is not None:
            _, metadata = load_checkpoint(path)
            size = metadata.get("img_size") or (metadata.get("recipe") or {}).get("img_size")
            return int(size) if size else None
        return None

    def quant_record(self) -> dict[str, Any] | None:
        """The ``repquant_quant`` record of a quantized checkpoint or a repquant QDQ ONNX file."""
        if self.spec.kind is ModelKind.QUANTIZED:
            return load_checkpoint(self.spec.path)[1].get(QUANT_METADATA_KEY)  # type: ignore[arg-type]
        if self.spec.kind is ModelKind.ONNX:
            return read_onnx_metadata(self.spec.path).get("quant")  # type: ignore[arg-type]
        return None


def open_model(spec: str | os.PathLike) -> ModelHandle:
    """Resolve a ``--model`` argument (see the module docstring)."""
    return ModelHandle(identify(spec))


def open_runner(handle: ModelHandle, backend: str, options: RunnerOptions, work_dir: Path | None = None,
                deployed: bool = True) -> Runner:
    """A runner for ``handle`` on ``backend``: torch models for ``torch`` (re-parameterized unless ``deployed``
    is False); ONNX / engine files as they are; a torch model asked for on an ONNX engine is exported first
    (deployed, dynamic batch) into ``work_dir`` (a temporary folder when None)."""
    engine = get_backend(backend)
    if engine.source == "torch":
        model, _ = handle.torch_model()
        if deployed and handle.kind is not ModelKind.QUANTIZED and not is_deployed(model):
            model = reparameterize(model).eval()
        return engine.open(model, options)
    if handle.spec.is_torch:
        if options.precision == "int8":
            raise CheckpointError(f"{handle.spec}: int8 needs a quantized (Q/DQ) ONNX file; quantize and export "
                                  "it first (repquant ptq)")
        folder = work_dir or Path(tempfile.mkdtemp(prefix="repquant-"))
        onnx_path = export_onnx(handle.deployed_model(), folder / "model.onnx", options.img_size or 640,
                                dynamic_batch=True)
        return engine.open(onnx_path, options)
    if handle.kind is ModelKind.ENGINE and engine.source != "engine":
        raise CheckpointError(f"{handle.spec}: a TensorRT engine runs only on the tensorrt backend")
    return engine.open(handle.spec.path, options)
