"""Read a checkpoint written by the official meituan/YOLOv6 code without running any of its pickled code.

Such a ``.pt`` is a ``torch.save`` dict whose ``model`` / ``ema`` entries are pickled ``nn.Module`` trees of
``yolov6.*`` classes (fp16). ``torch.load(weights_only=True)`` refuses them; here every global the pickle
names is listed first (``pickletools``, nothing executed), then the file is loaded with
``weights_only=True`` under :func:`torch.serialization.safe_globals` holding

- an inert stand-in class for every ``yolov6.*`` class and every allow-listed ``torch.nn`` module class:
  unpickling creates the bare object and fills its ``__dict__`` (no ``__init__``, no ``__setstate__``, no
  method of the real class ever runs);
- bytes-only stand-ins for the numpy scalar and dtype of the ``results`` entry.

Any other global (``os.system``, a class of another package) is refused before loading, naming the file
and the global. The model tree is then walked through the objects' ``_parameters`` / ``_buffers`` /
``_modules`` like ``nn.Module.state_dict`` does; as the official loaders do, ``ema`` is preferred over
``model`` and tensors are converted to float32.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repquant.errors import CheckpointError
from repquant.modelfile import pickle_globals, refuse_foreign_globals

# torch.nn module classes that official YOLOv6 model trees are built from (v2.0, v3.0, QARepVGG, lite).
ALLOWED_TORCH_MODULES = tuple(f"torch.nn.modules.{name}" for name in (
    "conv.Conv2d", "conv.ConvTranspose2d", "batchnorm.BatchNorm2d", "activation.ReLU", "activation.SiLU",
    "activation.Hardswish", "activation.LeakyReLU", "activation.ReLU6", "activation.Sigmoid",
    "activation.Hardsigmoid", "container.Sequential", "container.ModuleList", "linear.Identity",
    "pooling.MaxPool2d", "pooling.AvgPool2d", "pooling.AdaptiveAvgPool2d", "upsampling.Upsample",
))
_NUMPY_SCALARS = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
_NUMPY_DTYPE = "numpy.dtype"


class InertObject:
    """Base of the stand-ins: an object whose ``__dict__`` the unpickler fills; nothing else."""

    official_class = ""


class NumpyDtype:
    """Stand-in for ``numpy.dtype(code, align, copy)``: keeps the type code only."""

    def __init__(self, code: object = None, *args: object) -> None:
        self.code = code if isinstance(code, str) else None

    def __setstate__(self, state: object) -> None:
        """numpy's dtype state (version, byte order, ...): only little-endian or native plain codes are kept."""
        if isinstance(state, tuple) and len(state) > 1 and state[1] not in ("<", "|", "="):
            self.code = None


def _numpy_scalar(dtype: object, data: object = b"") -> float | None:
    """Stand-in for ``numpy.core.multiarray.scalar``: decodes plain numeric scalars from their bytes."""
    code = getattr(dtype, "code", None)
    if code not in ("f2", "f4", "f8", "i4", "i8", "u1", "b1") or not isinstance(data, bytes | bytearray):
        return None
    return float(np.frombuffer(bytes(data), dtype=np.dtype(code))[0])


def _stub(full_name: str) -> type:
    module, _, name = full_name.rpartition(".")
    return type(name, (InertObject,), {"official_class": full_name, "__module__": f"repquant_official.{module}"})


def safe_globals_for(path: Path, names: list[str]) -> list[Any]:
    """The stand-ins for the globals ``names`` of ``path``; the first global outside the allow-list raises."""
    allowed: list[Any] = []
    for name in names:
        if name.startswith("yolov6.") or name in ALLOWED_TORCH_MODULES:
            allowed.append((_stub(name), name))
        elif name in _NUMPY_SCALARS:
            allowed.append((_numpy_scalar, name))
        elif name == _NUMPY_DTYPE:
            allowed.append((NumpyDtype, name))
        else:
            refuse_foreign_globals(path, [name])
    return allowed


@dataclass
class OfficialFile:
    """What an official checkpoint holds: ``state`` (official names, float32, the ``ema`` model when present),
    ``classes`` (module path -> official class name), ``attributes`` (module path -> plain attributes such as
    a BatchNorm's ``eps`` or the head's ``use_dfl``), the checkpoint's other entries, and the file's sha256."""

    path: Path
    source: str
    state: dict[str, torch.Tensor]
    classes: dict[str, str]
    attributes: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, module object)`` for ``obj`` and every sub-module, in registration order."""
    yield prefix.rstrip("."), obj
    for name, child in (getattr(obj, "_modules", None) or {}).items():
        if child is not None:
            yield from _walk(child, f"{prefix}{name}.")


def _module_state(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    skip: set[str] = getattr(obj, "_non_persistent_buffers_set", None) or set()
    for name, value in (getattr(obj, "_parameters", None) or {}).items():
        if value is not None:
            yield prefix + name, value
    for name, value in (getattr(obj, "_buffers", None) or {}).items():
        if value is not None and name not in skip:
            yield prefix + name, value


_PLAIN = (bool, int, float, str, type(None))


def _tree(path: Path, root: Any) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict[str, Any]]]:
    if not isinstance(root, InertObject):
        raise CheckpointError(f"{path}: the checkpoint's model is not a pickled YOLOv6 module tree")
    state: dict[str, torch.Tensor] = {}
    classes: dict[str, str] = {}
    attributes: dict[str, dict[str, Any]] = {}
    for module_path, obj in _walk(root):
        classes[module_path] = getattr(obj, "official_class", type(obj).__name__)
        attributes[module_path] = {k: v for k, v in vars(obj).items()
                                   if isinstance(v, _PLAIN) and not k.startswith("_")}
        for name, tensor in _module_state(obj, f"{module_path}." if module_path else ""):
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path}: {name} is not a tensor")
            state[name] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    return state, classes, attributes


def read_official(path: str | os.PathLike) -> OfficialFile:
    """Read an official YOLOv6 ``.pt`` safely (see the module docstring)."""
    path = Path(path)
    try:
        names = pickle_globals(path)
    except (OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable torch checkpoint ({type(err).__name__})") from None
    allowed = safe_globals_for(path, names)
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError of a torn zip, ...
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: cannot load the official checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or not (ckpt.get("ema") or ckpt.get("model")):
        raise CheckpointError(f"{path}: not an official YOLOv6 checkpoint (no 'model' or 'ema' entry)")
    source = "ema" if ckpt.get("ema") else "model"
    state, classes, attributes = _tree(path, ckpt[source])
    info: dict[str, Any] = {k: v for k, v in ckpt.items() if k in ("epoch", "updates") and isinstance(v, int)}
    results = ckpt.get("results")
    if isinstance(results, tuple | list):  # (mAP@.5, mAP@.5:.95) of the official evaluation
        info["results"] = [r for r in results if isinstance(r, float)]
    info["nc"] = attributes.get("", {}).get("nc")
    root = ckpt[source]
    names_attr = getattr(root, "names", None)
    if isinstance(names_attr, list | tuple) and all(isinstance(n, str) for n in names_attr):
        info["names"] = list(names_attr)
    return OfficialFile(path, source, state, classes, attributes, info, _sha256(path))
