"""The master's plan as a map: one GeoJSON Feature per grid cell, its status and what it will cost.

``master.py --plan-out plan.geojson`` writes it (see :func:`write_plan_map`): an RFC 7946
FeatureCollection in EPSG:4326 (no ``crs`` member, counter-clockwise rings), one Feature per cell of
the grid, its geometry the cell's box (:attr:`~cropchips.queue.messages.Cell.bbox`) and its properties:

* ``cell_id``, ``row``, ``col``;
* ``status``: ``task`` for a published cell, else why it was dropped (``too_few_polygons``,
  ``outside_aoi``), decided as :func:`cropchips.plan.plan.make_plan` decides it;
* ``polygons``: field polygons in the cell (representative points, half-open cells: the plan's own counts);
* ``scenes``: scenes in the cell's task (0 for a dropped cell);
* ``split``: ``train``, ``val`` or ``test``, the split the master gave the cell's block (null for a dropped cell);
* ``est_chips``: ``min(max_chips_per_cell, polygons)`` for a task with scenes, else 0. An upper
  bound: chips too cloudy or outside the scenes' data are not written;
* ``est_fetch_bytes``: the bytes a worker fetches for the task, estimated as::

      sum over the scenes, sum over the spec's bands and the quality band (Sentinel-2: SCL):
          ceil((W + 2 M) / r) * ceil((H + 2 M) / r) * bytes_per_pixel * COMPRESSION_FACTOR

  where ``W`` x ``H`` is the cell's size in metres (on a sphere: ``step`` in radians times
  :data:`EARTH_RADIUS_M`, times the cosine of the cell's middle latitude east-west), ``M`` the
  worker's margin (``GRID_MARGIN_PX * resolution`` metres, one pixel: chips lie inside the cell),
  ``r`` the band's native resolution (the source's ``resolutions``: for Sentinel-2
  10 m for B02, B03, B04, B08; 20 m for B05, B06, B07, B8A, B11, B12 and SCL), ``bytes_per_pixel`` 2
  (uint16 reflectance) or 1 (the quality band is uint8), and :data:`COMPRESSION_FACTOR` the share of
  those raw bytes a deflate'd COG takes. The worker fetches only the spec's ``bands``. With
  ``max_scenes`` the worker reads every scene's quality band but the bands of only ``max_scenes``
  scenes, and so does the estimate.

  It is a guide to the order of magnitude, not a measure: a COG is fetched in whole internal tiles
  (Earth Search: 1024 px), so a cell fetches more at its edges, while neighbouring cells on one worker
  share tiles through its cache (``--task-partitioning grid``) and fetch less; the cell's box in the
  scenes' UTM zone is a little larger than the spherical one; SCL compresses better than reflectance.

The collection also carries foreign members: ``run_id``, ``dataset_id``, ``cells_total``, and the
totals ``tasks``, ``est_chips`` and ``est_fetch_bytes``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from cropchips.errors import ConfigError
from cropchips.plan.plan import Plan
from cropchips.queue.messages import Cell
from cropchips.raster.grid import GRID_MARGIN_PX
from cropchips.sources import source_for
from cropchips.spec import DatasetSpec
from cropchips.output.storage import atomic_output

log = logging.getLogger(__name__)

#: Share of a band's raw bytes that its deflate'd COG takes (Sentinel-2 L2A uint16 reflectance
#: deflates to roughly 50-70 %; SCL much further, but it is a small share of the total anyway).
COMPRESSION_FACTOR = 0.6
#: Bytes per pixel of a reflectance band (uint16) and of the quality band (uint8).
BAND_BYTES = 2
QUALITY_BYTES = 1
#: Mean Earth radius (IUGG), for the cell's size in metres.
EARTH_RADIUS_M = 6_371_008.8

#: Values of a cell's ``status``: published, or the reason make_plan dropped it.
TASK = "task"
TOO_FEW_POLYGONS = "too_few_polygons"
OUTSIDE_AOI = "outside_aoi"


@dataclass(frozen=True)
class CellPlan:
    """What the plan does with one cell, and what it is expected to cost."""

    cell: Cell
    """The grid cell."""
    status: str
    """``task``, ``too_few_polygons`` or ``outside_aoi``."""
    polygons: int
    """Field polygons whose representative point lies in the cell."""
    scenes: int
    """Scenes in the cell's task (0 if dropped)."""
    est_chips: int
    """Chips the task may write at most (0 if dropped or without scenes)."""
    est_fetch_bytes: int
    """Estimated bytes the worker fetches for the task (see the module docstring)."""
    split: str | None = None
    """The split of the cell's task (None if dropped)."""

    def feature(self) -> dict[str, Any]:
        """The cell as a GeoJSON Feature, its box a counter-clockwise ring (RFC 7946, 3.1.6)."""
        minx, miny, maxx, maxy = self.cell.bbox
        ring = [[minx, miny], [maxx, miny], [maxx, maxy], [minx, maxy], [minx, miny]]
        return {"type": "Feature", "id": self.cell.id, "bbox": [minx, miny, maxx, maxy],
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"cell_id": self.cell.id, "row": self.cell.row, "col": self.cell.col,
                               "status": self.status, "polygons": self.polygons, "scenes": self.scenes,
                               "split": self.split, "est_chips": self.est_chips,
                               "est_fetch_bytes": self.est_fetch_bytes}}


