"""The dataset spec: one versioned value that defines what a run's chips are.

The run defines the dataset, workers only supply machines. A :class:`DatasetSpec` holds
everything that shapes the output (the area, the scenes, the chip geometry, the compositing,
the thresholds, the class map's content, the format and the splits) and nothing about the host
(paths, threads, caches, brokers). The master builds it, from ``--spec dataset.yaml`` and the
flags that override the file, and workers build chips from it instead of from their own flags.

Its :meth:`~DatasetSpec.digest` (sha256 of :meth:`~DatasetSpec.canonical_json`) names the
dataset: two specs with the same content have the same digest, any change gives another one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ast
import hashlib
import inspect
import json
import math
import re
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

import yaml

from cropchips.fields.classes import DEFAULT_CLASS_MAP_PATH, ClassMap, load_class_map
from cropchips.raster.composite import CLEAR_CLASSES, methods
from cropchips.errors import ConfigError
from cropchips.plan.grid import Grid
from cropchips.sources import source_for
from cropchips.sources.sentinel2 import BANDS
from cropchips.sources.stac import parse_datetime_range
from cropchips.raster.write import COMPRESSION_LEVELS, COMPRESSIONS, FORMATS
from cropchips.raster.temporal import time_bins
from cropchips.fields.classes import MAX_CLASS_ID

#: How chips are placed in a cell (``chip_placement``).
CHIP_PLACEMENTS = ("fields", "lattice")
#: The label layers a chip may have (``labels``), in file order.
LABEL_LAYERS = ("classes", "instances", "boundaries")
#: The compositors a time bin may use (``composite`` with ``temporal_period``).
BINNED_COMPOSITES = ("median", "least-cloudy")
MAX_CLOUD_BUFFER_PX = 100

#: The seed's scenes: Sentinel-2 L2A on Earth Search, from mid-May to the end of June 2023.
DEFAULT_COLLECTION = "sentinel-2-l2a"
DEFAULT_DATETIME = "2023-05-15/2023-06-30"

#: The newest spec version this code reads (and the one it writes).
SPEC_VERSION = 2

#: Fields added after spec 2 that count in :meth:`DatasetSpec.dataset_digest` only when they differ from
#: these defaults, so that a dataset made before they existed keeps its id (and its folder).
DIGEST_IF_SET: dict[str, Any] = {"compression": "deflate", "compression_level": 0}

#: The seed's grid, used when a spec gives no area (nor bbox, nor aoi).
DEFAULT_START_X = -5.80
DEFAULT_START_Y = 37.20
DEFAULT_GRID_STEP = 0.05
DEFAULT_X_CELLS = 10
DEFAULT_Y_CELLS = 10

#: Keys of earlier drafts and what replaced them, for the error message.
RENAMED_KEYS = {"temporal": "composite: stack (a time series) or median / least-cloudy"}


#: The key ``from_mapping`` and ``with_overrides`` accept besides the fields: the class map's CSV file,
#: whose content becomes ``class_map``.
CLASS_MAP_FILE_KEY = "class_map_file"

#: Fields that only say which cells a run covers: the area may grow from run to run into one dataset.
AREA_FIELDS = ("start_x", "start_y", "x_cells", "y_cells", "bbox", "aoi", "min_polygons")

# The three ways to give the area; a spec uses exactly one (grid_step is shared by all).
_SEED_FIELDS = ("start_x", "start_y", "x_cells", "y_cells")
_AREA_MODES: dict[str, tuple[str, ...]] = {"grid": _SEED_FIELDS, "bbox": ("bbox",), "aoi": ("aoi",)}
_SEED_DEFAULTS = {"start_x": DEFAULT_START_X, "start_y": DEFAULT_START_Y,
                  "x_cells": DEFAULT_X_CELLS, "y_cells": DEFAULT_Y_CELLS}
# Float error of a bbox side that is a whole number of steps: (0.4 - 0.1) / 0.1 = 3.0000000000000004.
_CELL_TOLERANCE = 1e-9


@functools.lru_cache(maxsize=1)
def default_class_map() -> str:
    """The packaged class map CSV's text (``cropchips/fields/data/hcat_classes.csv``)."""
    return DEFAULT_CLASS_MAP_PATH.read_text(encoding="utf-8")


