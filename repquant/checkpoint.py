"""Model checkpoints: safetensors files holding a state dict and the model's config.

Layout of a repquant checkpoint (``*.safetensors``):

- tensors: the model's ``state_dict()`` (train-form or deployed, see ``deployed``);
- metadata (all strings, as safetensors requires):
  ``repquant_format`` (``"1"``), ``repquant_config`` (``ModelConfig.to_dict()`` as JSON),
  ``deployed`` (``"true"``/``"false"``), ``dtype`` of the floating tensors, and every user extra
  (mAP, recipe, ...) JSON-encoded under its own key.

Torch files (``*.pt``) are accepted for reading only through ``torch.load(weights_only=True)``:
a dict with ``"model"`` (state dict) and ``"model_config"`` (config dict), optional ``"deployed"``
and ``"metadata"`` (dict). Loading never unpickles code, and checks every tensor name and shape
before copying anything into the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repquant.errors import CheckpointError, ModelError
from repquant.io import read_safetensors, sniff_tensor_file, torch_load_weights_only, write_safetensors
from repquant.modelfile import pickle_globals, refuse_foreign_globals
from repquant.models.yolov6 import ModelConfig, YOLOv6

FORMAT_VERSION = 1
_RESERVED = ("repquant_format", "repquant_config", "deployed", "dtype")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    extra_metadata: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model``'s state dict and config to ``path`` (safetensors, atomic).

    Args:
        model: a repquant model (needs ``model.config.to_dict()``); train-form or deployed.
        extra_metadata: JSON-serializable values (e.g. ``{"map50_95": 0.41, "recipe": {...}}``).
        dtype: cast floating tensors, e.g. ``torch.float16`` to halve committed checkpoints;
            integer buffers (BN ``num_batches_tracked``) keep their dtype. ``None`` keeps them as is.
    """
    from repquant.reparam import is_deployed

    path = Path(path)
    config = _model_config_dict(model)
    metadata = {
        "repquant_format": str(FORMAT_VERSION),
        "repquant_config": json.dumps(config, sort_keys=True),
        "deployed": json.dumps(bool(is_deployed(model))),
    }
    for key, value in (extra_metadata or {}).items():
        if key in _RESERVED:
            raise CheckpointError(f"{path}: metadata key {key!r} is reserved")
        try:
            metadata[key] = json.dumps(value, sort_keys=True)
        except TypeError as err:
            raise CheckpointError(f"{path}: metadata {key!r} is not JSON-serializable ({err})") from None
    tensors = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        # clone(): safetensors refuses tensors that share storage (tied or aliased parameters).
        tensors[name] = t.contiguous().clone()
    float_dtypes = sorted(
        {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    )
    metadata["dtype"] = ",".join(float_dtypes)
    write_safetensors(path, tensors, metadata)
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint -> (state dict, metadata).

    ``metadata`` holds ``repquant_format`` (int), ``repquant_config`` (dict), ``deployed`` (bool)
    and the extras, JSON-decoded. Missing, unreadable or truncated files raise
    :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        kind = sniff_tensor_file(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err.strerror or err})") from None
    if kind == "safetensors":
        return _load_safetensors(path, map_location)
    if kind == "torch":
        return _load_torch(path, map_location)
    raise CheckpointError(f"{path}: not a safetensors or torch checkpoint")


def load_model(
    path: str | os.PathLike,
    expected_name: str | None = None,
    expected_num_classes: int | None = None,
    map_location: str = "cpu",
) -> YOLOv6:
    """Build the model stored in ``path`` and load its weights; returns it in eval mode.

    The model is created from the stored config (and re-parameterized first when the checkpoint is
    deployed). Every tensor name and shape is checked before copying; the first mismatch is named.
    ``expected_name`` / ``expected_num_classes`` guard against loading the wrong variant.
    """
    state, metadata = load_checkpoint(path, map_location="cpu")
    config = metadata.get("repquant_config")
    if not isinstance(config, dict) or "name" not in config:
        raise CheckpointError(f"{path}: no model config in checkpoint metadata")
    variant = _describe(config)
    if expected_name is not None and config["name"] != expected_name:
        raise CheckpointError(f"{path}: checkpoint is {variant}, expected {expected_name}")
    if expected_num_classes is not None and config.get("num_classes") != expected_num_classes:
        raise CheckpointError(f"{path}: checkpoint is {variant}, expected num_classes {expected_num_classes}")
    return model_from_state(path, state, metadata).to(map_location).eval()


