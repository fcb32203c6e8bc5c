"""Choosing chips: square windows on the pixel grid, centred on a cell's largest fields."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import shapely

from cropchips.plan.grid import cell_contains
from cropchips.queue.messages import Cell
from cropchips.raster.grid import TargetGrid


@dataclass(frozen=True)
class ChipWindow:
    """A chip: ``size`` x ``size`` pixels of the target grid from (row, col)."""

    row: int
    """Top row in the target grid."""
    col: int
    """Left column in the target grid."""
    size: int
    """Width and height in pixels."""
    field_id: str
    """The field the chip is centred on."""

    def slices(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.size), slice(self.col, self.col + self.size)


def plan_chips(fields: gpd.GeoDataFrame, cell: Cell, grid: TargetGrid, *, chip_size: int, max_chips: int,
               reject: Callable[[ChipWindow], str | None] | None = None) -> tuple[list[ChipWindow], Counter]:
    """Up to ``max_chips`` chips centred on the fields whose representative point lies in ``cell``.

    Labelled fields come first, then the largest. A chip is snapped to the grid, must lie
    inside the grid, must not be rejected by ``reject`` (which returns a reason, e.g. too
    much nodata or cloud, or None), and is never identical to an earlier chip of the cell.
    Returns the chips and the counts of candidates skipped, by reason.
    """
    skipped: Counter = Counter()
    if fields.empty or max_chips <= 0:
        return [], skipped
    inside = fields[cell_contains(cell, fields["lon"].to_numpy(), fields["lat"].to_numpy())]
    if inside.empty:
        return [], skipped
    local = inside.to_crs(grid.crs)
    area = local.geometry.area.to_numpy()
    order = np.lexsort((local["field_id"].to_numpy(), -area, local["class_id"].to_numpy() == 0))
    # The chip centres on the field's representative point (inside the field, unlike a centroid).
    points = shapely.point_on_surface(local.geometry.values)
    res = grid.resolution
    left, _, _, top = grid.bounds
    chips: list[ChipWindow] = []
    seen: set[tuple[int, int]] = set()
    for i in order:
        if len(chips) >= max_chips:
            break
        x, y = shapely.get_x(points[i]), shapely.get_y(points[i])
        col = int(math.floor((x - left) / res - chip_size / 2 + 0.5))
        row = int(math.floor((top - y) / res - chip_size / 2 + 0.5))
        if row < 0 or col < 0 or row + chip_size > grid.height or col + chip_size > grid.width:
            skipped["outside_grid"] += 1
            continue
        if (row, col) in seen:
            skipped["duplicate"] += 1
            continue
        window = ChipWindow(row=row, col=col, size=chip_size, field_id=str(local["field_id"].iloc[i]))
        reason = reject(window) if reject else None
        if reason:
            skipped[reason] += 1
            continue
        seen.add((row, col))
        chips.append(window)
    return chips, skipped
