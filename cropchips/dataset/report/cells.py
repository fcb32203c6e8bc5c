"""The report's inputs: the chips, the grid cells and their statuses, and the gallery's pick of chips."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import shapely

from cropchips.crs import transformer
from cropchips.dataset.index import INDEX_NAME, records_from_metadata
from cropchips.plan.grid import Grid
from cropchips.queue.messages import STATUSES, Result, RunHeader
from cropchips.output.storage import Storage, open_storage
from cropchips.raster.write import METADATA_DIR
from cropchips.spec import LABEL_LAYERS
from cropchips.dataset.report.labels import pixels_column, record_label_ids

log = logging.getLogger(__name__)

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


def load_chips(output: Storage | Path | str) -> tuple[Any, bool]:
    """The chips to report: ``index.parquet`` (and True), or, without one, every chip's sidecar
    with split ``unindexed`` (and False): its pixels per label (0, 1..8, 255 and any other its
    ``class_pixels`` count), its label layers and its time bins, as the index would hold them."""
    storage = open_storage(output)
    if storage.exists(INDEX_NAME):
        return gpd.read_parquet(storage.source(INDEX_NAME)), True
    log.warning("%s has no %s: reporting the chips of %s/ without splits (run monitor.py --rebuild-index)",
                storage, INDEX_NAME, METADATA_DIR)
    records = records_from_metadata(storage)
    labels = record_label_ids(records)
    rows = []
    for r in records:
        to_lonlat = transformer(r["crs"], "EPSG:4326")
        pixels = r.get("class_pixels") or {}
        layers = r.get("layers") or {"classes": r["mask"]}
        rows.append({
            "name": r["name"], "image": r["image"], "mask": r["mask"], "cell_id": r.get("cell_id", ""),
            "split": "unindexed", "clear_fraction": r.get("clear_fraction"), "run_id": r.get("run_id", ""),
            "scene_ids": [s["id"] for s in r.get("scenes", ())],
            "scene_dates": [s["datetime"][:10] for s in r.get("scenes", ())],
            **{pixels_column(k): int(pixels.get(str(k), 0)) for k in labels},
            "label_layers": sorted(layers, key=_layer_order),
            "bin_dates": [str(d) for d in r.get("bin_dates", ())],
            "geometry": shapely.box(*to_lonlat.transform_bounds(*r["bounds"], densify_pts=5))})
    columns = ["name", "image", "mask", "cell_id", "split", "clear_fraction", "run_id", "scene_ids", "scene_dates",
               *[pixels_column(k) for k in labels], "label_layers", "bin_dates"]
    if not rows:
        return gpd.GeoDataFrame({c: [] for c in columns}, geometry=[], crs="EPSG:4326"), False
    return gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326"), False


def _layer_order(layer: str) -> tuple[int, str]:
    """The known label layers in file order (classes, instances, boundaries), any other after them."""
    return (LABEL_LAYERS.index(layer), "") if layer in LABEL_LAYERS else (len(LABEL_LAYERS), layer)


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
    box from ``grid`` (a :class:`~cropchips.plan.grid.Grid`, e.g. :func:`grid_from_header`) when given."""
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
