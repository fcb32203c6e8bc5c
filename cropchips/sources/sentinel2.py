"""Sentinel-2 L2A on Earth Search (``sentinel-2-l2a``, ``sentinel-2-c1-l2a``): the first source.

Items: Earth Search v1 names the assets blue ... swir22 and scl (:data:`EARTH_SEARCH_KEYS`); the
``-jp2`` duplicates are never used. Quality: the scene classification layer (SCL), 0 = no data,
4/5/6 (vegetation, bare soil, water) clear by default. Radiometry, from the radiometry notes:

Radiometric consistency: the -1000 DN offset of Sentinel-2 processing baseline 04.00 and later.

From 2022-01-25 (processing baseline 04.00) L2A reflectance is stored as
``DN = reflectance * 10000 + 1000`` (BOA_ADD_OFFSET = -1000); before, ``DN = reflectance * 10000``.
STAC items say so in ``raster:bands`` (``offset: -0.1`` with ``scale: 0.0001``), but Earth
Search's metadata has not always agreed with the baseline (earth-search issues #66, #71), so
the baseline decides when it is known and the metadata only when it is not.

Harmonising moves every scene to the pre-2022 convention, so a composite or a time series
never mixes the two: ``DN - 1000``, clipped at 1 (0 stays nodata; nothing wraps around).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from cropchips.errors import InputDataError
from cropchips.queue.messages import MessageError, Scene
from cropchips.sources.stac import item_datetime, item_epsg
from cropchips.sources.base import SceneRadiometry, Source

log = logging.getLogger(__name__)

#: The spectral bands of the image chips, in this order.
BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12")
#: The scene classification layer, the quality band.
SCL = "SCL"
#: Every asset a scene carries: the bands, then SCL.
SCENE_ASSETS: tuple[str, ...] = (*BANDS, SCL)

#: Earth Search v1 asset keys (``sentinel-2-l2a`` and ``sentinel-2-c1-l2a``) for each band.
EARTH_SEARCH_KEYS: dict[str, str] = {
    "B02": "blue", "B03": "green", "B04": "red", "B08": "nir",
    "B05": "rededge1", "B06": "rededge2", "B07": "rededge3", "B8A": "nir08",
    "B11": "swir16", "B12": "swir22", "SCL": "scl",
}


#: The DN offset of processing baseline >= 04.00.
BOA_OFFSET_DN = 1000
FIRST_OFFSET_BASELINE = (4, 0)


def parse_baseline(text: str | None) -> tuple[int, int] | None:
    """``"05.09"`` -> (5, 9); None or junk -> None."""
    if not text:
        return None
    try:
        major, _, minor = str(text).strip().partition(".")
        return int(major), int(minor or 0)
    except ValueError:
        return None


def scene_offset_dn(scene: Scene) -> int:
    """The scene's DN offset: from the processing baseline when known, else from the metadata."""
    baseline = parse_baseline(scene.processing_baseline)
    offsets = {scene.offsets[b] for b in BANDS if b in scene.offsets}
    from_metadata = None
    if offsets:
        value = min(offsets)  # all reflectance bands share it in practice
        from_metadata = BOA_OFFSET_DN if value <= -0.05 else 0
    if baseline is not None:
        decided = BOA_OFFSET_DN if baseline >= FIRST_OFFSET_BASELINE else 0
        if from_metadata is not None and from_metadata != decided:
            log.warning("scene %s: baseline %s implies a %d DN offset but raster:bands says %s; "
                        "trusting the baseline", scene.id, scene.processing_baseline, decided, sorted(offsets))
        return decided
    return from_metadata or 0


def radiometry(scene: Scene, harmonize: bool) -> SceneRadiometry:
    offset = scene_offset_dn(scene)
    published = min((scene.offsets[b] for b in BANDS if b in scene.offsets), default=None)
    return SceneRadiometry(scene_id=scene.id, processing_baseline=scene.processing_baseline,
                           published_offset=published, offset_dn=offset, applied_dn=offset if harmonize else 0)


def _asset(item: dict[str, Any], band: str) -> dict[str, Any] | None:
    assets = item.get("assets", {})
    # Earth Search names (blue, ..., scl) first, then the band names some catalogues use.
    # Keys ending in -jp2 (JPEG2000 duplicates in sentinel-2-l2a) are never used.
    for key in (EARTH_SEARCH_KEYS[band], band, band.lower()):
        if key in assets:
            return assets[key]
    return None


def scene_from_item(item: dict[str, Any]) -> Scene:
    """Normalise an Earth Search-shaped STAC item (dict) to a :class:`Scene`."""
    item_id = item.get("id")
    assets: dict[str, str] = {}
    offsets: dict[str, float] = {}
    missing = []
    for band in (*BANDS, SCL):
        asset = _asset(item, band)
        if asset is None or not asset.get("href"):
            missing.append(EARTH_SEARCH_KEYS[band])
            continue
        assets[band] = asset["href"]
        bands = asset.get("raster:bands") or []
        if bands and isinstance(bands[0], dict) and bands[0].get("offset") is not None:
            offsets[band] = float(bands[0]["offset"])
    if missing:
        raise InputDataError(f"item {item_id!r} lacks assets {missing}; is it a Sentinel-2 L2A item?")
    props = item.get("properties", {})
    try:
        return Scene(
            id=str(item_id), collection=str(item.get("collection") or ""), datetime=item_datetime(item).isoformat().replace("+00:00", "Z"),
            cloud_cover=props.get("eo:cloud_cover"), epsg=item_epsg(item), assets=assets,
            bbox=tuple(item["bbox"]) if item.get("bbox") else None,
            processing_baseline=props.get("s2:processing_baseline"), offsets=offsets,
            item_href=next((link.get("href") for link in item.get("links", [])
                            if isinstance(link, dict) and link.get("rel") == "self"), None))
    except MessageError as exc:
        raise InputDataError(f"item {item_id!r} cannot be used: {exc}") from exc


class Sentinel2L2A(Source):
    """Sentinel-2 L2A surface reflectance, 10 bands at 10/20 m and SCL, from Earth Search v1."""

    collections: ClassVar[tuple[str, ...]] = ("sentinel-2-l2a", "sentinel-2-c1-l2a")
    bands = BANDS
    resolutions: ClassVar[Mapping[str, float]] = {
        **dict.fromkeys(("B02", "B03", "B04", "B08"), 10.0),
        **dict.fromkeys(("B05", "B06", "B07", "B8A", "B11", "B12", SCL), 20.0)}
    quality_band = SCL
    quality_classes = range(12)
    default_clear_classes = (4, 5, 6)
    #: SCL 3 cloud shadow, 8 cloud medium probability, 9 cloud high probability, 10 thin cirrus.
    cloud_classes = (3, 8, 9, 10)
    origin_band = "B02"
    constellation = "sentinel-2"
    instruments = ("msi",)

    def scene_from_item(self, item: Mapping[str, Any]) -> Scene:
        return scene_from_item(item)

    def radiometry(self, scene: Scene, harmonize: bool) -> SceneRadiometry:
        return radiometry(scene, harmonize)
