"""Export a (deployed) model to ONNX: ``images (B, 3, H, W) -> boxes (B, A, 4), scores (B, A, nc)``.

We use the TorchScript-based exporter (``dynamo=False``). torch 2.13 defaults to the
``torch.export``-based exporter, which needs ``onnxscript``; the YOLOv6 graph is static (no
data-dependent control flow), so tracing captures it exactly and needs no extra dependency.

The file carries its own description in ``metadata_props`` (read back by
:func:`read_onnx_metadata` and ``OrtDetector``): ``repquant_config`` (ModelConfig JSON),
``repquant_img_size`` (``[h, w]``), ``repquant_num_classes``, ``repquant_batch_size`` (0 when
dynamic), ``repquant_decoded``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from repquant.errors import CheckpointError, MissingDependencyError, ModelError
from repquant.io import atomic_write_bytes

FORMAT_VERSION = 1
INPUT_NAME = "images"
DECODED_OUTPUTS = ("boxes", "scores")
RAW_OUTPUTS = ("cls_logits", "reg_dist")
_MAX_STRIDE = 32

if TYPE_CHECKING:  # torch is imported inside export_onnx so that OrtDetector does not need it
    from torch import nn


def normalize_img_size(img_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``640`` or ``(h, w)`` -> ``(h, w)``, both positive multiples of the largest stride (32)."""
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(int(v) for v in img_size)
    if len(hw) != 2 or any(v <= 0 or v % _MAX_STRIDE for v in hw):
        raise ModelError(
            f"image size {img_size!r}: height and width must be positive multiples of {_MAX_STRIDE}"
        )
    return hw


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | tuple[int, int] = 640,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
    decoded: bool = True,
    simplify: bool = False,
) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically) and return the path.

    The model is deep-copied to CPU float32 and re-parameterized if it is not deployed yet; the
    caller's model is left untouched. With ``decoded=True`` the graph ends with box decoding
    (``DecodedDetector``): ``boxes (B, A, 4)`` xyxy input pixels and ``scores (B, A, nc)`` in [0, 1];
    with ``decoded=False`` it returns the raw ``cls_logits`` and ``reg_dist``. ``dynamic_batch``
    makes the batch axis symbolic (``batch``); ``batch_size`` is then only the tracing batch.
    The result is checked with ``onnx.checker.check_model``.
    """
    import torch

    from repquant.models.head import DecodedDetector
    from repquant.reparam import is_deployed, reparameterize

    path = Path(path)
    h, w = normalize_img_size(img_size)
    if batch_size < 1:
        raise ModelError(f"{path}: batch size must be >= 1, got {batch_size}")
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__}: model has no config; cannot export it")

    net = copy.deepcopy(model).to("cpu", torch.float32).eval()
    if not is_deployed(net):
        net = reparameterize(net)
    wrapper = DecodedDetector(net, (h, w)).eval() if decoded else net
    output_names = DECODED_OUTPUTS if decoded else RAW_OUTPUTS
    proto = _trace_to_onnx(wrapper, torch.zeros(batch_size, 3, h, w), output_names, dynamic_batch, opset)
    if simplify:
        proto = _simplify(proto)
    set_onnx_metadata(proto, export_metadata(config, (h, w), 0 if dynamic_batch else batch_size, decoded))
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def _trace_to_onnx(wrapper: nn.Module, dummy: Any, output_names: tuple[str, ...], dynamic_batch: bool,
                   opset: int) -> onnx.ModelProto:
    """The TorchScript exporter's graph of ``wrapper`` on ``dummy`` (constant-folded, batch axis optional)."""
    import torch

    dynamic_axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)} if dynamic_batch else None
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter announces its own deprecation on every call; we choose it on purpose.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torch.onnx.export writes to a file-like object too (its annotation says path only).
        torch.onnx.export(wrapper, (dummy,), buffer, dynamo=False, opset_version=opset,  # type: ignore[arg-type]
                          input_names=[INPUT_NAME], output_names=list(output_names), dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    return onnx.load_model_from_string(buffer.getvalue())


def export_metadata(config: Any, img_hw: tuple[int, int], batch_size: int, decoded: bool = True) -> dict[str, str]:
    """The ``repquant_*`` metadata_props of an exported model (``batch_size`` 0: dynamic batch)."""
    return {
        "repquant_format": str(FORMAT_VERSION),
        "repquant_config": json.dumps(config.to_dict(), sort_keys=True),
        "repquant_img_size": json.dumps([int(img_hw[0]), int(img_hw[1])]),
        "repquant_num_classes": str(config.num_classes),
        "repquant_batch_size": str(batch_size),
        "repquant_decoded": json.dumps(decoded),
    }


def set_onnx_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Set (replace) string entries of ``proto.metadata_props`` in place."""
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The repquant description stored in an exported ONNX file, decoded.

    Returns ``{"config": dict, "img_size": (h, w), "num_classes": int, "batch_size": int | None,
    "decoded": bool}``; raises :class:`CheckpointError` for a missing/corrupt file or one that was
    not written by :func:`export_onnx`.
    """
    from repquant.deploy.onnx_file import load_onnx_graph

    proto = load_onnx_graph(path)
    return decode_onnx_metadata({p.key: p.value for p in proto.metadata_props}, path)


def decode_onnx_metadata(props: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """Decode the ``repquant_*`` metadata_props of ``path`` (see :func:`read_onnx_metadata`)."""
    try:
        h, w = json.loads(props["repquant_img_size"])
        batch = int(props.get("repquant_batch_size", "0"))
        return {
            "config": json.loads(props["repquant_config"]),
            "img_size": (int(h), int(w)),
            "num_classes": int(props["repquant_num_classes"]),
            "batch_size": batch or None,
            "decoded": json.loads(props.get("repquant_decoded", "true")),
            "quant": json.loads(props["repquant_quant"]) if "repquant_quant" in props else None,
        }
    except KeyError as err:
        raise CheckpointError(
            f"{path}: ONNX file lacks repquant metadata {err.args[0]!r} (not exported by repquant)"
        ) from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: malformed repquant metadata in ONNX file ({err})") from None


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxsim
    except ImportError:
        raise MissingDependencyError("onnxsim", "simplify", "ONNX graph simplification") from None
    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise ModelError("onnxsim could not validate the simplified graph; export without simplify")
    return simplified


def onnx_has_qdq(onnx_path: str | os.PathLike) -> bool:
    """Whether the ONNX graph holds QuantizeLinear/DequantizeLinear nodes (explicit quantization); the graph
    only, external weights are not read. An unreadable file raises ``CheckpointError`` naming it."""
    from repquant.deploy.onnx_file import load_onnx_graph

    proto = load_onnx_graph(onnx_path)
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in proto.graph.node)
