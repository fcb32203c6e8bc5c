"""Gridding and polygon counting, checked on real EuroCrops parcels against a per-cell shapely test."""

import geopandas as gpd
import numpy as np
import pytest
from shapely.geometry import box

from conftest import shared_data
from cropchips.errors import ConfigError
from cropchips.fields.gpkg import open_layer, read_points
from cropchips.plan.grid import Grid, cell_contains


def test_cells_tile_the_grid_without_gaps():
    grid = Grid(start_x=-5.8, start_y=37.2, step=0.05, x_cells=10, y_cells=10)
    cells = list(grid.cells())
    assert len(cells) == 100 and len({c.id for c in cells}) == 100
    assert cells[0].bbox == pytest.approx((-5.8, 37.2, -5.75, 37.25))
    assert cells[-1].bbox == pytest.approx((-5.35, 37.65, -5.3, 37.7))
    assert sum(box(*c.bbox).area for c in cells) == pytest.approx(box(*grid.bbox).area)


def test_cell_ids_differ_between_grids():
    a = Grid(start_x=-5.8, start_y=37.2, step=0.05, x_cells=2, y_cells=2)
    b = Grid(start_x=-5.7, start_y=37.2, step=0.05, x_cells=2, y_cells=2)
    assert a.cell(0, 0).id != b.cell(0, 0).id
    assert a.cell(1, 1).id == Grid(start_x=-5.8, start_y=37.2, step=0.05, x_cells=5, y_cells=5).cell(1, 1).id


def test_locate_is_half_open_and_outside_is_minus_one():
    grid = Grid(start_x=0.0, start_y=0.0, step=1.0, x_cells=2, y_cells=2)
    row, col = grid.locate(np.array([0.0, 1.0, 1.999, 2.0, -0.1]), np.array([0.0, 0.5, 1.0, 0.5, 0.5]))
    assert row.tolist() == [0, 0, 1, -1, -1]
    assert col.tolist() == [0, 1, 1, -1, -1]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(step=0.0), "grid-step"), (dict(x_cells=0), "x-cells"), (dict(start_x=179.9), "leaves the globe")])
def test_bad_grid_is_a_config_error(kwargs, needle):
    base = dict(start_x=-5.8, start_y=37.2, step=0.05, x_cells=10, y_cells=10)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=needle):
        Grid(**base)


def test_counts_on_real_parcels_match_a_per_cell_shapely_count():
    path = f"zip://{shared_data('eurocrops', 'SI_2021.zip')}"
    parcels = gpd.read_file(path).to_crs("EPSG:4326")
    minx, miny, maxx, maxy = parcels.total_bounds
    grid = Grid(start_x=float(np.floor(minx * 100) / 100), start_y=float(np.floor(miny * 100) / 100), step=0.02,
                x_cells=int(np.ceil((maxx - minx) / 0.02)) + 1, y_cells=int(np.ceil((maxy - miny) / 0.02)) + 1)
    layer = open_layer(path)
    lon, lat = read_points(layer, grid.bbox)
    counts = grid.count(lon, lat)
    # Independent count: representative points computed in EPSG:4326 by geopandas, one cell at a time.
    reps = gpd.read_file(path).representative_point().to_crs("EPSG:4326")
    expected = np.zeros_like(counts)
    for cell in grid.cells():
        expected[cell.row, cell.col] = int(cell_contains(cell, reps.x.to_numpy(), reps.y.to_numpy()).sum())
    assert counts.sum() == len(parcels) == 100
    assert (counts == expected).all()
    assert (counts > 0).sum() >= 2  # the test means something only if several cells are populated
