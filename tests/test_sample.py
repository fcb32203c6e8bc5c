"""The generated sample area: Earth Search-shaped COGs and items, EuroCrops-like fields, determinism."""

from __future__ import annotations

import csv
import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyogrio
import pystac
import pytest
import rasterio
import rasterio.features
import shapely
import shapely.geometry
from pyproj import Transformer

from conftest import shared_data
from cropchips.fields.classes import load_class_map
from cropchips.demo.sample import CROPS, generate_sample, mgrs_square, scene_dates, utm_epsg
from cropchips.sources.stac import load_items_file, parse_datetime_range, to_scenes
from cropchips.sources.sentinel2 import EARTH_SEARCH_KEYS, Sentinel2L2A

BANDS_10M = ("B02", "B03", "B04", "B08")
BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
ALL_FILES = BANDS_10M + BANDS_20M + ("SCL",)


@pytest.fixture(scope="module")
def sample(sample_area):
    return sample_area


@pytest.fixture(scope="module")
def items(sample):
    return json.loads(sample.items.read_text())["features"]


@pytest.fixture(scope="module")
def fields(sample):
    return pyogrio.read_dataframe(sample.gpkg, layer=sample.layer)


def grid_bbox(sample):
    return (sample.start_x, sample.start_y, sample.start_x + sample.grid_step * sample.x_cells,
            sample.start_y + sample.grid_step * sample.y_cells)


def scene_folders(sample):
    return sorted(p for p in (sample.root / "scenes").iterdir() if p.is_dir())


def read(path):
    with rasterio.open(path) as src:
        return src.read(1)


# --------------------------------------------------------------------------- rasters


def test_defaults_describe_the_area(sample, items):
    assert (sample.x_cells, sample.y_cells, sample.grid_step) == (2, 2, 0.02)
    assert sample.epsg == 32630 == utm_epsg(-5.78, 37.22)
    assert sample.collection == "sentinel-2-l2a" and sample.layer == "es_2023_sample"
    assert len(items) == len(scene_folders(sample)) == 3
    assert (sample.root / "README.txt").read_text().startswith("SYNTHETIC")
    assert "cropchips.demo.sample" in (sample.root / "README.txt").read_text()


def test_every_band_is_an_earth_search_like_cog(sample):
    for folder in scene_folders(sample):
        assert sorted(p.name for p in folder.glob("*.tif")) == sorted(f"{b}.tif" for b in ALL_FILES)
        for band in ALL_FILES:
            with rasterio.open(folder / f"{band}.tif") as src:
                assert src.driver == "GTiff" and src.count == 1
                assert src.crs.to_epsg() == sample.epsg
                assert src.res == ((10.0, 10.0) if band in BANDS_10M else (20.0, 20.0))
                assert src.dtypes[0] == ("uint8" if band == "SCL" else "uint16")
                assert src.nodata == 0
                assert src.block_shapes == [(512, 512)] and src.profile["tiled"]
                assert src.compression.name.lower() == "deflate"
                assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
                assert src.overviews(1), "a COG of this size carries overviews"


def test_10m_and_20m_grids_share_a_60m_snapped_origin_and_cover_the_margin(sample):
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{sample.epsg}", always_xy=True)
    minx, miny, maxx, maxy = to_utm.transform_bounds(*grid_bbox(sample), densify_pts=21)
    for folder in scene_folders(sample):
        with rasterio.open(folder / "B02.tif") as ten, rasterio.open(folder / "SCL.tif") as twenty:
            assert (ten.transform.c, ten.transform.f) == (twenty.transform.c, twenty.transform.f)
            assert ten.transform.c % 60 == 0 and ten.transform.f % 60 == 0
            assert ten.shape == (2 * twenty.shape[0], 2 * twenty.shape[1])
            assert ten.bounds == twenty.bounds
            left, bottom, right, top = ten.bounds
            assert left <= minx - 3000 and bottom <= miny - 3000 and right >= maxx + 3000 and top >= maxy + 3000
            assert right - left < (maxx - minx) + 6000 + 120  # snapped, not padded further
        for band in BANDS_10M + BANDS_20M:
            with rasterio.open(folder / f"{band}.tif") as src:
                assert (src.transform.c, src.transform.f) == (ten.transform.c, ten.transform.f)


