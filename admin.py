#!/usr/bin/env python3
"""Administer the pipeline's topics and consumer group, inspect results and dead letters, check a host.

The seed's entry point, kept as a thin shim: the command lives in cropchips/cli/admin.py and is also
``cropchips admin`` once the package is installed.
"""

import sys

from cropchips.cli.admin import *  # noqa: F401,F403 - tests and users import the script's names
from cropchips.cli.admin import main

if __name__ == "__main__":
    sys.exit(main())
