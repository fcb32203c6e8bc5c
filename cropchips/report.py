"""A self-contained HTML report of a dataset folder: run summary, class balance, splits, cell map, quicklooks."""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
import re
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from pyproj import Transformer

from .classes import CLASS_NAMES
from .cli import EXIT_OK, run, setup_logging
from .dataset import INDEX_NAME, SPLITS, records_from_metadata
from .errors import InputDataError
from .grid import Grid
from .messages import BANDS, STATUSES, Result, RunHeader
from .storage import Storage, open_storage
from .writing import METADATA_DIR

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
QUICKLOOKS_DIR = "quicklooks"
#: White pixels between the true-colour and the overlay halves of a quicklook.
QUICKLOOK_GAP = 4
#: Opacity of the class colours drawn over the true-colour image.
OVERLAY_ALPHA = 0.45
#: Gallery images are subsampled to at most this many pixels a side (quicklook files are not).
GALLERY_MAX_SIDE = 256
#: Percentiles of the per-band linear stretch.
STRETCH_PERCENTILES = (2.0, 98.0)
RGB_BANDS = ("B04", "B03", "B02")

#: One fixed colour per class id, used by the bar chart, the split bars, the legend and the overlays.
PALETTE: dict[int, str] = {
    0: "#9e9e9e",  # unlabelled (never drawn over the quicklooks)
    1: "#808000",  # olive plantations
    2: "#8e24aa",  # vineyards
    3: "#e53935",  # fruit
    4: "#1b5e20",  # nuts, orchards, forest
    5: "#fdd835",  # cereals
    6: "#26c6da",  # legumes
    7: "#3949ab",  # vegetables
    8: "#fb8c00",  # fallow, bare arable land
}
STATUS_COLOURS: dict[str, str] = {"ok": "#2e7d32", "no_scenes": "#607d8b", "no_fields": "#f9a825",
                                  "failed": "#c62828"}
OTHER_STATUS_COLOUR = "#bdbdbd"
SPLIT_COLOURS: dict[str, str] = {"train": "#1565c0", "val": "#ef6c00", "test": "#6a1b9a"}
OTHER_SPLIT_COLOUR = "#616161"
#: Worst first: a cell with tasks of several statuses shows the first that occurs.
_STATUS_PRECEDENCE = ("failed", "no_scenes", "no_fields", "ok")
_CELL_ROW_COL = re.compile(r"^g(?P<grid>[0-9a-f]+)-r(?P<row>\d+)-c(?P<col>\d+)$")

Bbox = tuple[float, float, float, float]


@dataclass(frozen=True)
class CellStatus:
    """One grid cell as the report draws it."""

    cell_id: str
    """The cell id (the prefix of its chips' names)."""
    bbox: Bbox | None
    """(min lon, min lat, max lon, max lat) in EPSG:4326; None: the envelope of its chips."""
    status: str = "ok"
    """``ok``, ``no_scenes``, ``no_fields`` or ``failed``."""
    error: str | None = None
    """Why the cell is not ``ok``, when known."""


CellLike = CellStatus | Sequence[Any] | Mapping[str, Any]


# ----------------------------------------------------------------------------- PNG and pixels

def encode_png(pixels: np.ndarray, level: int = 6) -> bytes:
    """A PNG of ``pixels`` (rows, cols, 3) RGB or (rows, cols) grey, uint8: numpy and zlib only."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"encode_png needs (rows, cols[, 3]) uint8, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    raw = np.zeros((height, 1 + pixels[0].size), dtype=np.uint8)  # filter byte 0 (none) per row
    raw[:, 1:] = pixels.reshape(height, -1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
            + chunk(b"IEND", b""))


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def stretch_rgb(bands: np.ndarray, percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """(3, rows, cols) DNs -> (rows, cols, 3) uint8, each band stretched linearly between its
    percentiles over the valid pixels; pixels that are 0 (nodata) in any band are black."""
    valid = np.all(bands > 0, axis=0)
    out = np.zeros(bands.shape[1:] + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    for i in range(3):
        values = bands[i][valid].astype("float64")
        low, high = np.percentile(values, percentiles)
        if high <= low:
            high = low + 1.0
        scaled = np.clip((bands[i].astype("float64") - low) / (high - low), 0.0, 1.0)
        out[..., i] = np.round(scaled * 255).astype(np.uint8)
    out[~valid] = 0
    return out


def overlay_classes(rgb: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The class colours of ``mask`` (class 0 left clear) blended over ``rgb`` with ``alpha``."""
    colours = np.array([_hex_rgb(PALETTE.get(k, "#000000")) for k in range(256)], dtype="float64")
    labelled = (mask > 0)[..., None]
    blended = (1.0 - alpha) * rgb.astype("float64") + alpha * colours[mask]
    return np.where(labelled, np.round(blended), rgb).astype(np.uint8)


