"""``python -m xcraft``: the ``xcraft`` command (see :mod:`xcraft.cli`)."""

import sys

from xcraft.cli import main

if __name__ == "__main__":
    sys.exit(main())
