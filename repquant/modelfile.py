"""What a ``--model`` argument is, decided in one place from the file's content (never loaded here).

Kinds: a registry name (``yolov6s``), a repquant checkpoint (safetensors, or a ``torch.save`` dict of
tensors), a quantized checkpoint (safetensors with a ``repquant_quant`` record, written by QAT), an
official meituan/YOLOv6 ``.pt`` (a pickled ``nn.Module`` whose pickle names ``yolov6.*`` classes), an ONNX
file, a TensorRT engine. ONNX (protobuf, no magic bytes) and engines are recognised by their suffix.
"""

from __future__ import annotations

import enum
import os
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

from repquant.errors import CheckpointError
from repquant.io import read_safetensors_metadata, sniff_tensor_file

# What a pickle of tensors and plain containers refers to: torch's weights-only unpickler rebuilds these.
TORCH_BUILTINS = (
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor",
    "collections.OrderedDict", "__builtin__.set", "builtins.set", "_codecs.encode", "torch.Size",
    *(f"torch.{kind}Storage" for kind in ("Half", "Float", "Double", "BFloat16", "Long", "Int", "Short", "Char",
                                          "Byte", "Bool")),
)
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")
QUANT_METADATA_KEY = "repquant_quant"


class ModelKind(enum.Enum):
    REGISTRY = "registry name"
    CHECKPOINT = "repquant checkpoint"
    QUANTIZED = "quantized checkpoint"
    OFFICIAL = "official YOLOv6 checkpoint"
    ONNX = "ONNX model"
    ENGINE = "TensorRT engine"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved ``--model`` argument: what it is and where it lives (``path`` None for a registry name)."""

    text: str
    kind: ModelKind
    path: Path | None = None

    @property
    def is_torch(self) -> bool:
        """Loads as a torch model (float or fake-quant)."""
        return self.kind not in (ModelKind.ONNX, ModelKind.ENGINE)

    def __str__(self) -> str:
        return self.text


def pickle_globals(path: str | os.PathLike) -> list[str]:
    """The ``module.name`` globals the pickle of a ``torch.save`` file refers to (zip format, or the legacy and
    plain-pickle formats: every pickle in the file), in order of first use, read with ``pickletools`` (nothing
    is unpickled)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if name is None:
                    raise CheckpointError(f"{path}: torch zip file without data.pkl")
                data = archive.read(name)
        else:
            data = Path(path).read_bytes()
            if data.startswith(b"PK"):
                raise zipfile.BadZipFile("zip signature without a readable archive")
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint ({type(err).__name__})") from None
    found: list[str] = []
    strings: list[str] = []
    start, parsed = 0, 0
    # The legacy format is 5 pickles followed by raw storage bytes; a zip's data.pkl and a plain pickle are one.
    while start < len(data) and data[start] == 0x80 and parsed < 5:  # a pickle (protocol >= 2) starts with PROTO
        try:
            ops = list(pickletools.genops(data[start:]))
        except ValueError as err:  # not a pickle, or a torn one
            if parsed:
                break  # raw storage bytes after the pickles of a legacy file
            raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint (pickle: {err})") from None
        for opcode, arg, _pos in ops:
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif opcode.name == "GLOBAL":
                found.append(str(arg).replace(" ", ".").replace("\n", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
        start, parsed = start + int(ops[-1][2] or 0) + 1, parsed + 1
    if not parsed:
        raise CheckpointError(f"{path}: not a torch checkpoint (no pickle found)")
    return list(dict.fromkeys(found))


def refuse_foreign_globals(path: Path, names: list[str], allowed: tuple[str, ...] = TORCH_BUILTINS) -> None:
    """Raise naming the first global of the pickle that is not in ``allowed`` (nothing is executed)."""
    foreign = next((n for n in names if n not in allowed), None)
    if foreign is not None:
        raise CheckpointError(f"{path}: refused to load: the pickle references {foreign}, which is not a tensor "
                              "or container of a checkpoint (nothing was executed)")


def _torch_kind(path: Path) -> ModelKind:
    if not zipfile.is_zipfile(path):
        return ModelKind.CHECKPOINT  # a legacy pickle: the weights-only loader decides
    try:
        names = pickle_globals(path)
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError) as err:
        raise CheckpointError(f"{path}: corrupt torch checkpoint ({type(err).__name__})") from None
    return ModelKind.OFFICIAL if any(n.startswith("yolov6.") for n in names) else ModelKind.CHECKPOINT


def _file_kind(path: Path) -> ModelKind:
    if path.suffix in ONNX_SUFFIXES:
        return ModelKind.ONNX
    if path.suffix in ENGINE_SUFFIXES:
        return ModelKind.ENGINE
    try:
        container = sniff_tensor_file(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read model file ({err.strerror or err})") from None
    if container == "safetensors":
        try:
            metadata = read_safetensors_metadata(path)
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: corrupt safetensors file ({type(err).__name__})") from None
        return ModelKind.QUANTIZED if QUANT_METADATA_KEY in metadata else ModelKind.CHECKPOINT
    if container == "torch":
        return _torch_kind(path)
    raise CheckpointError(f"{path}: not a model file (expected a safetensors or torch checkpoint, an official "
                          f"YOLOv6 .pt, an {'/'.join(ONNX_SUFFIXES)} file or a TensorRT {'/'.join(ENGINE_SUFFIXES)})")


def identify(spec: str | os.PathLike) -> ModelSpec:
    """Resolve a ``--model`` argument: an existing file by its content, else a registry name.

    A missing path (a name with a folder separator or a model-file suffix) raises ``CheckpointError``;
    an unknown registry name is reported by the model registry when it is built.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.is_file():
        return ModelSpec(text, _file_kind(path), path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a model file")
    suffixes = (".safetensors", ".pt", ".pth", *ONNX_SUFFIXES, *ENGINE_SUFFIXES)
    if "/" in text or os.sep in text or text.endswith(suffixes):
        raise CheckpointError(f"{path}: no such model file")
    return ModelSpec(text, ModelKind.REGISTRY)
