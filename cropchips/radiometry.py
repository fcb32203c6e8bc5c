"""Radiometric consistency: the -1000 DN offset of Sentinel-2 processing baseline 04.00 and later.

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
from dataclasses import dataclass

import numpy as np

from .messages import BANDS, Scene

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class SceneRadiometry:
    """What a scene's DNs mean and what was done to them."""

    scene_id: str
    processing_baseline: str | None
    """As published (``s2:processing_baseline``)."""
    published_offset: float | None
    """``raster:bands`` offset of the reflectance bands as published (reflectance units)."""
    offset_dn: int
    """The scene's DN offset as decided: 1000 for baseline >= 04.00, else 0."""
    applied_dn: int
    """What was subtracted from its DNs (``offset_dn`` when harmonising, else 0)."""


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


def remove_offset(data: np.ndarray, offset_dn: int) -> np.ndarray:
    """Subtract ``offset_dn`` from valid (non-zero) uint16 DNs in place, clipping at 1."""
    if offset_dn <= 0:
        return data
    valid = data > 0
    low = valid & (data <= offset_dn)
    np.subtract(data, np.uint16(offset_dn), out=data, where=valid & ~low)
    data[low] = 1
    return data
