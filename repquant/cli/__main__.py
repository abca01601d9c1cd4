"""``python -m repquant.cli`` (used under torchrun for DDP commands)."""

from repquant.cli import main

main()
