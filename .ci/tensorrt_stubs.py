"""Put NVIDIA's published TensorRT type stubs (``tensorrt-stubs``, TensorRT 10 API) where mypy reads them.

``mypy`` then type-checks ``repquant/deploy/tensorrt.py`` against the real TensorRT 10 API on machines
without TensorRT. Written by hand because the published wheels cannot be used as they are:
- they depend on the ``tensorrt`` wheel itself (which needs CUDA), so the stub wheel is downloaded
  without dependencies and only its ``.pyi`` files are taken;
- they are not a PEP 561 stub package (``tensorrt/__init__.pyi`` without ``py.typed``), so mypy skips
  them when installed; here they go to ``.typestubs/`` (``mypy_path`` in pyproject.toml);
- every release up to 10.13 has syntax errors in signatures we never call (a parameter named ``in``,
  a required parameter after defaulted ones in ``add_scale_nd``); those lines are repaired (renamed
  parameter, ``= ...`` default) and every repair is printed. Any other syntax error fails this script.

Usage: ``python .ci/tensorrt_stubs.py`` (idempotent; needs the package registry once).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

STUBS_VERSION = "10.13.0.35.1"
TARGET = Path(__file__).resolve().parent.parent / ".typestubs"
MARKER = TARGET / f"tensorrt-stubs-{STUBS_VERSION}"


def _repair(source: str, name: str) -> str:
    lines = source.splitlines()
    for _ in range(100):  # one repair per syntax error
        try:
            ast.parse("\n".join(lines))
            return "\n".join(lines) + "\n"
        except SyntaxError as err:
            index = (err.lineno or 0) - 1
            old = lines[index]
            new = re.sub(r"\bin: ", "in_: ", old)
            if new == old and "def add_scale_nd(" in old:
                new = old.replace("channel_axis: int)", "channel_axis: int = ...)")
            if new == old:
                raise SystemExit(f"{name}:{index + 1}: unrepaired syntax error in the TensorRT stubs: {err.msg}")
            print(f"repaired {name}:{index + 1}: {old.strip()[:90]}")
            lines[index] = new
    raise SystemExit(f"{name}: too many syntax errors in the TensorRT stubs")


def main() -> None:
    if MARKER.is_file():
        print(f"TensorRT stubs {STUBS_VERSION} already in {TARGET}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp,
                        f"tensorrt-stubs=={STUBS_VERSION}"], check=True)
        wheel = next(Path(tmp).glob("tensorrt_stubs-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            stubs = [n for n in archive.namelist() if n.endswith(".pyi")]
            if not any(n == "tensorrt/__init__.pyi" for n in stubs):
                raise SystemExit(f"{wheel.name}: no tensorrt/__init__.pyi inside")
            for name in stubs:
                out = TARGET / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(_repair(archive.read(name).decode(), name))
    MARKER.write_text(f"tensorrt-stubs=={STUBS_VERSION}\n")
    print(f"TensorRT stubs {STUBS_VERSION}: {len(stubs)} files in {TARGET}")


if __name__ == "__main__":
    main()