@functools.lru_cache(maxsize=8)
def parse_class_map(text: str) -> ClassMap:
    """The :class:`~cropchips.fields.classes.ClassMap` of a class map CSV's text, checked by
    :func:`~cropchips.fields.classes.load_class_map` (cached by content)."""
    with tempfile.TemporaryDirectory(prefix="cropchips-spec-") as folder:
        path = Path(folder) / "class_map.csv"
        path.write_text(text, encoding="utf-8")
        try:
            return load_class_map(path)
        except ConfigError as exc:  # name the spec's key, not a temporary file
            raise ConfigError(str(exc).replace(f"class map {path}", "class_map")) from None


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that shapes a run's chips; the defaults are the seed's flag defaults."""

    spec_version: int = SPEC_VERSION
    """Version of this schema; a reader refuses a newer one instead of guessing."""

    # ------------------------------------------------------------------ area
    start_x: float | None = None
    """Longitude of the grid's south-west corner (-5.80 when no bbox or aoi is given)."""
    start_y: float | None = None
    """Latitude of the grid's south-west corner (37.20 when no bbox or aoi is given)."""
    x_cells: int | None = None
    """Cells from west to east (10 when no bbox or aoi is given)."""
    y_cells: int | None = None
    """Cells from south to north (10 when no bbox or aoi is given)."""
    bbox: tuple[float, float, float, float] | None = None
    """The area as (west, south, east, north) degrees instead of the grid: covered by cells of grid_step from its
    south-west corner (see :meth:`grid`)."""
    aoi: str | None = None
    """The area as a file of polygons (any OGR vector format, any CRS) instead of the grid or the bbox: the
    cells of grid_step over its bounds that touch a polygon."""
    grid_step: float = DEFAULT_GRID_STEP
    """Cell size in degrees (0.05 ~ 5.5 km), of whichever way the area is given."""
    min_polygons: int = 5
    """Only cells with at least this many field polygons are processed."""
    layer: str | None = None
    """Layer of the EuroCrops GeoPackage (None: the first with EuroCrops columns)."""

    # ------------------------------------------------------------------ scenes
    collection: str = DEFAULT_COLLECTION
    """STAC collection of the scenes (sentinel-2-l2a or sentinel-2-c1-l2a)."""
    datetime: str = DEFAULT_DATETIME
    """Date range START/END of the scenes (YYYY-MM-DD; ISO datetimes and '..' for an open end work too)."""
    max_cloud: float = 10.0
    """Only scenes with eo:cloud_cover below this percentage are used."""
    max_task_scenes: int = 0
    """At most this many scenes in a task, the least cloudy by eo:cloud_cover (0: all): keeps task messages
    small when a long date range has many scenes."""
    max_scenes: int = 0
    """At most this many scenes per chip image, the clearest over the cell, chosen on their SCL before any
    other band is read (0: all of the task's scenes)."""
    bands: tuple[str, ...] = BANDS
    """Bands of the image chips, in this order."""

    # ------------------------------------------------------------------ chips
    resolution: float = 10.0
    """Output pixel size in metres."""
    chip_size: int = 256
    """Chip width and height in pixels."""
    max_chips_per_cell: int = 5
    """At most this many chips per cell."""
    composite: str = "median"
    """How the scenes become the chip image: ``median`` of the clear pixels, the single ``least-cloudy``
    scene, or ``stack``, a time series of every usable scene (T x bands); see cropchips.composite."""
    harmonize: bool = True
    """Bring processing baseline >= 04.00 scenes to the pre-2022 convention (DN = reflectance x 10000)."""
    clear_classes: tuple[int, ...] = CLEAR_CLASSES
    """SCL classes counted as clear observations (sorted; 4 vegetation, 5 bare soil, 6 water)."""
    min_clear_fraction: float = 0.9
    """Chips with a smaller share of clear observations are not written."""
    max_nodata_fraction: float = 0.0
    """Chips with a larger share of pixels outside the scenes' data are not written."""
    format: str = "gtiff"
    """``gtiff`` (tiled GeoTIFF) or ``cog`` (Cloud-Optimized GeoTIFF with overviews)."""
    compression: str = "deflate"
    """Codec of the chip files: ``deflate``, ``zstd``, ``lzw`` or ``none`` (each with the horizontal predictor).
    The pixels are the same whichever; what differs is the worker's CPU and the bytes (see the README's
    performance section: deflate at its level 1 writes a chip in a third of the CPU of level 6, into 1.015 times the
    bytes; ``zstd`` at level 1 a little faster again, into 1.03 times)."""
    compression_level: int = 0
    """Level of ``compression``: 0 for deflate 1 (the fastest) and zstd 9; deflate 1..9
    (6 is GDAL's usual: 1.5 % smaller chips for 3 times the CPU), zstd 1..22. The pixels are the same at every level."""
    cloud_buffer_px: int = 0
    """Cloud and cloud-shadow pixels (SCL 3, 8, 9, 10) grow by this many pixels (a square) before the clear
    mask is taken: the hazy rim of a cloud is not counted clear."""
    chip_placement: str = "fields"
    """``fields``: chips centred on the cell's largest fields, shifted inward to stay inside the cell;
    ``lattice``: chips on a fixed grid of the UTM zone (stride = chip size), the most labelled first."""
    max_chip_overlap: float = 0.25
    """Within a cell, no two chips share more than this share of a chip's area."""
    min_labelled_fraction: float = 0.0
    """Chips with a smaller share of pixels of a class (1..8) are not written."""

    # ------------------------------------------------------------------ time series
    temporal_period: str | None = None
    """An ISO 8601 duration (P1M, P15D, P1W): cuts the datetime range into bins, each the composite
    (median or least-cloudy) of its scenes, so that every chip has the same T x bands (None: one image)."""
    min_valid_bins: int = 1
    """With temporal_period: chips with fewer bins whose clear share reaches min_clear_fraction are not
    written."""

    # ------------------------------------------------------------------ labels
    class_map: str = field(default_factory=default_class_map)
    """The HCAT3 -> class CSV's content (not its path; default: the packaged hcat_classes.csv)."""
    unmapped_label: int = 255
    """Label of a field whose crop is none of the classes, or unknown (255: the ignore index; 0: no field,
    as before cropchips 0.3)."""
    labels: tuple[str, ...] = ("classes",)
    """Label layers of each chip: ``classes`` (always), ``instances`` (uint32 field ids unique within the
    chip, 0 = no field) and ``boundaries`` (0 background, 1 field interior, 2 field boundary)."""

    # ------------------------------------------------------------------ splits
    split_block_size: float = 10000.0
    """Side in metres of the spatial blocks assigned whole to train/val/test."""
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train, val and test shares of the blocks."""

    # ------------------------------------------------------------------ provenance
    gpkg_fingerprint: str | None = None
    """Set by the master from the GeoPackage it planned with; a worker whose copy differs refuses the task."""

    def __post_init__(self) -> None:
        for name, kind in _field_types().items():
            object.__setattr__(self, name, _checked(name, getattr(self, name), kind))
        _check_version(self.spec_version)
        self._check_area()
        if self.min_polygons < 0:
            raise ConfigError(f"min_polygons (--min-polygons) must be >= 0, got {self.min_polygons}")
        if self.layer is not None and not self.layer.strip():
            raise ConfigError("layer is empty; give a layer name, or null for the first with EuroCrops columns")
        if not self.collection.strip():
            raise ConfigError(f"collection is empty; give a STAC collection such as {DEFAULT_COLLECTION}")
        source_for(self.collection)  # a collection some data source reads
        parse_datetime_range(self.datetime)
        if not self.max_cloud > 0:
            raise ConfigError(f"max_cloud (--max-cloud) must be > 0 percent (scenes below it are used), "
                              f"got {self.max_cloud}")
        for name in ("max_task_scenes", "max_scenes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be >= 0 (0: all scenes)")
        self._check_bands()
        if not self.resolution > 0:
            raise ConfigError(f"resolution (--resolution) must be > 0 metres, got {self.resolution}")
        if self.chip_size < 1:
            raise ConfigError(f"chip_size (--chip-size) must be >= 1, got {self.chip_size}")
        if self.max_chips_per_cell < 0:
            raise ConfigError(f"max_chips_per_cell (--max-chips-per-cell) must be >= 0, got {self.max_chips_per_cell}")
        if self.composite not in methods():
            raise ConfigError(f"composite (--composite) must be one of {methods()}, got {self.composite!r}")
        self._check_clear_classes()
        for name in ("min_clear_fraction", "max_nodata_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must lie between 0 and 1, got {value}")
        if self.format not in FORMATS:
            raise ConfigError(f"format (--format) must be one of {FORMATS}, got {self.format!r}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression (--compression) must be one of {COMPRESSIONS}, got {self.compression!r}")
        top = COMPRESSION_LEVELS.get(self.compression)
        if self.compression_level and (top is None or not 1 <= self.compression_level <= top):
            raise ConfigError(f"compression_level (--compression-level) {self.compression_level} does not apply to "
                              f"{self.compression}: " + (f"1..{top}, or 0 for its default" if top else
                                                         "it has no levels; give 0"))
        if not 0 <= self.cloud_buffer_px <= MAX_CLOUD_BUFFER_PX:
            raise ConfigError(f"cloud_buffer_px (--cloud-buffer-px) must be 0..{MAX_CLOUD_BUFFER_PX} pixels, "
                              f"got {self.cloud_buffer_px}")
        if self.chip_placement not in CHIP_PLACEMENTS:
            raise ConfigError(f"chip_placement (--chip-placement) must be one of {CHIP_PLACEMENTS}, "
                              f"got {self.chip_placement!r}")
        for name in ("max_chip_overlap", "min_labelled_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must lie between 0 and 1, got {value}")
        self._check_temporal()
        if not (self.unmapped_label == 0 or MAX_CLASS_ID < self.unmapped_label <= 255):
            raise ConfigError(f"unmapped_label (--unmapped-label) must be 0 (no field) or {MAX_CLASS_ID + 1}..255 "
                              f"(255: the ignore index), not a class id; got {self.unmapped_label}")
        self._check_labels()
        if not self.class_map.strip():
            raise ConfigError(f"class_map is empty; give the CSV's content, or {CLASS_MAP_FILE_KEY}: PATH")
        parse_class_map(self.class_map)
        if not self.split_block_size > 0:
            raise ConfigError(f"split_block_size (--split-block-size) must be > 0 metres, got {self.split_block_size}")
        if any(r < 0 for r in self.split_ratios) or abs(sum(self.split_ratios) - 1.0) > 1e-6:
            raise ConfigError(f"split_ratios (--split-ratios) must be three non-negative numbers adding up to 1, "
                              f"e.g. 0.8,0.1,0.1; got {','.join(map(str, self.split_ratios))}")
        if self.gpkg_fingerprint is not None and not self.gpkg_fingerprint.strip():
            raise ConfigError("gpkg_fingerprint is empty; leave it out (null), the master sets it")

    def _check_area(self) -> None:
        given = [mode for mode, names in _AREA_MODES.items() if any(getattr(self, n) is not None for n in names)]
        if len(given) > 1:
            keys = " / ".join(", ".join(n for n in _AREA_MODES[mode] if getattr(self, n) is not None) for mode in given)
            raise ConfigError(f"the area is given {len(given)} ways ({keys}): give the grid (start_x, start_y, "
                              "x_cells, y_cells), or bbox, or aoi, and remove the others")
        if not given or given == ["grid"]:
            for name, default in _SEED_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
        if not self.grid_step > 0:
            raise ConfigError(f"grid_step (--grid-step) must be > 0 degrees, got {self.grid_step}")
        if self.bbox is not None:
            west, south, east, north = self.bbox
            if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
                raise ConfigError(f"bbox {list(self.bbox)} is not west, south, east, north in degrees (EPSG:4326): "
                                  "give west < east within -180..180 and south < north within -90..90")
        if self.aoi is not None:
            if not self.aoi.strip():
                raise ConfigError("aoi is empty; give the path of a file of polygons, or use the grid or bbox")
            return
        self.grid()  # the grid's own checks: cells >= 1, inside the globe

    def _check_temporal(self) -> None:
        if self.min_valid_bins < 0:
            raise ConfigError(f"min_valid_bins (--min-valid-bins) must be >= 0, got {self.min_valid_bins}")
        if self.temporal_period is None:
            return
        if self.composite not in BINNED_COMPOSITES:
            raise ConfigError(f"temporal_period makes a time series of {'/'.join(BINNED_COMPOSITES)} bins; "
                              f"composite {self.composite!r} cannot be binned: use composite: median (or drop "
                              "temporal_period for the variable-length stack)")
        bins = time_bins(self.datetime, self.temporal_period)  # its own messages say what is wrong
        if self.min_valid_bins > len(bins):
            raise ConfigError(f"min_valid_bins {self.min_valid_bins} is more than the {len(bins)} bins of "
                              f"{self.temporal_period} in {self.datetime}")

    def _check_labels(self) -> None:
        unknown = [layer for layer in self.labels if layer not in LABEL_LAYERS]
        if unknown or "classes" not in self.labels:
            raise ConfigError(f"labels must list classes and any of {', '.join(LABEL_LAYERS[1:])}"
                              + (f"; {', '.join(map(repr, unknown))} is not a label layer" if unknown else ""))
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("labels lists a layer more than once; give each once")
        object.__setattr__(self, "labels", tuple(layer for layer in LABEL_LAYERS if layer in self.labels))

    def bins(self) -> tuple[tuple[str, str], ...]:
        """With ``temporal_period``: the (first day, day after the last) of each time bin, YYYY-MM-DD; else ()."""
        return time_bins(self.datetime, self.temporal_period) if self.temporal_period else ()

    def _check_bands(self) -> None:
        source = source_for(self.collection)
        unknown = [band for band in self.bands if band not in source.bands]
        if not self.bands or unknown:
            raise ConfigError(f"bands must be a non-empty list of {source.name}'s bands {', '.join(source.bands)}"
                              + (f"; {', '.join(map(repr, unknown))} is not one" if unknown else ""))
        repeated = sorted({band for band in self.bands if self.bands.count(band) > 1})
        if repeated:
            raise ConfigError(f"bands lists {', '.join(repeated)} more than once; give each band once")

    def _check_clear_classes(self) -> None:
        source = source_for(self.collection)
        classes = source.quality_classes
        bad = [c for c in self.clear_classes if c not in classes]
        if not self.clear_classes or bad:
            raise ConfigError(f"clear_classes must be a non-empty list of {source.quality_band} classes {classes.start}.."
                              f"{classes.stop - 1}, e.g. {list(source.default_clear_classes)}"
                              + (f"; got {bad}" if bad else ""))
        object.__setattr__(self, "clear_classes", tuple(sorted(set(self.clear_classes))))

    # ------------------------------------------------------------------ derived values

    @property
    def area_mode(self) -> str:
        """How the area is given: ``grid``, ``bbox`` or ``aoi``."""
        return "aoi" if self.aoi is not None else "bbox" if self.bbox is not None else "grid"

    def grid(self, aoi_bounds: tuple[float, float, float, float] | None = None) -> Grid:
        """The processing grid: its south-west corner (``start_x``, ``start_y``) and its number of cells
        (``x_cells`` x ``y_cells``) of ``grid_step`` degrees. For a bbox: the fewest cells that cover it,
        from its south-west corner (the last column and row may reach past its east and north edges).
        For an aoi: the same over ``aoi_bounds``, the bounds of its polygons, which the caller reads
        (see :func:`cropchips.plan.plan.read_aoi`): this module does no I/O."""
        if self.aoi is not None:
            if aoi_bounds is None:
                raise ConfigError(f"the grid of aoi {self.aoi!r} comes from its polygons: read them first "
                                  "(master.read_aoi) and pass their bounds")
            return self._covering(aoi_bounds)
        if self.bbox is None:
            return Grid(start_x=self.start_x, start_y=self.start_y, step=self.grid_step,
                        x_cells=self.x_cells, y_cells=self.y_cells)
        return self._covering(self.bbox)

    def _covering(self, bounds: tuple[float, float, float, float]) -> Grid:
        west, south, east, north = bounds
        cells = [max(1, math.ceil(side / self.grid_step - _CELL_TOLERANCE)) for side in (east - west, north - south)]
        return Grid(start_x=west, start_y=south, step=self.grid_step, x_cells=cells[0], y_cells=cells[1])

    def classes(self) -> ClassMap:
        """The class map, parsed (cached by content)."""
        return parse_class_map(self.class_map)

    # ------------------------------------------------------------------ identity

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples as lists); :meth:`from_mapping` reads it back."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def canonical_json(self) -> str:
        """The spec as JSON with sorted keys and no spaces: the text :meth:`digest` hashes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    def digest(self) -> str:
        """sha256 hex of :meth:`canonical_json`: equal specs, equal digests; any change, another one."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def short_id(self) -> str:
        """The first 12 hex digits of :meth:`digest`, for names and logs."""
        return self.digest()[:12]

    def dataset_digest(self) -> str:
        """sha256 hex of everything but the area (:data:`AREA_FIELDS`): what shapes each chip and the
        splits. Runs that cover other cells of one dataset share it; a folder's chips all have it."""
        values = {name: value for name, value in self.to_dict().items() if name not in AREA_FIELDS
                  and not (name in DIGEST_IF_SET and value == DIGEST_IF_SET[name])}
        text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def dataset_id(self) -> str:
        """The first 12 hex digits of :meth:`dataset_digest`: the id that chips, sidecars, the index and
        the STAC collection refer to."""
        return self.dataset_digest()[:12]

    def differences(self, other: DatasetSpec, *, area: bool = False) -> list[str]:
        """Names of the fields whose values differ (the area's only with ``area=True``), in field order."""
        return [f.name for f in dataclasses.fields(self)
                if (area or f.name not in AREA_FIELDS) and getattr(self, f.name) != getattr(other, f.name)]

    # ------------------------------------------------------------------ building

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base_dir: str | Path | None = None,
                     allow_files: bool = True) -> DatasetSpec:
        """A spec from a mapping of field names (the flag names with underscores) to values; missing keys
        take their defaults. ``class_map_file: PATH`` (relative to ``base_dir``) stands for ``class_map``:
        the file's content; ``allow_files=False`` refuses it (a spec from a message must never make a
        worker read its own files). Unknown keys, wrong types and bad values raise ConfigError."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a dataset spec is a mapping of keys such as chip_size: 64, got {type(values).__name__}")
        if "spec_version" in values:  # first: a newer spec may well have keys this version does not know
            _check_version(_checked("spec_version", values["spec_version"], int))
        _check_keys(values)
        kwargs = dict(values)
        if CLASS_MAP_FILE_KEY in kwargs and not allow_files:
            raise ConfigError(f"{CLASS_MAP_FILE_KEY} is not allowed here: the spec must carry the class map's "
                              "content (class_map)")
        if CLASS_MAP_FILE_KEY in kwargs:
            if "class_map" in kwargs:
                raise ConfigError(f"give class_map (the CSV's content) or {CLASS_MAP_FILE_KEY} (its path), not both")
            kwargs["class_map"] = _read_class_map_file(kwargs.pop(CLASS_MAP_FILE_KEY), base_dir)
        return cls(**kwargs)

    def with_overrides(self, overrides: Mapping[str, Any]) -> DatasetSpec:
        """A new spec where each value of ``overrides`` that is not None replaces this spec's: how a flag
        given on the command line overrides the spec file. An area given in ``overrides`` (grid fields,
        bbox or aoi) replaces this spec's area; ``class_map_file`` replaces ``class_map``."""
        given = {key: value for key, value in overrides.items() if value is not None}
        _check_keys(given)
        if CLASS_MAP_FILE_KEY in given:
            if "class_map" in given:
                raise ConfigError(f"give class_map (the CSV's content) or {CLASS_MAP_FILE_KEY} (its path), not both")
            given["class_map"] = _read_class_map_file(given.pop(CLASS_MAP_FILE_KEY), None)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for mode, names in _AREA_MODES.items():
            if any(name in given for name in names):  # the overrides' area replaces this one's
                for other, other_names in _AREA_MODES.items():
                    if other != mode:
                        values.update(dict.fromkeys(other_names))
        values.update(given)
        return type(self)(**values)

    # ------------------------------------------------------------------ YAML

    @classmethod
    def from_yaml(cls, source: str | Path) -> DatasetSpec:
        """A spec from YAML text or a YAML file (a Path, or a one-line string naming an existing file or ending
        in .yaml/.yml). A relative ``class_map_file`` is read from the YAML file's folder. An empty file is
        the default spec."""
        text, where, base_dir = _yaml_source(source)
        try:
            data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} is not valid YAML: {exc}") from None
        except ConfigError as exc:  # a repeated key
            raise ConfigError(f"{where}: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a YAML mapping of keys such as 'chip_size: 64', "
                              f"got a {type(data).__name__}")
        try:
            return cls.from_mapping(data, base_dir=base_dir)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_yaml(self) -> str:
        """The spec as YAML, one key per line in field order, lists in brackets, the class map last as a
        block scalar (quoted if a line ends in blanks, which PyYAML writes no other way), and only the keys
        of the way the area is given; :meth:`from_yaml` reads it back equal."""
        unused = {name for mode, names in _AREA_MODES.items() if mode != self.area_mode for name in names}
        items = [(name, value) for name, value in self.to_dict().items() if name not in unused]
        items.sort(key=lambda item: item[0] == "class_map")  # stable: the long block after the short keys
        data = {name: _FlowList(value) if isinstance(value, list) else value for name, value in items}
        body = yaml.dump(data, Dumper=_SpecDumper, sort_keys=False, allow_unicode=True, default_flow_style=False,
                         width=4096)
        return f"# cropchips dataset spec {self.short_id()} (keys: see cropchips/spec.py)\n{body}"


