"""A self-contained STAC catalog of the dataset: one collection, one label item per chip.

:func:`build_catalog` is pure: it returns the JSON documents (relative path -> dict), so the
caller decides where they go (a local folder with :func:`write_catalog`, or object storage).
All links and asset hrefs are relative, so the catalog can be moved or copied as a whole.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pystac
import shapely
from pyproj import Transformer
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.utils import str_to_datetime

from cropchips.errors import ConfigError
from cropchips.fields.classes import CLASS_NAMES
from cropchips.sources import source_for
from cropchips.sources.sentinel2 import BANDS
from cropchips.spec import DEFAULT_COLLECTION
from cropchips.output.storage import Storage, open_storage
from cropchips.raster.write import METADATA_DIR

with warnings.catch_warnings():
    # pystac flags the label extension as unmaintained ("pilot"); it is still the one STAC
    # extension that says "this item is training labels", which is what this catalog is for.
    warnings.simplefilter("ignore", DeprecationWarning)
    from pystac.extensions.label import LabelClasses, LabelExtension, LabelTask, LabelType

log = logging.getLogger(__name__)

CATALOG_NAME = "catalog.json"
STAC_DIR = "stac"
COLLECTION_PATH = f"{STAC_DIR}/collection.json"
ITEMS_DIR = f"{STAC_DIR}/items"

# Hrefs are laid out under this made-up root, then made relative; a URL (not a local path)
# so that scenes' local item paths are never mistaken for files of the catalog.
_VIRTUAL_ROOT = "https://cropchips.invalid/dataset"

#: Sentinel-2 MSI band -> (common name, centre wavelength um, full width at half maximum um),
#: as Earth Search publishes them (the common names are those of the eo extension).
S2_BANDS: dict[str, tuple[str, float, float]] = {
    "B02": ("blue", 0.49, 0.098),
    "B03": ("green", 0.56, 0.045),
    "B04": ("red", 0.665, 0.038),
    "B05": ("rededge", 0.704, 0.019),
    "B06": ("rededge", 0.74, 0.018),
    "B07": ("rededge", 0.783, 0.028),
    "B08": ("nir", 0.842, 0.145),
    "B8A": ("nir08", 0.865, 0.033),
    "B11": ("swir16", 1.61, 0.143),
    "B12": ("swir22", 2.19, 0.242),
}

SENTINEL_TERMS_URL = "https://sentinels.copernicus.eu/documents/247904/690755/Sentinel_Data_Legal_Notice"
CC_BY_4_URL = "https://creativecommons.org/licenses/by/4.0/"
EUROCROPS_URL = "https://github.com/maja601/EuroCrops"

LABEL_DESCRIPTION = (
    "Crop class per pixel, rasterised from EuroCrops field polygons (HCAT3 codes mapped to 8 classes); "
    "0 marks pixels outside any mapped field. Meant for training semantic segmentation models.")
LICENSE_NOTE = (
    "Images contain modified Copernicus Sentinel data (Sentinel data terms and conditions); "
    "masks are derived from EuroCrops, licensed CC-BY-4.0.")


def build_catalog(records: Sequence[dict[str, Any]], splits: Mapping[str, str], *,
                  collection_id: str = "cropchips", title: str | None = None, description: str | None = None,
                  created: datetime | None = None) -> dict[str, dict[str, Any]]:
    """The catalog's documents: relative POSIX path (from the output folder) -> JSON dict.

    ``records`` are chip provenance records (``metadata/*.json`` or the results topic), ``splits``
    maps chip name -> split for the chips the index keeps; other records are left out.
    ``created`` stamps the items (default: now, UTC).
    """
    created = created or datetime.now(timezone.utc)
    chosen: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["name"] in splits:
            if record["name"] in chosen:
                log.warning("chip %s appears twice in the records; the catalog keeps the last one", record["name"])
            chosen[record["name"]] = record
    missing = sorted(set(splits) - set(chosen))
    if missing:
        log.warning("%d chips of the index have no record and are left out of the catalog (e.g. %s)",
                    len(missing), missing[0])

    root = pystac.Catalog(id=f"{collection_id}-catalog", title=title,
                          description=description or f"STAC catalog of the {collection_id} crop-type chip dataset.",
                          catalog_type=pystac.CatalogType.SELF_CONTAINED)
    items = [_item(chosen[name], splits[name], created) for name in sorted(chosen)]
    collection = _collection(collection_id, title, description, items)
    root.add_child(collection)
    collection.add_items(items)

    root.set_self_href(f"{_VIRTUAL_ROOT}/{CATALOG_NAME}")
    collection.set_self_href(f"{_VIRTUAL_ROOT}/{COLLECTION_PATH}")
    for item in items:
        item.set_self_href(f"{_VIRTUAL_ROOT}/{ITEMS_DIR}/{item.id}.json")
    root.make_all_asset_hrefs_relative()

    documents = {CATALOG_NAME: root.to_dict(include_self_link=False, transform_hrefs=True),
                 COLLECTION_PATH: collection.to_dict(include_self_link=False, transform_hrefs=True)}
    for item in items:
        documents[f"{ITEMS_DIR}/{item.id}.json"] = item.to_dict(include_self_link=False, transform_hrefs=True)
    leaked = [path for path, doc in documents.items() if _VIRTUAL_ROOT in json.dumps(doc)]
    if leaked:  # a bug here, not in the data: never publish the made-up root
        raise RuntimeError(f"catalog documents {leaked[:3]} still hold absolute placeholder hrefs")
    return documents


def write_catalog(output: Storage | Path | str, documents: Mapping[str, dict[str, Any]]) -> Path | str:
    """Publish ``documents`` (each whole), items first and ``catalog.json`` last (a reader never
    finds a link to a file not yet written); then delete items no longer in the catalog.
    Returns where ``catalog.json`` is."""
    storage = open_storage(output)
    for rel in documents:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"catalog document path {rel!r} must be relative to the output folder, without '..'")
    for rel in sorted(documents, key=lambda path: (path == CATALOG_NAME, path == COLLECTION_PATH, path)):
        storage.write_bytes(rel, json.dumps(documents[rel], indent=1, ensure_ascii=False).encode("utf-8"))
    keep = {rel for rel in documents if rel.startswith(f"{ITEMS_DIR}/")}
    stale = [rel for rel in storage.list(ITEMS_DIR) if rel.endswith(".json") and rel not in keep]
    for rel in stale:
        storage.delete(rel)
    log.info("STAC catalog %s: %d items written, %d stale items removed", storage.url(CATALOG_NAME),
             len(keep), len(stale))
    return Path(storage.url(CATALOG_NAME)) if storage.is_local else storage.url(CATALOG_NAME)


def _platform(scenes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``constellation`` and ``instruments`` of a chip, from the source of its scenes' collection (none if no
    registered source reads it)."""
    try:
        source = source_for(str(scenes[0].get("collection") or DEFAULT_COLLECTION))
    except ConfigError:
        return {}
    return {"constellation": source.constellation, "instruments": list(source.instruments)}


def eo_bands(descriptions: Sequence[str]) -> list[Band]:
    """One eo band per file band, named as the file's description (``B02`` or ``2023-05-20 B02``)."""
    bands = []
    for text in descriptions:
        spec = S2_BANDS.get(text.rsplit(" ", 1)[-1])
        if spec is None:
            bands.append(Band.create(name=text))
        else:
            common, centre, fwhm = spec
            bands.append(Band.create(name=text, common_name=common, center_wavelength=centre,
                                     full_width_half_max=fwhm))
    return bands


def _classifications(counts: Mapping[str, int] | None = None) -> list[Classification]:
    return [Classification.create(value=value, name=name, title=name.replace("_", " ").capitalize(),
                                  nodata=True if value == 0 else None,
                                  count=None if counts is None else int(counts.get(str(value), 0)))
            for value, name in sorted(CLASS_NAMES.items())]


def _label_classes() -> list[LabelClasses]:
    # Raster labels: no feature property holds the class, so "name" is null (label extension).
    return [LabelClasses.create(classes=sorted(CLASS_NAMES), name=None)]


def _media_type(record: Mapping[str, Any]) -> str:
    return str(pystac.MediaType.COG if record.get("format") == "cog" else pystac.MediaType.GEOTIFF)


def _grid(record: Mapping[str, Any]) -> tuple[list[int], list[float]]:
    """(shape [rows, cols], transform) of the chip, from its bounds and resolution."""
    left, bottom, right, top = record["bounds"]
    if not record.get("resolution"):
        raise ValueError(f"chip {record['name']}: its record lacks its resolution; "
                         "rebuild it from metadata/ sidecars written by this version of the workers")
    res = float(record["resolution"])
    shape = [round((top - bottom) / res), round((right - left) / res)]
    return shape, [res, 0.0, left, 0.0, -res, top]


def _footprint(crs: str, bounds: Sequence[float], segments_per_edge: int = 4) -> shapely.Polygon:
    """The chip's outline in EPSG:4326, each edge densified (UTM edges are not straight in lon/lat)."""
    left, bottom, right, top = bounds
    box = shapely.box(left, bottom, right, top)
    ring = shapely.segmentize(box, max_segment_length=max(right - left, top - bottom) / segments_per_edge).exterior
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    x, y = to_lonlat.transform(*zip(*ring.coords))
    # 1e-9 degree is 0.1 mm: rounding only trims the JSON. GeoJSON (RFC 7946) rings run counter-clockwise.
    polygon = shapely.Polygon([(round(a, 9), round(b, 9)) for a, b in zip(x, y)])
    return shapely.geometry.polygon.orient(polygon, 1.0)


def _item(record: Mapping[str, Any], split: str, created: datetime) -> pystac.Item:
    name, scenes = record["name"], record.get("scenes") or ()
    if not scenes:
        raise ValueError(f"chip {name} lists no scenes, so it has no acquisition time; "
                         "its provenance record is incomplete (rebuild it from metadata/)")
    times = sorted(str_to_datetime(s["datetime"]) for s in scenes)
    footprint = _footprint(record["crs"], record["bounds"])
    properties: dict[str, Any] = {
        "split": split,
        **_platform(scenes),
        "cropchips:cell_id": record.get("cell_id", ""),
        "cropchips:method": record.get("method", ""),
        "cropchips:dataset_id": record.get("dataset_id", ""),
        "cropchips:clear_fraction": record.get("clear_fraction"),
        "cropchips:nodata_fraction": record.get("nodata_fraction"),
        "cropchips:scene_ids": [s["id"] for s in scenes],
        "cropchips:class_pixels": {str(k): int(v) for k, v in sorted(record.get("class_pixels", {}).items(),
                                                                     key=lambda kv: int(kv[0]))},
        "cropchips:software": f"cropchips {record.get('software', '')}".strip(),
    }
    if record.get("resolution"):
        properties["gsd"] = float(record["resolution"])
    one_time = len(set(times)) == 1
    geometry = json.loads(json.dumps(shapely.geometry.mapping(footprint)))  # GeoJSON arrays, not tuples
    item = pystac.Item(id=name, geometry=geometry, bbox=list(footprint.bounds),
                       datetime=times[0] if one_time else None, properties=properties,
                       start_datetime=None if one_time else times[0], end_datetime=None if one_time else times[-1])
    item.common_metadata.created = created

    shape, transform = _grid(record)
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=record["crs"], bbox=list(record["bounds"]), shape=shape, transform=transform)

    method = record.get("method", "")
    made = "Time stack of the scenes, 10 bands per date" if method == "stack" else f"{method} composite of the scenes"
    image = pystac.Asset(href=f"{_VIRTUAL_ROOT}/{record['image']}", title="Sentinel-2 L2A surface reflectance",
                         media_type=_media_type(record), roles=["data"], description=f"{made}; uint16 DN, 0 = no data")
    item.add_asset("image", image)
    EOExtension.ext(image, add_if_missing=True).bands = eo_bands(record.get("bands") or BANDS)

    mask = pystac.Asset(href=f"{_VIRTUAL_ROOT}/{record['mask']}", title="Crop class mask",
                        media_type=_media_type(record), roles=["labels", "labels-raster"],
                        description="uint8 class per pixel, 0 = unlabelled")
    item.add_asset("mask", mask)
    ClassificationExtension.ext(mask, add_if_missing=True).classes = _classifications(record.get("class_pixels", {}))

    item.add_asset("provenance", pystac.Asset(
        href=f"{_VIRTUAL_ROOT}/{METADATA_DIR}/{name}.json", title="Provenance record written by the worker",
        media_type=str(pystac.MediaType.JSON), roles=["metadata"]))

    LabelExtension.ext(item, add_if_missing=True).apply(
        label_description=LABEL_DESCRIPTION, label_type=LabelType.RASTER, label_properties=None,
        label_classes=_label_classes(), label_tasks=[LabelTask.SEGMENTATION, LabelTask.CLASSIFICATION],
        label_methods=["automated"])

    for scene in scenes:
        if scene.get("item_href"):
            item.add_link(pystac.Link(rel=pystac.RelType.DERIVED_FROM, target=scene["item_href"],
                                      media_type=pystac.MediaType.GEOJSON, title=scene["id"]))
    return item


def _collection(collection_id: str, title: str | None, description: str | None,
                items: Sequence[pystac.Item]) -> pystac.Collection:
    if items:
        boxes = [item.bbox for item in items]
        bbox = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        starts = [item.common_metadata.start_datetime or item.datetime for item in items]
        ends = [item.common_metadata.end_datetime or item.datetime for item in items]
        interval: list[datetime | None] = [min(starts), max(ends)]
    else:
        log.warning("no chips to catalog: the collection %s is empty", collection_id)
        bbox, interval = [-180.0, -90.0, 180.0, 90.0], [None, None]
    collection = pystac.Collection(
        id=collection_id, title=title or "Crop-type chips from Sentinel-2 and EuroCrops",
        description=(description or "Sentinel-2 L2A image chips (10 bands) with per-pixel crop class masks "
                     "(0 unlabelled + 8 crop classes) from EuroCrops, split spatially into train/val/test.")
        + " " + LICENSE_NOTE,
        extent=pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([interval])),
        license="other",
        keywords=["sentinel-2", "eurocrops", "crop type", "agriculture", "land cover",
                  "semantic segmentation", "machine learning", "training data"],
        providers=[
            pystac.Provider("ESA / Copernicus", roles=[pystac.ProviderRole.LICENSOR, pystac.ProviderRole.PRODUCER],
                            url="https://sentinels.copernicus.eu",
                            description="Sentinel-2 L2A imagery; modified Copernicus Sentinel data, "
                                        "Sentinel data terms and conditions."),
            pystac.Provider("EuroCrops", roles=[pystac.ProviderRole.LICENSOR, pystac.ProviderRole.PRODUCER],
                            url=EUROCROPS_URL,
                            description="Harmonised crop field polygons (HCAT3), licensed CC-BY-4.0."),
            pystac.Provider("cropchips", roles=[pystac.ProviderRole.PROCESSOR],
                            description="Cloud-masked composites or time stacks, chipping, class rasterisation."),
        ],
    )
    collection.add_link(pystac.Link(rel=pystac.RelType.LICENSE, target=SENTINEL_TERMS_URL, media_type="text/html",
                                    title="Copernicus Sentinel data terms and conditions (images)"))
    collection.add_link(pystac.Link(rel=pystac.RelType.LICENSE, target=CC_BY_4_URL, media_type="text/html",
                                    title="CC-BY-4.0 (EuroCrops, the source of the masks)"))

    collection.summaries.add("split", sorted({item.properties["split"] for item in items}))
    collection.summaries.add("constellation", sorted({item.properties["constellation"] for item in items
                                                      if "constellation" in item.properties}))
    collection.summaries.add("instruments", sorted({name for item in items
                                                    for name in item.properties.get("instruments", ())}))
    collection.summaries.add("cropchips:method", sorted({item.properties["cropchips:method"] for item in items}))
    # The dataset spec(s) the chips were made with: OUTPUT/dataset.yaml holds the folder's.
    collection.summaries.add("cropchips:dataset_id",
                             sorted({item.properties["cropchips:dataset_id"] for item in items}))
    if any("gsd" in item.properties for item in items):
        collection.summaries.add("gsd", sorted({item.properties["gsd"] for item in items if "gsd" in item.properties}))
    EOExtension.summaries(collection, add_if_missing=True).bands = eo_bands(BANDS)
    ProjectionExtension.summaries(collection, add_if_missing=True).code = sorted(
        {ProjectionExtension.ext(item).code for item in items})
    label_summaries = LabelExtension.summaries(collection, add_if_missing=True)
    label_summaries.label_type = [LabelType.RASTER]
    label_summaries.label_classes = _label_classes()
    label_summaries.label_tasks = [LabelTask.SEGMENTATION, LabelTask.CLASSIFICATION]
    ClassificationExtension.summaries(collection, add_if_missing=True).classes = _classifications()

    image_types = {item.assets["image"].media_type for item in items}
    mask_types = {item.assets["mask"].media_type for item in items}
    band_lists = {tuple(b.name for b in EOExtension.ext(item.assets["image"]).bands or ()) for item in items}
    image_def = pystac.ItemAssetDefinition.create(
        title="Sentinel-2 L2A surface reflectance", description="uint16 DN, 0 = no data",
        media_type=image_types.pop() if len(image_types) == 1 else None, roles=["data"])
    image_def.set_owner(collection)
    if len(band_lists) == 1:
        EOExtension.ext(image_def, add_if_missing=True).bands = eo_bands(band_lists.pop())
    mask_def = pystac.ItemAssetDefinition.create(
        title="Crop class mask", description="uint8 class per pixel, 0 = unlabelled",
        media_type=mask_types.pop() if len(mask_types) == 1 else None,
        roles=["labels", "labels-raster"])
    mask_def.set_owner(collection)
    ClassificationExtension.ext(mask_def, add_if_missing=True).classes = _classifications()
    collection.item_assets = {"image": image_def, "mask": mask_def,
                              "provenance": pystac.ItemAssetDefinition.create(
                                  title="Provenance record written by the worker", description=None,
                                  media_type=str(pystac.MediaType.JSON), roles=["metadata"])}
    return collection
