"""search_stac / to_scenes against a local server replaying real recorded Earth Search responses.

The recordings (../shared/data/earthsearch/responses) are read in place by tests/stac_replay.py.
Sequences used:

* ``cli_filter.1.json`` -> ``cli_filter.2.json``: two full pages (10 + 10 items) of a cross-collection
  search, page 2 requested with the recorded ``{"next": token}`` body; holds ``sentinel-2-c1-l2a`` and
  ``sentinel-2-l2a`` items (plus Sentinel-1 and L1C items that are no L2A scenes).
* ``multiple_collections.0.json`` -> ``multiple_collections.1.json``: one ``sentinel-2-l2a`` item and one
  Landsat item, then an empty page reached through the ``next`` token.
* ``fields.0.json``: ``sentinel-2-c1-l2a`` items with assets excluded by the fields extension.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
from conftest import shared_data
from stac_replay import RECORDED_ROOT, StacReplayServer

from cropchips.errors import InputDataError, SceneSearchError
from cropchips.sources.sentinel2 import SCENE_ASSETS
from cropchips.sources.stac import search_stac, to_scenes
from cropchips.sources.sentinel2 import EARTH_SEARCH_KEYS, Sentinel2L2A, scene_from_item

ALL_KEYS = [EARTH_SEARCH_KEYS[band] for band in SCENE_ASSETS]  # blue ... swir22, scl

# name -> (pages, collection searched, bbox, datetime range, max cloud)
SEQUENCES = {
    "cli_filter": (["cli_filter.1.json", "cli_filter.2.json"], "sentinel-2-c1-l2a",
                   [-42.0, -6.0, -38.0, -3.0], "2025-07-31", 40.0),
    "multiple_collections": (["multiple_collections.0.json", "multiple_collections.1.json"], "sentinel-2-l2a",
                             [-105.2, 40.1, -105.0, 40.2], "2023-10-08", 80.0),
}


@pytest.fixture(scope="module")
def responses_dir():
    return shared_data("earthsearch", "responses")


def recording(responses_dir, name: str) -> dict:
    return json.loads((responses_dir / name).read_text())


def recorded_body(responses_dir, name: str) -> dict:
    body = recording(responses_dir, name)["_request"]["body"]
    return json.loads(body) if isinstance(body, str) else body


def next_token(page: dict) -> str:
    (link,) = [link for link in page["links"] if link["rel"] == "next"]
    return link["body"]["next"]


def run_search(server: StacReplayServer, name: str, **kwargs) -> list[dict]:
    _, collection, bbox, datetime_range, max_cloud = SEQUENCES[name]
    return search_stac(server.url, collection=collection, bbox=bbox, datetime_range=datetime_range,
                       max_cloud=max_cloud, **kwargs)


def has_all_assets(item: dict) -> bool:
    return all(key in item.get("assets", {}) for key in ALL_KEYS)


def utm_epsg(item: dict) -> int:
    """EPSG from the MGRS tile (independent of proj:*): 326zz north of the equator, 327zz south."""
    props = item["properties"]
    south = props["mgrs:latitude_band"].upper() < "N"
    return (32700 if south else 32600) + int(props["mgrs:utm_zone"])


# --------------------------------------------------------------------------- pagination and request


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_search_follows_the_next_token_over_both_pages(responses_dir, name):
    pages = SEQUENCES[name][0]
    recorded = [recording(responses_dir, page)["response"] for page in pages]
    expected_ids = [f["id"] for page in recorded for f in page["features"]]

    with StacReplayServer(pages, responses_dir=responses_dir) as server:
        items = run_search(server, name)

    assert len(items) == sum(len(page["features"]) for page in recorded)
    assert [item["id"] for item in items] == expected_ids
    searches = server.search_requests
    assert [(r.method, r.page, r.status) for r in searches] == [("POST", pages[0], 200), ("POST", pages[1], 200)]
    assert "next" not in searches[0].body
    # Page 2 was asked for with the token of page 1's next link, exactly as the real client did.
    assert searches[1].body["next"] == next_token(recorded[0])
    assert searches[1].body == recorded_body(responses_dir, pages[1])
    assert len(server.requests_for("/v1", "GET")) == 1


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_first_page_request_carries_our_filters(responses_dir, name):
    pages, collection, bbox, datetime_range, max_cloud = SEQUENCES[name]
    with StacReplayServer(pages, responses_dir=responses_dir) as server:
        run_search(server, name, page_size=50)

    body = server.search_requests[0].body
    assert body["collections"] == [collection]
    assert body["bbox"] == pytest.approx(bbox)
    start, end = body["datetime"].split("/")
    assert start.startswith(datetime_range) and end.startswith(datetime_range)  # a date is the whole day
    assert body["query"] == {"eo:cloud_cover": {"lt": max_cloud}}
    assert body["limit"] == 50


# --------------------------------------------------------------------------- items -> scenes


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_replayed_items_become_scenes_with_cog_assets(responses_dir, name):
    with StacReplayServer(SEQUENCES[name][0], responses_dir=responses_dir) as server:
        items = run_search(server, name)

    complete = [item for item in items if has_all_assets(item)]
    incomplete = [item for item in items if not has_all_assets(item)]
    assert complete, "the recording holds no Sentinel-2 L2A item"
    scenes = {s.scene.id: s.scene for s in to_scenes(complete, Sentinel2L2A())}
    assert sorted(scenes) == sorted(item["id"] for item in complete)
    for item in complete:
        scene = scenes[item["id"]]
        props = item["properties"]
        declared = props.get("proj:epsg") or int(str(props["proj:code"]).split(":")[1])
        assert scene.epsg == declared == utm_epsg(item), item["id"]
        assert scene.collection == item["collection"]
        assert scene.datetime.startswith(props["datetime"][:19])
        for band, href in scene.assets.items():
            assert href == item["assets"][EARTH_SEARCH_KEYS[band]]["href"]
            assert href.endswith(".tif") and "jp2" not in href, href
    for item in incomplete:  # Sentinel-1, L1C (no scl), Landsat: refused with the missing names
        with pytest.raises(InputDataError, match="lacks assets") as err:
            scene_from_item(item)
        missing = [key for key in ALL_KEYS if key not in item.get("assets", {})]
        assert str(missing) in str(err.value)


def test_both_collections_are_covered(responses_dir):
    with StacReplayServer(SEQUENCES["cli_filter"][0], responses_dir=responses_dir) as server:
        items = run_search(server, "cli_filter")
    collections = [s.scene.collection for s in to_scenes((i for i in items if has_all_assets(i)), Sentinel2L2A())]
    assert {"sentinel-2-c1-l2a", "sentinel-2-l2a"} <= set(collections)
    # The JPEG2000 duplicates of sentinel-2-l2a are present in the recording but never chosen.
    assert any("blue-jp2" in i["assets"] for i in items if i["collection"] == "sentinel-2-l2a")


def test_items_without_assets_are_refused_by_name(responses_dir):
    """fields.0.json excluded assets (and geometry, links): such items cannot become scenes."""
    with StacReplayServer(["fields.0.json"], responses_dir=responses_dir) as server:
        items = search_stac(server.url, collection="sentinel-2-c1-l2a", bbox=[-105.2, 40.1, -105.0, 40.2],
                            datetime_range="2025-07-01/2025-07-31", max_cloud=100)
    assert len(items) == len(recording(responses_dir, "fields.0.json")["response"]["features"]) == 10
    # fields.0.json has a next link but no recorded page 2: the replay ends the sequence there.
    assert len(server.search_requests) == 1
    for item in items:
        assert "assets" not in item
        with pytest.raises(InputDataError) as err:
            scene_from_item(item)
        message = str(err.value)
        assert item["id"] in message and "lacks assets" in message
        assert all(repr(key) in message for key in ALL_KEYS)


# --------------------------------------------------------------------------- retries


def test_a_502_once_is_retried_and_the_search_succeeds(responses_dir):
    pages = SEQUENCES["cli_filter"][0]
    faults = {"landing": 1, pages[1]: 1}
    with StacReplayServer(pages, responses_dir=responses_dir, fail_first=faults) as server:
        started = time.monotonic()
        items = run_search(server, "cli_filter")  # the production retry policy (first retry is immediate)
        elapsed = time.monotonic() - started

    expected = [f["id"] for page in pages for f in recording(responses_dir, page)["response"]["features"]]
    assert [item["id"] for item in items] == expected
    assert [(r.page, r.status) for r in server.requests] == [
        ("landing", 502), ("landing", 200), (pages[0], 200), (pages[1], 502), (pages[1], 200)]
    # The retry re-sent the same body, the next token included.
    assert server.search_requests[1].body == server.search_requests[2].body == recorded_body(responses_dir, pages[1])
    assert elapsed < 10


@pytest.mark.parametrize("failing", ["landing", "cli_filter.1.json", "cli_filter.2.json"])
def test_a_page_that_always_fails_gives_a_readable_scene_search_error(responses_dir, failing):
    pages = SEQUENCES["cli_filter"][0]
    with (StacReplayServer(pages, responses_dir=responses_dir, always_fail={failing}) as server,
          pytest.raises(SceneSearchError) as err):
        run_search(server, "cli_filter", backoff_factor=0)  # same retry count, no sleeping

    message = str(err.value)
    assert message.startswith(f"cannot search the STAC API {server.url}")
    assert "502" in message and "--stac-items" in message
    failed = [r for r in server.requests if r.page == failing]
    assert len(failed) == 6 and all(r.status == 502 for r in failed)  # 1 try + Retry(total=5)


# --------------------------------------------------------------------------- the replay server itself


def test_replay_server_rewrites_links_and_serves_conformance_and_get_search(responses_dir):
    pages = SEQUENCES["cli_filter"][0]
    with StacReplayServer(pages, responses_dir=responses_dir) as server:
        landing = requests.get(server.url, timeout=5)
        assert landing.status_code == 200
        assert RECORDED_ROOT not in landing.text and f"{server.url}/search" in landing.text
        conformance = requests.get(f"{server.url}/conformance", timeout=5).json()
        assert conformance["conformsTo"] == recording(responses_dir, "cli_filter.0.json")["response"]["conformsTo"]
        collections = requests.get(f"{server.url}/collections", timeout=5).json()
        assert "sentinel-2-c1-l2a" in {c["id"] for c in collections["collections"]}

        page1 = requests.get(f"{server.url}/search", timeout=5).json()
        token = next_token(page1)
        (link,) = [link for link in page1["links"] if link["rel"] == "next"]
        assert link["href"] == f"{server.url}/search"
        page2 = requests.get(f"{server.url}/search", params={"next": token}, timeout=5).json()
        assert [f["id"] for f in page2["features"]] == [
            f["id"] for f in recording(responses_dir, pages[1])["response"]["features"]]
        unknown = requests.post(f"{server.url}/search", json={"next": "no-such-token"}, timeout=5)
        assert unknown.status_code == 404 and "no-such-token" in unknown.text
