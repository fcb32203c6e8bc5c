"""Data sources are plug-ins: a second satellite source is one class in one module, nothing else.

The source below, Landsat 8 Collection 2 Level-2 surface reflectance, lives in this test module
only: it is registered here, and the master plans and a worker processes a real Landsat scene
(../shared/data/landsat/stactools-landsat/assets3: Colombia 2019, the whole scene downsampled to
512 x 512 px of ~450 m, non-square pixels, with its real USGS STAC item and QA_PIXEL bit flags)
with no change anywhere else in cropchips.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.windows import from_bounds
from shapely.geometry import box

from conftest import shared_data
from cropchips.errors import ConfigError, InputDataError
from cropchips.plan.plan import MasterOptions, make_plan
from cropchips.queue.messages import Scene, decode, encode
from cropchips.processing import ProcessingOptions, TaskProcessor
from cropchips.sources.hrefs import HrefPolicy
from cropchips.sources.stac import item_datetime
from cropchips.sources import SOURCES, SceneRadiometry, Source, register_source, source_for
from cropchips.spec import DatasetSpec

FOLDER = shared_data("landsat", "stactools-landsat", "assets3")
SCENE_ID = "LC08_L2SP_008059_20191201_20200825_02_T1"
# QA_PIXEL bits (USGS Landsat C2 L2 product guide): 0 fill, 1 dilated cloud, 3 cloud, 4 cloud shadow, 6 clear.
FILL, CLEAR = 1 << 0, 1 << 6


class LandsatC2L2SR(Source):
    """Landsat 8/9 Collection 2 Level-2 surface reflectance as USGS publishes its STAC items."""

    collections: ClassVar[tuple[str, ...]] = ("landsat-c2l2-sr",)
    bands = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7")
    resolutions: ClassVar[Mapping[str, float]] = {**dict.fromkeys(bands, 30.0), "QA_PIXEL": 30.0}
    quality_band = "QA_PIXEL"
    quality_dtype = "uint16"
    quality_classes = range(1 << 16)
    default_clear_classes = (21824,)
    origin_band = "SR_B2"
    constellation = "landsat-8"
    instruments = ("oli", "tirs")

    def scene_from_item(self, item: Mapping[str, Any]) -> Scene:
        assets = {band: item["assets"][f"{band}.TIF"]["href"] for band in self.assets}
        return Scene(id=item["id"], collection=item["collection"],
                     datetime=item_datetime(item).isoformat().replace("+00:00", "Z"),
                     cloud_cover=item["properties"].get("eo:cloud_cover"), epsg=int(item["properties"]["proj:epsg"]),
                     assets=assets, bbox=tuple(item["bbox"]))

    def radiometry(self, scene: Scene, harmonize: bool) -> SceneRadiometry:
        # One convention since Collection 2: DN * 0.0000275 - 0.2 for every scene; nothing to harmonise.
        return SceneRadiometry(scene_id=scene.id, processing_baseline=None, published_offset=None, offset_dn=0,
                               applied_dn=0)

    def clear_mask(self, quality: np.ndarray, clear_classes) -> np.ndarray:
        return (quality & CLEAR != 0) & (quality & FILL == 0)  # bit flags, not classes

    def valid_mask(self, quality: np.ndarray) -> np.ndarray:
        return (quality != 0) & (quality & FILL == 0)


@pytest.fixture
def landsat():
    source = register_source(LandsatC2L2SR())
    yield source
    for collection in source.collections:
        SOURCES.pop(collection, None)


# The clearest 18 km of the scene (98 % of its QA_PIXEL clear) and field polygons in it.
CELL_BBOX = (-74.95, 1.60, -74.85, 1.70)


@pytest.fixture
def area(tmp_path):
    item = json.loads((FOLDER / f"{SCENE_ID}_SR_stac.json").read_text())
    for key, asset in item["assets"].items():
        if key.endswith(".TIF"):
            asset["href"] = str(FOLDER / f"{SCENE_ID}_{key}")
    item["properties"]["proj:epsg"] = 32618  # USGS items leave it out; Earth Search's and PC's carry it
    items = tmp_path / "items.json"
    items.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32618", always_xy=True)
    x0, y0 = to_utm.transform(CELL_BBOX[0], CELL_BBOX[1])
    fields = [box(x0 + 1500 + 3000 * i, y0 + 1500 + 3000 * j, x0 + 2900 + 3000 * i, y0 + 2900 + 3000 * j)
              for i in range(3) for j in range(3)]
    codes = ["3303050000" if k % 2 else "3301010100" for k in range(len(fields))]  # olives (1), wheat (5)
    frame = gpd.GeoDataFrame({"EC_hcat_c": codes, "EC_hcat_n": ["x"] * len(fields)}, geometry=fields, crs=32618)
    gpkg = tmp_path / "fields.gpkg"
    frame.to_file(gpkg, layer="fields", driver="GPKG")
    spec = DatasetSpec(collection="landsat-c2l2-sr", bbox=CELL_BBOX, grid_step=0.1, min_polygons=1, layer="fields",
                       datetime="2019-11-01/2019-12-31", max_cloud=100, bands=("SR_B4", "SR_B3", "SR_B2"),
                       resolution=450.0, chip_size=8, max_chips_per_cell=3, min_clear_fraction=0.5)
    return {"items": items, "gpkg": gpkg, "spec": spec, "out": tmp_path / "out"}


def test_a_source_registered_from_one_module_runs_master_and_worker(landsat, area):
    plan = make_plan(MasterOptions(gpkg=str(area["gpkg"]), spec=area["spec"], stac_items=str(area["items"])))
    [task] = plan.tasks
    assert [s.id for s in task.scenes] == [SCENE_ID] and set(task.scenes[0].assets) == set(landsat.assets)
    task = decode(encode(task))  # as a worker receives it
    processor = TaskProcessor(ProcessingOptions(output_dir=area["out"], gpkg=str(area["gpkg"]),
                                                hrefs=HrefPolicy(local_dirs=(FOLDER.resolve(),))), "l8@test")
    result = processor.process(task)
    assert result.status == "ok", result.error
    assert 1 <= len(result.chips) <= 3 and result.scenes_used == (SCENE_ID,)
    for chip in result.chips:
        with rasterio.open(area["out"] / chip.image) as image, rasterio.open(area["out"] / chip.mask) as mask:
            assert (image.count, image.width, image.descriptions) == (3, 8, ("SR_B4", "SR_B3", "SR_B2"))
            assert image.crs.to_epsg() == 32618 and image.dtypes[0] == "uint16"
            pixels, classes = image.read(), mask.read(1)
            bounds = image.bounds
        assert set(np.unique(classes)) <= {0, 1, 5} and (classes > 0).any()
        # The red band holds the scene's red reflectance there (resampled from ~450 m pixels to 450 m).
        with rasterio.open(FOLDER / f"{SCENE_ID}_SR_B4.TIF") as src:
            red = src.read(1, window=from_bounds(*bounds, transform=src.transform))
        assert (pixels[0] > 0).all() and abs(pixels[0].mean() / red[red > 0].mean() - 1) < 0.1
        assert chip.dataset_id == task.spec.dataset_id() and chip.method == "median"


def test_a_spec_for_another_source_checks_its_bands_and_quality_values(landsat):
    with pytest.raises(ConfigError, match="bands must be a non-empty list of landsat-c2l2-sr's bands SR_B1"):
        DatasetSpec(collection="landsat-c2l2-sr")  # the default bands are Sentinel-2's
    assert DatasetSpec(collection="landsat-c2l2-sr", bands=("SR_B5",), clear_classes=(21824,)).bands == ("SR_B5",)
    assert source_for("sentinel-2-c1-l2a") is source_for("sentinel-2-l2a")


def test_an_unknown_collection_is_a_clear_error():
    with pytest.raises(ConfigError, match="no data source reads the collection 'landsat-c2l2-sr'; known collections: "
                                          "sentinel-2-c1-l2a, sentinel-2-l2a"):
        DatasetSpec(collection="landsat-c2l2-sr")


def test_a_scene_without_the_sources_assets_is_refused_before_reading(landsat, area):
    plan = make_plan(MasterOptions(gpkg=str(area["gpkg"]), spec=area["spec"], stac_items=str(area["items"])))
    [task] = plan.tasks
    scene = task.scenes[0]
    partial = type(scene)(**{**scene.__dict__, "assets": {k: v for k, v in scene.assets.items() if k != "QA_PIXEL"}})
    with pytest.raises(InputDataError, match=r"lacks the assets \['QA_PIXEL'\]"):
        landsat.check_scene(partial)
    processor = TaskProcessor(ProcessingOptions(output_dir=area["out"], gpkg=str(area["gpkg"]),
                                                hrefs=HrefPolicy(local_dirs=(FOLDER.resolve(),))), "l8@test")
    result = processor.process(type(task)(**{**task.__dict__, "scenes": (partial,)}))
    assert result.status == "failed" and "lacks the assets ['QA_PIXEL']" in result.error


def test_off_the_lattice_the_chips_box_holds_the_pixels_of_the_whole_cell(landsat, area):
    """Landsat's non-square pixels are off the grid's lattice: each band is warped over the whole grid and
    the chips' box cut out of it (the warper's approximation depends on what it warps), so the chips are
    the same files as when the worker reads the whole cell."""
    plan = make_plan(MasterOptions(gpkg=str(area["gpkg"]), spec=area["spec"], stac_items=str(area["items"])))
    outputs = {}
    for whole in (True, False):
        out = area["out"] / str(whole)
        processor = TaskProcessor(ProcessingOptions(output_dir=out, gpkg=str(area["gpkg"]), read_whole_cell=whole,
                                                    hrefs=HrefPolicy(local_dirs=(FOLDER.resolve(),))), "l8@test")
        result = processor.process(decode(encode(plan.tasks[0])))
        assert result.status == "ok" and result.chips, result.error
        outputs[whole] = (result.chips, {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.tif"))})
    assert outputs[True] == outputs[False]
