"""A self-contained STAC catalog of the dataset: one collection, one label item per chip.

Each item has the image, one asset per label layer of the chip (``mask`` for the classes, and
``instances`` and ``boundaries`` when the spec made them; ``cropchips:label_layers`` lists them)
and the provenance sidecar. Given the train split's statistics (``stats.json``), the collection
links them as its ``stats`` asset and carries them as ``raster:bands`` statistics of its image
asset definition.

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
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension, Statistics
from pystac.utils import str_to_datetime

from cropchips.crs import transformer
from cropchips.errors import ConfigError
from cropchips.fields.classes import CLASS_NAMES, IGNORE_LABEL, LABEL_NAMES
from cropchips.sources import source_for
from cropchips.sources.sentinel2 import BANDS
from cropchips.spec import DEFAULT_COLLECTION, LABEL_LAYERS
from cropchips.output.storage import Storage, open_storage
from cropchips.raster.write import METADATA_DIR
from cropchips.dataset.stats import STATS_NAME

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
    "0 marks pixels outside any field, 255 pixels to ignore (a field whose crop is none of the classes, "
    "or no image data). Meant for training semantic segmentation models; the instances and boundaries "
    "layers, where present, serve field delineation.")
#: What the classes mask's 255 means (a loss function's ignore_index).
IGNORE_DESCRIPTION = "ignore: a field whose crop is none of the classes, or no image data"
MASK_DESCRIPTION = ("uint8 class per pixel: 0 = no field, 1..8 = crop classes, "
                    f"{IGNORE_LABEL} = ignore (a field whose crop is none of the classes, or no image data)")
INSTANCES_DESCRIPTION = "uint32 field id per pixel, unique within the chip; 0 = no field"
BOUNDARIES_DESCRIPTION = "uint8 per pixel: 0 = background, 1 = field interior, 2 = field boundary"
#: Values of the boundaries layer.
BOUNDARY_CLASSES: dict[int, str] = {0: "background", 1: "interior", 2: "boundary"}
#: Asset key of each label layer (the classes layer keeps the key it always had).
LAYER_ASSETS: dict[str, str] = {"classes": "mask", "instances": "instances", "boundaries": "boundaries"}
#: Title and description of each label layer's asset.
LAYER_TEXTS: dict[str, tuple[str, str]] = {"classes": ("Crop class mask", MASK_DESCRIPTION),
                                           "instances": ("Field instances", INSTANCES_DESCRIPTION),
                                           "boundaries": ("Field boundaries", BOUNDARIES_DESCRIPTION)}
STATS_TITLE = "Per-band pixel statistics of the train split"
LICENSE_NOTE = (
    "Images contain modified Copernicus Sentinel data (Sentinel data terms and conditions); "
    "masks are derived from EuroCrops, licensed CC-BY-4.0.")


def build_catalog(records: Sequence[dict[str, Any]], splits: Mapping[str, str], *,
                  collection_id: str = "cropchips", title: str | None = None, description: str | None = None,
                  created: datetime | None = None, stats: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The catalog's documents: relative POSIX path (from the output folder) -> JSON dict.

    ``records`` are chip provenance records (``metadata/*.json`` or the results topic), ``splits``
    maps chip name -> split for the chips the index keeps; other records are left out.
    ``created`` stamps the items (default: now, UTC). ``stats`` (what
    :func:`cropchips.dataset.stats.write_stats` wrote to ``stats.json``) adds the collection's
    ``stats`` asset and the image bands' statistics.
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
    collection = _collection(collection_id, title, description, items, stats)
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
    """The classes mask's values: 0 (no field), the crop classes, and 255, which is nodata-like
    (the ignore index: nothing to learn there)."""
    classes = [Classification.create(value=value, name=name, title=name.replace("_", " ").capitalize(),
                                     description="no field" if value == 0 else None,
                                     count=None if counts is None else int(counts.get(str(value), 0)))
               for value, name in sorted(CLASS_NAMES.items())]
    classes.append(Classification.create(value=IGNORE_LABEL, name=LABEL_NAMES[IGNORE_LABEL], title="Ignore",
                                         description=IGNORE_DESCRIPTION, nodata=True,
                                         count=None if counts is None else int(counts.get(str(IGNORE_LABEL), 0))))
    return classes


def _boundary_classes() -> list[Classification]:
    return [Classification.create(value=value, name=name, title=name.capitalize())
            for value, name in BOUNDARY_CLASSES.items()]


def _label_classes() -> list[LabelClasses]:
    # Raster labels: no feature property holds the class, so "name" is null (label extension).
    # Every value the classes mask holds is listed, 255 (ignore) too; classification:classes marks it nodata.
    return [LabelClasses.create(classes=[*sorted(CLASS_NAMES), IGNORE_LABEL], name=None)]


def label_layers(record: Mapping[str, Any]) -> dict[str, str]:
    """Label layer -> file (relative to the output folder) of a chip, in LABEL_LAYERS order; a record
    of cropchips < 0.3 has only its mask, the classes layer."""
    layers = dict(record.get("layers") or {})
    layers.setdefault("classes", record["mask"])
    unknown = sorted(set(layers) - set(LABEL_LAYERS))
    if unknown:
        raise ValueError(f"chip {record['name']}: unknown label layer(s) {unknown} in its record; "
                         f"a chip's layers are {', '.join(LABEL_LAYERS)} (a newer cropchips wrote it?)")
    return {layer: layers[layer] for layer in LABEL_LAYERS if layer in layers}


def _add_label_asset(item: pystac.Item, layer: str, href: str, media_type: str,
                     counts: Mapping[str, int] | None) -> None:
    """The layer's asset on ``item`` (key LAYER_ASSETS[layer]), with its classes where it has some."""
    title, text = LAYER_TEXTS[layer]
    asset = pystac.Asset(href=href, title=title, media_type=media_type, roles=["labels", "labels-raster"],
                         description=text)
    item.add_asset(LAYER_ASSETS[layer], asset)  # before the extension: it is declared on the asset's owner
    if layer == "classes":
        ClassificationExtension.ext(asset, add_if_missing=True).classes = _classifications(counts or {})
    elif layer == "boundaries":
        ClassificationExtension.ext(asset, add_if_missing=True).classes = _boundary_classes()


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
    to_lonlat = transformer(crs, "EPSG:4326")
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

    layers = label_layers(record)
    item.properties["cropchips:label_layers"] = list(layers)
    for layer, rel in layers.items():
        _add_label_asset(item, layer, f"{_VIRTUAL_ROOT}/{rel}", _media_type(record), record.get("class_pixels", {}))

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
                items: Sequence[pystac.Item], stats: Mapping[str, Any] | None = None) -> pystac.Collection:
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
                     "(0 no field, 8 crop classes, 255 ignore) from EuroCrops, split spatially into "
                     "train/val/test.")
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
    collection.summaries.add("cropchips:label_layers",
                             [layer for layer in LABEL_LAYERS
                              if any(layer in item.properties["cropchips:label_layers"] for item in items)])
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
    band_names = band_lists.pop() if len(band_lists) == 1 else None
    if band_names is not None:
        EOExtension.ext(image_def, add_if_missing=True).bands = eo_bands(band_names)
    if stats:
        _add_stats(collection, image_def, stats, band_names)
    mask_def = pystac.ItemAssetDefinition.create(
        title=LAYER_TEXTS["classes"][0], description=LAYER_TEXTS["classes"][1],
        media_type=mask_types.pop() if len(mask_types) == 1 else None,
        roles=["labels", "labels-raster"])
    mask_def.set_owner(collection)
    ClassificationExtension.ext(mask_def, add_if_missing=True).classes = _classifications()
    definitions = {"image": image_def, "mask": mask_def}
    for layer in ("instances", "boundaries"):
        title, text = LAYER_TEXTS[layer]
        with_layer = [item for item in items if LAYER_ASSETS[layer] in item.assets]
        if not with_layer:
            continue
        types = {item.assets[LAYER_ASSETS[layer]].media_type for item in with_layer}
        definition = pystac.ItemAssetDefinition.create(title=title, description=text,
                                                       media_type=types.pop() if len(types) == 1 else None,
                                                       roles=["labels", "labels-raster"])
        definition.set_owner(collection)
        if layer == "boundaries":
            ClassificationExtension.ext(definition, add_if_missing=True).classes = _boundary_classes()
        definitions[LAYER_ASSETS[layer]] = definition
    definitions["provenance"] = pystac.ItemAssetDefinition.create(
        title="Provenance record written by the worker", description=None,
        media_type=str(pystac.MediaType.JSON), roles=["metadata"])
    collection.item_assets = definitions
    return collection


