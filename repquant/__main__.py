"""``python -m repquant`` = the ``repquant`` command."""

from repquant.cli import main

if __name__ == "__main__":
    main()
