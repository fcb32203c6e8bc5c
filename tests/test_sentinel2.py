"""Sentinel-2 done right: the 2022 offset, two UTM zones, clouds and nodata, provenance, time series."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject
from shapely.geometry import box

from conftest import shared_data
from cropchips.raster.composite import composite
from cropchips.sources.hrefs import HrefPolicy
from cropchips.queue.messages import Cell, Task
from cropchips.sources.sentinel2 import BANDS
from cropchips.sources import remove_offset
from cropchips.sources.sentinel2 import EARTH_SEARCH_KEYS, radiometry, scene_from_item, scene_offset_dn
from cropchips.spec import DatasetSpec
from helpers import SpecProcessor

ITEMS = "earthsearch", "items"


def item(name):
    return json.loads(shared_data(*ITEMS, name).read_text())


# ----------------------------------------------------------------------------- the 2022 offset


def test_offset_is_decided_from_real_items():
    post = scene_from_item(item("S2A_13TDE_20231008_0_L2A.json"))  # baseline 05.09, raster:bands offset -0.1
    assert post.processing_baseline == "05.09" and post.offsets["B04"] == -0.1
    assert scene_offset_dn(post) == 1000
    c1 = scene_from_item(item("S2B_T24MVV_20250731T130245_L2A.json"))  # collection 1, reprocessed
    assert scene_offset_dn(c1) == 1000
    folder = shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A")
    pre = scene_from_item(json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text()))  # 2020, baseline 02.14
    assert pre.processing_baseline == "02.14" and scene_offset_dn(pre) == 0
    record = radiometry(post, harmonize=True)
    assert (record.offset_dn, record.applied_dn, record.published_offset) == (1000, 1000, -0.1)
    assert radiometry(post, harmonize=False).applied_dn == 0


def test_inconsistent_metadata_trusts_the_baseline(caplog):
    post = scene_from_item(item("S2A_13TDE_20231008_0_L2A.json"))
    wrong = replace(post, offsets={b: 0.0 for b in post.offsets})  # earth-search #66: offset missing
    with caplog.at_level(logging.WARNING):
        assert scene_offset_dn(wrong) == 1000
    assert "trusting the baseline" in caplog.text
    unknown = replace(post, processing_baseline=None)
    assert scene_offset_dn(unknown) == 1000  # no baseline: the metadata decides
    assert scene_offset_dn(replace(unknown, offsets={})) == 0


def test_remove_offset_clips_at_1_and_never_wraps():
    data = np.array([0, 1, 999, 1000, 1001, 2500, 65535], dtype="uint16")
    out = remove_offset(data.copy(), 1000)
    assert out.tolist() == [0, 1, 1, 1, 1, 1500, 64535]
    assert out.dtype == np.uint16
    assert remove_offset(data.copy(), 65535).tolist() == [0, 1, 1, 1, 1, 1, 1]  # every valid DN at or below it
    assert remove_offset(data.copy(), 65534).tolist() == [0, 1, 1, 1, 1, 1, 1]


def test_mixed_conventions_harmonise_before_the_median():
    """A real 2020 scene (no offset) and the same pixels stored the post-2022 way (+1000):
    harmonised, their median is the 2020 scene itself; not harmonised, it would be off by 500."""
    folder = shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A")
    with rasterio.open(folder / "B04.tif") as src:
        red = src.read(1, window=((0, 200), (0, 200)))
    base = np.stack([red] * len(BANDS))[None]
    newer = np.where(base > 0, base + 1000, 0).astype("uint16")
    data = np.concatenate([base, newer])
    scl = np.full((2, 200, 200), 5, dtype="uint8")
    mixed = composite(data.copy(), scl).image
    assert np.abs(mixed.astype(int) - base[0]).max() == 500
    remove_offset(data[1], 1000)
    assert np.array_equal(composite(data, scl).image, base[0])


# ----------------------------------------------------------------------------- two UTM zones


@pytest.fixture(scope="module")
def two_zones(tmp_path_factory):
    """The real 29RKH scene (EPSG:32629) and the same COGs reprojected into the next zone (EPSG:32628)."""
    folder = shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A")
    out = tmp_path_factory.mktemp("zones")
    original = json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text())
    for band, key in EARTH_SEARCH_KEYS.items():
        original["assets"][key]["href"] = str(folder / f"{band}.tif")
    other = json.loads(json.dumps(original))
    other["id"] = "S2A_28RKH_20200220_0_L2A"
    other["properties"]["datetime"] = "2020-02-20T11:00:00Z"
    other["properties"]["proj:epsg"] = 32628
    (out / "28").mkdir()
    for band, key in EARTH_SEARCH_KEYS.items():
        with rasterio.open(folder / f"{band}.tif") as src:
            transform, width, height = calculate_default_transform(src.crs, "EPSG:32628", src.width, src.height,
                                                                    *src.bounds, resolution=src.res)
            profile = dict(src.profile, crs="EPSG:32628", transform=transform, width=width, height=height)
            target = out / "28" / f"{band}.tif"
            with rasterio.open(target, "w", **profile) as dst:
                reproject(rasterio.band(src, 1), rasterio.band(dst, 1), dst_nodata=0,
                          resampling=Resampling.nearest if band == "SCL" else Resampling.bilinear)
        other["assets"][key]["href"] = str(target)
    # Three fields in the desert, in a national-style CRS, so the cell has something to chip.
    fields = gpd.GeoDataFrame({"EC_hcat_c": ["3301010100", "3303050000", "3301110000"],
                               "EC_hcat_n": ["common_soft_wheat", "olive_plantations", "fallow_land_not_crop"]},
                              geometry=[box(-11.56 + 0.02 * i, 24.64, -11.55 + 0.02 * i, 24.65) for i in range(3)],
                              crs="EPSG:4326").to_crs("EPSG:32629")
    fields.to_file(out / "fields.gpkg", layer="desert", driver="GPKG")
    return {"scenes": [scene_from_item(original), scene_from_item(other)], "gpkg": out / "fields.gpkg",
            "dirs": (folder.resolve(), out.resolve())}


def test_a_cell_over_two_zones_gets_the_zone_of_its_centre(two_zones, tmp_path):
    scenes = two_zones["scenes"]
    assert {s.epsg for s in scenes} == {32628, 32629}
    cell = Cell(id="c-zones", row=0, col=0, bbox=(-11.6, 24.6, -11.5, 24.7))  # centre in zone 29
    processor = SpecProcessor("z@test", output_dir=tmp_path, gpkg=str(two_zones["gpkg"]), resolution=100.0, chip_size=8,
                              hrefs=HrefPolicy(local_dirs=two_zones["dirs"]), min_clear_fraction=0.0)
    result = processor.process(Task(run_id="run-z", task_id="t-zones", cell=cell, scenes=tuple(scenes),
                                    spec=DatasetSpec()))
    assert result.status == "ok" and len(result.chips) == 3, result.error
    assert set(result.scenes_used) == {s.id for s in scenes}  # the other zone's scene took part
    for chip in result.chips:
        with rasterio.open(tmp_path / chip.image) as img, rasterio.open(scenes[0].assets["B04"]) as original:
            assert img.crs.to_epsg() == 32629
            # Aligned to the zone-29 scene's own lattice.
            assert (img.transform.c - original.transform.c) % 100 == 0
            assert (original.transform.f - img.transform.f) % 100 == 0
            window = rasterio.windows.from_bounds(*img.bounds, transform=original.transform).round_offsets()
            expected = original.read(1, window=window.round_lengths())
            red = img.read(BANDS.index("B04") + 1)
        # The median of the original and its reprojected twin stays within a few percent of the original.
        assert np.median(np.abs(red.astype(float) - expected) / expected) < 0.03


# ----------------------------------------------------------------------------- clouds, provenance, stack


def sample_processor(sample_area, out, **over):
    return SpecProcessor("s2@test", output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                         chip_size=64, hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)), **over)


def test_cloudy_chips_are_skipped_and_counted(sample_area, sample_task, tmp_path):
    cloudy = [s for s in sample_task.scenes if "_20230530_" in s.id]  # the sample's cloudy date
    task = replace(sample_task, scenes=tuple(cloudy), task_id=sample_task.task_id + "c")
    # Overlapping chips allowed: a chip skipped as too cloudy then frees no room for another.
    strict = sample_processor(sample_area, tmp_path / "strict", min_clear_fraction=0.99,
                              max_chips_per_cell=12, max_chip_overlap=1.0).process(task)
    loose = sample_processor(sample_area, tmp_path / "loose", min_clear_fraction=0.0,
                             max_chips_per_cell=12, max_chip_overlap=1.0).process(task)
    assert strict.chips_skipped.get("too_cloudy", 0) > 0
    assert len(strict.chips) + strict.chips_skipped["too_cloudy"] <= len(loose.chips)
    assert all(c.clear_fraction >= 0.99 for c in strict.chips)
    assert any(c.clear_fraction < 0.99 for c in loose.chips)
    # The recorded clear fraction is the share of SCL-clear pixels under the chip.
    chip = min(loose.chips, key=lambda c: c.clear_fraction)
    with rasterio.open(tmp_path / "loose" / chip.image) as img, rasterio.open(cloudy[0].assets["SCL"]) as scl:
        window = rasterio.windows.from_bounds(*img.bounds, transform=scl.transform)
        classes = scl.read(1, window=window, out_shape=img.shape, resampling=Resampling.nearest)
    assert chip.clear_fraction == pytest.approx(np.isin(classes, (4, 5, 6)).mean(), abs=0.02)


def test_provenance_sidecar_matches_the_result(sample_area, sample_task, tmp_path):
    result = sample_processor(sample_area, tmp_path).process(sample_task)
    items = {i["id"]: i for i in json.loads(sample_area.items.read_text())["features"]}
    for chip in result.chips:
        sidecar = json.loads((tmp_path / "metadata" / f"{chip.name}.json").read_text())
        assert sidecar["task_id"] == sample_task.task_id and sidecar["cell_id"] == sample_task.cell.id
        assert sidecar["name"] == chip.name and sidecar["crs"] == chip.crs and sidecar["bounds"] == list(chip.bounds)
        assert sidecar["method"] == "median" and sidecar["software"]
        assert sidecar["dataset_id"] == sample_processor_spec(sample_task).dataset_id()
        assert (sidecar["resolution"], sidecar["format"]) == (10.0, "gtiff")
        assert sidecar["class_pixels"] == chip.class_pixels
        assert [s["id"] for s in sidecar["scenes"]] == list(result.scenes_used)
        for scene in sidecar["scenes"]:
            source = items[scene["id"]]
            assert scene["datetime"][:10] == source["properties"]["datetime"][:10]
            assert scene["processing_baseline"] == source["properties"]["s2:processing_baseline"]
            assert scene["published_offset"] == source["assets"]["red"]["raster:bands"][0]["offset"]
            assert scene["applied_dn"] == 1000
        assert 0.9 <= sidecar["clear_fraction"] <= 1.0 and sidecar["nodata_fraction"] == 0.0
        assert sidecar["bands"] == list(BANDS)


def sample_processor_spec(task):
    """The spec sample_processor gives its tasks (harmonize on, the default)."""
    from dataclasses import replace

    spec = replace(task.spec, chip_size=64)
    assert spec.harmonize is True
    return spec


def sidecar(out, chip):
    """The chip's provenance sidecar (per-scene radiometry lives there, not in the result)."""
    return json.loads((out / "metadata" / f"{chip.name}.json").read_text())