def model_from_state(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> YOLOv6:
    """Build the model described by checkpoint ``metadata`` (re-parameterized when it is deployed) and load
    ``state`` into it after checking every name and shape; ``path`` only names the file in errors."""
    from repquant.reparam import reparameterize

    path = Path(path)
    config = metadata.get("repquant_config")
    if not isinstance(config, dict) or "name" not in config:
        raise CheckpointError(f"{path}: no model config in checkpoint metadata")
    model = _build_model(path, config)
    if metadata.get("deployed"):
        model = reparameterize(model)
    if "repquant_quant" in metadata and any("_quantizer." in k for k in state):
        raise CheckpointError(f"{path}: a quantized (QAT) checkpoint; `repquant export` and `repquant eval` "
                              "read it, float-model commands do not")
    check_state_dict(path, _describe(config), model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model


# --- helpers --------------------------------------------------------------------------------------


def _model_config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise CheckpointError(f"{type(model).__name__}: model has no config.to_dict(); cannot checkpoint it")
    return config.to_dict()


def _describe(config: dict[str, Any]) -> str:
    return f"{config.get('name')} (num_classes {config.get('num_classes')})"


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a safetensors checkpoint (as ``load_checkpoint`` gives it), tensors unread."""
    from repquant.io import read_safetensors_metadata

    return {key: _decode(value) for key, value in read_safetensors_metadata(path).items()}


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # metadata written by another tool: keep the raw string


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__


def _load_safetensors(path: Path, map_location: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        state, raw = read_safetensors(path, device=map_location)
    except Exception as err:  # safetensors raises its own SafetensorError / OSError variants
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_one_line(err)})") from None
    if "repquant_format" not in raw:
        raise CheckpointError(
            f"{path}: safetensors file without repquant metadata (not a repquant checkpoint)"
        )
    metadata = {key: _decode(value) for key, value in raw.items()}
    if metadata["repquant_format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {metadata['repquant_format']!r}, this repquant reads {FORMAT_VERSION}"
        )
    metadata["deployed"] = bool(metadata.get("deployed", False))
    return state, metadata


def _load_torch(path: Path, map_location: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    # Name the offending global instead of torch's weights-only message (which suggests weights_only=False).
    refuse_foreign_globals(path, pickle_globals(path))
    try:
        obj = torch_load_weights_only(path, map_location=map_location)
    except Exception as err:  # truncated zip, pickle with code (weights_only refuses it), ...
        raise CheckpointError(f"{path}: unreadable torch checkpoint ({_one_line(err)})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or "model_config" not in obj:
        raise CheckpointError(f"{path}: torch checkpoint must be a dict with 'model' and 'model_config'")
    state = obj["model"]
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: 'model' entry {bad!r} is not a tensor")
    metadata: dict[str, Any] = dict(obj.get("metadata") or {})
    metadata.update(
        repquant_format=FORMAT_VERSION,
        repquant_config=dict(obj["model_config"]),
        deployed=bool(obj.get("deployed", False)),
    )
    return state, metadata


def _build_model(path: Path, config: dict[str, Any]) -> YOLOv6:
    # Build from the stored config, not the registry entry: a checkpoint stays loadable when a
    # registry default changes, and custom configs (other widths, block modes) round-trip.
    try:
        return YOLOv6(ModelConfig.from_dict(config))
    except (KeyError, TypeError, ValueError, ModelError) as err:
        raise CheckpointError(f"{path}: cannot build model from stored config ({_one_line(err)})") from None


def check_state_dict(
    path: Path, variant: str, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]
) -> None:
    """Raise on the first missing key, unexpected key or shape mismatch (model order)."""
    for name, tensor in expected.items():
        if name not in found:
            raise CheckpointError(
                f"{path}: checkpoint ({variant}) lacks tensor {name!r} that the model expects"
            )
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(found[name].shape)} in checkpoint ({variant}), "
                f"model expects {tuple(tensor.shape)}"
            )
    for name in found:
        if name not in expected:
            raise CheckpointError(f"{path}: checkpoint ({variant}) has unexpected tensor {name!r}")
