"""Label layers: field instances from real parcels that agree with the classes mask, ids renumbered per
chip, field boundaries (Fields of The World convention) and the nodata ignore label."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
import shapely.affinity
from affine import Affine
from shapely.geometry import box

from conftest import shared_data
from cropchips.raster.grid import TargetGrid
from cropchips.raster.labels import (chip_instances, classes_of_instances, field_boundaries, mask_nodata,
                                     rasterize_classes, rasterize_instances)

RES = 10.0


@pytest.fixture(scope="module")
def overlapping():
    """The 100 real Slovenian parcels plus 20 scaled, shifted copies of some of them (half grown, half
    shrunk), so that fields overlap; classes 1..8 and 255 in turn."""
    real = gpd.read_file(f"zip://{shared_data('eurocrops', 'SI_2021.zip')}")[["geometry"]]
    copies = []
    for i, geom in enumerate(real.geometry.iloc[:20]):
        factor = 1.3 if i % 2 else 0.7
        copies.append(shapely.affinity.translate(shapely.affinity.scale(geom, factor, factor), 25.0, 15.0))
    frame = gpd.GeoDataFrame(geometry=list(real.geometry) + copies, crs=real.crs)
    frame["class_id"] = np.array([255 if i % 9 == 8 else i % 9 + 1 for i in range(len(frame))], dtype="uint8")
    return frame


def utm_grid(frame, epsg=32633):
    minx, miny, maxx, maxy = frame.to_crs(epsg).total_bounds
    left, top = np.floor(minx / RES) * RES - 50, np.ceil(maxy / RES) * RES + 50
    width = int(np.ceil((maxx - left) / RES)) + 5
    height = int(np.ceil((top - miny) / RES)) + 5
    return TargetGrid(epsg=epsg, transform=Affine(RES, 0, left, 0, -RES, top), width=width, height=height)


def owners_by_shapely(frame, grid):
    """Rows, cols of every pixel in a field's bounding box, the position + 1 of the smallest field (by
    area in the grid's CRS) holding its centre, 0 for none, and how many fields hold it: computed point
    by point with shapely."""
    local = frame.to_crs(grid.crs)
    picked = np.zeros((grid.height, grid.width), dtype=bool)
    for minx, miny, maxx, maxy in local.geometry.bounds.to_numpy():
        c0, c1 = int((minx - grid.transform.c) // RES), int((maxx - grid.transform.c) // RES) + 1
        r0, r1 = int((grid.transform.f - maxy) // RES), int((grid.transform.f - miny) // RES) + 1
        picked[max(r0, 0):r1, max(c0, 0):c1] = True
    rows, cols = np.nonzero(picked)
    points = shapely.points(grid.transform.c + (cols + 0.5) * RES, grid.transform.f - (rows + 0.5) * RES)
    hit_point, hit_poly = shapely.STRtree(local.geometry.values).query(points, predicate="within")
    area = local.geometry.area.to_numpy()
    expected = np.zeros(len(points), dtype=np.int64)
    best = np.full(len(points), np.inf)
    for p, g in zip(hit_point, hit_poly):
        if area[g] < best[p]:
            best[p], expected[p] = area[g], g + 1
    return rows, cols, expected, np.bincount(hit_point, minlength=len(points))


def test_instances_and_classes_agree_with_the_smallest_field_under_each_pixel(overlapping):
    grid = utm_grid(overlapping)
    instances = rasterize_instances(overlapping, grid)
    classes = rasterize_classes(overlapping, grid)
    assert instances.dtype == np.uint32 and instances.shape == (grid.height, grid.width)
    assert classes.dtype == np.uint8
    rows, cols, expected, holders = owners_by_shapely(overlapping, grid)
    assert (expected > 0).sum() > 10000 and (holders >= 2).sum() > 1000  # many pixels under two fields
    assert np.array_equal(instances[rows, cols], expected)
    class_of = np.concatenate([[0], overlapping["class_id"].to_numpy()])
    assert np.array_equal(classes[rows, cols], class_of[expected])
    assert (classes == 255).any()  # 255 survives rasterization
    # The two rasters agree everywhere: a pixel has a class exactly when it has a field.
    assert np.array_equal(classes > 0, instances > 0)
    assert np.array_equal(classes_of_instances(overlapping, instances), classes)
    # Pixels outside every bounding box have no field.
    outside = np.ones(instances.shape, dtype=bool)
    outside[rows, cols] = False
    assert not instances[outside].any()


def test_the_overlapping_copies_really_overlap(overlapping):
    # Otherwise the smaller-wins check above would check nothing.
    local = overlapping.to_crs(32633)
    first, copies = local.geometry.iloc[:20].values, local.geometry.iloc[100:].values
    assert sum(a.intersection(b).area > 500 for a, b in zip(first, copies)) >= 15


def test_each_field_has_its_own_id():
    a = box(500000, 5000000, 500100, 5000100)
    b = box(500100, 5000000, 500200, 5000100)  # shares an edge with a
    frame = gpd.GeoDataFrame({"class_id": np.array([5, 5], "uint8")}, geometry=[a, b], crs="EPSG:32633")
    grid = TargetGrid(epsg=32633, transform=Affine(10, 0, 500000, 0, -10, 5000100), width=20, height=10)
    instances = rasterize_instances(frame, grid)
    assert (instances[:, :10] == 1).all() and (instances[:, 10:] == 2).all()
    assert (rasterize_classes(frame, grid) == 5).all()  # one class, two fields


def test_no_fields_give_empty_rasters():
    grid = TargetGrid(epsg=32633, transform=Affine(10, 0, 500000, 0, -10, 5000100), width=7, height=5)
    empty = gpd.GeoDataFrame({"class_id": np.array([], "uint8")}, geometry=[], crs="EPSG:32633")
    assert rasterize_instances(empty, grid).dtype == np.uint32 and not rasterize_instances(empty, grid).any()
    assert rasterize_classes(empty, grid).shape == (5, 7)


def test_chip_instances_renumbers_by_first_appearance():
    window = np.array([[0, 70, 70, 0],
                       [31, 0, 900, 900],
                       [31, 31, 900, 70]], dtype=np.uint32)
    expected = np.array([[0, 1, 1, 0],
                         [2, 0, 3, 3],
                         [2, 2, 3, 1]], dtype=np.uint32)
    out = chip_instances(window)
    assert out.dtype == np.uint32 and np.array_equal(out, expected)
    assert np.array_equal(chip_instances(np.zeros((2, 3), np.uint32)), np.zeros((2, 3), np.uint32))


def test_chip_instances_of_a_real_chip_are_unique_and_keep_the_fields_apart(overlapping):
    grid = utm_grid(overlapping)
    instances = rasterize_instances(overlapping, grid)
    # The window holding the most distinct fields.
    size = 64
    best, where = 0, (0, 0)
    for r in range(0, grid.height - size, 32):
        for c in range(0, grid.width - size, 32):
            n = len(np.unique(instances[r:r + size, c:c + size]))
            if n > best:
                best, where = n, (r, c)
    window = instances[where[0]:where[0] + size, where[1]:where[1] + size]
    assert best >= 6
    out = chip_instances(window)
    ids = np.unique(out[out > 0])
    assert ids.tolist() == list(range(1, len(ids) + 1))
    assert len(ids) == len(np.unique(window[window > 0]))
    assert np.array_equal(out == 0, window == 0)
    # One new id per old id and back: the pairs are as many as either side's ids.
    pairs = {(int(a), int(b)) for a, b in zip(window.ravel(), out.ravel())}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    # First appearance, row by row: the new ids show up as 1, 2, 3, ...
    seen = []
    for value in out.ravel():
        if value and value not in seen:
            seen.append(int(value))
    assert seen == list(range(1, len(ids) + 1))


def test_boundaries_of_two_adjacent_squares():
    instances = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                          [0, 1, 1, 1, 1, 2, 2, 2, 2, 0],
                          [0, 1, 1, 1, 1, 2, 2, 2, 2, 0],
                          [0, 1, 1, 1, 1, 2, 2, 2, 2, 0],
                          [0, 1, 1, 1, 1, 2, 2, 2, 2, 0],
                          [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.uint32)
    expected = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                         [0, 2, 2, 2, 2, 2, 2, 2, 2, 0],
                         [0, 2, 1, 1, 2, 2, 1, 1, 2, 0],
                         [0, 2, 1, 1, 2, 2, 1, 1, 2, 0],
                         [0, 2, 2, 2, 2, 2, 2, 2, 2, 0],
                         [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.uint8)
    out = field_boundaries(instances)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)


def test_a_diagonal_neighbour_makes_a_boundary_and_the_raster_edge_does_not():
    instances = np.array([[1, 1, 1, 1],
                          [1, 1, 1, 1],
                          [1, 1, 1, 1],
                          [1, 1, 1, 3]], dtype=np.uint32)
    expected = np.array([[1, 1, 1, 1],
                         [1, 1, 1, 1],
                         [1, 1, 2, 2],
                         [1, 1, 2, 2]], dtype=np.uint8)
    assert np.array_equal(field_boundaries(instances), expected)


def test_a_chip_cut_from_the_cell_boundaries_has_no_boundary_at_its_edge():
    cell = np.zeros((40, 40), dtype=np.uint32)
    cell[5:35, 5:35] = 7  # one big field
    cell[18:22, 30:34] = 8  # a small one inside its east part
    boundaries = field_boundaries(cell)
    chip = boundaries[10:26, 10:26]  # cuts the big field: its edges are inside the field
    assert (chip[0] == 1).all() and (chip[:, 0] == 1).all() and (chip[-1] == 1).all() and (chip[:, -1] == 1).all()
    # The small field's ring and the big field's pixels around it are boundary.
    assert (boundaries[17:23, 29:35][[0, -1]] == 2).all()
    assert boundaries[20, 25] == 1 and boundaries[20, 29] == 2 and boundaries[20, 30] == 2


def test_mask_nodata_marks_pixels_without_data():
    mask = np.array([[0, 5, 255], [3, 0, 8]], dtype=np.uint8)
    covered = np.array([[True, False, True], [False, True, True]])
    out = mask_nodata(mask, covered)
    assert np.array_equal(out, np.array([[0, 255, 255], [255, 0, 8]], dtype=np.uint8))
    assert out is not mask and mask[0, 1] == 5  # the input is left alone
    assert np.array_equal(mask_nodata(mask, covered, label=0), np.array([[0, 0, 255], [0, 0, 8]], np.uint8))
    with pytest.raises(ValueError, match="shape"):
        mask_nodata(mask, covered[:, :2])
    with pytest.raises(ValueError, match="boolean"):
        mask_nodata(mask, covered.astype(np.uint8))
    with pytest.raises(ValueError, match="fit"):
        mask_nodata(mask, covered, label=256)
