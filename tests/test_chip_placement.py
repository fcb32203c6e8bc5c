"""Chip placement on real EuroCrops parcels: chips stay inside their cell, overlap at most max_overlap,
sit on a fixed lattice when asked, and skip unlabelled windows.

The expectations are computed here from the cell's lon/lat box projected with pyproj and from the
window arithmetic, never with the planner's own helpers."""

from __future__ import annotations

import itertools

import geopandas as gpd
import numpy as np
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import box

from conftest import shared_data
from cropchips.errors import ConfigError
from cropchips.fields.classes import load_class_map
from cropchips.fields.gpkg import open_layer, read_fields
from cropchips.queue.messages import Cell
from cropchips.raster.chips import ChipWindow, chip_fits, inner_box, plan_chips
from cropchips.raster.grid import TargetGrid, cell_grid
from cropchips.raster.labels import rasterize_classes

EPSG = 32633  # UTM 33N holds the Slovenian parcels (15.6..15.73 E)
RES = 10.0
#: A 0.04 degree cell over the north-west end of the 100 real parcels' strip, where most of their cereal
#: and vegetable fields lie: fields cross its west and south edges.
CELL = Cell(id="si", row=0, col=0, bbox=(15.60, 46.10, 15.64, 46.14))


def projected_cell(cell: Cell, crs: str, n: int = 400) -> shapely.Polygon:
    """The cell's lon/lat box as a polygon in ``crs``, each edge projected at ``n`` points."""
    lon0, lat0, lon1, lat1 = cell.bbox
    t = np.linspace(0.0, 1.0, n)
    lons = np.concatenate([lon0 + (lon1 - lon0) * t, np.full(n, lon1), lon1 - (lon1 - lon0) * t, np.full(n, lon0)])
    lats = np.concatenate([np.full(n, lat0), lat0 + (lat1 - lat0) * t, np.full(n, lat1), lat1 - (lat1 - lat0) * t])
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lons, lats)
    return shapely.Polygon(np.column_stack([x, y]))


def window_box(window: ChipWindow, grid: TargetGrid) -> shapely.Polygon:
    left = grid.transform.c + window.col * grid.resolution
    top = grid.transform.f - window.row * grid.resolution
    size = window.size * grid.resolution
    return box(left, top - size, left + size, top)


def shared_share(a: ChipWindow, b: ChipWindow) -> float:
    """Share of a chip's area two windows have in common, from their pixel ranges."""
    rows = set(range(a.row, a.row + a.size)) & set(range(b.row, b.row + b.size))
    cols = set(range(a.col, a.col + a.size)) & set(range(b.col, b.col + b.size))
    return len(rows) * len(cols) / (a.size * a.size)


def labelled_share(labels: np.ndarray, window: ChipWindow) -> float:
    part = labels[window.slices()]
    return float(((part >= 1) & (part <= 8)).mean())


@pytest.fixture(scope="module")
def layer():
    return open_layer(f"zip://{shared_data('eurocrops', 'SI_2021.zip')}")


@pytest.fixture(scope="module")
def grid() -> TargetGrid:
    # Origin (0, 0): the pixel lattice is that of the metres, as Sentinel-2's 10 m grid.
    return cell_grid(CELL, EPSG, (0.0, 0.0), RES, 33)


@pytest.fixture(scope="module")
def fields(layer, grid) -> gpd.GeoDataFrame:
    bbox = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform_bounds(*grid.bounds)
    frame = read_fields(layer, bbox, load_class_map())
    assert len(frame) > 20
    return frame


@pytest.fixture(scope="module")
def labels(fields, grid) -> np.ndarray:
    return rasterize_classes(fields, grid)