def test_least_cloudy_records_its_one_scene(sample_area, sample_task, tmp_path):
    result = sample_processor(sample_area, tmp_path, composite="least-cloudy").process(sample_task)
    assert len(result.scenes_used) == 1
    assert all(c.method == "least-cloudy" and [s["id"] for s in sidecar(tmp_path, c)["scenes"]]
               == list(result.scenes_used) for c in result.chips)


def test_time_series_stack(sample_area, sample_task, tmp_path):
    result = sample_processor(sample_area, tmp_path, composite="stack", min_clear_fraction=0.5).process(sample_task)
    assert result.status == "ok" and result.chips
    dates = sorted(s.datetime[:10] for s in sample_task.scenes)
    chip = result.chips[0]
    with rasterio.open(tmp_path / chip.image) as img:
        assert img.count == len(dates) * 10 and img.dtypes[0] == "uint16"
        assert img.descriptions == tuple(f"{d} {b}" for d in dates for b in BANDS)
        stack = img.read()
    assert chip.method == "stack" and [s["datetime"][:10] for s in sidecar(tmp_path, chip)["scenes"]] == dates
    # Each date's block is that scene's own pixels (harmonised), not a composite.
    scene = sorted(sample_task.scenes, key=lambda s: s.datetime)[0]
    with rasterio.open(scene.assets["B04"]) as src:
        window = rasterio.windows.from_bounds(*img.bounds, transform=src.transform).round_offsets().round_lengths()
        raw = src.read(1, window=window).astype(int)
    assert np.array_equal(stack[BANDS.index("B04")], np.where(raw > 0, np.maximum(raw - 1000, 1), 0))
    # --max-scenes keeps the clearest dates, in date order.
    two = sample_processor(sample_area, tmp_path / "two", composite="stack", max_scenes=2,
                           min_clear_fraction=0.5).process(sample_task)
    kept = [s["datetime"][:10] for s in sidecar(tmp_path / "two", two.chips[0])["scenes"]]
    assert len(kept) == 2 and kept == sorted(kept) and "2023-05-30" not in kept  # the cloudy date goes
