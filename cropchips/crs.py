"""Coordinate transformers, made once per pair of CRSs in a process.

Making a pyproj ``Transformer`` costs milliseconds (4.4 ms for UTM to lon/lat, measured), using
one microseconds: a worker needs the same few for every cell, and an index of 10^5 chips the same
one or two for every chip. pyproj (>= 3.1) lets threads share a Transformer.
"""

from __future__ import annotations

import functools

from pyproj import CRS, Transformer


@functools.lru_cache(maxsize=64)
def transformer(src: str | CRS, dst: str | CRS) -> Transformer:
    """The ``src`` -> ``dst`` transformer, axes in x/y (lon/lat) order whatever the CRSs' own order."""
    return Transformer.from_crs(src, dst, always_xy=True)