def _add_stats(collection: pystac.Collection, image_def: pystac.ItemAssetDefinition, stats: Mapping[str, Any],
               band_names: tuple[str, ...] | None) -> None:
    """Link ``stats.json`` from the collection; where every item's image has the bands the statistics
    describe, in that order, give the image definition one ``raster:bands`` entry per band with them."""
    split, chips = stats.get("split", "train"), stats.get("chips")
    collection.add_asset("stats", pystac.Asset(
        href=f"{_VIRTUAL_ROOT}/{STATS_NAME}", title=STATS_TITLE, media_type=str(pystac.MediaType.JSON),
        roles=["metadata"],
        description=f"Count, mean, std, 2nd and 98th percentiles of the valid pixels of each image band (per "
                    f"date for a time series), over the {chips} chips of the {split} split: the normalisation "
                    "of a model's inputs."))
    entries = {entry["description"]: entry for entry in stats.get("bands", ())}
    if band_names is None or list(band_names) != list(entries):
        log.info("the images' bands differ between chips or from the statistics' bands; stats.json is linked "
                 "but the image definition carries no per-band statistics")
        return
    bands = []
    for name in band_names:
        entry = entries[name]
        statistics = None
        if entry.get("count"):
            statistics = Statistics.create(minimum=entry["min"], maximum=entry["max"], mean=entry["mean"],
                                           stddev=entry["std"])
        bands.append(RasterBand.create(nodata=0, data_type=DataType.UINT16, statistics=statistics))
    RasterExtension.ext(image_def, add_if_missing=True).bands = bands