def test_real_fields_at_the_cell_edge_get_chips_shifted_inside_the_cell(fields, grid):
    cell_poly = projected_cell(CELL, grid.crs)
    local = fields.to_crs(grid.crs)
    lon0, lat0, lon1, lat1 = CELL.bbox
    lon, lat = fields["lon"].to_numpy(), fields["lat"].to_numpy()
    in_cell = local[(lon >= lon0) & (lon < lon1) & (lat >= lat0) & (lat < lat1)]
    # The test is only worth its name if a chip centred on some field would cross the cell's edge.
    size_m = 64 * RES
    reps = in_cell.geometry.representative_point()
    naive = [box(p.x - size_m / 2, p.y - size_m / 2, p.x + size_m / 2, p.y + size_m / 2) for p in reps]
    assert sum(not cell_poly.covers(b) for b in naive) >= 3

    chips, skipped = plan_chips(fields, CELL, grid, chip_size=64, max_chips=100, max_overlap=1.0)
    assert len(chips) >= 10
    by_id = dict(zip(local["field_id"], local.geometry))
    shifted = 0
    for chip in chips:
        footprint = window_box(chip, grid)
        assert cell_poly.covers(footprint), f"chip {chip} crosses the cell's edge"
        assert 0 <= chip.row and chip.row + chip.size <= grid.height and 0 <= chip.col and chip.col + 64 <= grid.width
        rep = by_id[chip.field_id].representative_point()
        assert footprint.covers(rep), "the chip lost its field"
        shifted += footprint.centroid.distance(rep) > 2 * RES
    assert shifted >= 3  # chips of the edge fields moved inward, not dropped


def test_no_two_chips_share_more_than_max_overlap(fields, grid):
    for max_overlap in (0.0, 0.25, 0.5):
        chips, skipped = plan_chips(fields, CELL, grid, chip_size=64, max_chips=100, max_overlap=max_overlap)
        assert len(chips) >= 3
        for a, b in itertools.combinations(chips, 2):
            assert shared_share(a, b) <= max_overlap, (max_overlap, a, b)
        assert skipped["overlap"] > 0  # the real fields lie close together: some candidates had to go
    loose, _ = plan_chips(fields, CELL, grid, chip_size=64, max_chips=100, max_overlap=0.5)
    strict, _ = plan_chips(fields, CELL, grid, chip_size=64, max_chips=100, max_overlap=0.0)
    assert len(loose) > len(strict)


def test_identical_windows_count_as_overlap_even_at_max_overlap_one(fields, grid):
    lon0, lat0, lon1, lat1 = CELL.bbox
    inside = fields[fields["lon"].between(lon0, lon1, inclusive="left")
                    & fields["lat"].between(lat0, lat1, inclusive="left")]
    twin = inside.iloc[[0, 0]].copy()
    twin["field_id"] = ["a", "b"]
    twin["class_id"] = np.uint8(5)
    chips, skipped = plan_chips(twin, CELL, grid, chip_size=32, max_chips=10, max_overlap=1.0)
    assert [c.field_id for c in chips] == ["a"]
    assert skipped == {"overlap": 1}


def test_lattice_windows_are_aligned_disjoint_inside_and_most_labelled_first(fields, grid, labels):
    size = 32
    stride = size * RES
    chips, skipped = plan_chips(fields, CELL, grid, chip_size=size, max_chips=1000, placement="lattice",
                                labels=labels)
    assert len(chips) >= 5
    cell_poly = projected_cell(CELL, grid.crs)
    for chip in chips:
        left = grid.transform.c + chip.col * RES
        top = grid.transform.f - chip.row * RES
        assert left % stride == 0 and top % stride == 0, chip
        assert chip.field_id is None
        assert cell_poly.covers(window_box(chip, grid))
        assert labelled_share(labels, chip) > 0
    for a, b in itertools.combinations(chips, 2):
        assert shared_share(a, b) == 0
    counts = [labelled_share(labels, c) for c in chips]
    assert counts == sorted(counts, reverse=True)
    ties = [(c.row, c.col) for c in chips]
    for i in range(len(chips) - 1):
        if counts[i] == counts[i + 1]:
            assert ties[i] < ties[i + 1]
    # Every labelled lattice window well inside the cell (30 m from its edge) is found.
    inner = cell_poly.buffer(-3 * RES)
    minx, miny, maxx, maxy = inner.bounds
    expected = set()
    for x in np.arange(np.ceil(minx / stride) * stride, maxx, stride):
        for y in np.arange(np.ceil(miny / stride) * stride + stride, maxy + stride, stride):  # y: the top edge
            if inner.covers(box(x, y - stride, x + stride, y)):
                row, col = int(round((grid.transform.f - y) / RES)), int(round((x - grid.transform.c) / RES))
                if labelled_share(labels, ChipWindow(row, col, size, None)) > 0:
                    expected.add((row, col))
    assert expected and expected <= {(c.row, c.col) for c in chips}


