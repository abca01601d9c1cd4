"""The ``repquant`` command line: flags -> task config -> ``repquant.tasks.<command>.run`` -> printed result.

Errors: a :class:`RepquantError` (or an OS error such as a missing directory) prints ``error: <one line>``
on stderr and exits 1; ``REPQUANT_DEBUG=1`` (or ``--debug``) shows the traceback instead. Usage errors exit
2 (click's convention). Importing this package does not import torch: task modules load inside commands.
"""

from __future__ import annotations

from collections.abc import Sequence

from repquant.cli import deploy_commands, quant_commands, quantize_commands, train_commands  # noqa: F401  (register commands)
from repquant.cli.core import cli

__all__ = ["cli", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``repquant = repquant.cli:main``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="repquant")
