"""Scene search and item normalisation on real Earth Search STAC items."""

import json
from datetime import datetime, timezone

import pytest

from conftest import shared_data
from cropchips.errors import ConfigError, InputDataError, SceneSearchError
from cropchips.queue.messages import Cell
from cropchips.sources.sentinel2 import SCENE_ASSETS, Sentinel2L2A, scene_from_item
from cropchips.sources.stac import (filter_items, load_items_file, parse_datetime_range, scenes_for_cell,
                              search_stac, to_scenes)

SENTINEL2 = Sentinel2L2A()

ITEMS = ("S2A_13TDE_20231008_0_L2A.json", "S2B_24MVV_20250731_0_L2A.json", "S2B_T24MVV_20250731T130245_L2A.json")


def real_item(name):
    return json.loads(shared_data("earthsearch", "items", name).read_text())


@pytest.mark.parametrize("name", ITEMS)
def test_real_items_normalise_to_scenes(name):
    item = real_item(name)
    scene = scene_from_item(item)
    assert scene.id == item["id"] and scene.collection == item["collection"]
    assert set(scene.assets) == set(SCENE_ASSETS)
    # The COG assets are used, never the JPEG2000 duplicates of sentinel-2-l2a.
    assert all(href.endswith(".tif") for href in scene.assets.values())
    assert scene.assets["B8A"] == item["assets"]["nir08"]["href"]
    assert scene.assets["SCL"] == item["assets"]["scl"]["href"]
    expected_epsg = item["properties"].get("proj:epsg") or int(item["properties"]["proj:code"].split(":")[1])
    assert scene.epsg == expected_epsg
    assert scene.processing_baseline == item["properties"].get("s2:processing_baseline")
    assert scene.offsets["B04"] == item["assets"]["red"]["raster:bands"][0]["offset"]


def test_proj_code_is_understood():
    item = real_item(ITEMS[2])
    item["properties"].pop("proj:epsg", None)
    item["properties"]["proj:code"] = "EPSG:32724"
    assert scene_from_item(item).epsg == 32724


def test_item_without_bands_is_a_clear_error():
    item = real_item(ITEMS[0])
    del item["assets"]["swir22"]
    with pytest.raises(InputDataError, match="swir22"):
        scene_from_item(item)


def test_datetime_ranges():
    start, end = parse_datetime_range("2023-05-15/2023-06-30")
    assert start == datetime(2023, 5, 15, tzinfo=timezone.utc)
    assert end.date().isoformat() == "2023-06-30" and end.hour == 23
    assert parse_datetime_range("../2023-06-30")[0] is None
    for bad in ("2023-13-01/2023-06-30", "yesterday", "2023-06-30/2023-05-15", "a/b/c", ""):
        with pytest.raises(ConfigError, match="datetime"):
            parse_datetime_range(bad)


def test_filter_items_applies_collection_dates_cloud_and_bbox(tmp_path):
    items = [real_item(n) for n in ITEMS]
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    loaded = load_items_file(path)
    assert [i["id"] for i in loaded] == [i["id"] for i in items]
    colorado = (-106.0, 39.5, -104.5, 40.5)  # inside the 13TDE footprint
    kept = filter_items(loaded, collection="sentinel-2-l2a", bbox=colorado, datetime_range="2023-10-01/2023-10-31",
                        max_cloud=10)
    assert [i["id"] for i in kept] == ["S2A_13TDE_20231008_0_L2A"]
    assert filter_items(loaded, collection="sentinel-2-l2a", bbox=colorado, datetime_range="2023-11-01/2023-11-30",
                        max_cloud=10) == []
    cloud = items[0]["properties"]["eo:cloud_cover"]
    assert filter_items(loaded, collection="sentinel-2-l2a", bbox=colorado, datetime_range="2023-10-01/2023-10-31",
                        max_cloud=cloud) == []  # strictly below, like the API's "lt"
    brazil = filter_items(loaded, collection="sentinel-2-c1-l2a", bbox=(-180, -90, 180, 90), datetime_range="2025-07-31",
                          max_cloud=100)
    assert [i["id"] for i in brazil] == ["S2B_T24MVV_20250731T130245_L2A"]


def test_scenes_for_cell_uses_footprints():
    scenes = to_scenes([real_item(n) for n in ITEMS], SENTINEL2)
    inside = Cell(id="c", row=0, col=0, bbox=(-105.2, 40.1, -105.1, 40.2))
    far = Cell(id="d", row=0, col=0, bbox=(10.0, 10.0, 10.1, 10.1))
    assert [s.id for s in scenes_for_cell(inside, scenes)] == ["S2A_13TDE_20231008_0_L2A"]
    assert scenes_for_cell(far, scenes) == []


def test_unreachable_stac_api_is_a_scene_search_error():
    with pytest.raises(SceneSearchError, match="cannot search the STAC API"):
        search_stac("http://127.0.0.1:9/v1", collection="sentinel-2-l2a", bbox=(0, 0, 1, 1),
                    datetime_range="2023-05-15/2023-06-30", max_cloud=10, timeout=2)