def _rgb_indexes(descriptions: Sequence[str | None], count: int) -> list[int]:
    """1-based band indexes of B04, B03, B02: by band description, else the standard band order."""
    names = [d or "" for d in descriptions]
    if all(name in names for name in RGB_BANDS):
        return [names.index(name) + 1 for name in RGB_BANDS]
    return [BANDS.index(name) + 1 for name in RGB_BANDS] if count >= len(BANDS) else [1, 1, 1]


def read_rgb(image_path: str | Path | BinaryIO) -> np.ndarray:
    """B04, B03, B02 of an image chip as (3, rows, cols) DNs; for a time series (``DATE B02`` band
    descriptions), the date with the most valid pixels, the latest on a tie."""
    with rasterio.open(image_path) as src:
        descriptions = list(src.descriptions)
        dates = sorted({d.split()[0] for d in descriptions if d and len(d.split()) == 2})
        if dates:
            best, best_valid = None, -1
            for date in reversed(dates):  # latest first: it wins ties
                indexes = [descriptions.index(f"{date} {b}") + 1 for b in RGB_BANDS
                           if f"{date} {b}" in descriptions]
                if len(indexes) != 3:
                    continue
                bands = src.read(indexes)
                valid = int(np.all(bands > 0, axis=0).sum())
                if valid > best_valid:
                    best, best_valid = bands, valid
            if best is not None:
                return best
        return src.read(_rgb_indexes(descriptions, src.count))


def quicklook(image_path: str | Path | BinaryIO, mask_path: str | Path | BinaryIO) -> np.ndarray:
    """True colour | true colour with the class overlay, side by side: (rows, 2 cols + gap, 3) uint8."""
    rgb = stretch_rgb(read_rgb(image_path))
    with rasterio.open(mask_path) as src:
        mask = src.read(1)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{mask_path} is {mask.shape}, its image {rgb.shape[:2]}")
    rows, cols = mask.shape
    out = np.full((rows, 2 * cols + QUICKLOOK_GAP, 3), 255, dtype=np.uint8)
    out[:, :cols] = rgb
    out[:, cols + QUICKLOOK_GAP:] = overlay_classes(rgb, mask)
    return out


