"""Masks from real parcels, chip planning and atomic GeoTIFF writing."""

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from shapely.geometry import box

from conftest import shared_data
from cropchips import retry
from cropchips.raster.chips import plan_chips
from cropchips.raster.labels import rasterize_classes
from cropchips.queue.messages import Cell
from cropchips.sources.sentinel2 import BANDS
from cropchips.raster.grid import TargetGrid
from cropchips.output.storage import TMP_PREFIX, remove_stale_temporaries
from cropchips.raster.write import write_chip


@pytest.fixture(scope="module")
def parcels():
    frame = gpd.read_file(f"zip://{shared_data('eurocrops', 'SI_2021.zip')}")
    frame["class_id"] = (np.arange(len(frame)) % 8 + 1).astype("uint8")
    frame["field_id"] = frame["ID"].astype(str)
    reps = frame.representative_point().to_crs(4326)
    frame["lon"], frame["lat"] = reps.x.to_numpy(), reps.y.to_numpy()
    return frame


def utm_grid(frame, epsg=32633, res=10.0, pad=0):
    minx, miny, maxx, maxy = frame.to_crs(epsg).total_bounds
    left, top = np.floor(minx / res) * res - pad * res, np.ceil(maxy / res) * res + pad * res
    width = int(np.ceil((maxx - left) / res)) + pad
    height = int(np.ceil((top - miny) / res)) + pad
    return TargetGrid(epsg=epsg, transform=Affine(res, 0, left, 0, -res, top), width=width, height=height)