def test_nodata_only_far_outside_the_grid_and_the_same_in_every_band(sample):
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{sample.epsg}", always_xy=True)
    minx, miny, maxx, maxy = to_utm.transform_bounds(*grid_bbox(sample), densify_pts=21)
    keep_out = shapely.box(minx, miny, maxx, maxy).buffer(1500, join_style="mitre")
    strips = 0
    for folder in scene_folders(sample):
        with rasterio.open(folder / "SCL.tif") as src:
            scl, transform = src.read(1), src.transform
        empty = scl == 0
        for band in BANDS_20M:
            assert np.array_equal(read(folder / f"{band}.tif") == 0, empty), (folder.name, band)
        for band in BANDS_10M:
            ten = read(folder / f"{band}.tif") == 0
            assert np.array_equal(ten, np.repeat(np.repeat(empty, 2, 0), 2, 1)), (folder.name, band)
        rows, cols = np.nonzero(empty)
        if rows.size:
            strips += 1
            xs, ys = rasterio.transform.xy(transform, rows, cols)
            assert not shapely.intersects(keep_out, shapely.points(np.asarray(xs), np.asarray(ys))).any()
    assert strips == 1, "one scene has an orbit-edge strip of nodata"


def test_scl_and_reflectance_look_like_sentinel2(sample, items):
    covers = []
    for k, folder in enumerate(scene_folders(sample)):
        scl = read(folder / "SCL.tif")
        classes = set(np.unique(scl).tolist())
        assert {4, 5} <= classes <= {0, 3, 4, 5, 6, 8, 9, 10}
        assert k > 0 or 6 in classes, "the reservoir shows as water on the clear date"
        cloud = np.isin(scl, (8, 9, 10))
        covers.append(cloud.sum() / (scl != 0).sum())
        # Reflectance x 10000, after removing the +1000 DN offset of baseline 05.09.
        b02 = read(folder / "B02.tif")[::2, ::2].astype(int) - 1000
        b12 = read(folder / "B12.tif").astype(int) - 1000
        clear = np.isin(scl, (4, 5))
        assert 300 < np.median(b02[clear]) < 1500 and 500 < np.median(b12[clear]) < 4000
        if cloud.any():
            assert np.median(b02[scl == 9]) > 5000 and np.median(b12[scl == 9]) > 4000
            assert (scl == 3).any(), "clouds cast a shadow"
        if (scl == 6).any():
            assert np.median(read(folder / "B08.tif")[::2, ::2][scl == 6].astype(int) - 1000) < 500
    covers = np.array(covers)
    assert covers[0] == 0, "the first date is clear"
    assert covers.max() > 0.2 and covers.max() < 0.6 and np.sort(covers)[-2] < 0.1, covers


def test_vegetated_fields_are_green_and_fallow_is_not(sample, fields):
    """NDVI on the clear first date: citrus (evergreen) well above fallow."""
    folder = scene_folders(sample)[0]
    with rasterio.open(folder / "B04.tif") as src:
        red, transform, crs = src.read(1).astype(float) - 1000, src.transform, src.crs
    nir = read(folder / "B08.tif").astype(float) - 1000  # baseline 05.09 offset
    ndvi = (nir - red) / (nir + red)
    local = fields.to_crs(crs)
    means = {}
    for name in ("citrus_plantations", "fallow_land_not_crop"):
        shapes = [(geom, 1) for geom in local.geometry[local["EC_hcat_n"] == name]]
        inside = rasterio.features.rasterize(shapes, out_shape=red.shape, transform=transform, fill=0) == 1
        means[name] = ndvi[inside].mean()
    assert means["citrus_plantations"] > 0.55 and means["fallow_land_not_crop"] < 0.3, means
    assert means["citrus_plantations"] - means["fallow_land_not_crop"] > 0.3, means


def test_each_scene_changes_between_dates(sample):
    folders = scene_folders(sample)
    first, second = read(folders[0] / "B08.tif"), read(folders[-1] / "B08.tif")
    both = (first > 0) & (second > 0)
    assert not np.array_equal(first[both], second[both])


# --------------------------------------------------------------------------- items


