"""The processing grid: regular cells in EPSG:4326 degrees and vectorised point-to-cell binning."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cropchips.errors import ConfigError
from cropchips.queue.messages import Cell


@dataclass(frozen=True)
class Grid:
    """A regular grid of ``x_cells`` x ``y_cells`` cells of ``step`` degrees from a south-west corner."""

    start_x: float
    """Longitude of the south-west corner."""
    start_y: float
    """Latitude of the south-west corner."""
    step: float
    """Cell size in degrees."""
    x_cells: int
    """Number of columns."""
    y_cells: int
    """Number of rows."""

    def __post_init__(self) -> None:
        if not self.step > 0:
            raise ConfigError(f"--grid-step must be > 0 degrees, got {self.step}")
        if self.x_cells < 1 or self.y_cells < 1:
            raise ConfigError(f"--x-cells and --y-cells must be >= 1, got {self.x_cells} x {self.y_cells}")
        minx, miny, maxx, maxy = self.bbox
        if not (-180 <= minx and maxx <= 180 and -90 <= miny and maxy <= 90):
            raise ConfigError(
                f"the grid {self.bbox} leaves the globe: --start-x/--start-y are the south-west corner in "
                "degrees (EPSG:4326) and --grid-step x cells must stay within -180..180 / -90..90"
            )

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return (self.start_x, self.start_y,
                self.start_x + self.step * self.x_cells, self.start_y + self.step * self.y_cells)

    @property
    def grid_id(self) -> str:
        """Short hash of the grid's corner and step: distinct grids never share cell ids."""
        key = f"{self.start_x:.7f},{self.start_y:.7f},{self.step:.7f}"
        return hashlib.sha256(key.encode()).hexdigest()[:6]

    def cell_id(self, row: int, col: int) -> str:
        return f"g{self.grid_id}-r{row:03d}-c{col:03d}"

    def cell(self, row: int, col: int) -> Cell:
        if not (0 <= row < self.y_cells and 0 <= col < self.x_cells):
            raise IndexError(f"cell ({row}, {col}) outside a {self.y_cells} x {self.x_cells} grid")
        x0 = self.start_x + col * self.step
        y0 = self.start_y + row * self.step
        return Cell(id=self.cell_id(row, col), row=row, col=col,
                    bbox=(round(x0, 9), round(y0, 9), round(x0 + self.step, 9), round(y0 + self.step, 9)))

    def cells(self) -> Iterator[Cell]:
        """All cells, row by row from the south-west."""
        for row in range(self.y_cells):
            for col in range(self.x_cells):
                yield self.cell(row, col)

    def locate(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of each point; -1 for points outside the grid.

        A point on a shared edge belongs to the cell east/north of it (half-open cells),
        so every point has at most one cell.
        """
        lon = np.asarray(lon, dtype="float64")
        lat = np.asarray(lat, dtype="float64")
        col = np.floor((lon - self.start_x) / self.step).astype("int64")
        row = np.floor((lat - self.start_y) / self.step).astype("int64")
        inside = (col >= 0) & (col < self.x_cells) & (row >= 0) & (row < self.y_cells) & np.isfinite(lon) & np.isfinite(lat)
        return np.where(inside, row, -1), np.where(inside, col, -1)

    def count(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Number of points per cell as a (y_cells, x_cells) array, in one vectorised pass."""
        row, col = self.locate(lon, lat)
        keep = row >= 0
        flat = row[keep] * self.x_cells + col[keep]
        return np.bincount(flat, minlength=self.x_cells * self.y_cells).reshape(self.y_cells, self.x_cells)


def cell_contains(cell: Cell, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Half-open membership test of points in a single cell, consistent with :meth:`Grid.locate`."""
    minx, miny, maxx, maxy = cell.bbox
    lon = np.asarray(lon, dtype="float64")
    lat = np.asarray(lat, dtype="float64")
    return (lon >= minx) & (lon < maxx) & (lat >= miny) & (lat < maxy)
