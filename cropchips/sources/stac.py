"""Scene search: STAC items from an API (one search per grid) or a local items file, and their footprints.

What an item of a collection *means* (its band assets, its radiometry) is its source's business
(:mod:`cropchips.sources`); this module only finds items, filters them and matches them to cells.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import shapely
from shapely.geometry import box, shape

from cropchips.errors import ConfigError, InputDataError, SceneSearchError
from cropchips.queue.messages import Cell, Scene

if TYPE_CHECKING:
    from cropchips.sources.base import Source

log = logging.getLogger(__name__)

#: The seed's STAC API: Earth Search v1.
DEFAULT_STAC_API = "https://earth-search.aws.element84.com/v1"

# --------------------------------------------------------------------------- datetime


def parse_datetime_range(text: str) -> tuple[datetime | None, datetime | None]:
    """Parse ``start/end`` (dates or ISO datetimes, ``..`` for open) or a single date.

    A date-only end is inclusive (the whole day). Raises ConfigError with an example.
    """
    def one(part: str, end: bool) -> datetime | None:
        part = part.strip()
        if part in ("", ".."):
            return None
        try:
            if len(part) == 10:
                day = datetime.strptime(part, "%Y-%m-%d").date()
                return datetime.combine(day, time.max if end else time.min, tzinfo=timezone.utc)
            value = datetime.fromisoformat(part.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"--datetime {text!r}: {part!r} is not a date; use YYYY-MM-DD/YYYY-MM-DD, "
                              "e.g. 2023-05-15/2023-06-30 (ISO datetimes and '..' for an open end work too)") from None
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)

    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--datetime is empty; use e.g. 2023-05-15/2023-06-30")
    parts = text.split("/")
    if len(parts) == 1:
        return one(parts[0], False), one(parts[0], True)
    if len(parts) != 2:
        raise ConfigError(f"--datetime {text!r} has more than one '/'; use START/END, e.g. 2023-05-15/2023-06-30")
    start, end = one(parts[0], False), one(parts[1], True)
    if start is None and end is None:
        raise ConfigError("--datetime '../..' selects everything; give at least one end")
    if start and end and start > end:
        raise ConfigError(f"--datetime {text!r}: start is after end")
    return start, end


def item_datetime(item: dict[str, Any]) -> datetime:
    props = item.get("properties", {})
    raw = props.get("datetime") or props.get("start_datetime")
    if not raw:
        raise InputDataError(f"item {item.get('id')!r} has no datetime")
    value = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------- items -> scenes


def item_epsg(item: dict[str, Any]) -> int:
    """The item's EPSG code from ``proj:epsg`` or ``proj:code`` (item or asset level)."""
    places = [item.get("properties", {})] + [a for a in item.get("assets", {}).values() if isinstance(a, dict)]
    for place in places:
        if place.get("proj:epsg"):
            return int(place["proj:epsg"])
        code = place.get("proj:code")
        if isinstance(code, str) and code.upper().startswith("EPSG:"):
            return int(code.split(":", 1)[1])
    raise InputDataError(f"item {item.get('id')!r} has neither proj:epsg nor proj:code; cannot tell its UTM zone")


def footprint(item: dict[str, Any]) -> shapely.Geometry:
    if item.get("geometry"):
        return shape(item["geometry"])
    bbox = item.get("bbox")
    if bbox:
        # A 3-D bbox is (minx, miny, minz, maxx, maxy, maxz).
        return box(bbox[0], bbox[1], bbox[3], bbox[4]) if len(bbox) == 6 else box(*bbox)
    raise InputDataError(f"item {item.get('id')!r} has no geometry or bbox")


@dataclass(frozen=True)
class SceneFootprint:
    """A scene and its footprint polygon (EPSG:4326), for cell intersection."""

    scene: Scene
    geometry: shapely.Geometry


def to_scenes(items: Iterable[dict[str, Any]], source: Source) -> list[SceneFootprint]:
    """The items as ``source``'s scenes with their footprints, oldest first."""
    out = [SceneFootprint(source.scene_from_item(item), footprint(item)) for item in items]
    out.sort(key=lambda s: (s.scene.datetime, s.scene.id))
    return out


def scenes_for_cell(cell: Cell, scenes: Sequence[SceneFootprint]) -> list[Scene]:
    """Scenes whose footprint intersects the cell, oldest first."""
    cell_box = box(*cell.bbox)
    return [s.scene for s in scenes if s.geometry.intersects(cell_box)]


# --------------------------------------------------------------------------- search


def filter_items(items: Iterable[dict[str, Any]], *, collection: str | None, bbox: Sequence[float],
                 datetime_range: str, max_cloud: float) -> list[dict[str, Any]]:
    """Apply the STAC search's filters locally (for ``--stac-items``)."""
    start, end = parse_datetime_range(datetime_range)
    area = box(*bbox)
    kept = []
    for item in items:
        if collection and item.get("collection") not in (None, collection):
            continue
        when = item_datetime(item)
        if (start and when < start) or (end and when > end):
            continue
        cloud = item.get("properties", {}).get("eo:cloud_cover")
        if cloud is not None and not float(cloud) < max_cloud:
            continue
        if not footprint(item).intersects(area):
            continue
        kept.append(item)
    return kept


def load_items_file(path: str | Path) -> list[dict[str, Any]]:
    """Items of a local STAC ItemCollection / FeatureCollection JSON (or a single Item)."""
    p = Path(path)
    if not p.exists():
        raise InputDataError(f"STAC items file not found: {p}")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(f"cannot read STAC items from {p}: {exc}") from exc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        items = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        items = [doc]
    elif isinstance(doc, list):
        items = doc
    else:
        raise InputDataError(f"{p} is not a STAC ItemCollection/FeatureCollection (type {doc.get('type') if isinstance(doc, dict) else type(doc).__name__})")
    return [i for i in items if isinstance(i, dict)]


def search_stac(api_url: str, *, collection: str, bbox: Sequence[float], datetime_range: str, max_cloud: float,
                timeout: float = 60.0, page_size: int = 100, backoff_factor: float = 1.0) -> list[dict[str, Any]]:
    """One paginated search for the whole grid; HTTP retries are left to pystac-client (urllib3 Retry).

    ``backoff_factor`` scales the sleep between retries (0, 2, 4, 8, 16 s at the default 1.0).
    """
    from pystac_client import Client
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    parse_datetime_range(datetime_range)  # fail early with a readable message
    # Retries with exponential backoff for 5xx and throttling answers, a bounded number of times.
    # A refused connection is retried less: an unreachable API should fail fast with a clear message.
    retry = Retry(total=5, connect=2, backoff_factor=backoff_factor, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None, respect_retry_after_header=True)
    try:
        client = Client.open(api_url, stac_io=StacApiIO(max_retries=retry, timeout=timeout))
        search = client.search(collections=[collection], bbox=list(bbox), datetime=datetime_range,
                               query={"eo:cloud_cover": {"lt": max_cloud}}, limit=page_size)
        items = list(search.items_as_dicts())
    except Exception as exc:  # APIError (also wraps connection errors), requests/urllib3 errors, bad JSON
        raise SceneSearchError(
            f"cannot search the STAC API {api_url} ({exc.__class__.__name__}: {exc}); "
            "check --stac-api and the network, or pass a local --stac-items file") from exc
    log.info("STAC search at %s: %d items in %s, cloud < %s%%", api_url, len(items), datetime_range, max_cloud)
    return items
