"""Choosing chips: square windows on the pixel grid, inside their cell, centred on fields or on a lattice.

Every chip lies wholly inside its cell (the cell's lon/lat box as drawn in the grid's CRS): a chip
centred on a field near the cell's edge is shifted inward, so that neighbouring cells never make
chips of the same ground. Within a cell, no two chips share more than ``max_overlap`` of a chip.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import shapely
from pyproj import CRS

from cropchips.crs import transformer
from cropchips.errors import ConfigError, InputDataError
from cropchips.fields.classes import MAX_CLASS_ID
from cropchips.plan.grid import cell_contains
from cropchips.queue.messages import Cell
from cropchips.raster.grid import TargetGrid

log = logging.getLogger(__name__)

#: How chips are placed in a cell: centred on fields, or on a fixed lattice of the CRS.
PLACEMENTS = ("fields", "lattice")
#: Why a candidate chip is skipped, besides the reasons ``reject`` returns (``nodata``, ``too_cloudy``).
SKIP_EDGE = "edge"  # shifted inside the cell, the chip no longer holds its field's representative point
SKIP_OVERLAP = "overlap"  # it shares more than max_overlap with a chip of the cell already chosen
SKIP_UNLABELLED = "unlabelled"  # its share of class pixels is below min_labelled_fraction

#: Points per edge of the cell's box when projecting it: the edges of a lon/lat box are curves in UTM.
EDGE_POINTS = 101
#: Metres the inner box is shrunk by, for the sag of the true edge between two projected points.
EDGE_SLACK_M = 1e-3
# Float noise allowed when snapping an edge that lies on a pixel boundary (in pixels).
_SNAP_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ChipWindow:
    """A chip: ``size`` x ``size`` pixels of the target grid from (row, col)."""

    row: int
    """Top row in the target grid."""
    col: int
    """Left column in the target grid."""
    size: int
    """Width and height in pixels."""
    field_id: str | None
    """The field the chip is centred on; None for a chip of the lattice placement."""

    def slices(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.size), slice(self.col, self.col + self.size)


def inner_box(cell: Cell, crs: str | CRS) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) in ``crs`` of the largest axis-aligned rectangle inside the cell.

    The cell's lon/lat box is a curved quadrilateral in a projected CRS (meridians converge, parallels
    bend): the rectangle lies inside each of its four edges, each projected at ``EDGE_POINTS`` points.
    """
    minlon, minlat, maxlon, maxlat = cell.bbox
    t = np.linspace(0.0, 1.0, EDGE_POINTS)
    lons = minlon + (maxlon - minlon) * t
    lats = minlat + (maxlat - minlat) * t
    to_crs = transformer("EPSG:4326", crs)
    west_x, _ = to_crs.transform(np.full_like(lats, minlon), lats)
    east_x, _ = to_crs.transform(np.full_like(lats, maxlon), lats)
    _, south_y = to_crs.transform(lons, np.full_like(lons, minlat))
    _, north_y = to_crs.transform(lons, np.full_like(lons, maxlat))
    edges = np.concatenate([west_x, east_x, south_y, north_y])
    if not np.isfinite(edges).all():
        raise InputDataError(f"cell {cell.id} {cell.bbox} cannot be drawn in {crs}: it lies outside that CRS's "
                             "area of use; use the cell's own UTM zone")
    left, right = float(np.max(west_x)) + EDGE_SLACK_M, float(np.min(east_x)) - EDGE_SLACK_M
    bottom, top = float(np.max(south_y)) + EDGE_SLACK_M, float(np.min(north_y)) - EDGE_SLACK_M
    return left, bottom, right, top


def chip_fits(cell: Cell, crs: str | CRS, chip_size: int, resolution: float, *, placement: str = "fields") -> bool:
    """Does a chip of ``chip_size`` pixels of ``resolution`` metres fit inside the cell's inner box
    (:func:`inner_box`) whatever the pixel grid's origin?

    Snapping the box inward onto a pixel grid can cost up to one pixel per axis, so ``fields`` needs
    ``chip_size + 1`` pixels of room; ``lattice`` needs a whole lattice window, which any
    ``2 * chip_size + 1`` pixels hold. False means the cell can never yield a chip.
    """
    _check_placement(placement)
    if chip_size <= 0 or resolution <= 0:
        raise ConfigError(f"chip_size and resolution must be positive, got {chip_size} and {resolution}")
    left, bottom, right, top = inner_box(cell, crs)
    need = ((chip_size + 1) if placement == "fields" else (2 * chip_size + 1)) * resolution
    return right - left >= need and top - bottom >= need