def test_lattice_follows_the_crs_not_the_grid_origin(fields, labels):
    # A grid whose origin is 5 m off the metre lattice: the windows still start on multiples of the stride,
    # to the nearest pixel.
    grid = cell_grid(CELL, EPSG, (5.0, 5.0), RES, 33)
    classes = rasterize_classes(fields, grid)
    chips, _ = plan_chips(fields, CELL, grid, chip_size=32, max_chips=1000, placement="lattice", labels=classes)
    assert chips
    for chip in chips:
        left = grid.transform.c + chip.col * RES
        assert abs((left + 160) % 320 - 160) <= RES / 2  # within half a pixel of a multiple of 320 m
    assert len({(c.row % 32, c.col % 32) for c in chips}) == 1  # one lattice


def test_min_labelled_fraction_skips_chips_with_few_class_pixels(fields, grid, labels):
    every, _ = plan_chips(fields, CELL, grid, chip_size=16, max_chips=100, labels=labels)
    shares = [labelled_share(labels, c) for c in every]
    threshold = 0.3
    assert min(shares) < threshold <= max(shares)  # the real cell has both kinds
    kept, skipped = plan_chips(fields, CELL, grid, chip_size=16, max_chips=100, labels=labels,
                               min_labelled_fraction=threshold)
    assert kept and skipped["unlabelled"] > 0
    assert all(labelled_share(labels, c) >= threshold for c in kept)
    lattice, skipped = plan_chips(fields, CELL, grid, chip_size=32, max_chips=100, placement="lattice",
                                  labels=labels, min_labelled_fraction=0.1)
    assert lattice and skipped["unlabelled"] > 0
    assert all(labelled_share(labels, c) >= 0.1 for c in lattice)


def test_labelled_fields_come_first_and_255_fields_still_get_chips(fields, grid):
    chips, _ = plan_chips(fields, CELL, grid, chip_size=32, max_chips=100, max_overlap=1.0)
    by_id = dict(zip(fields["field_id"], fields["class_id"]))
    classes = [int(by_id[c.field_id]) for c in chips]
    assert 255 in classes and any(1 <= k <= 8 for k in classes)
    first_ignored = classes.index(255)
    assert all(k == 255 for k in classes[first_ignored:])