@dataclass(frozen=True)
class PlanMap:
    """Every cell of a plan's grid with its status and estimates."""

    run_id: str
    """The plan's run."""
    dataset_id: str
    """The dataset its chips belong to."""
    bbox: tuple[float, float, float, float]
    """The grid's box in EPSG:4326."""
    cells: tuple[CellPlan, ...]
    """Row by row from the south-west, as :meth:`~cropchips.plan.grid.Grid.cells`."""

    def totals(self) -> dict[str, int]:
        """Tasks, and the estimated chips and fetched bytes of all of them."""
        tasks = [c for c in self.cells if c.status == TASK]
        return {"tasks": len(tasks), "est_chips": sum(c.est_chips for c in tasks),
                "est_fetch_bytes": sum(c.est_fetch_bytes for c in tasks)}

    def to_geojson(self) -> dict[str, Any]:
        """The RFC 7946 FeatureCollection (EPSG:4326 implied: no ``crs`` member)."""
        return {"type": "FeatureCollection", "bbox": list(self.bbox), "run_id": self.run_id,
                "dataset_id": self.dataset_id, "cells_total": len(self.cells), **self.totals(),
                "features": [cell.feature() for cell in self.cells]}


def cell_size_m(bbox: tuple[float, float, float, float]) -> tuple[float, float]:
    """Width and height in metres of a lon/lat box, on a sphere (width at its middle latitude)."""
    minx, miny, maxx, maxy = bbox
    height = math.radians(maxy - miny) * EARTH_RADIUS_M
    width = math.radians(maxx - minx) * EARTH_RADIUS_M * math.cos(math.radians((miny + maxy) / 2))
    return width, height


def estimate_fetch_bytes(cell: Cell, n_scenes: int, spec: DatasetSpec) -> int:
    """Bytes a worker is expected to fetch for ``n_scenes`` scenes over ``cell`` (the module
    docstring gives the formula and what it leaves out)."""
    if n_scenes <= 0:
        return 0
    width, height = cell_size_m(cell.bbox)
    margin = GRID_MARGIN_PX * spec.resolution  # the worker's margin (raster/grid.py)
    band_scenes = min(n_scenes, spec.max_scenes) if spec.max_scenes else n_scenes
    source = source_for(spec.collection)
    total = 0.0
    for band in (*spec.bands, source.quality_band):
        res = source.resolutions[band]
        pixels = math.ceil((width + 2 * margin) / res) * math.ceil((height + 2 * margin) / res)
        if band == source.quality_band:  # every scene's quality band picks the clearest
            total += n_scenes * pixels * QUALITY_BYTES * COMPRESSION_FACTOR
        else:
            total += band_scenes * pixels * BAND_BYTES * COMPRESSION_FACTOR
    return int(round(total))


def build_plan_map(plan: Plan, counts: np.ndarray, aoi: BaseGeometry | None = None) -> PlanMap:
    """The map of ``plan``, given the polygons per cell (a ``(y_cells, x_cells)`` array, as
    :meth:`~cropchips.plan.grid.Grid.count` gives) and the aoi the plan was made with (if any).

    No I/O (:func:`plan_map` passes the plan's own)."""
    grid, spec = plan.grid, plan.spec
    if counts.shape != (grid.y_cells, grid.x_cells):
        raise ValueError(f"counts must have the grid's shape {(grid.y_cells, grid.x_cells)}, got {counts.shape}")
    tasks = {task.cell.id: task for task in plan.tasks}
    cells = []
    for cell in grid.cells():
        polygons = int(counts[cell.row, cell.col])
        task = tasks.get(cell.id)
        if task is None:
            # The order of make_plan's tests: outside the aoi first, then too few polygons.
            status = OUTSIDE_AOI if aoi is not None and not aoi.intersects(shapely.box(*cell.bbox)) else TOO_FEW_POLYGONS
            cells.append(CellPlan(cell, status, polygons, 0, 0, 0))
            continue
        n = len(task.scenes)
        # A task without scenes reports no_scenes and writes nothing.
        chips = min(spec.max_chips_per_cell, polygons) if n else 0
        cells.append(CellPlan(cell, TASK, polygons, n, chips, estimate_fetch_bytes(cell, n, spec), task.split))
    return PlanMap(run_id=plan.run_id, dataset_id=spec.dataset_id(), bbox=grid.bbox, cells=tuple(cells))


def plan_map(plan: Plan) -> PlanMap:
    """The map of ``plan``, from the polygon counts and the aoi it was made with."""
    return build_plan_map(plan, plan.counts, plan.aoi)


def check_plan_out(path: str | Path) -> Path:
    """``path`` if a plan map can be written there: its folder exists and it is no folder itself.
    Checked before planning, so a typo fails at once rather than after the GeoPackage is read."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--plan-out {path} is a folder; give a file name such as {path / 'plan.geojson'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--plan-out {path}: the folder {path.parent} does not exist; create it or give "
                          "a path in an existing folder")
    return path


def write_plan_map(path: str | Path, cells: PlanMap) -> Path:
    """Write the map ``cells`` as GeoJSON at ``path``, atomically (a temporary beside it, then renamed over it,
    so a reader never sees half a file). Refuses a path whose folder does not exist."""
    path = check_plan_out(path)
    doc = cells.to_geojson()
    features = doc.pop("features")
    # One feature a line: small to diff and to grep, still one JSON document.
    text = (json.dumps(doc, allow_nan=False)[:-1] + ', "features": [\n'
            + ",\n".join(json.dumps(f, allow_nan=False) for f in features) + "\n]}")
    try:
        with atomic_output(path) as tmp:
            Path(tmp).write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the plan map {path} ({exc.strerror or exc}); give --plan-out a "
                          "path you may write to") from None
    log.info("wrote the plan map of %d cells to %s", len(cells.cells), path)
    return path
