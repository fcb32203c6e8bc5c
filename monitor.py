#!/usr/bin/env python3
"""Follow the results topic: live progress, per-class pixel counts, per-worker throughput, final summary.

The seed's entry point, kept as a thin shim: the command lives in cropchips/cli/monitor.py and is also
``cropchips monitor`` once the package is installed.
"""

import sys

from cropchips.cli.monitor import *  # noqa: F401,F403 - tests and users import the script's names
from cropchips.cli.monitor import main

if __name__ == "__main__":
    sys.exit(main())
