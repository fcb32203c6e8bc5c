"""Write a dataset folder's report.html (and, on request, a quicklook PNG per chip)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cropchips.errors import InputDataError
from cropchips.output.storage import Storage, open_storage
from cropchips.dataset.report.cells import CellLike, _resolve_cells, load_chips, select_gallery
from cropchips.dataset.report.images import _subsample, encode_png, quicklook
from cropchips.dataset.report.page import GalleryItem, render_page

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
QUICKLOOKS_DIR = "quicklooks"
#: Gallery images are subsampled to at most this many pixels a side (quicklook files are not).
GALLERY_MAX_SIDE = 256


def build_report(output: Storage | Path | str, *, cells: Iterable[CellLike] | None = None,
                 run_summary: Mapping[str, Any] | None = None, quicklooks: bool = False,
                 max_gallery: int = 24) -> Path | str:
    """Write ``OUTPUT/report.html`` (self-contained: inline CSS, SVG and PNG data URIs, no script,
    no external resource) and, with ``quicklooks``, ``OUTPUT/quicklooks/NAME.png`` per chip.

    ``cells``: (cell_id, bbox lon/lat or None, status[, error]) tuples, mappings with those keys or
    :class:`CellStatus`; None: one ``ok`` cell per chip ``cell_id``, boxed by its chips' footprints.
    ``run_summary``: the monitor's :meth:`~cropchips.queue.monitor.RunProgress.summary`, shown when given.
    Returns the report's path or URL.
    """
    storage = open_storage(output)
    if storage.is_local and not Path(storage.url()).is_dir():
        raise InputDataError(f"{storage} does not exist: give the workers' output folder")
    chips, indexed = load_chips(storage)
    chips = chips.sort_values("name").reset_index(drop=True) if len(chips) else chips
    resolved = _resolve_cells(cells, chips)
    written = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")

    gallery_rows = set(select_gallery(chips, max_gallery))
    wanted = range(len(chips)) if quicklooks else sorted(gallery_rows, key=lambda i: str(chips["name"].iat[i]))
    gallery: list[GalleryItem] = []
    written_pngs = 0
    for i in wanted:
        name = str(chips["name"].iat[i])
        try:
            pixels = quicklook(storage.source(str(chips["image"].iat[i])), storage.source(str(chips["mask"].iat[i])))
        except (OSError, ValueError, IndexError) as exc:  # one unreadable chip must not stop the report
            log.warning("no quicklook for %s: %s", name, exc)
            continue
        if quicklooks:
            storage.write_bytes(f"{QUICKLOOKS_DIR}/{name}.png", encode_png(pixels))
            written_pngs += 1
        if i in gallery_rows:
            small = _subsample(pixels, GALLERY_MAX_SIDE)
            clear = chips["clear_fraction"].iat[i] if "clear_fraction" in chips else None
            gallery.append((name, str(chips["split"].iat[i]), None if clear is None else float(clear),
                            encode_png(small), (small.shape[1], small.shape[0])))
    gallery.sort(key=lambda item: item[0])

    page = render_page(storage, chips, indexed, resolved, run_summary, gallery, written)
    storage.write_bytes(REPORT_NAME, page.encode("utf-8"))
    path = storage.url(REPORT_NAME)
    log.info("report %s: %d chips, %d cells, %d in the gallery%s", path, len(chips), len(resolved), len(gallery),
             f", {written_pngs} quicklooks in {storage.url(QUICKLOOKS_DIR)}" if quicklooks else "")
    return Path(path) if storage.is_local else path
