"""Atomic file writes and safe checkpoint loading (no arbitrary pickle)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any threads exist
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``.

    A crash (even SIGKILL) leaves either the old file or the new one, never a torn write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- tensor files -------------------------------------------------------------------------------
# torch and safetensors are imported inside the functions so that `import repquant.io` stays light
# (the CLI imports the error/io layer before it knows whether a command needs torch).

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reader rejects headers above 100 MB


def sniff_tensor_file(path: str | os.PathLike) -> str | None:
    """Guess the container of ``path`` from its first bytes, not its suffix.

    Returns ``"safetensors"`` (8-byte little-endian header length, then a JSON object),
    ``"torch"`` (zip archive written by ``torch.save``, or a legacy pickle), or ``None``.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= _SAFETENSORS_MAX_HEADER:
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return None


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (name -> contiguous CPU tensor, no shared storage) atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict[str, str]]:
    """Read a safetensors file -> (name -> tensor on ``device``, raw string metadata).

    Raises whatever safetensors raises on a corrupt file; callers turn it into a one-line error.
    """
    from safetensors import safe_open

    tensors = {}
    with safe_open(os.fspath(path), framework="pt", device=device) as f:
        metadata = dict(f.metadata() or {})
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    return tensors, metadata


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw string metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_open` (trainer state, optimizer moments)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def torch_load_weights_only(path: str | os.PathLike, map_location: str = "cpu") -> object:
    """``torch.load`` restricted to tensors and plain containers: never runs pickled code."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)
