"""A worker reads and composites the bands over its chips' box only: the same chips as the whole cell.

The chips of a cell, which scenes take part and where the cell is covered and clear follow from the
quality bands and the fields alone, so the worker finds them first and then reads the bands of the
scenes used over the box that holds the chips (``TaskProcessor._chips_first``). Every test here runs
the master and the worker both ways (``read_whole_cell``) and compares every file and result.

The scenes are the real S2A_29RKH COGs (../shared/data/sentinel2, downsampled 10x: 100 m and 200 m)
and scenes derived from them in the test's folder (the data has one date there): later dates with
clouds painted into their SCL and the bands scaled, a scene whose bands hold nothing where its SCL says
there is data (a broken scene, left out by the whole-cell path), and one whose bands are empty (its SCL
not) in a strip across the first cells.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from shapely.geometry import box

from conftest import shared_data
from cropchips.crs import transformer
from cropchips.plan.plan import MasterOptions, make_plan
from cropchips.processing import ProcessingOptions, TaskProcessor
from cropchips.queue.messages import Cell, decode, encode
from cropchips.raster.composite import COMPOSITORS
from cropchips.raster.grid import cell_grid
from cropchips.raster.read import CogReader, grid_origin, read_band
from cropchips.sources.hrefs import HrefPolicy
from cropchips.sources.sentinel2 import EARTH_SEARCH_KEYS
from cropchips.spec import DatasetSpec

FOLDER = shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A")
ITEM = "S2A_29RKH_20200219_0_L2A"
START = (-11.5, 24.7)  # 2 x 2 cells of 0.1 degrees inside the scene
CLOUD, BARE = 9, 5  # SCL classes: cloud high probability, bare soil (clear)


def derive(tmp: Path, name: str, date: str, *, scale: float = 1.0, clouds: tuple[slice, slice] | None = None,
           bands_empty: tuple[slice, slice] | None = None) -> dict:
    """A scene derived from the real one: its bands times ``scale``, ``clouds`` (rows, cols of the 200 m SCL)
    painted as cloud, ``bands_empty`` (a share of each band's rows and cols, as slices of [0, 1]) set to 0
    in the bands while the SCL still says there is data."""
    item = json.loads((FOLDER / f"{ITEM}.json").read_text())
    item["id"] = name
    item["properties"]["datetime"] = f"{date}T11:34:25Z"
    folder = tmp / name
    folder.mkdir()
    for band, key in EARTH_SEARCH_KEYS.items():
        with rasterio.open(FOLDER / f"{band}.tif") as src:
            profile, pixels = src.profile, src.read(1)
        if band == "SCL" and clouds is not None:
            pixels = pixels.copy()
            pixels[clouds] = CLOUD
        elif band != "SCL":
            pixels = np.where(pixels > 0, np.clip(pixels * scale, 1, 65535), 0).astype(pixels.dtype)
            if bands_empty is not None:
                rows, cols = (slice(round(s.start * n), round(s.stop * n)) for s, n in zip(bands_empty, pixels.shape))
                pixels[rows, cols] = 0
        with rasterio.open(folder / f"{band}.tif", "w", **profile) as dst:
            dst.write(pixels, 1)
        item["assets"][key]["href"] = str(folder / f"{band}.tif")
    return item


def fields_gpkg(path: Path) -> Path:
    """Fields over the 2 x 2 cells: rectangles of 300-900 m, of two classes and an unmapped code (255)."""
    rng = np.random.default_rng(7)
    to_utm = transformer("EPSG:4326", "EPSG:32629")
    x0, y0 = to_utm.transform(*START)
    x1, y1 = to_utm.transform(START[0] + 0.2, START[1] + 0.2)
    shapes, codes = [], []
    for _ in range(90):
        x, y = rng.uniform(x0 + 500, x1 - 1500), rng.uniform(y0 + 500, y1 - 1500)
        w, h = rng.uniform(300, 900, size=2)
        shapes.append(box(x, y, x + w, y + h))
        codes.append(str(rng.choice(["3301010100", "3303050000", "9999999999"])))
    gpd.GeoDataFrame({"EC_hcat_c": codes, "EC_hcat_n": ["x"] * len(codes)}, geometry=shapes,
                     crs=32629).to_file(path, layer="fields", driver="GPKG")
    return path


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chips-first")
    real = json.loads((FOLDER / f"{ITEM}.json").read_text())
    for band, key in EARTH_SEARCH_KEYS.items():
        real["assets"][key]["href"] = str(FOLDER / f"{band}.tif")
    rows, cols = slice(0, 549), slice(0, 549)
    scenes = {
        "real": real,
        "clouds": derive(tmp, "S2A_29RKH_20200229_0_L2A", "2020-02-29", scale=0.9, clouds=(slice(300, 330), cols)),
        "clouds2": derive(tmp, "S2A_29RKH_20200310_0_L2A", "2020-03-10", scale=1.1, clouds=(rows, slice(250, 262))),
        "half": derive(tmp, "S2A_29RKH_20200320_0_L2A", "2020-03-20", scale=1.05,
                       bands_empty=(slice(0, 1), slice(0.45, 0.5))),
        "same_day": derive(tmp, "S2B_29RKH_20200229_0_L2A", "2020-02-29", scale=0.95,
                           clouds=(slice(200, 300), slice(240, 300))),
        "overcast": derive(tmp, "S2A_29RKH_20200309_0_L2A", "2020-03-09", clouds=(slice(270, 340), slice(225, 290))),
        "broken": derive(tmp, "S2A_29RKH_20200330_0_L2A", "2020-03-30", bands_empty=(slice(0, 1), slice(0, 1))),
    }
    return {"tmp": tmp, "scenes": scenes, "gpkg": fields_gpkg(tmp / "fields.gpkg"),
            "dirs": (FOLDER.resolve(), tmp.resolve())}


def plan(area, tmp: Path, which: tuple[str, ...], **spec):
    items = tmp / "items.json"
    items.write_text(json.dumps({"type": "FeatureCollection", "features": [area["scenes"][k] for k in which]}))
    settings = dict(start_x=START[0], start_y=START[1], grid_step=0.1, x_cells=2, y_cells=2, layer="fields",
                    min_polygons=1, datetime="2020-02-01/2020-04-30", max_cloud=100, resolution=100.0,
                    chip_size=16, max_chips_per_cell=5, labels=("classes", "instances", "boundaries"))
    dataset = DatasetSpec(**{**settings, **spec})
    tasks = make_plan(MasterOptions(gpkg=str(area["gpkg"]), spec=dataset, stac_items=str(items))).tasks
    return [decode(encode(task)) for task in tasks]  # as workers receive them


class Counting(CogReader):
    """The default reader, counting the band pixels it reads."""

    def __init__(self):
        super().__init__(threads=2)
        self.band_pixels = 0
        self.calls = {"read": 0, "bands": 0}

    def read(self, scenes, grid, source, **kwargs):
        self.band_pixels += len(scenes) * len(kwargs["bands"]) * grid.width * grid.height
        self.calls["read"] += 1
        return super().read(scenes, grid, source, **kwargs)

    def bands(self, scenes, grid, source, *, bands, within):
        self.band_pixels += len(scenes) * len(bands) * within[2] * within[3]
        self.calls["bands"] += 1
        return super().bands(scenes, grid, source, bands=bands, within=within)


def process(area, tasks, out: Path, *, whole: bool):
    reader = Counting()
    processor = TaskProcessor(ProcessingOptions(output_dir=out, gpkg=str(area["gpkg"]), read_whole_cell=whole,
                                                hrefs=HrefPolicy(local_dirs=area["dirs"])), "w@test", reader=reader)
    results = [replace(processor.process(task), seconds={}, finished_at="") for task in tasks]
    processor.close()
    files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tif"))}
    sidecars = {str(p.relative_to(out)): p.read_text() for p in sorted((out / "metadata").glob("*.json"))}
    return results, files, sidecars, reader.band_pixels


def same_both_ways(area, tmp_path, which, **spec):
    tasks = plan(area, tmp_path, which, **spec)
    whole = process(area, tasks, tmp_path / "whole", whole=True)
    first = process(area, tasks, tmp_path / "first", whole=False)
    assert whole[0] == first[0]  # statuses, chips (names, bounds, class pixels, scenes), skipped counts
    assert whole[1] == first[1] and whole[2] == first[2]  # every image and label file, every sidecar
    chips = [c for r in whole[0] for c in r.chips]
    return whole[0], chips, whole[3], first[3]


@pytest.mark.parametrize("spec", [
    {},
    {"composite": "least-cloudy"},
    {"composite": "stack"},
    {"max_scenes": 2},
    {"cloud_buffer_px": 2, "min_clear_fraction": 0.9},
    {"chip_placement": "lattice", "max_chip_overlap": 0.0},
    {"bands": ("B08", "B04", "B11"), "harmonize": False},
    {"temporal_period": "P15D"},
    {"temporal_period": "P1M", "composite": "least-cloudy", "min_valid_bins": 2, "min_clear_fraction": 0.6},
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_the_chips_are_the_same_files_as_from_the_whole_cell(area, tmp_path, spec):
    """With a time series too: the bins' days (two scenes of 2020-02-29 merged into one), what each bin's
    compositor takes and where each bin is clear come from the SCL bands over the whole cell."""
    results, chips, whole_pixels, first_pixels = same_both_ways(
        area, tmp_path, ("real", "clouds", "same_day", "clouds2", "half"), **spec)
    assert len(results) == 4 and all(r.status == "ok" for r in results) and len(chips) >= 8
    assert first_pixels < 0.9 * whole_pixels  # and it did read less: the chips' box, not the grid


def test_chips_skipped_for_clouds_are_the_same_and_a_cell_without_chips_reads_no_band(area, tmp_path):
    results, chips, whole_pixels, first_pixels = same_both_ways(area, tmp_path, ("overcast",),
                                                                min_clear_fraction=0.99)
    skipped = {k: sum(r.chips_skipped.get(k, 0) for r in results) for k in ("too_cloudy",)}
    assert skipped["too_cloudy"] > 0 and len(chips) < sum(len(r.chips) + sum(r.chips_skipped.values())
                                                            for r in results)
    empty = [r for r in results if not r.chips]
    assert empty and len(empty) < len(results)  # the south-west cell is overcast
    assert first_pixels < whole_pixels


def test_a_scene_whose_bands_are_empty_goes_the_whole_cell_way_with_the_same_chips(area, tmp_path, caplog):
    """The whole-cell path leaves out a scene whose bands hold nothing (its SCL's coverage with it); the
    masks alone cannot tell, so the worker finds out after reading the chips' box and reads the whole cell."""
    with caplog.at_level(logging.INFO, logger="cropchips.processing"):
        results, chips, _, _ = same_both_ways(area, tmp_path, ("real", "broken"))
    assert chips and all(r.scenes_used == ("S2A_29RKH_20200219_0_L2A",) for r in results)
    assert "reading the whole cell" in caplog.text


@pytest.mark.parametrize("name", sorted(COMPOSITORS))
def test_a_compositors_selection_is_what_it_composes_and_a_part_composes_alone(name):
    rng = np.random.default_rng(3)
    data = rng.integers(1, 10000, size=(5, 3, 40, 50), dtype=np.uint16)
    clear = rng.random((5, 40, 50)) < np.linspace(0.2, 0.9, 5)[:, None, None]
    compositor = COMPOSITORS[name]
    whole = compositor.compose(data, clear)
    picked = compositor.select(clear)
    assert picked.used == whole.used and np.array_equal(picked.clear_fraction, whole.clear_fraction)
    used = list(picked.used)
    part = compositor.compose(data[used][:, :, 7:29, 11:45], clear[used][:, 7:29, 11:45])
    assert part.used == tuple(range(len(used)))
    assert np.array_equal(part.image, whole.image[:, 7:29, 11:45])


@pytest.mark.parametrize("band", ["B04", "B11", "SCL"])
@pytest.mark.parametrize("within", [(0, 0, 37, 41), (13, 26, 50, 33), (1, 3, 70, 64)])
def test_a_band_read_over_part_of_the_grid_is_that_part_of_the_whole(band, within):
    """10 m (a copy), 20 m bilinear (both phases of the 20 m lattice: odd and even offsets) and the SCL
    (nearest) on the real files' lattice; off the lattice (another CRS) the whole grid is warped and cut."""
    href = str(FOLDER / f"{band}.tif")
    origin = grid_origin(str(FOLDER / "B02.tif"))
    cell = Cell(id="c", row=0, col=0, bbox=(-11.5, 24.7, -11.43, 24.76))
    on_lattice = cell_grid(cell, 32629, origin, 100.0, 1)
    off_lattice = cell_grid(cell, 32628, (0.0, 0.0), 100.0, 1)  # the next UTM zone: warped
    for grid in (on_lattice, off_lattice):
        whole = read_band(href, band, grid, categorical=band == "SCL")
        row, col, height, width = within
        part = read_band(href, band, grid, categorical=band == "SCL", within=within)
        assert part.shape == (height, width) and (whole > 0).mean() > 0.9
        assert np.array_equal(part, whole[row:row + height, col:col + width])
    with pytest.raises(ValueError, match="not inside"):
        read_band(href, band, on_lattice, within=(0, 0, on_lattice.height + 1, 5))


def test_a_compositor_that_needs_the_bands_reads_the_whole_cell(area, tmp_path):
    """A plug-in compositor without ``select`` (here: the brightest scene of the cell, by its bands) gets the
    whole cell's stack, as before."""
    from cropchips.raster.composite import COMPOSITORS, Composed, Compositor, register_compositor

    class Brightest(Compositor):
        name = "brightest-test"

        def compose(self, data, clear):
            best = int(np.argmax(data.reshape(len(data), -1).mean(axis=1)))
            return Composed(data[best], (best,), clear[best].astype("float32"))

    register_compositor(Brightest())
    try:
        tasks = plan(area, tmp_path, ("real", "clouds", "clouds2"), composite="brightest-test")
        reader = Counting()
        processor = TaskProcessor(ProcessingOptions(output_dir=tmp_path / "out", gpkg=str(area["gpkg"]),
                                                    hrefs=HrefPolicy(local_dirs=area["dirs"])), "w@test",
                                  reader=reader)
        results = [processor.process(task) for task in tasks]
        processor.close()
    finally:
        COMPOSITORS.pop("brightest-test")
    assert all(r.status == "ok" for r in results) and any(r.chips for r in results)
    assert {r.scenes_used for r in results} == {("S2A_29RKH_20200310_0_L2A",)}  # the bands scaled by 1.1
    assert reader.calls == {"read": len(tasks), "bands": 0}  # every band of every scene over the whole grid


@pytest.mark.parametrize("method", ["median", "least-cloudy"])
def test_bins_selected_from_the_masks_compose_a_part_as_the_whole_series_does(method):
    """Same-day merges (three scenes of one day, two of another), an empty bin, a scene outside the bins and
    one without data: the selection is compose_bins' (clear bins, scenes used per bin) and the image of a
    part of the grid, composed from the selected scenes alone, is that part of compose_bins' image."""
    from cropchips.raster.composite import has_data
    from cropchips.raster.temporal import compose_bins, compose_selected_bins, select_bins, time_bins

    rng = np.random.default_rng(11)
    dates = ["2020-01-02", "2020-01-02", "2020-01-02", "2020-01-09", "2020-01-20", "2020-01-20", "2020-02-25",
             "2020-03-30", "2020-01-25"]
    n, rows, cols = len(dates), 30, 40
    data = rng.integers(1, 5000, size=(n, 2, rows, cols), dtype=np.uint16)
    valid = rng.random((n, rows, cols)) < 0.8
    valid[8] = False  # no data at all
    data[~np.repeat(valid[:, None], 2, axis=1)] = 0
    clear = valid & (rng.random((n, rows, cols)) < 0.5)
    bins = time_bins("2020-01-01/2020-02-29", "P15D")  # 4 bins; 2020-02-01..15 is empty; 03-30 is outside
    whole = compose_bins(data, clear, valid, dates, bins, method)
    selection = select_bins(clear, valid, dates, bins, method, has_data(data, valid))
    assert (selection.used, selection.bin_used) == (whole.used, whole.bin_used)
    assert np.array_equal(selection.bin_clear, whole.bin_clear)
    assert selection.binned(whole.image).clear_fraction.tolist() == whole.clear_fraction.tolist()
    part = (slice(4, 27), slice(9, 31))
    used = list(selection.used)
    image = compose_selected_bins(selection, data[used][:, :, part[0], part[1]], {p: k for k, p in enumerate(used)},
                                  clear[:, part[0], part[1]], valid[:, part[0], part[1]], method)
    assert np.array_equal(image, whole.image[:, part[0], part[1]])
