"""Output safety, in one place for every command: no command writes over one of its own inputs, and replacing
an existing artefact or run takes an explicit ``--overwrite`` (files) or ``--exist-ok`` (run folders).

Checked before any work starts, so a refused command has spent nothing and changed nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from repquant.errors import RepquantError

OVERWRITE_FLAG = "--overwrite"
EXIST_OK_FLAG = "--exist-ok"


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_creatable(path: str | os.PathLike) -> Path:
    """``path`` can be created: its first existing ancestor is a folder (else an error naming that file)."""
    path = Path(path)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise RepquantError(f"{path}: cannot be created, {parent} is a file, not a folder")
            break
    if path.is_dir():
        raise RepquantError(f"{path}: is a folder; the output must be a file path")
    return path


def check_output_file(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], overwrite: bool,
                      what: str = "output") -> Path:
    """Refuse an ``output`` that is one of ``inputs``, one that exists unless ``overwrite``, and one that cannot
    be created. Returns it as a ``Path``."""
    path = check_creatable(output)
    for source in inputs:
        if source is not None and Path(source).exists() and _same_file(path, Path(source)):
            raise RepquantError(f"{path}: the {what} is the input file {source}; writing it would destroy the "
                                "input, pick another path")
    if path.exists() and not overwrite:
        raise RepquantError(f"{path}: exists; pass {OVERWRITE_FLAG} to replace it")
    return path


def check_run_folder(folder: str | os.PathLike, artefacts: Iterable[str], exist_ok: bool, resume: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """A run folder may be reused only when resuming or with ``exist_ok``: refuse one that already holds any of
    ``artefacts`` (paths relative to it), and one whose artefacts include an input file (even when resuming)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RepquantError(f"{folder}: exists and is a file, not a run folder")
    check_creatable(folder / "x")
    artefacts = list(artefacts)
    for source in (Path(s) for s in inputs if s is not None):
        if source.exists() and any(_same_file(folder / name, source) for name in artefacts):
            raise RepquantError(f"{folder}: the run would write over its own input {source}; choose another "
                                "output folder")
    found = [name for name in artefacts if (folder / name).exists()]
    if found and not (resume or exist_ok):
        raise RepquantError(f"{folder}: holds a previous run ({found[0]}); pass {EXIST_OK_FLAG} to replace it, "
                            "resume it, or choose another output folder")
    return folder