def inner_pixels(cell: Cell, grid: TargetGrid) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1): the pixels of ``grid`` wholly inside the cell's inner box, rows
    ``row0 <= r < row1`` and columns ``col0 <= c < col1``, clipped to the grid. Empty (row1 <= row0
    or col1 <= col0) when not one pixel fits."""
    left, bottom, right, top = inner_box(cell, grid.crs)
    grid_left, _, _, grid_top = grid.bounds
    res = grid.resolution
    col0 = max(0, math.ceil((left - grid_left) / res - _SNAP_TOLERANCE))
    col1 = min(grid.width, math.floor((right - grid_left) / res + _SNAP_TOLERANCE))
    row0 = max(0, math.ceil((grid_top - top) / res - _SNAP_TOLERANCE))
    row1 = min(grid.height, math.floor((grid_top - bottom) / res + _SNAP_TOLERANCE))
    return row0, row1, col0, col1


def plan_chips(fields: gpd.GeoDataFrame, cell: Cell, grid: TargetGrid, *, chip_size: int, max_chips: int,
               placement: str = "fields", max_overlap: float = 0.25, labels: np.ndarray | None = None,
               min_labelled_fraction: float = 0.0,
               reject: Callable[[ChipWindow], str | None] | None = None) -> tuple[list[ChipWindow], Counter]:
    """Up to ``max_chips`` chips of ``chip_size`` pixels inside ``cell``, and the counts of candidates
    skipped, by reason.

    ``placement="fields"``: a candidate per field whose representative point lies in the cell,
    those of a class (1..8) first, then the largest. The chip is centred on the field's
    representative point, snapped to the grid and shifted inward to lie inside the cell; if the
    point then falls outside the chip, the candidate is skipped (``edge``).

    ``placement="lattice"``: the candidates are the windows of a fixed lattice of ``grid.crs`` (their
    corners at multiples of ``chip_size * resolution`` metres, snapped to the pixel grid) that lie
    wholly inside the cell, the most labelled first (ties by row, then column). Windows with no
    labelled pixel are no candidates (and not counted). Lattice chips have no ``field_id``, and
    never overlap each other, in a cell or across the cells of one CRS and pixel lattice.

    Every candidate is then skipped if it shares more than ``max_overlap`` of its area with a chip
    already chosen, or is the same window (``overlap``); if its share of labelled pixels, those
    of ``labels`` (the cell's class raster on ``grid``) that are 1..8, is below
    ``min_labelled_fraction`` (``unlabelled``); or if ``reject`` (which returns a reason, e.g.
    ``nodata`` or ``too_cloudy``, or None) rejects it.
    """
    _check_placement(placement)
    if chip_size <= 0:
        raise ConfigError(f"chip_size must be a positive number of pixels, got {chip_size}")
    for name, value in (("max_overlap", max_overlap), ("min_labelled_fraction", min_labelled_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must lie between 0 and 1, got {value}")
    labelled = None
    if labels is not None:
        if labels.shape != (grid.height, grid.width):
            raise ValueError(f"labels has shape {labels.shape}, the grid is {(grid.height, grid.width)}; "
                             "give the cell's class raster on the same grid")
        labelled = _summed_area((labels >= 1) & (labels <= MAX_CLASS_ID))
    elif placement == "lattice" or min_labelled_fraction > 0:
        raise ValueError(f"placement={placement!r} with min_labelled_fraction={min_labelled_fraction} needs "
                         "labels, the cell's class raster on the grid")

    skipped: Counter = Counter()
    chips: list[ChipWindow] = []
    if max_chips <= 0:
        return chips, skipped
    room = inner_pixels(cell, grid)
    if placement == "fields":
        candidates = _field_candidates(fields, cell, grid, chip_size, room, skipped)
    else:
        candidates = _lattice_candidates(grid, chip_size, room, labelled)
    limit = max_overlap * chip_size * chip_size
    for window in candidates:
        if len(chips) >= max_chips:
            break
        if any(_shared(window, chip) > limit or (window.row, window.col) == (chip.row, chip.col) for chip in chips):
            skipped[SKIP_OVERLAP] += 1
            continue
        if min_labelled_fraction > 0 and labelled is not None:
            share = _window_sum(labelled, window.row, window.col, chip_size) / (chip_size * chip_size)
            if share < min_labelled_fraction:
                skipped[SKIP_UNLABELLED] += 1
                continue
        reason = reject(window) if reject else None
        if reason:
            skipped[reason] += 1
            continue
        chips.append(window)
    log.debug("cell %s: %d %s chips, skipped %s", cell.id, len(chips), placement, dict(skipped) or "none")
    return chips, skipped


def _check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ConfigError(f"chip placement must be one of {PLACEMENTS}, got {placement!r}")


def _field_candidates(fields: gpd.GeoDataFrame, cell: Cell, grid: TargetGrid, chip_size: int,
                      room: tuple[int, int, int, int], skipped: Counter):
    """Windows centred on the cell's fields (labelled first, then the largest), shifted into ``room``;
    those whose field's representative point is then outside are counted as ``edge``."""
    if fields.empty:
        return
    inside = fields[cell_contains(cell, fields["lon"].to_numpy(), fields["lat"].to_numpy())]
    if inside.empty:
        return
    local = inside.to_crs(grid.crs)
    area = local.geometry.area.to_numpy()
    class_id = local["class_id"].to_numpy()
    unlabelled = ~((class_id >= 1) & (class_id <= MAX_CLASS_ID))
    order = np.lexsort((local["field_id"].to_numpy(), -area, unlabelled))
    # The chip centres on the field's representative point (inside the field, unlike a centroid).
    points = shapely.point_on_surface(local.geometry.values)
    res = grid.resolution
    left, _, _, top = grid.bounds
    row0, row1, col0, col1 = room
    for i in order:
        x, y = shapely.get_x(points[i]), shapely.get_y(points[i])
        px, py = (x - left) / res, (top - y) / res  # the point in pixel units of the grid
        col = int(math.floor(px - chip_size / 2 + 0.5))
        row = int(math.floor(py - chip_size / 2 + 0.5))
        if row1 - row0 < chip_size or col1 - col0 < chip_size:
            skipped[SKIP_EDGE] += 1  # the cell cannot hold a chip at all
            continue
        col = min(max(col, col0), col1 - chip_size)
        row = min(max(row, row0), row1 - chip_size)
        if not (col <= px < col + chip_size and row <= py < row + chip_size):
            skipped[SKIP_EDGE] += 1
            continue
        yield ChipWindow(row=row, col=col, size=chip_size, field_id=str(local["field_id"].iloc[i]))


def _lattice_candidates(grid: TargetGrid, chip_size: int, room: tuple[int, int, int, int],
                        labelled: np.ndarray) -> list[ChipWindow]:
    """The lattice windows inside ``room`` that hold a labelled pixel, the most labelled first."""
    res = grid.resolution
    stride = chip_size * res
    left, _, _, top = grid.bounds
    row0, row1, col0, col1 = room
    if row1 - row0 < chip_size or col1 - col0 < chip_size:
        return []

    def starts(first_m: float, last_m: float, to_pixel: Callable[[np.ndarray], np.ndarray], low: int,
               high: int) -> np.ndarray:
        k = np.arange(math.floor(first_m / stride) - 1, math.ceil(last_m / stride) + 2)
        # Snapped to the pixel grid: stride is a whole number of pixels, so neighbours stay chip_size apart.
        pixel = np.floor(to_pixel(k * stride) + 0.5).astype(np.int64)
        return pixel[(pixel >= low) & (pixel + chip_size <= high)]

    cols = starts(left + col0 * res, left + col1 * res, lambda x: (x - left) / res, col0, col1)
    # A window's top edge lies on a lattice line; rows count down from the grid's top.
    rows = starts(top - row1 * res, top - row0 * res, lambda y: (top - y) / res, row0, row1)
    if not len(rows) or not len(cols):
        return []
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    counts = _window_sum(labelled, rr, cc, chip_size)
    keep = counts > 0
    rr, cc, counts = rr[keep], cc[keep], counts[keep]
    order = np.lexsort((cc, rr, -counts))
    return [ChipWindow(row=int(rr[i]), col=int(cc[i]), size=chip_size, field_id=None) for i in order]


def _shared(a: ChipWindow, b: ChipWindow) -> int:
    """Pixels two windows share."""
    rows = min(a.row + a.size, b.row + b.size) - max(a.row, b.row)
    cols = min(a.col + a.size, b.col + b.size) - max(a.col, b.col)
    return max(rows, 0) * max(cols, 0)


def _summed_area(values: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: any window's sum in four look-ups."""
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = values.cumsum(axis=0, dtype=np.int64).cumsum(axis=1)
    return table


def _window_sum(table: np.ndarray, row, col, size: int):
    """Sum of the ``size`` x ``size`` windows at (row, col) (scalars or arrays) of a summed-area table."""
    return table[row + size, col + size] - table[row, col + size] - table[row + size, col] + table[row, col]
