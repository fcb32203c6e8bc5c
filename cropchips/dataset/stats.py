"""Per-band pixel statistics of a split (``stats.json``): what a model needs to standardise its inputs.

The statistics are exact: every image of the split is read once, one at a time, and each band's
uint16 values are counted in a 65536-bin histogram (``np.bincount``); the count, mean, standard
deviation and percentiles all come from those histograms. Memory is bounded by bands x 65536
counters whatever the number of chips, and the numbers do not depend on the order of the chips.

An image band is named by its description: ``B02`` for a single image, ``2023-05-15 B02`` for a
bin (or date) of a time series. Statistics are kept per description, i.e. per band and per
date, and also pooled per band name over all dates (``pooled``), for time series whose dates
differ between chips. Pixels equal to 0 are no data (the chips' GeoTIFF nodata) and are left out.

Layout of ``stats.json`` (``version`` 1)::

    {"version": 1, "split": "train", "chips": 23, "dataset_id": "0123abcd4567", "dataset_ids": [...],
     "nodata": 0, "percentiles": [2, 98], "ddof": 0,
     "bands": [{"description": "B02", "band": "B02", "date": null, "count": 23552, "mean": 812.4,
                "std": 120.9, "min": 401, "max": 1730, "p2": 590.0, "p98": 1102.0}, ...],
     "pooled": [{"band": "B02", "date": null, ...}, ...],
     "normalize": {"bands": ["B02", ...], "mean": [812.4, ...], "std": [120.9, ...]}}

``normalize`` lists mean and std in the band order of the images (the order of ``bands``), ready
for ``(x - mean) / std``; a band with no valid pixel has null entries.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from rasterio.io import DatasetReader, MemoryFile

from cropchips.errors import InputDataError
from cropchips.output.storage import Storage, open_storage

log = logging.getLogger(__name__)

STATS_NAME = "stats.json"
STATS_VERSION = 1
#: The percentiles reported for each band (a 2-98 % stretch for display, robust clipping for models).
PERCENTILES = (2, 98)
#: Image pixels of this value are no data (the chips' GeoTIFF nodata).
NODATA = 0
_LEVELS = 2**16  # uint16: one counter per possible value

#: A time-series band description: "YYYY-MM-DD BAND".
_DATED = re.compile(r"(\d{4}-\d{2}-\d{2}) (\S+)", re.ASCII)


def parse_band_description(text: str) -> tuple[str | None, str]:
    """(date, band) of an image band's description: ``"2023-05-15 B02"`` -> ``("2023-05-15", "B02")``,
    ``"B02"`` -> ``(None, "B02")``."""
    match = _DATED.fullmatch(text.strip())
    if match:
        return match.group(1), match.group(2)
    return None, text.strip()


@contextmanager
def open_image(storage: Storage, rel: str) -> Iterator[DatasetReader]:
    """Open the dataset file ``rel`` with rasterio: by path in a folder, from its bytes in memory
    for an object store (one GET, no GDAL credentials needed). InputDataError if it is missing
    or not a raster."""
    memory = None
    try:
        if storage.is_local:
            src = rasterio.open(storage.source(rel))
        else:
            memory = MemoryFile(storage.read_bytes(rel))
            src = memory.open()
    except FileNotFoundError as exc:
        raise InputDataError(f"{storage.url(rel)} is listed in the index of {storage} but missing; rebuild the "
                             f"index (cropchips index --output-dir {storage})") from exc
    except rasterio.RasterioIOError as exc:
        if memory is not None:
            memory.close()
        raise InputDataError(f"{storage.url(rel)} is not a readable GeoTIFF ({exc}); rewrite the chip "
                             "(run its cell again with --force) or drop it from the index") from exc
    try:
        yield src
    finally:
        src.close()
        if memory is not None:
            memory.close()


def image_descriptions(src: DatasetReader, fallback: Sequence[str] | None = None) -> list[str]:
    """The band descriptions of an open image; ``fallback`` (e.g. the index's ``bands``) fills any
    band without one. InputDataError if a band has no name at all."""
    names = list(src.descriptions)
    for i, text in enumerate(names):
        if not text:
            if fallback is not None and len(fallback) == len(names) and fallback[i]:
                names[i] = str(fallback[i])
            else:
                raise InputDataError(f"{src.name}: band {i + 1} has no description, so its statistics cannot be "
                                     "named; write the chips with this version of cropchips (one description "
                                     "per band, e.g. B02 or '2023-05-15 B02')")
    return names


class _Histograms:
    """One exact histogram of uint16 values per band description, in order of first appearance."""

    def __init__(self) -> None:
        self.counts: dict[str, np.ndarray] = {}

    def add(self, description: str, values: np.ndarray) -> None:
        hist = np.bincount(values.ravel(), minlength=_LEVELS).astype(np.int64)
        hist[NODATA] = 0
        if description in self.counts:
            self.counts[description] += hist
        else:
            self.counts[description] = hist


def summarise(hist: np.ndarray) -> dict[str, Any]:
    """count, mean, std (ddof 0), min, max and the PERCENTILES of the values counted in ``hist``
    (index = value), exactly as numpy's defaults give them on the values themselves (percentiles:
    linear interpolation between the closest ranks). Nulls when nothing was counted."""
    n = int(hist.sum())
    if n == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None,
                **{f"p{q}": None for q in PERCENTILES}}
    values = np.arange(hist.size, dtype=np.float64)
    present = np.flatnonzero(hist)
    # The sum in integers is exact (65535 x 2**47 pixels fit in int64); the variance in float64.
    mean = int(np.dot(hist.astype(np.int64), np.arange(hist.size, dtype=np.int64))) / n
    variance = float(np.dot(hist, (values - mean) ** 2)) / n
    cumulative = np.cumsum(hist)
    out: dict[str, Any] = {"count": n, "mean": mean, "std": float(np.sqrt(variance)),
                           "min": int(present[0]), "max": int(present[-1])}
    for q in PERCENTILES:
        position = (n - 1) * (q / 100)
        lo = int(np.floor(position))
        hi = min(lo + 1, n - 1)
        # The value of rank k (0-based) is the first value whose cumulative count exceeds k.
        x_lo, x_hi = np.searchsorted(cumulative, [lo, hi], side="right")
        fraction = position - lo
        out[f"p{q}"] = float(x_lo + (x_hi - x_lo) * fraction)
    return out


def compute_stats(output: Storage | Path | str, frame: pd.DataFrame, split: str = "train") -> dict[str, Any]:
    """Per-band statistics of the images of ``split`` in ``frame`` (the chip index: columns
    ``image`` and ``split``; ``dataset_id`` and ``bands`` used when present); see the module
    docstring for the layout. Each image is read once, one at a time."""
    storage = open_storage(output)
    missing = [column for column in ("image", "split") if column not in frame.columns]
    if missing:
        raise InputDataError(f"the chip index lacks the column(s) {missing}; rebuild it "
                             f"(cropchips index --output-dir {storage})")
    rows = frame[frame["split"] == split]
    histograms = _Histograms()
    for position, row in enumerate(rows.itertuples(index=False)):
        rel = str(row.image)
        fallback = getattr(row, "bands", None)
        with open_image(storage, rel) as src:
            if any(dtype != "uint16" for dtype in src.dtypes):
                raise InputDataError(f"{storage.url(rel)} is {src.dtypes[0]}, not uint16: it is not a cropchips "
                                     "image chip (statistics count uint16 values)")
            names = image_descriptions(src, None if fallback is None else list(fallback))
            for band, description in enumerate(names, start=1):
                histograms.add(description, src.read(band))
        if (position + 1) % 500 == 0:
            log.info("statistics: %d of %d %s images read", position + 1, len(rows), split)

    bands = []
    for description, hist in histograms.counts.items():
        date, band = parse_band_description(description)
        bands.append({"description": description, "band": band, "date": date, **summarise(hist)})
    pooled_hist: dict[str, np.ndarray] = {}
    for description, hist in histograms.counts.items():
        _, band = parse_band_description(description)
        pooled_hist[band] = pooled_hist[band] + hist if band in pooled_hist else hist.copy()
    pooled = [{"band": band, "date": None, **summarise(hist)} for band, hist in pooled_hist.items()]

    ids = sorted({v for v in rows["dataset_id"] if isinstance(v, str) and v}) if "dataset_id" in rows.columns else []
    return {
        "version": STATS_VERSION, "split": split, "chips": int(len(rows)),
        "dataset_id": ids[0] if len(ids) == 1 else None, "dataset_ids": ids,
        "nodata": NODATA, "percentiles": list(PERCENTILES), "ddof": 0,
        "bands": bands, "pooled": pooled,
        "normalize": {"bands": [b["description"] for b in bands], "mean": [b["mean"] for b in bands],
                      "std": [b["std"] for b in bands]},
    }


def write_stats(output: Storage | Path | str, frame: pd.DataFrame) -> dict[str, Any] | None:
    """Compute the train split's statistics and publish them whole as ``stats.json``; return them.
    None (and no file: a stale one is removed) when the index has no train chip."""
    storage = open_storage(output)
    if "split" not in frame.columns or not (frame["split"] == "train").any():
        if storage.exists(STATS_NAME):
            log.warning("%s: the index has no train chip; removing the stale %s", storage, STATS_NAME)
            storage.delete(STATS_NAME)
        else:
            log.warning("%s: the index has no train chip; no %s written", storage, STATS_NAME)
        return None
    stats = compute_stats(storage, frame, "train")
    storage.write_json(STATS_NAME, stats)
    log.info("statistics of %d train chips (%d bands) written to %s", stats["chips"], len(stats["bands"]),
             storage.url(STATS_NAME))
    return stats


def read_stats(location: Storage | Path | str) -> dict[str, Any]:
    """``stats.json`` of a dataset folder or URL, or the stats file itself when ``location`` ends in
    ``.json``. InputDataError when there is none."""
    text = str(location) if not isinstance(location, Storage) else ""
    if text.endswith(".json"):
        parent, _, name = text.rstrip("/").rpartition("/")
        storage, rel = open_storage(parent or "."), name
    else:
        storage, rel = open_storage(location), STATS_NAME
    try:
        stats = storage.read_json(rel)
    except FileNotFoundError:
        raise InputDataError(f"{storage.url(rel)} does not exist: compute the statistics first "
                             "(cropchips.dataset.stats.write_stats(ROOT, index), which finalising the "
                             "index does), or pass normalize=False") from None
    if not isinstance(stats, Mapping) or stats.get("version") != STATS_VERSION or "bands" not in stats:
        raise InputDataError(f"{storage.url(rel)} is not a version {STATS_VERSION} cropchips stats file; "
                             "recompute it with cropchips.dataset.stats.write_stats")
    return dict(stats)
