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
from cropchips.raster.write import (BOUNDARIES_DIR, INSTANCES_DIR, LAYER_DIRS, MASKS_DIR, OUTPUT_SUBDIRS,
                                    write_chip, write_layers)


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
    # A grid covering only a corner of the cell: chips are shifted onto it, and the fields they then
    # miss are skipped as "edge" (a real task's grid always holds its cell).
    small = TargetGrid(epsg=grid.epsg, transform=grid.transform, width=80, height=80)
    chips, skipped = plan_chips(parcels, cell, small, chip_size=32, max_chips=100, max_overlap=1.0)
    assert skipped["edge"] > 0
    assert all(0 <= c.row and c.row + 32 <= 80 and 0 <= c.col and c.col + 32 <= 80 for c in chips)


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
        # 0 is "no field", a real label: the mask declares 255 (ignore) as nodata, never 0.
        assert src.nodata == 255 and src.descriptions == ("class",)
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


def test_write_layers_writes_instances_and_boundaries_without_nodata(tmp_path):
    rng = np.random.default_rng(1)
    instances = rng.integers(0, 70000, (48, 48), dtype="uint32")  # ids beyond uint16
    boundaries = rng.integers(0, 3, (48, 48), dtype="uint8")
    transform = Affine(10, 0, 300000, 0, -10, 4100000)
    paths = write_layers(tmp_path, "cell-chip03", {"instances": instances, "boundaries": boundaries},
                         crs="EPSG:32630", transform=transform)
    assert paths == {"instances": "instances/cell-chip03.tif", "boundaries": "boundaries/cell-chip03.tif"}
    for layer, array, dtype, description in (("instances", instances, "uint32", "instance"),
                                             ("boundaries", boundaries, "uint8", "boundary")):
        with rasterio.open(tmp_path / paths[layer]) as src:
            assert src.count == 1 and src.dtypes[0] == dtype and src.descriptions == (description,)
            assert src.nodata is None  # 0 = no field / background is a value, not a gap
            assert src.crs.to_epsg() == 32630 and src.transform == transform
            assert np.array_equal(src.read(1), array)
    assert not list(tmp_path.rglob(f"{TMP_PREFIX}*"))
    assert {"instances", "boundaries"} <= set(OUTPUT_SUBDIRS) and INSTANCES_DIR in OUTPUT_SUBDIRS
    assert LAYER_DIRS == {"classes": MASKS_DIR, "instances": INSTANCES_DIR, "boundaries": BOUNDARIES_DIR}
    # The classes layer may be given too: it is the mask, as write_chip writes it.
    mask = rng.integers(0, 9, (48, 48), dtype="uint8")
    assert write_layers(tmp_path, "cell-chip04", {"classes": mask}, crs="EPSG:32630",
                        transform=transform) == {"classes": "masks/cell-chip04.tif"}
    with rasterio.open(tmp_path / "masks" / "cell-chip04.tif") as src:
        assert src.nodata == 255 and np.array_equal(src.read(1), mask)


