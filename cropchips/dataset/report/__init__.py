"""A self-contained HTML report of a dataset folder: run summary, class balance, splits, cell map, quicklooks.

``labels`` names and colours the mask labels (0 no field, 1..8, 255 ignore), ``images`` makes the
quicklook pixels and PNGs, ``cells`` loads the chips and the cells' statuses, ``page`` writes the HTML,
``build`` ties them into ``report.html`` and ``cli`` is ``cropchips report``.
"""

from cropchips.dataset.report.build import GALLERY_MAX_SIDE, QUICKLOOKS_DIR, REPORT_NAME, build_report
from cropchips.dataset.report.cells import Bbox, CellLike, CellStatus, cells_from_results, grid_from_header, load_chips, select_gallery
from cropchips.dataset.report.cli import main
from cropchips.dataset.report.colours import (
    OTHER_LABEL_COLOUR,
    OTHER_SPLIT_COLOUR,
    OTHER_STATUS_COLOUR,
    PALETTE,
    SPLIT_COLOURS,
    STATUS_COLOURS,
)
from cropchips.dataset.report.images import (
    OVERLAY_ALPHA,
    QUICKLOOK_GAP,
    RGB_BANDS,
    STRETCH_PERCENTILES,
    _subsample,  # tests/test_report.py checks the gallery's subsampling
    encode_png,
    overlay_classes,
    quicklook,
    read_rgb,
    stretch_rgb,
)
from cropchips.dataset.report.labels import LABEL_TEXT, label_colour, label_ids, label_text

__all__ = [
    "GALLERY_MAX_SIDE", "LABEL_TEXT", "OTHER_LABEL_COLOUR", "OTHER_SPLIT_COLOUR", "OTHER_STATUS_COLOUR",
    "OVERLAY_ALPHA", "PALETTE", "QUICKLOOKS_DIR", "QUICKLOOK_GAP", "REPORT_NAME", "RGB_BANDS", "SPLIT_COLOURS",
    "STATUS_COLOURS", "STRETCH_PERCENTILES", "Bbox", "CellLike", "CellStatus", "build_report", "cells_from_results",
    "encode_png", "grid_from_header", "label_colour", "label_ids", "label_text", "load_chips", "main",
    "overlay_classes", "quicklook", "read_rgb", "select_gallery", "stretch_rgb",
]
