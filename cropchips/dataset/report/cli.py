"""``cropchips report``: argument parsing around :func:`~cropchips.dataset.report.build.build_report`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from cropchips.cli.run import EXIT_OK, run, setup_logging
from cropchips.dataset.report.build import build_report

#: The ``--help`` description (the docstring of the single module this package was split from).
DESCRIPTION = ("A self-contained HTML report of a dataset folder: run summary, class balance, splits, cell map, "
               "quicklooks.")


def main(argv: Sequence[str] | None = None) -> int:
    """``cropchips report OUTPUT_DIR [--quicklooks] [--max-gallery N]``."""
    parser = argparse.ArgumentParser(prog="cropchips report", description=DESCRIPTION)
    parser.add_argument("output_dir", help="the workers' output folder (with index.parquet, ideally)")
    parser.add_argument("--quicklooks", action="store_true", help="also write quicklooks/NAME.png for every chip")
    parser.add_argument("--max-gallery", type=int, default=24, help="chips shown in the report's gallery")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)

    def body() -> int:
        setup_logging(args.log_level)
        path = build_report(args.output_dir, quicklooks=args.quicklooks, max_gallery=args.max_gallery)
        print(json.dumps({"report": str(path)}))
        return EXIT_OK

    return run(body)