@pytest.mark.parametrize(("layers", "match"), [
    ({"instances": np.zeros((8, 8), "uint16")}, "uint32"),
    ({"boundaries": np.zeros((8, 8), "uint32")}, "uint8"),
    ({"boundaries": np.full((8, 8), 3, "uint8")}, "0 background"),
    ({"instances": np.zeros((8, 8), "uint32"), "boundaries": np.zeros((8, 9), "uint8")}, "differ in shape"),
    ({"parcels": np.zeros((8, 8), "uint8")}, "unknown label layer"),
    ({"instances": np.zeros((1, 8, 8), "uint32")}, "rows, cols"),
])
def test_write_layers_refuses_bad_layers(tmp_path, layers, match):
    with pytest.raises(ValueError, match=match):
        write_layers(tmp_path, "c-chip00", layers, crs="EPSG:32630", transform=Affine(10, 0, 0, 0, -10, 0))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_cog_label_layers_have_majority_overviews(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    # Four fields in 2 x 2 pixel checks at one corner and big blocks elsewhere: averaging would invent ids.
    instances = np.zeros((256, 256), dtype="uint32")
    instances[:128, :128], instances[:128, 128:], instances[128:, :128] = 100001, 7, 65
    instances[128:, 128:] = np.where((np.indices((128, 128)).sum(axis=0) // 2) % 2, 3, 900000)
    boundaries = np.where(instances == 3, 2, 1).astype("uint8")
    paths = write_layers(tmp_path, "c-chip00", {"instances": instances, "boundaries": boundaries},
                         crs="EPSG:32630", transform=Affine(10, 0, 300000, 0, -10, 4100000), fmt="cog")
    rio = [str(Path(sys.executable).parent / "rio")]
    for layer, array in (("instances", instances), ("boundaries", boundaries)):
        checked = subprocess.run([*rio, "cogeo", "validate", str(tmp_path / paths[layer])], capture_output=True,
                                 text=True)
        assert "is a valid cloud optimized GeoTIFF" in checked.stdout, checked.stdout + checked.stderr
        with rasterio.open(tmp_path / paths[layer]) as src:
            assert src.overviews(1) == [2] and src.nodata is None
            overview = src.read(1, out_shape=(128, 128))
            assert set(np.unique(overview)) <= set(np.unique(array))  # mode: no invented ids or codes
            assert overview[10, 10] == array[10, 10] and overview[10, 100] == array[10, 200]


def test_stale_layer_files_are_removed(tmp_path):
    from cropchips.output.manifest import chip_files, remove_other_chips
    from cropchips.output.storage import open_storage

    storage = open_storage(tmp_path)
    for folder in ("images", "masks", "instances", "boundaries", "metadata"):
        (tmp_path / folder).mkdir()
        for chip in ("c-chip00", "c-chip01", "d-chip00"):
            (tmp_path / folder / f"{chip}.{'json' if folder == 'metadata' else 'tif'}").write_bytes(b"x")
    # An earlier run made two chips of cell c; this one keeps chip00, with classes only.
    assert remove_other_chips(storage, "c", keep={"c-chip00"}, layers=("classes",)) == 5 + 2
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*"))
    assert left == ["boundaries/d-chip00.tif", "images/c-chip00.tif", "images/d-chip00.tif",
                    "instances/d-chip00.tif", "masks/c-chip00.tif", "masks/d-chip00.tif",
                    "metadata/c-chip00.json", "metadata/d-chip00.json"]
    # Without layers, a kept chip keeps every layer file; other chips lose theirs.
    assert remove_other_chips(storage, "d", keep={"d-chip00"}) == 0
    assert remove_other_chips(storage, "d", keep=set()) == 5
    with pytest.raises(ValueError, match="unknown label layer"):
        remove_other_chips(storage, "c", keep=set(), layers=("parcels",))
    chip = {"name": "c-chip00", "image": "images/c-chip00.tif", "mask": "masks/c-chip00.tif",
            "layers": {"classes": "masks/c-chip00.tif", "instances": "instances/c-chip00.tif",
                       "boundaries": "boundaries/c-chip00.tif"}}
    assert chip_files(chip) == ("images/c-chip00.tif", "masks/c-chip00.tif", "boundaries/c-chip00.tif",
                                "instances/c-chip00.tif", "metadata/c-chip00.json")
    assert chip_files({**chip, "layers": {}}) == ("images/c-chip00.tif", "masks/c-chip00.tif",
                                                  "metadata/c-chip00.json")


def test_stale_chips_named_by_the_caller_are_removed_without_listing_the_folders(tmp_path, monkeypatch):
    from cropchips.output.manifest import chip_name, is_chip_of, remove_other_chips
    from cropchips.output.storage import open_storage

    storage = open_storage(tmp_path)
    for folder in ("images", "masks", "instances", "boundaries", "metadata"):
        (tmp_path / folder).mkdir()
        for chip in ("c-chip00", "c-chip01", "c-chip03", "c-chip07", "d-chip00"):
            (tmp_path / folder / f"{chip}.{'json' if folder == 'metadata' else 'tif'}").write_bytes(b"x")
    monkeypatch.setattr(storage, "list", lambda *a, **k: pytest.fail("listed a folder"))
    names = {chip_name("c", k) for k in range(5)}
    # c-chip01 and c-chip03 go in all five folders, c-chip00's instances and boundaries too; c-chip07
    # (no name given) and cell d stay.
    assert remove_other_chips(storage, "c", keep={"c-chip00"}, layers=("classes",), names=names) == 5 + 5 + 2
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*"))
    assert left == sorted([f"{folder}/{chip}.{'json' if folder == 'metadata' else 'tif'}"
                           for folder in ("images", "masks", "instances", "boundaries", "metadata")
                           for chip in ("c-chip07", "d-chip00")]
                          + ["images/c-chip00.tif", "masks/c-chip00.tif", "metadata/c-chip00.json"])
    assert is_chip_of("c-chip07", "c") and is_chip_of("c-chip100", "c")
    assert not any(is_chip_of(name, "c") for name in ("d-chip00", "c-chip", "c-chip0a", "c-chip00/../x", "c-chip٣"))
