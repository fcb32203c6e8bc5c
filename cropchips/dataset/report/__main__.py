"""``cropchips report OUTPUT_DIR [--quicklooks] [--max-gallery N]``."""

import sys

from cropchips.dataset.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
