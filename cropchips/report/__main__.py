"""``python -m cropchips.report OUTPUT_DIR [--quicklooks] [--max-gallery N]``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