def test_items_are_earth_search_shaped_stac(sample, items):
    collection = pystac.ItemCollection.from_dict(json.loads(sample.items.read_text()))
    assert len(collection) == len(items)
    start, end = parse_datetime_range(sample.datetime)
    folders = {p.name for p in scene_folders(sample)}
    for item in items:
        props = item["properties"]
        assert item["stac_version"] == "1.0.0" and item["collection"] == "sentinel-2-l2a"
        assert item["id"] in folders and item["id"].endswith("_0_L2A")
        when = datetime.fromisoformat(props["datetime"].replace("Z", "+00:00"))
        assert start <= when <= end and when.tzinfo == timezone.utc
        assert props["proj:epsg"] == sample.epsg and props["s2:processing_baseline"] == "05.09"
        assert props["platform"] in ("sentinel-2a", "sentinel-2b") and props["constellation"] == "sentinel-2"
        assert props["mgrs:utm_zone"] == 30 and item["id"].split("_")[1] == f"30{props['mgrs:latitude_band']}" \
            f"{props['mgrs:grid_square']}"
        assert set(item["assets"]) == set(EARTH_SEARCH_KEYS.values())
        footprint = shapely.geometry.shape(item["geometry"])
        assert footprint.contains(shapely.box(*grid_bbox(sample)))
        assert item["bbox"] == pytest.approx(list(footprint.bounds))
        for band, key in EARTH_SEARCH_KEYS.items():
            asset = item["assets"][key]
            href = Path(asset["href"])
            assert href.is_absolute() and href.exists() and href.name == f"{band}.tif"
            assert asset["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
            assert "data" in asset["roles"]
            (raster_band,) = asset["raster:bands"]
            with rasterio.open(href) as src:
                assert asset["proj:shape"] == list(src.shape)
                assert asset["proj:transform"] == list(src.transform)[:6]
                assert raster_band["spatial_resolution"] == src.res[0]
                assert raster_band["data_type"] == src.dtypes[0] and raster_band["nodata"] == 0
            if band == "SCL":
                assert "scale" not in raster_band
            else:
                # Baseline 05.09, like every scene since 2022: DN = reflectance x 10000 + 1000.
                assert raster_band["scale"] == 0.0001 and raster_band["offset"] == -0.1
                assert item["properties"]["s2:processing_baseline"] >= "04.00"


def test_cloud_cover_is_the_cloud_share_of_scl(sample, items):
    for item in items:
        scl = read(item["assets"]["scl"]["href"])
        expected = 100.0 * np.isin(scl, (8, 9, 10)).sum() / (scl != 0).sum()
        assert item["properties"]["eo:cloud_cover"] == pytest.approx(expected, abs=1e-4)
        nodata = 100.0 * (scl == 0).mean()
        assert item["properties"]["s2:nodata_pixel_percentage"] == pytest.approx(nodata, abs=1e-4)


def test_the_pipeline_reads_the_items(sample):
    scenes = to_scenes(load_items_file(sample.items), Sentinel2L2A())
    assert len(scenes) == 3
    for footprint in scenes:
        assert footprint.scene.epsg == sample.epsg
        assert set(footprint.scene.assets) == set(ALL_FILES)
        assert all(v == -0.1 for v in footprint.scene.offsets.values())
        assert footprint.scene.processing_baseline == "05.09"


def test_helpers():
    assert utm_epsg(-5.8, 37.2) == 32630 and utm_epsg(151.2, -33.9) == 32756 and utm_epsg(180.0, 0) == 32660
    # Real tiles: Seville is in 30STG, the reference item 13TDE.
    assert mgrs_square(-5.8, 37.2, 252_000, 4_121_000) == (30, "S", "TG")
    assert mgrs_square(-105.5, 40.1, 450_000, 4_450_000) == (13, "T", "DE")
    assert [d.isoformat() for d in scene_dates(3)] == ["2023-05-20", "2023-05-30", "2023-06-09"]
    many = scene_dates(47)
    assert len(set(many)) == 47 and many[0].isoformat() == "2023-05-15" and many[-1].isoformat() == "2023-06-30"
    assert scene_dates(1)[0].isoformat() == "2023-05-20" and scene_dates(6)[-1].isoformat() == "2023-06-30"
    with pytest.raises(ValueError):
        scene_dates(0)


# --------------------------------------------------------------------------- fields


def test_fields_are_a_eurocrops_like_layer(sample, fields):
    info = pyogrio.read_info(sample.gpkg, layer=sample.layer)
    assert info["crs"] == "EPSG:25830"
    assert {"ID", "EC_hcat_c", "EC_hcat_n", "EC_trans_n"} <= set(info["fields"])
    assert info["geometry_type"] == "Polygon"
    assert fields["EC_hcat_c"].map(lambda c: isinstance(c, str) and len(c) == 10 and c.isdigit()).all()
    assert fields["ID"].is_unique
    with sqlite3.connect(sample.gpkg) as db:
        extensions = db.execute("SELECT extension_name FROM gpkg_extensions WHERE table_name = ?",
                                (sample.layer,)).fetchall()
    assert ("gpkg_rtree_index",) in extensions


def test_fields_are_valid_disjoint_and_field_sized(fields):
    geoms = fields.geometry.values
    assert shapely.is_valid(geoms).all()
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    assert (left == right).all(), "fields never touch each other"
    rectangles = shapely.oriented_envelope(geoms)
    for rect in rectangles:
        xy = np.asarray(rect.exterior.coords)
        sides = np.hypot(*np.diff(xy[:3], axis=0).T)
        assert 60 <= sides.min() and sides.max() <= 420, sides
    convex = shapely.convex_hull(geoms)
    assert np.allclose(shapely.area(convex), shapely.area(geoms))


def test_every_cell_holds_at_least_8_fields_and_every_class_appears(sample, fields):
    points = fields.geometry.representative_point()
    lon, lat = Transformer.from_crs(fields.crs, "EPSG:4326", always_xy=True).transform(points.x, points.y)
    col = np.floor((np.asarray(lon) - sample.start_x) / sample.grid_step).astype(int)
    row = np.floor((np.asarray(lat) - sample.start_y) / sample.grid_step).astype(int)
    inside = (col >= 0) & (col < sample.x_cells) & (row >= 0) & (row < sample.y_cells)
    counts = np.zeros((sample.y_cells, sample.x_cells), dtype=int)
    np.add.at(counts, (row[inside], col[inside]), 1)
    assert counts.min() >= 8, counts
    assert (~inside).sum() > 0, "some fields lie just outside the grid"
    classes = load_class_map().classify(fields["EC_hcat_c"][inside], fields["EC_hcat_n"][inside])
    assert set(classes.tolist()) == set(range(9)), "all 8 classes and unlabelled fields in the grid"


def test_codes_and_names_are_real_hcat3_rows(fields):
    path = shared_data("eurocrops", "HCAT3.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = {(r["HCAT3_code"].strip(), r["HCAT3_name"].strip()) for r in csv.DictReader(handle)}
    used = set(zip(fields["EC_hcat_c"], fields["EC_hcat_n"]))
    assert used <= rows, used - rows
    assert {(c.code, c.hcat_name) for c in CROPS} <= rows


# --------------------------------------------------------------------------- determinism


SMALL = dict(x_cells=1, y_cells=1, dates=2, margin_m=400.0)


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    first = generate_sample(tmp_path / "a", seed=7, **SMALL)
    again = generate_sample(tmp_path / "b", seed=7, **SMALL)
    other = generate_sample(tmp_path / "c", seed=8, **SMALL)

    def b04(area):
        return [read(p / "B04.tif").tobytes() for p in scene_folders(area)]

    assert b04(first) == b04(again) and b04(first) != b04(other)
    assert [p.name for p in scene_folders(first)] == [p.name for p in scene_folders(again)]
    a, b, c = (pyogrio.read_dataframe(x.gpkg, layer=x.layer) for x in (first, again, other))
    assert a.geometry.equals(b.geometry) and a["EC_hcat_c"].equals(b["EC_hcat_c"])
    assert not a.geometry.equals(c.geometry)
    def properties(area):
        return [item["properties"] for item in json.loads(area.items.read_text())["features"]]

    assert properties(first) == properties(again)


def test_other_places_get_their_own_utm_zone(tmp_path):
    south = generate_sample(tmp_path / "s", start_x=151.2, start_y=-33.9, **SMALL)
    assert south.epsg == 32756
    with rasterio.open(scene_folders(south)[0] / "B02.tif") as src:
        assert src.crs.to_epsg() == 32756 and src.transform.c % 60 == 0 and src.transform.f % 60 == 0
    items = json.loads(south.items.read_text())["features"]
    assert items[0]["id"].split("_")[1].startswith("56H")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        generate_sample(tmp_path, x_cells=0)
    with pytest.raises(ValueError):
        generate_sample(tmp_path, dates=60)
