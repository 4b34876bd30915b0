"""``python -m icbs``: the same command line as the ``icbs`` console script."""

import sys

from icbs.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