# ---------------------------------------------------------------------- checking values


@functools.lru_cache(maxsize=1)
def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(DatasetSpec)
    return {f.name: hints[f.name] for f in dataclasses.fields(DatasetSpec)}


@functools.lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """Field name -> the docstring under it in :class:`DatasetSpec` (one source for the fields' docs,
    the master's --help and the README)."""
    try:
        tree = ast.parse(inspect.getsource(DatasetSpec))
    except (OSError, TypeError):  # no source (a frozen build): no help texts
        return {}
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            text = re.sub(r":\w+:`~?([^`]*)`", r"\1", " ".join(nxt.value.value.split()))  # :meth:`grid` -> grid
            docs[stmt.target.id] = text.replace("``", "")
    return docs


def field_types() -> dict[str, Any]:
    """Field name -> its declared type (``int``, ``float | None``, ``tuple[str, ...]``, ...)."""
    return dict(_field_types())


def _describe(kind: Any) -> str:
    """``kind`` in words, for error messages."""
    if isinstance(kind, UnionType) or typing.get_origin(kind) is typing.Union:
        return " or ".join("null" if arg is NoneType else _describe(arg) for arg in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


def _plural(kind: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings"}[kind]


def _checked(name: str, value: Any, kind: Any) -> Any:
    """``value`` as field ``name`` of type ``kind`` holds it (ints as floats, lists as tuples), or ConfigError."""
    if isinstance(kind, UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None and NoneType in typing.get_args(kind):
            return None
        (inner,) = [arg for arg in typing.get_args(kind) if arg is not NoneType]
        return _checked_or_fail(name, value, inner, kind)
    return _checked_or_fail(name, value, kind, kind)


def _checked_or_fail(name: str, value: Any, kind: Any, declared: Any) -> Any:
    result = _convert(value, kind)
    if result is _BAD:
        raise ConfigError(f"{name} must be {_describe(declared)}, got {value!r} ({type(value).__name__})")
    return result


_BAD = object()


def _convert(value: Any, kind: Any) -> Any:
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if isinstance(value, str):  # "0.8,0.1,0.1", as the flags write lists
            value = [part.strip() for part in value.split(",")] if value.strip() else []
            item_kind = args[0]
            try:
                value = [item if item_kind is str else item_kind(item) for item in value]
            except ValueError:
                return _BAD
        if not isinstance(value, (list, tuple)):
            return _BAD
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            return _BAD
        items = [_convert(item, args[0]) for item in value]
        return _BAD if any(item is _BAD for item in items) else tuple(items)
    if kind is bool:
        return value if isinstance(value, bool) else _BAD
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _BAD
    if kind is str:
        return value if isinstance(value, str) else _BAD
    raise TypeError(f"no check for {kind!r}")  # pragma: no cover - a field of a new type


def _check_version(version: int) -> None:
    if version > SPEC_VERSION:
        raise ConfigError(f"spec_version {version} is newer than this cropchips reads ({SPEC_VERSION}): "
                          "upgrade cropchips on this machine (pip install -U cropchips)")
    if version < 1:
        raise ConfigError(f"spec_version must be 1..{SPEC_VERSION}, got {version}")


def _check_keys(values: Mapping[str, Any]) -> None:
    valid = [f.name for f in dataclasses.fields(DatasetSpec)] + [CLASS_MAP_FILE_KEY]
    for key in values:
        if key in valid:
            continue
        if not isinstance(key, str):
            raise ConfigError(f"spec key {key!r} is not a name; keys are the flag names with underscores, "
                              "e.g. chip_size")
        if key in RENAMED_KEYS:
            raise ConfigError(f"spec key {key!r} is gone: use {RENAMED_KEYS[key]}")
        close = difflib.get_close_matches(key.replace("-", "_").lower(), valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        raise ConfigError(f"unknown spec key {key!r}: {hint}")


def _read_class_map_file(path: Any, base_dir: str | Path | None) -> str:
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ConfigError(f"{CLASS_MAP_FILE_KEY} must be the path of a CSV file, got {path!r}")
    source = Path(path).expanduser()
    if base_dir is not None and not source.is_absolute():
        source = Path(base_dir) / source
    load_class_map(source)  # its own messages name the file and the line
    return source.read_text(encoding="utf-8")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------- YAML


def _yaml_source(source: str | Path) -> tuple[str, str, Path | None]:
    """(text, what to call it in messages, folder of relative paths) of a YAML file or text."""
    is_file = isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source
        and (source.strip().endswith((".yaml", ".yml")) or Path(source).is_file()))
    if not is_file:
        if not isinstance(source, str):
            raise ConfigError(f"from_yaml takes YAML text or a file path, got {type(source).__name__}")
        return source, "the dataset spec", None
    path = Path(source).expanduser()
    try:
        return path.read_text(encoding="utf-8"), f"spec file {path}", path.parent
    except FileNotFoundError:
        raise ConfigError(f"spec file {path} does not exist; give the path of a dataset spec YAML file "
                          "(master.py --write-spec prints one to start from)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"spec file {path} cannot be read ({exc}); give a UTF-8 YAML file") from None


class _SpecLoader(yaml.SafeLoader):
    """Safe YAML that refuses a repeated key and keeps dates as written (``datetime: 2023-05-15``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise ConfigError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SpecLoader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))


class _FlowList(list):
    """A list written on one line: ``[0.8, 0.1, 0.1]``."""


class _SpecDumper(yaml.SafeDumper):
    """Multi-line strings as block scalars, short lists on one line."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_SpecDumper.add_representer(str, _represent_str)
_SpecDumper.add_representer(
    _FlowList, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))
