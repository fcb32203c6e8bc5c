"""Data sources: the registry of satellite collections the pipeline reads (see :mod:`.base`).

The spec's ``collection`` selects the source (:func:`source_for`). Sentinel-2 L2A is built in;
another source registers itself when its module is imported::

    from cropchips.sources import register_source
    register_source(LandsatC2L2())
"""

from __future__ import annotations

from cropchips.errors import ConfigError
from cropchips.sources.base import SceneRadiometry, Source, remove_offset
from cropchips.sources.sentinel2 import Sentinel2L2A

#: Collection id -> the source that reads it.
SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    """Make ``source`` read its collections (a collection belongs to one source)."""
    for collection in source.collections:
        current = SOURCES.get(collection)
        if current is not None and type(current) is not type(source):
            raise ValueError(f"collection {collection!r} is already read by {type(current).__name__}")
    for collection in source.collections:
        SOURCES[collection] = source
    return source


def source_for(collection: str) -> Source:
    """The source of ``collection``; ConfigError naming the known collections otherwise."""
    try:
        return SOURCES[collection]
    except KeyError:
        raise ConfigError(f"no data source reads the collection {collection!r}; known collections: "
                          f"{', '.join(sorted(SOURCES))} (a new one is a module in cropchips/sources/)") from None


register_source(Sentinel2L2A())

__all__ = ["SOURCES", "SceneRadiometry", "Source", "Sentinel2L2A", "register_source", "remove_offset", "source_for"]
