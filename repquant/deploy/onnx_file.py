"""The door for ONNX files: every ONNX file repquant is given is opened here first, so a corrupt file, a
foreign protobuf, or weights stored outside the model's folder are refused with one line naming the file
before any engine (ONNX Runtime, TensorRT) reads it."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

from repquant.errors import CheckpointError


def load_onnx_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph of ``path`` (external tensor data not loaded), checked: it parses as an ONNX model with a
    graph, and every external-data file it names lies inside the model's folder (an absolute path or ``..``
    could make an engine read any file on the machine)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError, OSError: no common base class
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:120]})") from None
    if not proto.graph.node or not proto.graph.input or not proto.graph.output:
        raise CheckpointError(f"{path}: not an ONNX model with a graph (no nodes, inputs or outputs)")
    _check_external_data(proto, path)
    return proto


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    folder = path.resolve().parent
    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise CheckpointError(f"{path}: tensor {tensor.name!r} stores its data at {location!r}, outside the "
                                  "model's folder; refusing to read it")
        if not target.is_file():
            raise CheckpointError(f"{path}: tensor {tensor.name!r} stores its data in {location}, which is missing")
