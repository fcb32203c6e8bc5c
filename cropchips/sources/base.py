"""What a data source is: the interface every satellite collection implements.

A :class:`Source` knows one family of STAC collections: how its items become
:class:`~cropchips.queue.messages.Scene` messages, which band assets it has and at what native
resolution, which band is its per-pixel quality (cloud) mask and what the values there mean,
and how its digital numbers are corrected to one radiometric convention. The master finds
scenes through it and the worker reads, masks and harmonises them through it; nothing else
in the pipeline names a band. Sentinel-2 L2A on Earth Search (:mod:`.sentinel2`) is the first;
another collection is one module with a subclass and a :func:`~cropchips.sources.register_source`
call. (Modelled on rslearn's ``data_sources.DataSource``.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from cropchips.errors import InputDataError
from cropchips.queue.messages import Scene


@dataclass(frozen=True)
class SceneRadiometry:
    """What a scene's DNs mean and what was done to them (recorded in each chip's sidecar)."""

    scene_id: str
    processing_baseline: str | None
    """The processing version as published (Sentinel-2: ``s2:processing_baseline``), if any."""
    published_offset: float | None
    """The reflectance bands' ``raster:bands`` offset as published (reflectance units), if any."""
    offset_dn: int
    """The scene's DN offset as decided by the source."""
    applied_dn: int
    """What was subtracted from its DNs (``offset_dn`` when harmonising, else 0)."""


class Source(ABC):
    """One family of STAC collections the pipeline can make chips from."""

    #: The collections (STAC collection ids) this source reads; the spec's ``collection`` picks the source.
    collections: ClassVar[tuple[str, ...]]
    #: The spectral band assets, in the default order of the image chips.
    bands: ClassVar[tuple[str, ...]]
    #: Native pixel size in metres of each band asset and of the quality band.
    resolutions: ClassVar[Mapping[str, float]]
    #: The per-pixel quality (cloud) mask asset.
    quality_band: ClassVar[str]
    #: Pixel type of the quality band (Sentinel-2 SCL: uint8; bit-flag bands such as Landsat's QA_PIXEL: uint16).
    quality_dtype: ClassVar[str] = "uint8"
    #: Values the quality band may take, the candidates for the spec's ``clear_classes``.
    quality_classes: ClassVar[range]
    #: The quality values counted as clear by default.
    default_clear_classes: ClassVar[tuple[int, ...]]
    #: The quality values that are cloud or cloud shadow (grown by the spec's ``cloud_buffer_px``); none
    #: by default, so a source that does not name them gets no buffer (see :meth:`cloud_mask`).
    cloud_classes: ClassVar[tuple[int, ...]] = ()
    #: The finest band: its pixel lattice anchors every cell's grid, so no band is shifted.
    origin_band: ClassVar[str]
    #: STAC ``constellation`` and ``instruments`` of the chips (for the catalog).
    constellation: ClassVar[str]
    instruments: ClassVar[tuple[str, ...]]

    @property
    def name(self) -> str:
        """The first collection id: how logs and messages call the source."""
        return self.collections[0]

    @property
    def assets(self) -> tuple[str, ...]:
        """Every asset a scene of this source must carry: the bands, then the quality band."""
        return (*self.bands, self.quality_band)

    @abstractmethod
    def scene_from_item(self, item: Mapping[str, Any]) -> Scene:
        """A Scene from one STAC item (a dict, as parsed JSON); InputDataError if it cannot be one."""

    @abstractmethod
    def radiometry(self, scene: Scene, harmonize: bool) -> SceneRadiometry:
        """The scene's DN offset, and what to subtract to bring it to the source's one convention
        (nothing when ``harmonize`` is False)."""

    def clear_mask(self, quality: np.ndarray, clear_classes: Sequence[int]) -> np.ndarray:
        """True where the quality band says the observation is clear (a class of ``clear_classes``)."""
        return np.isin(quality, np.asarray(clear_classes, dtype=quality.dtype))

    def cloud_mask(self, quality: np.ndarray) -> np.ndarray:
        """True where the quality band says cloud or cloud shadow (a class of :attr:`cloud_classes`).

        These pixels are grown by the spec's ``cloud_buffer_px`` before the clear mask is taken
        (:func:`cropchips.raster.composite.buffer_clear`). A source without :attr:`cloud_classes`
        (the default) knows no cloud classes: all False, no pixel is buffered. A source whose
        quality band is bit flags overrides this method."""
        if not self.cloud_classes:
            return np.zeros(np.shape(quality), dtype=bool)
        return np.isin(quality, np.asarray(self.cloud_classes, dtype=quality.dtype))

    def valid_mask(self, quality: np.ndarray) -> np.ndarray:
        """True inside the scene's data (quality value 0 means no data)."""
        return quality != 0

    def is_categorical(self, band: str) -> bool:
        """True for bands whose values are classes (never averaged when resampled): the quality band."""
        return band == self.quality_band

    def check_scene(self, scene: Scene) -> None:
        """InputDataError unless ``scene`` carries every asset this source reads."""
        missing = [band for band in self.assets if band not in scene.assets]
        if missing:
            raise InputDataError(f"scene {scene.id} lacks the assets {missing} that {self.name} scenes carry "
                                 f"({', '.join(self.assets)}); re-publish the task with this version's master")


def remove_offset(data: np.ndarray, offset_dn: int) -> np.ndarray:
    """Subtract ``offset_dn`` from valid (non-zero) uint16 DNs in place, clipping at 1."""
    if offset_dn <= 0:
        return data
    if offset_dn >= np.iinfo(data.dtype).max:
        np.minimum(data, 1, out=data)  # every valid DN is at most the offset: all become 1
        return data
    # max(v, offset + 1) - offset is v - offset above the offset and 1 at or below it; the minimum
    # with v itself keeps 0 (nodata) at 0. Three whole-array passes, no boolean indexing.
    shifted = np.maximum(data, data.dtype.type(offset_dn + 1))
    np.subtract(shifted, data.dtype.type(offset_dn), out=shifted)
    np.minimum(shifted, data, out=data)
    return data
