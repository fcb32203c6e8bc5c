"""Shared plumbing of the command-line scripts: logging set-up and one exit point."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import CropChipsError

log = logging.getLogger("cropchips")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def setup_logging(level: str = "INFO") -> None:
    """Configure logging for a script (library modules only ever call getLogger)."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # kafka-python logs every reconnect attempt; our own code logs the waits once, readably.
    logging.getLogger("kafka").setLevel(logging.CRITICAL if level.upper() != "DEBUG" else logging.DEBUG)
    for noisy in ("rasterio", "urllib3", "botocore", "fiona", "pyogrio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(body: Callable[[], int]) -> int:
    """Run a script body; a CropChipsError becomes one clear log line and exit code 1."""
    try:
        return body()
    except CropChipsError as exc:
        setup_logging()  # a no-op if the script configured logging already
        log.error("%s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        setup_logging()
        log.warning("interrupted")
        return EXIT_INTERRUPTED
