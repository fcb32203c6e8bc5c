#!/usr/bin/env python3
"""Consume tasks, read Sentinel-2 scenes, composite, rasterize field masks and write image/mask chips.

The seed's entry point, kept as a thin shim: the command lives in cropchips/cli/worker.py and is also
``cropchips worker`` once the package is installed.
"""

import sys

from cropchips.cli.worker import *  # noqa: F401,F403 - tests and users import the script's names
from cropchips.cli.worker import main

if __name__ == "__main__":
    sys.exit(main())