def test_mask_agrees_with_the_polygons_under_each_pixel_centre(parcels):
    grid = utm_grid(parcels)
    mask = rasterize_classes(parcels, grid)
    assert mask.shape == (grid.height, grid.width) and mask.dtype == np.uint8
    local = parcels.to_crs(grid.crs)
    rng = np.random.default_rng(0)
    # 200 random pixels in each parcel's bounding box (the parcels are sparse over the grid).
    rows, cols = [], []
    for minx, miny, maxx, maxy in local.geometry.bounds.to_numpy():
        c0, c1 = int((minx - grid.transform.c) // 10), int((maxx - grid.transform.c) // 10) + 1
        r0, r1 = int((grid.transform.f - maxy) // 10), int((grid.transform.f - miny) // 10) + 1
        rows.append(rng.integers(max(r0, 0), min(r1, grid.height), 200))
        cols.append(rng.integers(max(c0, 0), min(c1, grid.width), 200))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    xs = grid.transform.c + (cols + 0.5) * grid.resolution
    ys = grid.transform.f - (rows + 0.5) * grid.resolution
    points = shapely.points(xs, ys)
    tree = shapely.STRtree(local.geometry.values)
    hits_point, hits_poly = tree.query(points, predicate="within")
    expected = np.zeros(len(points), dtype="uint8")
    covered = np.zeros(len(points), dtype=int)
    np.add.at(covered, hits_point, 1)
    expected[hits_point] = local["class_id"].to_numpy()[hits_poly]
    single = covered <= 1  # pixels under overlapping parcels are decided by the draw order, tested below
    assert (covered == 1).sum() > 5000 and (covered == 0).sum() > 1000
    assert np.array_equal(mask[rows, cols][single], expected[single])


def test_smaller_field_wins_where_fields_overlap():
    big = box(500000, 5000000, 500200, 5000200)
    small = box(500050, 5000050, 500100, 5000100)
    frame = gpd.GeoDataFrame({"class_id": [3, 7]}, geometry=[small, big], crs="EPSG:32633")
    grid = TargetGrid(epsg=32633, transform=Affine(10, 0, 500000, 0, -10, 5000200), width=20, height=20)
    mask = rasterize_classes(frame, grid)
    assert mask[0, 0] == 7 and mask[19, 19] == 7
    assert (mask[10:15, 5:10] == 3).all()  # rows from the top: y 5000100..5000050


def test_chips_centre_on_largest_labelled_fields_and_stay_on_the_grid(parcels):
    grid = utm_grid(parcels, pad=40)
    minlon, minlat, maxlon, maxlat = parcels.to_crs(4326).total_bounds
    cell = Cell(id="c", row=0, col=0, bbox=(minlon, minlat, maxlon + 1e-6, maxlat + 1e-6))
    frame = parcels.copy()
    frame.loc[frame.index[:3], "class_id"] = 0  # unlabelled fields come last
    chips, skipped = plan_chips(frame, cell, grid, chip_size=32, max_chips=5)
    assert len(chips) == 5
    local = frame.to_crs(grid.crs)
    areas = local.geometry.area.where(local["class_id"] > 0, -1.0)
    expected_ids = local.loc[areas.sort_values(ascending=False).index[:5], "field_id"].tolist()
    assert [c.field_id for c in chips] == expected_ids
    for chip in chips:
        field = local.loc[local["field_id"] == chip.field_id].geometry.iloc[0]
        x0 = grid.transform.c + chip.col * grid.resolution
        y0 = grid.transform.f - chip.row * grid.resolution
        centre = shapely.Point(x0 + 16 * grid.resolution, y0 - 16 * grid.resolution)
        assert centre.distance(field.representative_point()) <= grid.resolution  # snapped within a pixel
    assert len({(c.row, c.col) for c in chips}) == 5


def test_chips_outside_valid_data_or_grid_are_skipped_and_counted(parcels):
    grid = utm_grid(parcels, pad=40)
    minlon, minlat, maxlon, maxlat = parcels.to_crs(4326).total_bounds
    cell = Cell(id="c", row=0, col=0, bbox=(minlon, minlat, maxlon + 1e-6, maxlat + 1e-6))
    valid = np.ones((grid.height, grid.width), dtype=bool)
    valid[:, : grid.width // 2] = False  # the west half has no data
    chips, skipped = plan_chips(parcels, cell, grid, chip_size=32, max_chips=100,
                                reject=lambda w: None if valid[w.slices()].all() else "nodata")
    assert skipped["nodata"] > 0 and chips
    assert all(valid[c.slices()].all() for c in chips)
    small = TargetGrid(epsg=grid.epsg, transform=grid.transform, width=40, height=40)
    chips, skipped = plan_chips(parcels, cell, small, chip_size=32, max_chips=100)
    assert skipped["outside_grid"] > 0


def test_write_chip_profile_and_atomicity(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(1, 10000, (10, 64, 64), dtype="uint16")
    mask = rng.integers(0, 9, (64, 64), dtype="uint8")
    transform = Affine(10, 0, 300000, 0, -10, 4100000)
    image_rel, mask_rel = write_chip(tmp_path, "cell-chip00", image, mask, crs="EPSG:32630", transform=transform)
    with rasterio.open(tmp_path / image_rel) as src:
        assert src.count == 10 and src.dtypes[0] == "uint16" and src.nodata == 0
        assert src.descriptions == BANDS and src.crs.to_epsg() == 32630 and src.transform == transform
        assert src.profile["compress"] == "deflate" and src.block_shapes == [(64, 64)] * 10
        assert np.array_equal(src.read(), image)
    with rasterio.open(tmp_path / mask_rel) as src:
        assert src.count == 1 and src.dtypes[0] == "uint8" and np.array_equal(src.read(1), mask)
    assert not list(tmp_path.rglob(f"{TMP_PREFIX}*"))
    with pytest.raises(ValueError):
        write_chip(tmp_path, "bad", image[:3], mask, crs="EPSG:32630", transform=transform)
    with pytest.raises(Exception, match="safe identifier"):
        write_chip(tmp_path, "../escape", image, mask, crs="EPSG:32630", transform=transform)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import cropchips.output.storage as storage

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", boom)
    image = np.ones((10, 32, 32), "uint16")
    with pytest.raises(OSError, match="disk full"):
        write_chip(tmp_path, "x", image, np.ones((32, 32), "uint8"), crs="EPSG:32630", transform=Affine.identity())
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_temporaries_of_dead_writers_and_old_ones_are_removed(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    (tmp_path / "images").mkdir()
    (tmp_path / "manifests").mkdir()
    of_dead = tmp_path / "images" / f"{TMP_PREFIX}{host}~{dead_pid}~aaaa~c-chip00.tif"
    of_live = tmp_path / "images" / f"{TMP_PREFIX}{host}~{os.getpid()}~bbbb~c-chip01.tif"
    other_host = tmp_path / "manifests" / f"{TMP_PREFIX}elsewhere~{dead_pid}~cccc~c.json"
    old_other_host = tmp_path / "manifests" / f"{TMP_PREFIX}elsewhere~1~dddd~d.json"
    for path in (of_dead, of_live, other_host, old_other_host):
        path.write_bytes(b"x")
    os.utime(old_other_host, (0, 0))
    assert remove_stale_temporaries(tmp_path, ("images", "manifests"), older_than_s=60) == 2
    assert not of_dead.exists() and not old_other_host.exists()
    assert of_live.exists() and other_host.exists()  # may still be being written


def test_transient_write_errors_are_retried(tmp_path, monkeypatch, caplog):
    import errno
    import cropchips.raster.write as writing

    real = writing.write_tiff
    calls = []

    def flaky(path, *args, **kwargs):
        calls.append(path.name.rsplit("~", 1)[-1])
        if len(calls) == 1:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writing, "write_tiff", flaky)
    monkeypatch.setattr(retry, "sleep", lambda s: None)
    image = np.ones((10, 16, 16), "uint16")
    write_chip(tmp_path, "c-chip00", image, np.ones((16, 16), "uint8"), crs="EPSG:32630",
               transform=Affine(10, 0, 0, 0, -10, 0))
    assert calls == ["c-chip00.tif", "c-chip00.tif", "c-chip00.tif"]  # image retried once, then the mask
    assert "retry 1/2" in caplog.text
    monkeypatch.setattr(writing, "write_tiff", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(PermissionError):
        write_chip(tmp_path, "c-chip01", image, np.ones((16, 16), "uint8"), crs="EPSG:32630",
                   transform=Affine(10, 0, 0, 0, -10, 0))
