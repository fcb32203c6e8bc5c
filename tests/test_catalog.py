"""The STAC catalog of a dataset: valid STAC 1.1, true to the files, the index and the provenance."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import geopandas as gpd
import numpy as np
import pystac
import pytest
import rasterio
import shapely
from conftest import shared_data
from jsonschema import Draft7Validator
from pyproj import Transformer
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.eo import EOExtension
from pystac.extensions.label import LabelExtension, LabelType
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension
from referencing import Registry, Resource

import cropchips.dataset.catalog as catalog_module
from cropchips.dataset.catalog import CATALOG_NAME, COLLECTION_PATH, ITEMS_DIR, build_catalog, write_catalog
from cropchips.fields.classes import CLASS_NAMES, LABEL_NAMES
from cropchips.dataset.index import SplitPolicy, finalize, records_from_metadata
from cropchips.dataset.stats import STATS_NAME
from cropchips.plan.plan import make_plan
from cropchips.sources.hrefs import HrefPolicy
from cropchips.sources.sentinel2 import EARTH_SEARCH_KEYS
from cropchips.output.storage import TMP_PREFIX, LocalStorage
from helpers import SpecProcessor

CHIP = 64
# Records without a split of their own (cropchips < 0.3) are split by these blocks.
POLICY = SplitPolicy(block_size_m=400, ratios=(0.5, 0.25, 0.25))
ALL_LAYERS = ("classes", "instances", "boundaries")


# The stack of the sample's partly covering scenes leaves few chips of 64 px, none in the train cells:
# 48 px chips give every split one.
@pytest.fixture(scope="module", params=[("median", "gtiff", ("classes",), CHIP), ("stack", "cog", ALL_LAYERS, 48)],
                ids=["median-gtiff", "stack-cog"])
def written(request, sample_area, sample_master_options, tmp_path_factory):
    """A processed sample dataset with its index, stats and catalog written beside it. The master plans
    one split block per cell (~2 km), so its four cells get train, val and test."""
    temporal, fmt, labels, chip = request.param
    out = tmp_path_factory.mktemp(f"catalog-{temporal}")
    plan = make_plan(replace(sample_master_options, spec=replace(sample_master_options.spec, split_block_size=2000.0)))
    processor = SpecProcessor("c@test", output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                              chip_size=chip, max_chips_per_cell=8, composite=temporal, format=fmt, labels=labels,
                              hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)))
    assert all(processor.process(task).status == "ok" for task in plan.tasks)
    finalize(out, policy=POLICY)
    index = gpd.read_parquet(out / "index.parquet")
    records = records_from_metadata(out)
    stats = json.loads((out / STATS_NAME).read_text())
    documents = build_catalog(records, dict(zip(index["name"], index["split"])), title="Sample chips", stats=stats)
    path = write_catalog(out, documents)
    return {"out": out, "index": index, "records": {r["name"]: r for r in records}, "documents": documents,
            "path": path, "format": fmt, "temporal": temporal, "labels": labels, "stats": stats, "chip": chip,
            "dataset_id": processor.task(plan.tasks[0]).spec.dataset_id()}


# --- STAC core schemas, offline ------------------------------------------------------------------

STAC_SCHEMAS = "https://schemas.stacspec.org/v1.1.0"
CORE = STAC_SCHEMAS + "/{0}-spec/json-schema/{0}.json"


def _local_registry() -> Registry:
    """The STAC 1.1.0 core and GeoJSON schemas that pystac ships, under their published URLs;
    any other reference fails instead of being fetched."""
    root = files("pystac.validation.jsonschemas")
    resources = []
    for entry in (root / "stac-spec" / "v1.1.0").iterdir():
        if entry.name.endswith(".json"):
            stem = entry.name[:-len(".json")]
            # Not by "$id": the published common.json carries a broken one (".../commonjson").
            uri = CORE.format(stem) if stem in ("catalog", "collection", "item") else (
                f"{STAC_SCHEMAS}/item-spec/json-schema/{entry.name}")
            resources.append((uri, Resource.from_contents(json.loads(entry.read_text()))))
    for entry in (root / "geojson").iterdir():
        if entry.name.endswith(".json"):
            resources.append((f"https://geojson.org/schema/{entry.name}",
                              Resource.from_contents(json.loads(entry.read_text()))))

    def refuse(uri: str):
        raise LookupError(f"schema {uri} is not shipped with pystac; this test never fetches schemas")

    return Registry(retrieve=refuse).with_resources(resources)


REGISTRY = _local_registry()


def core_errors(document: dict) -> list[str]:
    kind = {"Feature": "item", "Collection": "collection", "Catalog": "catalog"}[document["type"]]
    schema = REGISTRY.contents(CORE.format(kind))
    validator = Draft7Validator(schema, registry=REGISTRY, format_checker=Draft7Validator.FORMAT_CHECKER)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def test_every_document_is_valid_stac_1_1(written):
    documents = written["documents"]
    assert {d["type"] for d in documents.values()} == {"Catalog", "Collection", "Feature"}
    for path, document in documents.items():
        assert document["stac_version"] == "1.1.0"
        assert core_errors(document) == [], path
    # The validator does reject what STAC forbids (so the checks above can fail).
    item = copy.deepcopy(next(d for d in documents.values() if d["type"] == "Feature"))
    item["properties"].pop("datetime", None)
    item["properties"].pop("start_datetime", None)
    assert core_errors(item)
    collection = copy.deepcopy(documents[COLLECTION_PATH])
    collection["extent"]["spatial"]["bbox"] = [[0, 0]]
    assert core_errors(collection)


# --- the catalog against the dataset ------------------------------------------------------------

def test_written_catalog_round_trips_to_the_chips_of_the_index(written):
    out, index = written["out"], written["index"]
    root = pystac.Catalog.from_file(str(out / CATALOG_NAME))
    collections = list(root.get_collections())
    assert len(collections) == 1 and collections[0].id == "cropchips"
    items = {item.id: item for item in root.get_items(recursive=True)}
    # One item per chip the index keeps, and only those: every chip here (the master's splits are of
    # whole cells, so no chip overlaps one of another split).
    assert sorted(items) == sorted(index["name"]) == sorted(written["records"])
    split_of = dict(zip(index["name"], index["split"]))
    for name, item in items.items():
        assert item.properties["split"] == split_of[name] == written["records"][name]["split"]
        assert item.collection_id == "cropchips" and item.get_parent().id == "cropchips"
        for key, asset in item.assets.items():
            assert Path(asset.get_absolute_href()).is_file(), (name, key)
        assert Path(item.assets["image"].get_absolute_href()) == (out / written["records"][name]["image"]).resolve()
        assert Path(item.assets["mask"].get_absolute_href()) == (out / written["records"][name]["mask"]).resolve()
        # One asset per label layer of the chip, at the layer's file.
        layers = written["records"][name]["layers"]
        assert item.properties["cropchips:label_layers"] == list(written["labels"])
        assert sorted(layers, key=ALL_LAYERS.index) == list(written["labels"])
        for layer, key in (("classes", "mask"), ("instances", "instances"), ("boundaries", "boundaries")):
            assert (key in item.assets) == (layer in layers)
            if layer in layers:
                assert Path(item.assets[key].get_absolute_href()) == (out / layers[layer]).resolve()
                assert item.assets[key].roles == ["labels", "labels-raster"]
    # The collection links the train split's statistics.
    stats_asset = collections[0].assets["stats"]
    assert Path(stats_asset.get_absolute_href()) == (out / STATS_NAME).resolve() and "metadata" in stats_asset.roles
    # Every link and asset href is relative: the folder can be moved or uploaded as a whole.
    for document in written["documents"].values():
        hierarchy = [link for link in document["links"] if link["rel"] in ("root", "parent", "child", "item",
                                                                         "collection", "self")]
        assert all(not link["href"].startswith(("/", "http")) for link in hierarchy)
        assert all(not a["href"].startswith(("/", "http")) for a in document.get("assets", {}).values())


def test_items_carry_the_chips_provenance(written):
    index = written["index"].set_index("name")
    for name, item in _items(written).items():
        record = written["records"][name]
        props = item.properties
        assert props["cropchips:cell_id"] == record["cell_id"] and props["cropchips:method"] == record["method"]
        assert props["cropchips:dataset_id"] == record["dataset_id"] == written["dataset_id"]
        assert props["cropchips:scene_ids"] == [s["id"] for s in record["scenes"]]
        assert props["cropchips:clear_fraction"] == record["clear_fraction"]
        assert props["cropchips:nodata_fraction"] == record["nodata_fraction"]
        assert record["software"] in props["cropchips:software"] and props["created"]
        pixels = {int(k): v for k, v in props["cropchips:class_pixels"].items()}
        assert pixels == {int(k): v for k, v in record["class_pixels"].items()}
        assert sum(pixels.values()) == written["chip"] ** 2
        # derived_from: exactly the source scenes' STAC items.
        assert [link.href for link in item.links if link.rel == "derived_from"] == [
            s["item_href"] for s in record["scenes"] if s.get("item_href")]
        assert all(s.get("item_href") for s in record["scenes"])  # the sample's scenes all have one
        # Time: the span of the scenes.
        times = sorted(pystac.utils.str_to_datetime(s["datetime"]) for s in record["scenes"])
        assert len(times) > 1 and item.datetime is None
        assert item.common_metadata.start_datetime == times[0] and item.common_metadata.end_datetime == times[-1]
        # Footprint: contains the chip's centre, lies in its bbox, and agrees with the index's footprint.
        left, bottom, right, top = record["bounds"]
        to_lonlat = Transformer.from_crs(record["crs"], 4326, always_xy=True)
        centre = to_lonlat.transform((left + right) / 2, (bottom + top) / 2)
        footprint = shapely.geometry.shape(item.geometry)
        assert footprint.is_valid and footprint.exterior.is_ccw and footprint.contains(shapely.Point(centre))
        assert shapely.box(*item.bbox).buffer(1e-12).contains(footprint)
        assert footprint.difference(index.loc[name, "geometry"]).area < 1e-6 * footprint.area
        # The chip is rotated in lon/lat (grid convergence): its four corners, not the index's box, trace it.
        corners = shapely.Polygon([to_lonlat.transform(x, y) for x, y in
                                   ((left, bottom), (right, bottom), (right, top), (left, top))])
        assert footprint.symmetric_difference(corners).area < 1e-4 * corners.area


def test_collection_summarises_the_items(written):
    collection = pystac.Collection.from_dict(written["documents"][COLLECTION_PATH],
                                             href=str(written["out"] / COLLECTION_PATH))
    items = list(_items(written).values())
    bbox = collection.extent.spatial.bboxes[0]
    assert bbox == [min(i.bbox[0] for i in items), min(i.bbox[1] for i in items),
                    max(i.bbox[2] for i in items), max(i.bbox[3] for i in items)]
    scene_times = [pystac.utils.str_to_datetime(s["datetime"]) for i in items
                   for s in written["records"][i.id]["scenes"]]
    assert collection.extent.temporal.intervals[0] == [min(scene_times), max(scene_times)]
    assert collection.summaries.get_list("split") == sorted(set(written["index"]["split"]))
    assert len(collection.summaries.get_list("split")) > 1
    assert collection.summaries.get_list("cropchips:dataset_id") == [written["dataset_id"]]
    assert collection.license == "other"
    licence_links = [link.href for link in collection.links if link.rel == "license"]
    assert any("creativecommons.org/licenses/by/4.0" in href for href in licence_links)
    assert any("copernicus" in href.lower() for href in licence_links)
    assert "CC-BY-4.0" in collection.description and "Copernicus" in collection.description
    assert {p.name for p in collection.providers} >= {"EuroCrops", "cropchips"}
    label_summary = collection.summaries.get_list("label:classes")
    assert label_summary[0]["classes"] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 255]
    summary_classes = collection.summaries.get_list("classification:classes")
    assert {c["value"]: c["name"] for c in summary_classes} == {**CLASS_NAMES, 255: LABEL_NAMES[255]}
    assert [c["value"] for c in summary_classes if c.get("nodata")] == [255]
    layer_keys = {"classes": "mask", "instances": "instances", "boundaries": "boundaries"}
    assert set(collection.item_assets) == {"image", "provenance", *(layer_keys[k] for k in written["labels"])}
    assert collection.summaries.get_list("cropchips:label_layers") == list(written["labels"])
    assert "labels" in collection.item_assets["mask"].roles


# --- extension fields, read back through pystac and compared with the GeoTIFFs ------------------

def test_extension_fields_match_the_geotiffs(written):
    out = written["out"]
    for name, item in _items(written).items():
        image, mask = item.assets["image"], item.assets["mask"]
        with rasterio.open(out / written["records"][name]["image"]) as src:
            assert [b.name for b in EOExtension.ext(image).bands] == list(src.descriptions)
            proj = ProjectionExtension.ext(item)
            assert proj.code == src.crs.to_string()
            assert tuple(proj.shape) == src.shape
            assert proj.transform == list(src.transform)[:6]
            assert proj.bbox == list(src.bounds)
            is_cog = src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert is_cog == (written["format"] == "cog")
        assert image.media_type == (pystac.MediaType.COG if is_cog else pystac.MediaType.GEOTIFF)
        assert mask.media_type == image.media_type
        assert len(EOExtension.ext(image).bands) == (30 if written["temporal"] == "stack" else 10)
        with rasterio.open(out / written["records"][name]["mask"]) as src:
            values, counts = np.unique(src.read(1), return_counts=True)
            nodata = src.nodata
            assert src.crs.to_string() == proj.code and list(src.transform)[:6] == proj.transform
        label = LabelExtension.ext(item)
        assert label.label_type == LabelType.RASTER and label.label_properties is None
        [classes] = label.label_classes
        assert classes.name is None and classes.classes == [*sorted(CLASS_NAMES), 255]
        assert set(values.tolist()) <= set(classes.classes)
        assert set(label.label_tasks) == {"segmentation", "classification"}
        mask_classes = ClassificationExtension.ext(mask).classes
        assert {c.value: c.name for c in mask_classes} == {**CLASS_NAMES, 255: LABEL_NAMES[255]}
        assert {c.value: c.count for c in mask_classes if c.count} == dict(zip(values.tolist(), counts.tolist()))
        # 255 (ignore) is the nodata-like value, as the mask GeoTIFF declares it; 0 (no field) is a class.
        assert [c.value for c in mask_classes if c.nodata] == [255] == [int(nodata)]
        assert "labels" in mask.roles and "data" in image.roles
        if "boundaries" in item.assets:
            with rasterio.open(out / written["records"][name]["layers"]["boundaries"]) as src:
                assert src.dtypes[0] == "uint8" and list(src.transform)[:6] == proj.transform
                drawn = set(np.unique(src.read(1)).tolist())
            boundary_classes = ClassificationExtension.ext(item.assets["boundaries"]).classes
            assert {c.value: c.name for c in boundary_classes} == {0: "background", 1: "interior", 2: "boundary"}
            assert drawn <= {0, 1, 2} and 2 in drawn
        if "instances" in item.assets:
            with rasterio.open(out / written["records"][name]["layers"]["instances"]) as src:
                assert src.dtypes[0] == "uint32" and tuple(src.shape) == tuple(proj.shape)
            assert "uint32" in item.assets["instances"].description


def test_band_metadata_agrees_with_earth_search():
    """The S2 band table against the eo:bands of a real Earth Search item (independent source)."""
    folder = shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A")
    real = json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text())
    for band, (common, centre, fwhm) in catalog_module.S2_BANDS.items():
        [published] = real["assets"][EARTH_SEARCH_KEYS[band]]["eo:bands"]
        assert (common, centre, fwhm) == (published["common_name"], published["center_wavelength"],
                                          published["full_width_half_max"]), band


# Minimal field checks written from the extension specs' field tables (label v1.0.1, eo v1.1.0,
# projection v2.0.0, classification v2.0.0): their JSON schemas are not available offline.
EO_COMMON_NAMES = {"pan", "coastal", "blue", "green", "green05", "yellow", "red", "rededge", "rededge071",
                   "rededge075", "rededge078", "nir", "nir08", "nir09", "cirrus", "swir16", "swir22", "lwir",
                   "lwir11", "lwir12"}
EXTENSION_IDS = {"label": "label", "eo": "eo", "proj": "projection", "classification": "classification"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_extension_fields_follow_the_specs(written):
    for path, document in written["documents"].items():
        if document["type"] != "Feature":
            continue
        props = document["properties"]
        # label: properties is null for raster labels; class objects are {name: str|null, classes: [str]|[number]}.
        assert props["label:type"] in ("vector", "raster") and props["label:properties"] is None
        assert isinstance(props["label:description"], str) and props["label:description"]
        assert all(isinstance(task, str) for task in props["label:tasks"])
        for class_object in props["label:classes"]:
            assert set(class_object) == {"name", "classes"}
            assert class_object["name"] is None or isinstance(class_object["name"], str)
            values = class_object["classes"]
            assert values and (all(isinstance(v, str) for v in values) or all(_is_number(v) for v in values))
        # projection: an "authority:code" string, a 2-D shape, a 6-coefficient transform, a 4-number bbox.
        assert re.fullmatch(r"[A-Za-z0-9]+:[0-9]+", props["proj:code"])
        assert len(props["proj:shape"]) == 2 and all(isinstance(v, int) and v > 0 for v in props["proj:shape"])
        assert len(props["proj:transform"]) in (6, 9) and all(_is_number(v) for v in props["proj:transform"])
        assert len(props["proj:bbox"]) == 4 and all(_is_number(v) for v in props["proj:bbox"])
        # eo: bands are objects with a name; common names from the spec's list; wavelengths in micrometres.
        for band in document["assets"]["image"]["eo:bands"]:
            assert isinstance(band["name"], str) and band["name"]
            assert band["common_name"] in EO_COMMON_NAMES
            assert _is_number(band["center_wavelength"]) and 0.3 < band["center_wavelength"] < 15
        # classification: integer values, unique, names of letters, digits, '-' and '_'.
        classes = document["assets"]["mask"]["classification:classes"]
        assert len({c["value"] for c in classes}) == len(classes)
        for c in classes:
            assert isinstance(c["value"], int) and re.fullmatch(r"[0-9A-Za-z_-]+", c["name"])
        # Every extension used is declared in stac_extensions (and only those).
        used = {key.split(":")[0] for key in props if ":" in key} | {
            key.split(":")[0] for asset in document["assets"].values() for key in asset if ":" in key}
        declared = {re.search(r"stac-extensions\.github\.io/([a-z-]+)/v", uri).group(1)
                    for uri in document["stac_extensions"]}
        assert declared == {EXTENSION_IDS[prefix] for prefix in used if prefix in EXTENSION_IDS}, path


# --- building and writing -----------------------------------------------------------------------

def test_only_chips_in_splits_are_catalogued_and_stale_items_are_removed(written, monkeypatch):
    out = written["out"]
    names = sorted(written["index"]["name"])
    kept = {name: "val" for name in names[1:]}
    documents = build_catalog(list(written["records"].values()), kept)
    assert sorted(d["id"] for d in documents.values() if d["type"] == "Feature") == names[1:]
    order = []
    real_write_bytes = LocalStorage.write_bytes

    def recording(self, rel, data):
        order.append(rel)
        return real_write_bytes(self, rel, data)

    with monkeypatch.context() as patch:
        patch.setattr(LocalStorage, "write_bytes", recording)
        write_catalog(out, documents)
    assert order[-2:] == [COLLECTION_PATH, CATALOG_NAME] and sorted(order) == sorted(documents)
    assert not (out / ITEMS_DIR / f"{names[0]}.json").exists()
    assert sorted(p.stem for p in (out / ITEMS_DIR).glob("*.json")) == names[1:]
    assert not list(out.rglob(f"{TMP_PREFIX}*"))
    root = pystac.Catalog.from_file(str(out / CATALOG_NAME))
    assert {i.properties["split"] for i in root.get_items(recursive=True)} == {"val"}
    with pytest.raises(ValueError, match="without '..'"):
        write_catalog(out, {"../escape.json": {}})
    assert not (out.parent / "escape.json").exists()
    # Put the module's own catalog back for the other tests of this dataset.
    write_catalog(out, written["documents"])
    assert sorted(p.stem for p in (out / ITEMS_DIR).glob("*.json")) == names


def test_one_scene_gives_a_datetime_and_missing_item_hrefs_are_skipped(written):
    record = copy.deepcopy(next(iter(written["records"].values())))
    record["scenes"] = [dict(record["scenes"][0], item_href=None)]
    document = build_catalog([record], {record["name"]: "test"})[f"{ITEMS_DIR}/{record['name']}.json"]
    assert document["properties"]["datetime"] == record["scenes"][0]["datetime"].replace("+00:00", "Z")
    assert "start_datetime" not in document["properties"]
    assert not [link for link in document["links"] if link["rel"] == "derived_from"]
    assert core_errors(document) == []
    record["scenes"] = []
    with pytest.raises(ValueError, match="lists no scenes"):
        build_catalog([record], {record["name"]: "test"})


def _items(written) -> dict[str, pystac.Item]:
    return {d["id"]: pystac.Item.from_dict(d, href=str(written["out"] / path))
            for path, d in written["documents"].items() if d["type"] == "Feature"}


def test_the_platform_comes_from_the_source_of_the_scenes_collection(written):
    from cropchips.sources import SOURCES, Sentinel2L2A, register_source

    record = copy.deepcopy(next(iter(written["records"].values())))
    documents = build_catalog([record], {record["name"]: "test"})
    item = documents[f"{ITEMS_DIR}/{record['name']}.json"]
    assert (item["properties"]["constellation"], item["properties"]["instruments"]) == ("sentinel-2", ["msi"])

    class OtherMission(Sentinel2L2A):  # a source of its own collection, registered for this test only
        collections = ("other-l2a",)
        constellation = "other"
        instruments = ("imager",)

    register_source(OtherMission())
    try:
        record["scenes"] = [dict(scene, collection="other-l2a") for scene in record["scenes"]]
        documents = build_catalog([record], {record["name"]: "test"})
    finally:
        SOURCES.pop("other-l2a")
    item = documents[f"{ITEMS_DIR}/{record['name']}.json"]
    assert (item["properties"]["constellation"], item["properties"]["instruments"]) == ("other", ["imager"])
    collection = next(d for d in documents.values() if d["type"] == "Collection")
    assert collection["summaries"]["constellation"] == ["other"] and collection["summaries"]["instruments"] == ["imager"]
    assert core_errors(item) == []


def test_the_collection_carries_the_train_statistics(written):
    documents = written["documents"]
    collection = pystac.Collection.from_dict(documents[COLLECTION_PATH], href=str(written["out"] / COLLECTION_PATH))
    assert documents[COLLECTION_PATH]["assets"]["stats"]["href"] == "../stats.json"
    assert documents[COLLECTION_PATH]["assets"]["stats"]["type"] == "application/json"
    assert core_errors(documents[COLLECTION_PATH]) == []
    # Every image has the bands stats.json describes, in its order: the image definition carries them.
    image_def = collection.item_assets["image"]
    bands = RasterExtension.ext(image_def).bands
    entries = written["stats"]["bands"]
    assert [b.name for b in EOExtension.ext(image_def).bands] == [e["description"] for e in entries]
    assert len(bands) == len(entries) == (30 if written["temporal"] == "stack" else 10)
    for band, entry in zip(bands, entries):
        assert band.nodata == 0 and band.data_type == "uint16"
        if entry["count"]:
            assert (band.statistics.mean, band.statistics.stddev) == (entry["mean"], entry["std"])
            assert (band.statistics.minimum, band.statistics.maximum) == (entry["min"], entry["max"])
        else:  # a date no train chip has: no statistics rather than made-up ones
            assert band.statistics is None
    assert RasterExtension.get_schema_uri() in documents[COLLECTION_PATH]["stac_extensions"]
    # Without statistics: no stats asset, no raster bands.
    records = list(written["records"].values())
    bare = build_catalog(records, dict(zip(written["index"]["name"], written["index"]["split"])))[COLLECTION_PATH]
    assert "stats" not in bare.get("assets", {}) and "raster:bands" not in bare["item_assets"]["image"]


def test_label_layers_of_old_and_unknown_records(written):
    record = copy.deepcopy(next(iter(written["records"].values())))
    record.pop("layers")  # a record of cropchips < 0.3: its mask is its only layer
    item = build_catalog([record], {record["name"]: "train"})[f"{ITEMS_DIR}/{record['name']}.json"]
    assert item["properties"]["cropchips:label_layers"] == ["classes"]
    assert set(item["assets"]) == {"image", "mask", "provenance"}
    assert item["assets"]["mask"]["href"] == f"../../{record['mask']}"
    record["layers"] = {"classes": record["mask"], "heights": "heights/x.tif"}
    with pytest.raises(ValueError, match="unknown label layer.*heights"):
        build_catalog([record], {record["name"]: "train"})
