"""The report's HTML: one function per section, the inline CSS and the page around them."""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cropchips.fields.classes import IGNORE_LABEL
from cropchips.dataset.index import SPLITS
from cropchips.queue.messages import STATUSES
from cropchips.output.storage import Storage
from cropchips.raster.write import METADATA_DIR
from cropchips.spec import LABEL_LAYERS
from cropchips.dataset.report.cells import _CELL_ROW_COL, CellStatus
from cropchips.dataset.report.colours import OTHER_SPLIT_COLOUR, OTHER_STATUS_COLOUR, SPLIT_COLOURS, STATUS_COLOURS
from cropchips.dataset.report.labels import label_colour, label_ids, label_text, pixels_column
from cropchips.dataset.report.images import OVERLAY_ALPHA, STRETCH_PERCENTILES

#: A gallery figure: chip name, split, clear fraction, quicklook PNG, (width, height) in pixels.
GalleryItem = tuple[str, str, float | None, bytes, tuple[int, int]]
#: At most this many time bins are listed by date in the summary.
MAX_LISTED_BINS = 48


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt_int(value: int) -> str:
    return f"{int(value):,}".replace(",", "\u202f")  # narrow no-break space: 1 234 567


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}\u202f%" if whole else "–"


def _class_totals(chips: Any) -> dict[int, int]:
    """Mask pixels per label over ``chips``: every label of the report, 0 where the index has no column
    for it (an index older than the 255 ignore label has no ``class_255_pixels``)."""
    totals = {}
    for k in label_ids(getattr(chips, "columns", ())):
        column = pixels_column(k)
        totals[k] = int(chips[column].fillna(0).sum()) if column in chips else 0
    return totals