def _subsample(pixels: np.ndarray, max_side: int) -> np.ndarray:
    step = max(1, math.ceil(max(pixels.shape[0], pixels.shape[1] / 2) / max_side))
    if step == 1:
        return pixels
    cols = (pixels.shape[1] - QUICKLOOK_GAP) // 2
    left, right = pixels[::step, :cols:step], pixels[::step, cols + QUICKLOOK_GAP::step]
    gap = np.full((left.shape[0], QUICKLOOK_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([left, gap, right], axis=1)


# ----------------------------------------------------------------------------- inputs

def load_chips(output: Storage | Path | str) -> tuple[Any, bool]:
    """The chips to report: ``index.parquet`` (and True), or, without one, every chip's sidecar
    with split ``unindexed`` (and False)."""
    storage = open_storage(output)
    if storage.exists(INDEX_NAME):
        return gpd.read_parquet(storage.source(INDEX_NAME)), True
    log.warning("%s has no %s: reporting the chips of %s/ without splits (run monitor.py --rebuild-index)",
                storage, INDEX_NAME, METADATA_DIR)
    rows = []
    for r in records_from_metadata(storage):
        to_lonlat = Transformer.from_crs(r["crs"], "EPSG:4326", always_xy=True)
        rows.append({
            "name": r["name"], "image": r["image"], "mask": r["mask"], "cell_id": r.get("cell_id", ""),
            "split": "unindexed", "clear_fraction": r.get("clear_fraction"), "run_id": r.get("run_id", ""),
            "scene_ids": [s["id"] for s in r.get("scenes", ())],
            "scene_dates": [s["datetime"][:10] for s in r.get("scenes", ())],
            **{f"class_{k}_pixels": int(r.get("class_pixels", {}).get(str(k), 0)) for k in CLASS_NAMES},
            "geometry": shapely.box(*to_lonlat.transform_bounds(*r["bounds"], densify_pts=5))})
    columns = ["name", "image", "mask", "cell_id", "split", "clear_fraction", "run_id", "scene_ids", "scene_dates",
               *[f"class_{k}_pixels" for k in CLASS_NAMES]]
    if not rows:
        return gpd.GeoDataFrame({c: [] for c in columns}, geometry=[], crs="EPSG:4326"), False
    return gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326"), False


def _as_cell(cell: CellLike) -> CellStatus:
    if isinstance(cell, CellStatus):
        return cell
    if isinstance(cell, Mapping):
        return CellStatus(str(cell["cell_id"]), _bbox(cell.get("bbox")), str(cell.get("status", "ok")),
                          cell.get("error"))
    values = list(cell)
    if not 2 <= len(values) <= 4:
        raise ValueError(f"a cell is (cell_id, bbox, status[, error]), got {cell!r}")
    return CellStatus(str(values[0]), _bbox(values[1]), str(values[2]) if len(values) > 2 else "ok",
                      values[3] if len(values) > 3 else None)


def _bbox(value: Any) -> Bbox | None:
    if value is None:
        return None
    minx, miny, maxx, maxy = (float(v) for v in value)
    return minx, miny, maxx, maxy


def grid_from_header(header: RunHeader | None) -> Grid | None:
    """The master's grid from a run header's recorded parameters, or None when it is not there."""
    params = (header.params if header is not None else {}).get("grid")
    if not isinstance(params, Mapping):
        return None
    try:
        return Grid(**{k: params[k] for k in ("start_x", "start_y", "step", "x_cells", "y_cells")})
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("the run header's grid %r is unusable (%s): cells are drawn from their chips", params, exc)
        return None


def cells_from_results(results: Iterable[Result], grid: Grid | None = None) -> list[CellStatus]:
    """One :class:`CellStatus` per cell of ``results`` (the worst status among its tasks), with its
    box from ``grid`` (a :class:`~cropchips.grid.Grid`, e.g. :func:`grid_from_header`) when given."""
    by_cell: dict[str, list[Result]] = {}
    for result in results:
        by_cell.setdefault(result.cell_id, []).append(result)
    cells = []
    for cell_id in sorted(by_cell):
        statuses = {r.status for r in by_cell[cell_id]}
        status = next((s for s in _STATUS_PRECEDENCE if s in statuses), min(statuses))
        error = next((r.error for r in by_cell[cell_id] if r.status == status and r.error), None)
        bbox = None
        match = _CELL_ROW_COL.match(cell_id)
        if grid is not None and match and match["grid"] == grid.grid_id:
            try:
                bbox = grid.cell(int(match["row"]), int(match["col"])).bbox
            except IndexError:
                bbox = None
        cells.append(CellStatus(cell_id, bbox, status, error))
    return cells


def _resolve_cells(cells: Iterable[CellLike] | None, chips: Any) -> list[CellStatus]:
    """The given cells (boxes filled in from the chips where missing) plus any cell that has chips
    but was not given (status ok)."""
    envelopes: dict[str, Bbox] = {}
    if len(chips):
        for cell_id, group in chips.groupby("cell_id"):
            envelopes[str(cell_id)] = tuple(float(v) for v in group.geometry.total_bounds)  # type: ignore[assignment]
    resolved: dict[str, CellStatus] = {}
    for raw in cells or ():
        cell = _as_cell(raw)
        if cell.bbox is None and cell.cell_id in envelopes:
            cell = CellStatus(cell.cell_id, envelopes[cell.cell_id], cell.status, cell.error)
        if cell.status not in STATUSES:
            log.warning("cell %s has an unknown status %r; drawn grey", cell.cell_id, cell.status)
        resolved[cell.cell_id] = cell
    missing = sorted(set(envelopes) - set(resolved))
    if cells is not None and missing:
        log.warning("%d cells have chips but were not among the cells given (drawn as ok): %s",
                    len(missing), ", ".join(missing[:5]))
    for cell_id in missing:
        resolved[cell_id] = CellStatus(cell_id, envelopes[cell_id], "ok")
    return [resolved[k] for k in sorted(resolved)]


def select_gallery(chips: Any, max_gallery: int) -> list[int]:
    """Row positions of at most ``max_gallery`` chips: cells taken in turn (sorted by id), each
    cell's chips by name, so every cell shows before any shows twice; deterministic."""
    if max_gallery <= 0 or not len(chips):
        return []
    order = sorted(range(len(chips)), key=lambda i: (str(chips["cell_id"].iat[i]), str(chips["name"].iat[i])))
    queues: dict[str, list[int]] = {}
    for i in order:
        queues.setdefault(str(chips["cell_id"].iat[i]), []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < max_gallery and any(depth < len(q) for q in queues.values()):
        for queue in queues.values():
            if depth < len(queue) and len(picked) < max_gallery:
                picked.append(queue[depth])
        depth += 1
    return sorted(picked, key=lambda i: str(chips["name"].iat[i]))


# ----------------------------------------------------------------------------- HTML pieces

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt_int(value: int) -> str:
    return f"{int(value):,}".replace(",", "\u202f")  # narrow no-break space: 1 234 567


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}\u202f%" if whole else "–"


def _class_totals(chips: Any) -> dict[int, int]:
    return {k: int(chips[f"class_{k}_pixels"].sum()) if f"class_{k}_pixels" in chips else 0 for k in CLASS_NAMES}


def _class_label(k: int) -> str:
    return CLASS_NAMES.get(k, str(k)).replace("_", " ")


def _class_balance(totals: dict[int, int]) -> str:
    present = [k for k in sorted(totals) if totals[k] > 0]
    whole = sum(totals.values())
    if not present:
        return '<section id="class-balance" class="card"><h2>Class balance</h2><p class="muted">no chips</p></section>'
    gap, chart_h, top, bottom, left = 16, 220, 26, 28, 8
    bar_w = int(min(72, max(26, (540 - 2 * left) / len(present) - gap)))
    width = left * 2 + len(present) * bar_w + (len(present) - 1) * gap
    height = top + chart_h + bottom
    peak = max(totals[k] for k in present)
    parts = [(f'<svg class="chart" role="img" aria-label="pixels per class" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}">'),
             f'<line x1="0" y1="{top + chart_h}" x2="{width}" y2="{top + chart_h}" stroke="#9ca3af" stroke-width="1"/>']
    for n, k in enumerate(present):
        x = left + n * (bar_w + gap)
        h = chart_h * totals[k] / peak
        y = top + chart_h - h
        parts.append(
            f'<rect class="bar" data-class="{k}" data-pixels="{totals[k]}" x="{x}" y="{y:.3f}" width="{bar_w}" '
            f'height="{h:.3f}" fill="{PALETTE[k]}" rx="2"><title>{k} {_e(_class_label(k))}: '
            f'{_fmt_int(totals[k])} px ({_pct(totals[k], whole)})</title></rect>')
        parts.append(f'<text x="{x + bar_w / 2}" y="{y - 6:.1f}" text-anchor="middle" class="bar-value">'
                     f'{_pct(totals[k], whole)}</text>')
        parts.append(f'<text x="{x + bar_w / 2}" y="{top + chart_h + 18}" text-anchor="middle" class="bar-label">'
                     f'{k}</text>')
    parts.append("</svg>")
    rows = []
    for k in sorted(CLASS_NAMES):
        absent = "" if totals.get(k, 0) else ' class="absent"'
        rows.append(f'<tr{absent} data-class="{k}"><td><span class="swatch" style="background:{PALETTE[k]}"></span>'
                    f'{k}</td><td>{_e(_class_label(k))}</td><td class="num">{_fmt_int(totals.get(k, 0))}</td>'
                    f'<td class="num">{_pct(totals.get(k, 0), whole)}</td></tr>')
    return ('<section id="class-balance" class="card"><h2>Class balance</h2>'
            f'<p class="muted">mask pixels per class over all {_fmt_int(whole)} pixels; bar heights are '
            'proportional to the counts</p>'
            f'<div class="chart-wrap">{"".join(parts)}</div>'
            '<table class="legend-table"><thead><tr><th>id</th><th>class</th><th class="num">pixels</th>'
            f'<th class="num">share</th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _stacked_bar(counts: dict[int, int], width: int = 170, height: int = 14) -> str:
    whole = sum(counts.values())
    parts = [f'<svg class="stack" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<rect width="{width}" height="{height}" fill="#f3f4f6"/>']
    x = 0.0
    for k in sorted(counts):
        if not counts[k] or not whole:
            continue
        w = width * counts[k] / whole
        parts.append(f'<rect x="{x:.2f}" width="{w:.2f}" height="{height}" fill="{PALETTE.get(k, "#000")}">'
                     f'<title>{k} {_e(_class_label(k))}: {_pct(counts[k], whole)}</title></rect>')
        x += w
    parts.append("</svg>")
    return "".join(parts)


def _split_counts(chips: Any) -> str:
    counts = Counter(str(s) for s in chips["split"]) if len(chips) else Counter()
    names = list(SPLITS) + sorted(set(counts) - set(SPLITS))
    total = sum(counts.values())
    peak = max(counts.values(), default=0)
    mixes = {split: _class_totals(chips[chips["split"] == split] if len(chips) else chips) for split in names}
    rows = []
    for split in names:
        colour = SPLIT_COLOURS.get(split, OTHER_SPLIT_COLOUR)
        w = 86 * counts[split] / peak if peak else 0
        bar = (f'<svg class="split-bar" width="90" height="14" viewBox="0 0 90 14"><rect class="split-bar-fill" '
               f'data-split="{_e(split)}" width="{w:.2f}" height="14" fill="{colour}" rx="2"/></svg>')
        rows.append(f'<tr data-split="{_e(split)}"><td><span class="swatch" style="background:{colour}"></span>'
                    f'{_e(split)}</td><td class="num count">{counts[split]}</td><td class="num">'
                    f'{_pct(counts[split], total)}</td><td>{bar}</td><td>{_stacked_bar(mixes[split])}</td></tr>')
    present = [k for k in sorted(CLASS_NAMES) if any(m[k] for m in mixes.values())]
    mix_head = "".join(f'<th class="num">{_e(split)}</th>' for split in names)
    mix_rows = "".join(
        f'<tr data-class="{k}"><td><span class="swatch" style="background:{PALETTE[k]}"></span>{k} '
        f'{_e(_class_label(k))}</td>'
        + "".join(f'<td class="num">{_pct(mixes[split][k], sum(mixes[split].values()))}</td>' for split in names)
        + "</tr>" for k in present)
    mix = ('<h3>Class share of each split\'s pixels</h3><table id="split-classes"><thead><tr><th>class</th>'
           f'{mix_head}</tr></thead><tbody>{mix_rows}</tbody></table>') if present else ""
    return ('<section id="split-counts" class="card"><h2>Chips per split</h2>'
            '<p class="muted">spatial blocks go whole to one split; the last column is each split\'s class mix</p>'
            '<table><thead><tr><th>split</th><th class="num">chips</th><th class="num">share</th><th></th>'
            f'<th>classes</th></tr></thead><tbody>{"".join(rows)}</tbody></table>{mix}</section>')


def _nice_length(km: float) -> float:
    """The largest 1, 2 or 5 x 10^n not above ``km``."""
    if km <= 0:
        return 0.0
    power = 10 ** math.floor(math.log10(km))
    return max(m * power for m in (1, 2, 5) if m * power <= km)


def _cell_map(cells: list[CellStatus], chips: Any, max_width: int = 900, max_height: int = 620) -> str:
    footprints = [(str(chips["name"].iat[i]), str(chips["split"].iat[i]), chips.geometry.iat[i])
                  for i in range(len(chips))]
    boxes = [c.bbox for c in cells if c.bbox is not None]
    boxes += [tuple(g.bounds) for _, _, g in footprints if g is not None and not g.is_empty]
    status_counts = Counter(c.status for c in cells)
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{colour};opacity:.75"></span>{_e(s)} '
        f'<b>{status_counts.get(s, 0)}</b></span>' for s, colour in STATUS_COLOURS.items())
    legend += "".join(f'<span class="key"><span class="swatch" style="background:{OTHER_STATUS_COLOUR}"></span>'
                      f'{_e(s)} <b>{n}</b></span>' for s, n in sorted(status_counts.items()) if s not in STATUS_COLOURS)
    split_keys = [s for s in SPLITS] + sorted({s for _, s, _ in footprints} - set(SPLITS))
    legend += '<span class="sep"></span>' + "".join(
        f'<span class="key"><span class="swatch outline" style="border-color:{SPLIT_COLOURS.get(s, OTHER_SPLIT_COLOUR)};'
        f'background:{SPLIT_COLOURS.get(s, OTHER_SPLIT_COLOUR)}55"></span>{_e(s)} chips</span>' for s in split_keys)
    head = ('<section id="cell-map" class="card"><h2>Cells and chips</h2>'
            '<p class="muted">cells coloured by status, chip footprints on top coloured by split '
            '(lon/lat, equirectangular, x scaled by cos(latitude))</p>')
    if not boxes:
        return head + f'<p class="muted">nothing to draw</p><div class="legend">{legend}</div></section>'
    west, south = min(b[0] for b in boxes), min(b[1] for b in boxes)
    east, north = max(b[2] for b in boxes), max(b[3] for b in boxes)
    pad_x, pad_y = max((east - west) * 0.04, 1e-4), max((north - south) * 0.04, 1e-4)
    west, east, south, north = west - pad_x, east + pad_x, south - pad_y, north + pad_y
    coslat = max(math.cos(math.radians((south + north) / 2)), 1e-3)
    span_x, span_y = (east - west) * coslat, north - south
    scale = min(max_width / span_x, max_height / span_y)
    width, height = span_x * scale, span_y * scale
    margin_bottom = 34

    def xy(lon: float, lat: float) -> tuple[float, float]:
        return (lon - west) * coslat * scale, (north - lat) * scale

    parts = [(f'<svg class="map" role="img" aria-label="cells by status and chip footprints" width="{width:.0f}" '
              f'height="{height + margin_bottom:.0f}" viewBox="0 0 {width:.1f} {height + margin_bottom:.1f}">'),
             f'<rect class="map-bg" width="{width:.1f}" height="{height:.1f}" fill="#f8fafc" stroke="#d1d5db"/>']
    chips_per_cell = Counter(str(c) for c in chips["cell_id"]) if len(chips) else Counter()
    for cell in cells:
        if cell.bbox is None:
            continue
        colour = STATUS_COLOURS.get(cell.status, OTHER_STATUS_COLOUR)
        x0, y0 = xy(cell.bbox[0], cell.bbox[3])
        x1, y1 = xy(cell.bbox[2], cell.bbox[1])
        tip = f"{cell.cell_id}: {cell.status}, {chips_per_cell.get(cell.cell_id, 0)} chips"
        if cell.error:
            tip += f" ({cell.error})"
        parts.append(f'<rect class="cell" data-cell-id="{_e(cell.cell_id)}" data-status="{_e(cell.status)}" '
                     f'x="{x0:.2f}" y="{y0:.2f}" width="{x1 - x0:.2f}" height="{y1 - y0:.2f}" fill="{colour}" '
                     f'fill-opacity="0.22" stroke="{colour}" stroke-width="2"><title>{_e(tip)}</title></rect>')
        match = _CELL_ROW_COL.match(cell.cell_id)
        if x1 - x0 > 70 and y1 - y0 > 28:
            label = f"r{int(match['row'])} c{int(match['col'])}" if match else cell.cell_id
            parts.append(f'<text class="cell-label" x="{x0 + 5:.1f}" y="{y0 + 15:.1f}" fill="{colour}">'
                         f'{_e(label)} · {_e(cell.status)}</text>')
    for name, split, geometry in footprints:
        if geometry is None or geometry.is_empty:
            continue
        colour = SPLIT_COLOURS.get(split, OTHER_SPLIT_COLOUR)
        ring = geometry.exterior.coords if hasattr(geometry, "exterior") else geometry.envelope.exterior.coords
        points = " ".join(f"{x:.2f},{y:.2f}" for x, y in (xy(lon, lat) for lon, lat in ring))
        parts.append(f'<polygon class="footprint" data-chip="{_e(name)}" data-split="{_e(split)}" points="{points}" '
                     f'fill="{colour}" fill-opacity="0.35" stroke="{colour}" stroke-width="1.2">'
                     f'<title>{_e(name)} ({_e(split)})</title></polygon>')
    km_per_px = 111.32 / scale  # one degree of latitude (or of scaled longitude) is ~111 km
    bar_km = _nice_length(km_per_px * width / 4)
    if bar_km:
        bar_px = bar_km / km_per_px
        label = f"{bar_km:g} km" if bar_km >= 1 else f"{bar_km * 1000:g} m"
        y = height + 20
        parts.append(f'<g class="scale-bar"><line x1="4" y1="{y}" x2="{4 + bar_px:.1f}" y2="{y}" stroke="#374151" '
                     f'stroke-width="3"/><text x="{10 + bar_px:.1f}" y="{y + 4}" class="axis">{label}</text></g>')
    parts.append(f'<text x="{width:.1f}" y="{height + 24:.1f}" text-anchor="end" class="axis">'
                 f'lon {west + pad_x:.4f}…{east - pad_x:.4f}, lat {south + pad_y:.4f}…{north - pad_y:.4f}</text>')
    parts.append("</svg>")
    return head + f'<div class="map-wrap">{"".join(parts)}</div><div class="legend">{legend}</div></section>'


def _problems(cells: list[CellStatus], run_summary: Mapping[str, Any] | None) -> str:
    rows = [(c.cell_id, c.status, c.error or "") for c in cells if c.status != "ok"]
    listed = {r[0] for r in rows}
    for task_id, error in ((run_summary or {}).get("failures") or {}).items():
        if not any(task_id.startswith(cell_id) for cell_id in listed):
            rows.append((task_id, "failed", error or ""))
    if not rows:
        return ""
    shown = rows[:50]
    body = "".join(f'<tr><td class="mono">{_e(a)}</td><td><span class="swatch" style="background:'
                   f'{STATUS_COLOURS.get(b, OTHER_STATUS_COLOUR)}"></span>{_e(b)}</td><td>{_e(c)}</td></tr>'
                   for a, b, c in shown)
    more = f'<p class="muted">and {len(rows) - len(shown)} more</p>' if len(rows) > len(shown) else ""
    return ('<section id="problems" class="card"><h2>Cells without chips</h2><table><thead><tr><th>cell / task</th>'
            f'<th>status</th><th>reason</th></tr></thead><tbody>{body}</tbody></table>{more}</section>')


def _summary(storage: Storage, chips: Any, indexed: bool, cells: list[CellStatus],
             run_summary: Mapping[str, Any] | None, written: str) -> str:
    run_summary = run_summary or {}
    run_ids = sorted({str(r) for r in chips["run_id"] if r}) if len(chips) and "run_id" in chips else []
    if run_summary.get("run_id") and str(run_summary["run_id"]) not in run_ids:
        run_ids.insert(0, str(run_summary["run_id"]))
    scenes: set[str] = set()
    dates: set[str] = set()
    if len(chips) and "scene_ids" in chips:
        for ids in chips["scene_ids"]:
            scenes.update(str(s) for s in (ids if ids is not None else ()))
        for ds in chips.get("scene_dates", ()):
            dates.update(str(d) for d in (ds if ds is not None else ()))
    statuses = Counter(c.status for c in cells)
    status_text = " ".join(
        f'<span class="pill" style="background:{STATUS_COLOURS.get(s, OTHER_STATUS_COLOUR)}">{_e(s)} {n}</span>'
        for s, n in sorted(statuses.items(), key=lambda kv: (STATUSES + (kv[0],)).index(kv[0])))
    on_disk = sum(rel.endswith(".json") for rel in storage.list(METADATA_DIR))
    chip_note = (f"{on_disk - len(chips)} more on disk, not in the index" if indexed and on_disk > len(chips)
                 else "from index.parquet" if indexed else "no index.parquet yet: no splits")
    cards = [("chips", _fmt_int(len(chips)), chip_note, "chips"),
             ("cells", _fmt_int(len(cells)), status_text or "–", "cells"),
             ("run", _e(", ".join(run_ids) or "–"), "", "run"),
             ("scenes used", _fmt_int(len(scenes)),
              f'<span class="nowrap">{_e(min(dates))}</span> … <span class="nowrap">{_e(max(dates))}</span>'
              if dates else "", "scenes")]
    if run_summary.get("tasks_total") is not None or run_summary.get("tasks_done") is not None:
        extra = f"{run_summary['elapsed_s']} s" if run_summary.get("elapsed_s") is not None else ""
        cards.append(("tasks", f"{run_summary.get('tasks_done', '–')}/{run_summary.get('tasks_total', '–')}",
                      _e(extra), "tasks"))
    workers = run_summary.get("workers")
    if isinstance(workers, Mapping) and workers:
        cards.append(("workers", str(len(workers)), "", "workers"))
    html_cards = "".join(f'<div class="stat" data-stat="{key}"><div class="label">{label}</div>'
                         f'<div class="value">{value}</div><div class="note">{note}</div></div>'
                         for label, value, note, key in cards)
    return (f'<section id="summary"><div class="stats">{html_cards}</div>'
            f'<p class="muted">written {_e(written)}</p></section>')


def _gallery(items: list[tuple[str, str, float | None, bytes, tuple[int, int]]], total: int) -> str:
    legend = "".join(f'<span class="key"><span class="swatch" style="background:{PALETTE[k]}"></span>'
                     f'{k} {_e(_class_label(k))}</span>' for k in sorted(CLASS_NAMES) if k)
    figures = []
    for name, split, clear, png, (w, h) in items:
        colour = SPLIT_COLOURS.get(split, OTHER_SPLIT_COLOUR)
        clear_text = f"clear {100 * clear:.0f}\u202f%" if clear is not None and not math.isnan(clear) else "clear –"
        figures.append(
            f'<figure class="chip" data-chip="{_e(name)}"><img class="quicklook" width="{w}" height="{h}" '
            f'alt="{_e(name)}: true colour and classes" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f'<figcaption><span class="mono">{_e(name)}</span><span class="badge" style="background:{colour}">'
            f'{_e(split)}</span><span class="muted">{clear_text}</span></figcaption></figure>')
    shown = f"{len(items)} of {total} chips" if total > len(items) else f"all {total} chips"
    return ('<section id="gallery" class="card"><h2>Quicklooks</h2>'
            f'<p class="muted">{shown}, every cell before any cell twice. Left: true colour (B04 B03 B02, '
            f'{STRETCH_PERCENTILES[0]:g}–{STRETCH_PERCENTILES[1]:g} percentile stretch per band and chip, nodata '
            f'black); right: the class mask over it at {OVERLAY_ALPHA:.0%} opacity (unlabelled left clear).</p>'
            f'<div class="legend">{legend}</div><div class="grid">{"".join(figures)}</div></section>')


_CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--card:#fff;--bg:#f3f4f6}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"DejaVu Sans",sans-serif}
header{background:#0f172a;color:#f8fafc;padding:18px 28px}
header h1{margin:0;font-size:21px;font-weight:600}
header p{margin:4px 0 0;color:#cbd5e1}
main{max-width:1220px;margin:0 auto;padding:18px 24px 40px;display:grid;gap:18px;grid-template-columns:1fr 1fr}
main>section{grid-column:1/-1}
main>#class-balance,main>#split-counts{grid-column:auto}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;min-width:0}
h2{font-size:16px;margin:0 0 4px}
h3{font-size:13px;margin:18px 0 6px}
.muted{color:var(--muted)}
p.muted{margin:0 0 10px;font-size:12.5px}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px}
.stat{background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.stat .label{font-size:11.5px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.stat .value{font-size:22px;font-weight:600;margin:2px 0;overflow-wrap:anywhere}
.stat[data-stat=run] .value{font-size:15px;font-family:ui-monospace,Menlo,Consolas,monospace;padding-top:5px}
.stat .note{font-size:12px;color:var(--muted)}
#summary>p{margin:8px 2px 0}
.pill{display:inline-block;color:#fff;border-radius:9px;padding:0 7px;font-size:11.5px;margin:1px 2px 1px 0}
table{border-collapse:collapse;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:middle;white-space:nowrap}
#problems td:last-child{white-space:normal}
th{font-size:11.5px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.absent td{color:#b0b4bb}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:6px;vertical-align:-1px}
.swatch.outline{border:2px solid}
.chart-wrap{overflow-x:auto;margin-bottom:8px}
.chart-wrap svg{max-width:100%;height:auto}
svg text{font:11px system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;fill:#374151}
svg text.bar-label{font-weight:600}
svg text.cell-label{font-size:11px;font-weight:600}
svg.stack,svg.split-bar{vertical-align:middle}
.map-wrap svg{max-width:100%;height:auto;display:block;margin:0 auto}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;margin:10px 0 4px;font-size:12.5px}
.legend .sep{flex-basis:100%;height:0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:14px;margin-top:10px}
figure.chip{margin:0;border:1px solid var(--line);border-radius:8px;padding:8px;background:#fafafa}
img.quicklook{display:block;width:100%;height:auto;image-rendering:pixelated;border-radius:3px}
figcaption{display:flex;flex-wrap:wrap;gap:4px 8px;align-items:center;margin-top:6px;font-size:12px}
.nowrap{white-space:nowrap}
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11.5px}
.badge{color:#fff;border-radius:4px;padding:0 6px;font-size:11px}
footer{max-width:1220px;margin:0 auto;padding:0 24px 30px;color:var(--muted);font-size:12px}
@media (max-width:900px){main>#class-balance,main>#split-counts{grid-column:1/-1}}
"""


# ----------------------------------------------------------------------------- the report

def build_report(output: Storage | Path | str, *, cells: Iterable[CellLike] | None = None,
                 run_summary: Mapping[str, Any] | None = None, quicklooks: bool = False,
                 max_gallery: int = 24) -> Path | str:
    """Write ``OUTPUT/report.html`` (self-contained: inline CSS, SVG and PNG data URIs, no script,
    no external resource) and, with ``quicklooks``, ``OUTPUT/quicklooks/NAME.png`` per chip.

    ``cells``: (cell_id, bbox lon/lat or None, status[, error]) tuples, mappings with those keys or
    :class:`CellStatus`; None: one ``ok`` cell per chip ``cell_id``, boxed by its chips' footprints.
    ``run_summary``: the monitor's :meth:`~cropchips.monitor.RunProgress.summary`, shown when given.
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
    gallery: list[tuple[str, str, float | None, bytes, tuple[int, int]]] = []
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

    title = "cropchips dataset report"
    body = "".join([
        _summary(storage, chips, indexed, resolved, run_summary, written),
        _class_balance(_class_totals(chips)),
        _split_counts(chips),
        _cell_map(resolved, chips),
        _problems(resolved, run_summary),
        _gallery(gallery, len(chips)),
    ])
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}: {_e(_display_name(storage))}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><p>{_e(_display_location(storage))}</p></header>"
            f"<main>{body}</main><footer>written {_e(written)} by cropchips.report</footer></body></html>\n")
    storage.write_bytes(REPORT_NAME, page.encode("utf-8"))
    path = storage.url(REPORT_NAME)
    log.info("report %s: %d chips, %d cells, %d in the gallery%s", path, len(chips), len(resolved), len(gallery),
             f", {written_pngs} quicklooks in {storage.url(QUICKLOOKS_DIR)}" if quicklooks else "")
    return Path(path) if storage.is_local else path


def _display_location(storage: Storage) -> str:
    return str(Path(storage.url()).resolve()) if storage.is_local else storage.url()


def _display_name(storage: Storage) -> str:
    return storage.url().rstrip("/").rsplit("/", 1)[-1]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cropchips.report OUTPUT_DIR [--quicklooks] [--max-gallery N]``."""
    parser = argparse.ArgumentParser(prog="python -m cropchips.report", description=__doc__)
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


if __name__ == "__main__":
    sys.exit(main())
