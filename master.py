#!/usr/bin/env python3
"""Grid an area of a EuroCrops GeoPackage, find Sentinel-2 scenes and publish one task per useful cell.

The seed's entry point, kept as a thin shim: the command lives in cropchips/cli/master.py and is also
``cropchips master`` once the package is installed.
"""

import sys

from cropchips.cli.master import *  # noqa: F401,F403 - tests and users import the script's names
from cropchips.cli.master import main

if __name__ == "__main__":
    sys.exit(main())