def _class_label(k: int) -> str:
    return label_text(k)


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
            f'height="{h:.3f}" fill="{label_colour(k)}" rx="2"><title>{k} {_e(_class_label(k))}: '
            f'{_fmt_int(totals[k])} px ({_pct(totals[k], whole)})</title></rect>')
        parts.append(f'<text x="{x + bar_w / 2}" y="{y - 6:.1f}" text-anchor="middle" class="bar-value">'
                     f'{_pct(totals[k], whole)}</text>')
        parts.append(f'<text x="{x + bar_w / 2}" y="{top + chart_h + 18}" text-anchor="middle" class="bar-label">'
                     f'{k}</text>')
    parts.append("</svg>")
    rows = []
    for k in sorted(totals):
        absent = "" if totals.get(k, 0) else ' class="absent"'
        rows.append(f'<tr{absent} data-class="{k}"><td><span class="swatch" '
                    f'style="background:{label_colour(k)}"></span>'
                    f'{k}</td><td>{_e(_class_label(k))}</td><td class="num">{_fmt_int(totals.get(k, 0))}</td>'
                    f'<td class="num">{_pct(totals.get(k, 0), whole)}</td></tr>')
    return ('<section id="class-balance" class="card"><h2>Class balance</h2>'
            f'<p class="muted">mask pixels per label over all {_fmt_int(whole)} pixels; bar heights are '
            f'proportional to the counts. {IGNORE_LABEL} (ignore) is a field whose crop is none of the classes '
            'or unknown, or a pixel without image data: never learned from</p>'
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
        parts.append(f'<rect x="{x:.2f}" width="{w:.2f}" height="{height}" fill="{label_colour(k)}">'
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
    present = [k for k in label_ids(getattr(chips, "columns", ())) if any(m.get(k) for m in mixes.values())]
    mix_head = "".join(f'<th class="num">{_e(split)}</th>' for split in names)
    mix_rows = "".join(
        f'<tr data-class="{k}"><td><span class="swatch" style="background:{label_colour(k)}"></span>{k} '
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
    summary_lines = (("label-layers", _label_layers_line(chips)), ("time-bins", _time_bins_line(chips)))
    lines = "".join(f'<p class="summary-line" data-summary="{key}">{line}</p>' for key, line in summary_lines if line)
    return (f'<section id="summary"><div class="stats">{html_cards}</div>{lines}'
            f'<p class="muted">written {_e(written)}</p></section>')


def _as_list(value: Any) -> list[Any]:
    """A list cell of the index (a numpy array once read from Parquet, a list, or None) as a list."""
    if isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:  # None, NaN, pd.NA: a chip without the column's value
        return []


def _chip_layers(chips: Any) -> list[list[str]]:
    """Each chip's label layers: the index's ``label_layers``; an older index (without that column)
    has the classes mask of every chip, and instances or boundaries where those columns name a file."""
    if "label_layers" in chips:
        return [[str(layer) for layer in _as_list(v)] or ["classes"] for v in chips["label_layers"]]
    layers = [["classes"] for _ in range(len(chips))]
    for name in ("instances", "boundaries"):
        if name in chips:
            for row, rel in zip(layers, chips[name]):
                if isinstance(rel, str) and rel:
                    row.append(name)
    return layers


def _label_layers_line(chips: Any) -> str:
    """``Label layers: classes (12 chips), instances (12 chips), boundaries (5 chips)``; empty without chips."""
    if not len(chips):
        return ""
    counts = Counter(layer for row in _chip_layers(chips) for layer in set(row))
    order = [layer for layer in LABEL_LAYERS if layer in counts] + sorted(set(counts) - set(LABEL_LAYERS))
    parts = ", ".join(f'<span class="layer" data-layer="{_e(layer)}" data-chips="{counts[layer]}">{_e(layer)} '
                      f'({_fmt_int(counts[layer])} {"chip" if counts[layer] == 1 else "chips"})</span>'
                      for layer in order)
    return f"Label layers: {parts}"


def _time_bins_line(chips: Any) -> str:
    """``2 time bins: 2023-05-15, 2023-06-15`` (the bins' first days) for a time series; empty otherwise."""
    if not len(chips) or "bin_dates" not in chips:
        return ""
    per_chip = [tuple(str(d) for d in _as_list(v)) for v in chips["bin_dates"]]
    with_bins = [bins for bins in per_chip if bins]
    if not with_bins:
        return ""
    dates = sorted({d for bins in with_bins for d in bins})
    listed = ", ".join(f'<span class="nowrap">{_e(d)}</span>' for d in dates[:MAX_LISTED_BINS])
    if len(dates) > MAX_LISTED_BINS:
        listed += f" … and {len(dates) - MAX_LISTED_BINS} more"
    line = f'{len(dates)} time {"bin" if len(dates) == 1 else "bins"}: {listed}'
    notes = []
    if len(set(with_bins)) > 1:
        notes.append(f"the chips have {len(set(with_bins))} different sets of bins")
    if len(with_bins) < len(per_chip):
        notes.append(f"{_fmt_int(len(with_bins))} of {_fmt_int(len(per_chip))} chips are binned")
    return line + (f' <span class="muted">({"; ".join(notes)})</span>' if notes else "")


def _gallery(items: list[GalleryItem], total: int, labels: list[int] | None = None) -> str:
    """The quicklooks, with a legend of the labels drawn over them (all but 0, no field, which is left clear)."""
    legend = "".join(f'<span class="key" data-class="{k}"><span class="swatch" style="background:{label_colour(k)}">'
                     f'</span>{k} {_e(_class_label(k))}</span>' for k in (labels or label_ids()) if k)
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
            f'black); right: the class mask over it at {OVERLAY_ALPHA:.0%} opacity (0, no field, left clear; '
            f'{IGNORE_LABEL}, ignore, in grey).</p>'
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


def render_page(storage: Storage, chips: Any, indexed: bool, cells: list[CellStatus],
                run_summary: Mapping[str, Any] | None, gallery: list[GalleryItem], written: str) -> str:
    """The whole report page: summary, class balance, splits, cell map, problems and gallery."""
    title = "cropchips dataset report"
    body = "".join([
        _summary(storage, chips, indexed, cells, run_summary, written),
        _class_balance(_class_totals(chips)),
        _split_counts(chips),
        _cell_map(cells, chips),
        _problems(cells, run_summary),
        _gallery(gallery, len(chips), label_ids(getattr(chips, "columns", ()))),
    ])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}: {_e(_display_name(storage))}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><p>{_e(_display_location(storage))}</p></header>"
            f"<main>{body}</main><footer>written {_e(written)} by cropchips</footer></body></html>\n")


def _display_location(storage: Storage) -> str:
    return str(Path(storage.url()).resolve()) if storage.is_local else storage.url()


def _display_name(storage: Storage) -> str:
    return storage.url().rstrip("/").rsplit("/", 1)[-1]