def test_reject_reasons_are_counted(fields, grid):
    valid = np.ones((grid.height, grid.width), dtype=bool)
    valid[: grid.height // 2] = False  # the north half has no data
    chips, skipped = plan_chips(fields, CELL, grid, chip_size=32, max_chips=100,
                                reject=lambda w: None if valid[w.slices()].all() else "nodata")
    assert chips and skipped["nodata"] > 0
    assert all(valid[c.slices()].all() for c in chips)


def test_a_field_in_the_cell_but_outside_its_inner_rectangle_is_skipped_as_edge(grid):
    # The west edge of the cell is a slanted curve in UTM: near its westmost end, a point can lie in
    # the cell but west of every axis-aligned rectangle inside it.
    lon0, lat0, _, lat1 = CELL.bbox
    to_utm = Transformer.from_crs("EPSG:4326", grid.crs, always_xy=True)
    lats = np.linspace(lat0, lat1, 201)
    xs, ys = to_utm.transform(np.full_like(lats, lon0), lats)
    i = int(np.argmin(xs))
    west_max = float(np.max(xs))
    assert west_max - xs[i] > 10, "the cell's west edge must slant by more than a pixel for this test"
    x, y = xs[i] + 3.0, ys[i] + (8.0 if i == 0 else -8.0)
    field = gpd.GeoDataFrame({"field_id": ["sliver"], "class_id": np.array([5], "uint8")},
                             geometry=[box(x - 1, y - 1, x + 1, y + 1)], crs=grid.crs)
    lon, lat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(x, y)
    field["lon"], field["lat"] = [lon], [lat]
    assert projected_cell(CELL, grid.crs).contains(shapely.Point(x, y))
    chips, skipped = plan_chips(field, CELL, grid, chip_size=16, max_chips=5)
    assert chips == [] and skipped == {"edge": 1}


def test_a_cell_smaller_than_a_chip_gives_no_chip(fields, grid):
    chips, skipped = plan_chips(fields, CELL, grid, chip_size=600, max_chips=5)
    assert chips == [] and skipped["edge"] > 0
    assert plan_chips(fields, CELL, grid, chip_size=600, max_chips=5, placement="lattice",
                      labels=np.zeros((grid.height, grid.width), "uint8")) == ([], {})


def test_inner_box_lies_inside_the_cell_and_nearly_fills_it():
    cell_poly = projected_cell(CELL, f"EPSG:{EPSG}")
    left, bottom, right, top = inner_box(CELL, f"EPSG:{EPSG}")
    rect = box(left, bottom, right, top)
    assert cell_poly.covers(rect)
    assert rect.area / cell_poly.area > 0.97


def test_chip_fits():
    small = Cell(id="small", row=0, col=0, bbox=(15.60, 46.10, 15.61, 46.11))  # ~770 m x 1110 m
    assert not chip_fits(small, f"EPSG:{EPSG}", 256, 10.0)
    assert chip_fits(small, f"EPSG:{EPSG}", 64, 10.0)
    assert chip_fits(CELL, f"EPSG:{EPSG}", 256, 10.0)  # ~3.1 km x 4.4 km
    assert not chip_fits(CELL, f"EPSG:{EPSG}", 256, 10.0, placement="lattice")  # 2 x 2.56 km do not fit
    # At the limit: the narrowest side, measured here, holds floor(width / 10 m) whole pixels on an aligned
    # grid but one fewer on a shifted one, so one more than the chip is needed.
    poly = projected_cell(small, f"EPSG:{EPSG}")
    xs = np.array(poly.exterior.coords)[:, 0]
    n = len(xs) // 4
    width = np.min(xs[n:2 * n]) - np.max(xs[3 * n:])  # east edge's westmost point - west edge's eastmost
    pixels = int(np.floor(width / 10.0))
    assert chip_fits(small, f"EPSG:{EPSG}", pixels - 2, 10.0)
    assert not chip_fits(small, f"EPSG:{EPSG}", pixels, 10.0)


def test_bad_arguments_say_what_to_change(fields, grid, labels):
    with pytest.raises(ConfigError, match="placement"):
        plan_chips(fields, CELL, grid, chip_size=32, max_chips=5, placement="grid")
    with pytest.raises(ValueError, match="needs labels"):
        plan_chips(fields, CELL, grid, chip_size=32, max_chips=5, placement="lattice")
    with pytest.raises(ValueError, match="needs labels"):
        plan_chips(fields, CELL, grid, chip_size=32, max_chips=5, min_labelled_fraction=0.5)
    with pytest.raises(ValueError, match="shape"):
        plan_chips(fields, CELL, grid, chip_size=32, max_chips=5, labels=labels[1:])
    with pytest.raises(ConfigError, match="max_overlap"):
        plan_chips(fields, CELL, grid, chip_size=32, max_chips=5, max_overlap=1.5)
