"""Pixel-grid geometry of a task, with no I/O: the target grid, the UTM zone of a cell, snapping.

Everything here is arithmetic on coordinates (pyproj and affine, never GDAL), so it is cheap to
test and to reuse; reading the scenes onto a grid is :mod:`cropchips.raster.read`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from affine import Affine

from cropchips.crs import transformer
from cropchips.queue.messages import Cell, Scene


@dataclass(frozen=True)
class TargetGrid:
    """The pixel grid every band of a task is read onto (north-up, square pixels)."""

    epsg: int
    """EPSG code of the grid's CRS (a UTM zone)."""
    transform: Affine
    """Affine transform of the upper-left corner."""
    width: int
    """Columns."""
    height: int
    """Rows."""

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"grid must have a positive size, got {self.width} x {self.height}")

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    @property
    def resolution(self) -> float:
        return self.transform.a

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return (left, top - self.height * self.resolution, left + self.width * self.resolution, top)

    def window(self, row: int, col: int, height: int, width: int) -> TargetGrid:
        """The part of this grid ``height`` x ``width`` pixels from (``row``, ``col``): the same lattice, its
        pixels those of this grid (a read onto it gives the pixels a read onto the whole would hold there)."""
        if row < 0 or col < 0 or height <= 0 or width <= 0 or row + height > self.height or col + width > self.width:
            raise ValueError(f"window {height}x{width} at ({row}, {col}) is not inside the {self.height}x{self.width} grid")
        return TargetGrid(epsg=self.epsg, transform=self.transform * Affine.translation(col, row),
                          width=width, height=height)


def utm_epsg(lon: float, lat: float) -> int:
    """WGS 84 / UTM zone EPSG code holding a point (326xx north, 327xx south)."""
    zone = min(60, int(math.floor((lon + 180.0) / 6.0)) + 1)
    return (32600 if lat >= 0 else 32700) + zone


def choose_epsg(cell: Cell, scenes: Sequence[Scene]) -> int:
    """The CRS of a cell's outputs: the UTM zone of the cell centre if a scene is in it,
    else the zone most of the scenes are in."""
    if not scenes:
        raise ValueError("no scenes to choose a CRS from")
    minx, miny, maxx, maxy = cell.bbox
    centre = utm_epsg((minx + maxx) / 2, (miny + maxy) / 2)
    epsgs = [s.epsg for s in scenes]
    if centre in epsgs:
        return centre
    return max(sorted(set(epsgs)), key=epsgs.count)


#: Pixels the cell's grid reaches beyond the cell: chips lie inside the cell (``cropchips.raster.chips``),
#: so one pixel is enough, for the neighbours that tell a field boundary at the cell's edge. (Before 0.3 a
#: chip could reach half a chip past the edge, and the grid had that margin: 2.3x the pixels of a 0.05 degree
#: cell for 256 px chips.) A chip's pixels do not depend on it: resampling reads its own neighbours.
GRID_MARGIN_PX = 1


def cell_grid(cell: Cell, epsg: int, origin: tuple[float, float], resolution: float, margin_px: int) -> TargetGrid:
    """The cell's box in ``epsg``, grown by ``margin_px`` pixels and snapped outwards onto the
    lattice of ``resolution`` anchored at ``origin`` (the scenes' own grid: nothing is shifted)."""
    x0, y0 = origin
    to_utm = transformer("EPSG:4326", f"EPSG:{epsg}")
    minx, miny, maxx, maxy = to_utm.transform_bounds(*cell.bbox, densify_pts=21)
    margin = margin_px * resolution
    minx, miny, maxx, maxy = minx - margin, miny - margin, maxx + margin, maxy + margin
    left = x0 + math.floor((minx - x0) / resolution) * resolution
    right = x0 + math.ceil((maxx - x0) / resolution) * resolution
    top = y0 + math.ceil((maxy - y0) / resolution) * resolution
    bottom = y0 + math.floor((miny - y0) / resolution) * resolution
    width = int(round((right - left) / resolution))
    height = int(round((top - bottom) / resolution))
    return TargetGrid(epsg=epsg, transform=Affine(resolution, 0.0, left, 0.0, -resolution, top),
                      width=width, height=height)
