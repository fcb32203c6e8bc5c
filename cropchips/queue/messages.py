"""Versioned message schemas shared by master, worker and monitor (JSON over Kafka).

Three message types travel on the topics:

* ``task`` (tasks topic, key = cell id): one grid cell and the scenes that cover it.
* ``run`` (results topic): the master's run header, so the monitor knows how many
  tasks a run has.
* ``result`` (results topic, key = task id): what a worker did with one task.

Every message carries ``type`` and ``schema_version``. A reader rejects an unknown
type or version with :class:`~cropchips.errors.MessageError` instead of guessing.

Version 2: every task carries the run's :class:`~cropchips.spec.DatasetSpec` (workers build chips
from it, never from their own flags), the run header carries it too, and chips name the
dataset they belong to (``dataset_id``) instead of carrying the worker's settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cropchips.errors import ConfigError, MessageError

if TYPE_CHECKING:
    from cropchips.spec import DatasetSpec

SCHEMA_VERSION = 3

#: The splits of a dataset, in this order.
SPLITS = ("train", "val", "test")

#: At most this many assets per scene (Sentinel-2 L2A carries 11; which ones is its source's business).
MAX_SCENE_ASSETS = 64

STATUSES = ("ok", "no_scenes", "no_fields", "failed")

#: A message larger than this is refused before it is parsed (a task of 1,000 scenes is ~2 MB).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Identifiers end up in file names: letters, digits, '-', '_' and '.', never '..'.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_safe_id(value: Any, what: str) -> str:
    """Return ``value`` if it is a safe identifier (usable as a file name), else raise."""
    if not isinstance(value, str) or not _SAFE_ID.match(value) or ".." in value:
        raise MessageError(
            f"{what} {value!r} is not a safe identifier: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    return value


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise MessageError(message)


def _count(value: Any) -> bool:
    """A non-negative integer that fits 64 bits (JSON allows any size)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _finite(value: Any, what: str) -> float:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
             f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Cell:
    """A grid cell in EPSG:4326 degrees."""

    id: str
    """Stable identifier, also the prefix of the cell's chip names."""
    row: int
    """Row index in the grid, 0 at the south edge."""
    col: int
    """Column index in the grid, 0 at the west edge."""
    bbox: tuple[float, float, float, float]
    """(min lon, min lat, max lon, max lat) in EPSG:4326."""

    def __post_init__(self) -> None:
        check_safe_id(self.id, "cell id")
        _require(isinstance(self.row, int) and isinstance(self.col, int) and self.row >= 0 and self.col >= 0,
                 f"cell row/col must be non-negative integers, got {self.row!r}/{self.col!r}")
        _require(isinstance(self.bbox, (list, tuple)) and len(self.bbox) == 4, f"cell bbox must have 4 numbers, got {self.bbox!r}")
        minx, miny, maxx, maxy = (_finite(v, "cell bbox value") for v in self.bbox)
        _require(-180 <= minx < maxx <= 180 and -90 <= miny < maxy <= 90,
                 f"cell bbox {self.bbox!r} is not a valid lon/lat box (min < max, within -180..180 / -90..90)")
        object.__setattr__(self, "bbox", (minx, miny, maxx, maxy))


@dataclass(frozen=True)
class Scene:
    """One scene, with everything a worker needs to read it (which assets it must carry is its
    source's to say: :meth:`cropchips.sources.base.Source.check_scene`)."""

    id: str
    """STAC item id."""
    collection: str
    """STAC collection id, e.g. ``sentinel-2-l2a``."""
    datetime: str
    """Acquisition time, ISO 8601 UTC."""
    cloud_cover: float | None
    """Scene-wide cloud cover in percent (``eo:cloud_cover``)."""
    epsg: int
    """EPSG code of the scene's UTM grid."""
    assets: dict[str, str]
    """Band name (Sentinel-2: B02 ... B12, SCL) -> href of its Cloud-Optimized GeoTIFF."""
    bbox: tuple[float, float, float, float] | None = None
    """Footprint bounding box in EPSG:4326, when known."""
    processing_baseline: str | None = None
    """``s2:processing_baseline``: 04.00 and later carry a -1000 DN offset."""
    offsets: dict[str, float] = field(default_factory=dict)
    """Band name -> ``raster:bands`` offset as published (reflectance units)."""
    item_href: str | None = None
    """The STAC item's own URL (its ``self`` link), for provenance links."""

    def __post_init__(self) -> None:
        check_safe_id(self.id, "scene id")
        _require(isinstance(self.collection, str) and self.collection != "", "scene collection must be a string")
        _require(isinstance(self.datetime, str) and len(self.datetime) >= 10, f"scene datetime must be ISO 8601, got {self.datetime!r}")
        _require(isinstance(self.epsg, int) and 1024 <= self.epsg <= 999999, f"scene epsg must be an EPSG integer, got {self.epsg!r}")
        _require(isinstance(self.assets, dict) and 1 <= len(self.assets) <= MAX_SCENE_ASSETS,
                 f"scene assets must be an object of 1..{MAX_SCENE_ASSETS} band -> href")
        for band, href in self.assets.items():
            _require(isinstance(band, str) and 0 < len(band) <= 32, f"scene {self.id} has an invalid band name")
            _require(isinstance(href, str) and href != "", f"scene {self.id} asset {band} href must be a non-empty string")
        if self.cloud_cover is not None:
            object.__setattr__(self, "cloud_cover", _finite(self.cloud_cover, "scene cloud_cover"))
        if self.bbox is not None:
            _require(len(self.bbox) == 4, f"scene bbox must have 4 numbers, got {self.bbox!r}")
            object.__setattr__(self, "bbox", tuple(_finite(v, "scene bbox value") for v in self.bbox))


@dataclass(frozen=True)
class Task:
    """One unit of work: a cell and the scenes that cover it."""

    run_id: str
    """The master run that published this task."""
    task_id: str
    """Deterministic id: the same cell and scenes always give the same id."""
    cell: Cell
    """The cell to process."""
    scenes: tuple[Scene, ...]
    """Scenes whose footprints intersect the cell, oldest first."""
    spec: DatasetSpec
    """The run's dataset spec: everything that shapes the chips."""
    force: bool = False
    """Redo the cell even if its outputs are complete, and replace the output folder's dataset spec
    if it differs (``master.py --force``)."""
    split: str | None = None
    """The split (train, val or test) the master gave the cell's block; every chip of the cell is in it."""
    schema_version: int = SCHEMA_VERSION
    """Version of this schema."""

    def __post_init__(self) -> None:
        check_safe_id(self.run_id, "run id")
        check_safe_id(self.task_id, "task id")
        _require(isinstance(self.cell, Cell), "task cell must be a Cell")
        _require(all(isinstance(s, Scene) for s in self.scenes), "task scenes must be Scenes")
        object.__setattr__(self, "scenes", tuple(self.scenes))
        object.__setattr__(self, "spec", _spec(self.spec, "task"))
        _require(isinstance(self.force, bool), "task force must be true or false")
        _require(self.split is None or self.split in SPLITS, f"task split must be one of {SPLITS}, got {self.split!r}")

    @staticmethod
    def make_id(cell: Cell, scenes: tuple[Scene, ...] | list[Scene]) -> str:
        """Task id from the content that decides the outputs (not the run)."""
        content = {"cell": asdict(cell), "scenes": sorted(s.id for s in scenes)}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
        return f"{cell.id}-{digest}"


@dataclass(frozen=True)
class RunHeader:
    """Published by the master after its tasks: the size of the run."""

    run_id: str
    """Identifier of the run; tasks and results carry it."""
    task_count: int
    """Number of tasks published in this run."""
    created_at: str
    """When the master published the run (ISO 8601 UTC)."""
    cells_total: int = 0
    """Cells in the grid."""
    cells_dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> number of cells not published (e.g. too few polygons)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The master's configuration, for the record."""
    spec: DatasetSpec | None = None
    """The run's dataset spec (the tasks carry the same)."""
    schema_version: int = SCHEMA_VERSION
    """Version of this schema."""

    def __post_init__(self) -> None:
        check_safe_id(self.run_id, "run id")
        if self.spec is not None:
            object.__setattr__(self, "spec", _spec(self.spec, "run"))
        _require(_count(self.task_count), "run task_count must be a non-negative integer")
        _require(_count(self.cells_total), "run cells_total must be a non-negative integer")
        _require(isinstance(self.cells_dropped, dict) and all(_count(v) for v in self.cells_dropped.values()),
                 "run cells_dropped must map reasons to counts")
        _require(isinstance(self.params, dict), "run params must be an object")


@dataclass(frozen=True)
class ChipRecord:
    """One chip written by a worker."""

    name: str
    """File stem of the image and the mask."""
    image: str
    """Image path relative to the output directory."""
    mask: str
    """Mask path relative to the output directory."""
    crs: str
    """CRS of both files, e.g. ``EPSG:32630``."""
    bounds: tuple[float, float, float, float]
    """(left, bottom, right, top) in ``crs``."""
    class_pixels: dict[str, int]
    """Class id (as a string, JSON keys are strings) -> number of mask pixels."""
    field_id: str | None = None
    """Id of the field the chip is centred on."""
    cell_id: str = ""
    """Cell the chip belongs to."""
    method: str = "median"
    """How the image was made: ``median``, ``least-cloudy`` or ``stack`` (a time series)."""
    scenes: tuple[dict[str, Any], ...] = ()
    """Scenes in the image, oldest first: ``id``, ``datetime``, ``processing_baseline``,
    ``published_offset`` (raster:bands), ``offset_dn`` (decided) and ``applied_dn`` (subtracted)."""
    bands: tuple[str, ...] = ()
    """Band descriptions in file order (``B02``..., or ``2023-05-20 B02``... for a stack)."""
    clear_fraction: float = 1.0
    """Share of the chip's pixels (and dates, for a stack) with a clear observation (SCL 4, 5, 6)."""
    nodata_fraction: float = 0.0
    """Share of the chip's pixels outside every scene's data footprint."""
    software: str = ""
    """cropchips version that wrote it."""
    resolution: float = 10.0
    """Pixel size of both files in ``crs`` units (metres)."""
    format: str = "gtiff"
    """File format of both files: ``gtiff`` or ``cog``."""
    dataset_id: str = ""
    """:meth:`~cropchips.spec.DatasetSpec.dataset_id` of the spec the chip was made with (the folder's
    ``dataset.yaml`` holds that spec)."""
    split: str = ""
    """train, val or test: the split of the chip's cell (empty for chips of cropchips < 0.3)."""
    layers: dict[str, str] = field(default_factory=dict)
    """Label layer -> its file relative to the output directory: ``classes`` (the mask), and ``instances``
    and ``boundaries`` when the spec asks for them."""
    bin_dates: tuple[str, ...] = ()
    """With a temporal_period: the first day (YYYY-MM-DD) of each time bin, in image order."""
    bin_clear_fractions: tuple[float, ...] = ()
    """Per bin: the share of the chip's pixels with a clear observation in it."""
    bin_valid: tuple[bool, ...] = ()
    """Per bin: does its clear share reach the spec's min_clear_fraction."""

    def __post_init__(self) -> None:
        # JSON gives lists: normalise so that a decoded record equals the one encoded.
        for name in ("bounds", "scenes", "bands", "bin_dates", "bin_clear_fractions", "bin_valid"):
            _require(isinstance(getattr(self, name), (list, tuple)), f"chip {name} must be a list")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("name", "image", "mask", "crs"):
            _require(isinstance(getattr(self, name), str), f"chip {name} must be a string")
        _require(len(self.bounds) == 4, f"chip bounds must have 4 numbers, got {self.bounds!r}")
        object.__setattr__(self, "bounds", tuple(_finite(v, "chip bounds value") for v in self.bounds))
        _require(isinstance(self.class_pixels, dict) and all(
            isinstance(k, str) and k.isdigit() and len(k) <= 10 and _count(v) for k, v in self.class_pixels.items()),
            "chip class_pixels must map class ids to pixel counts")
        for name in ("clear_fraction", "nodata_fraction"):
            _finite(getattr(self, name), f"chip {name}")
        _require(isinstance(self.dataset_id, str), "chip dataset_id must be a string")
        _require(isinstance(self.format, str), "chip format must be a string")
        _require(_finite(self.resolution, "chip resolution") > 0, "chip resolution must be > 0")
        _require(self.split in ("", *SPLITS), f"chip split must be one of {SPLITS}, got {self.split!r}")
        _require(isinstance(self.layers, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in self.layers.items()),
                 "chip layers must map layer names to paths")
        _require(len(self.bin_dates) == len(self.bin_clear_fractions) == len(self.bin_valid)
                 and all(isinstance(d, str) for d in self.bin_dates)
                 and all(isinstance(v, bool) for v in self.bin_valid), "chip bins must be lists of equal length")
        for value in self.bin_clear_fractions:
            _finite(value, "chip bin clear fraction")


def compact_chip(record: ChipRecord) -> ChipRecord:
    """The chip as a result carries it: without the per-scene provenance, which the sidecar
    beside the chip holds (the result lists the scene ids once, in ``scenes_used``). Keeps a
    result of 30 chips x 100 scenes at a few kB, not a megabyte."""
    return replace(record, scenes=())


@dataclass(frozen=True)
class Result:
    """What a worker did with one task."""

    run_id: str
    """Run of the task."""
    task_id: str
    """Task this result is for."""
    cell_id: str
    """Cell of the task."""
    worker_id: str
    """Worker that processed it (``N@host``)."""
    status: str
    """One of ``ok``, ``no_scenes``, ``no_fields``, ``failed``."""
    error: str | None = None
    """Readable reason when status is not ``ok``."""
    chips: tuple[ChipRecord, ...] = ()
    """Chips written."""
    scenes_used: tuple[str, ...] = ()
    """Ids of the scenes that went into the chips."""
    chips_skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> number of candidate chips not written."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Stage -> seconds spent (fields, read, composite, rasterize, write, total)."""
    reused: bool = False
    """True when the outputs already existed and the task was not redone."""
    deliveries: int = 1
    """How many times workers have taken this task (1: the first time; more after a crash,
    a rebalance or a second master publishing the same cell)."""
    finished_at: str = ""
    """When the worker finished (ISO 8601 UTC)."""
    schema_version: int = SCHEMA_VERSION
    """Version of this schema."""

    def __post_init__(self) -> None:
        _require(self.status in STATUSES, f"result status must be one of {STATUSES}, got {self.status!r}")
        for name in ("run_id", "task_id", "cell_id", "worker_id", "finished_at"):
            _require(isinstance(getattr(self, name), str), f"result {name} must be a string")
        _require(self.error is None or isinstance(self.error, str), "result error must be a string or null")
        _require(isinstance(self.chips, (list, tuple)) and isinstance(self.scenes_used, (list, tuple)),
                 "result chips and scenes_used must be lists")
        object.__setattr__(self, "chips", tuple(c if isinstance(c, ChipRecord) else ChipRecord(**c) for c in self.chips))
        object.__setattr__(self, "scenes_used", tuple(self.scenes_used))
        _require(all(isinstance(s, str) for s in self.scenes_used), "result scenes_used must be scene ids")
        _require(isinstance(self.seconds, dict) and all(isinstance(k, str) for k in self.seconds),
                 "result seconds must map stage names to seconds")
        for value in self.seconds.values():
            _finite(value, "result seconds value")
        _require(isinstance(self.chips_skipped, dict) and all(_count(v) for v in self.chips_skipped.values()),
                 "result chips_skipped must map reasons to counts")
        _require(_count(self.deliveries) and self.deliveries >= 1, "result deliveries must be a positive integer")
        _require(isinstance(self.reused, bool), "result reused must be true or false")

    def class_pixels(self) -> dict[int, int]:
        """Class id -> pixels over all chips."""
        # (validated in ChipRecord: keys are digit strings, values counts)
        totals: dict[int, int] = {}
        for chip in self.chips:
            for key, count in chip.class_pixels.items():
                totals[int(key)] = totals.get(int(key), 0) + int(count)
        return totals


Message = Task | RunHeader | Result
_TYPES: dict[type, str] = {Task: "task", RunHeader: "run", Result: "result"}


def encode(message: Message) -> bytes:
    """Serialise a message to compact, key-sorted JSON bytes (deterministic)."""
    body = asdict(message)
    body["type"] = _TYPES[type(message)]
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode(raw: bytes | str | None) -> Message:
    """Parse and validate a message; raise MessageError saying what is wrong.

    Messages come from the network: whatever goes wrong while parsing or validating one
    (deep nesting, a 5,000-digit integer, a field of the wrong type) is a MessageError, so a
    reader can dead-letter it and go on. Nothing else escapes.
    """
    if raw is None:
        raise MessageError("empty message (null value)")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(raw)} bytes is larger than {MAX_MESSAGE_BYTES} bytes; "
                           "nothing this software publishes is that large")
    try:
        return _decode(raw)
    except MessageError:
        raise
    except RecursionError:
        raise MessageError("message is nested too deeply to be a valid message") from None
    except Exception as exc:  # noqa: BLE001 - any failure on hostile input is a bad message
        raise MessageError(f"message is not a valid message: {type(exc).__name__}: {str(exc)[:300]}") from None


def _decode(raw: bytes | str) -> Message:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"message is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise MessageError(f"message must be a JSON object, got {type(body).__name__}")
    kind = body.pop("type", None)
    version = body.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MessageError(f"unsupported schema_version {version!r} (this software reads version {SCHEMA_VERSION}); "
                           "upgrade the reader or republish the message")
    try:
        if kind == "task":
            cell = Cell(**_fields(body.pop("cell"), Cell, "cell"))
            scenes = tuple(Scene(**_fields(s, Scene, "scene")) for s in body.pop("scenes"))
            task = Task(cell=cell, scenes=scenes, **_fields(body, Task, "task"))
            return task
        if kind == "run":
            return RunHeader(**_fields(body, RunHeader, "run"))
        if kind == "result":
            chips = tuple(ChipRecord(**_fields(c, ChipRecord, "chip")) for c in body.pop("chips", ()))
            return Result(chips=chips, **_fields(body, Result, "result"))
    except MessageError:
        raise
    except (TypeError, KeyError, AttributeError) as exc:
        raise MessageError(f"{kind} message has missing or invalid fields: {exc}") from exc
    raise MessageError(f"unknown message type {kind!r}; expected one of {sorted(_TYPES.values())}")


def _spec(value: Any, what: str) -> DatasetSpec:
    """A DatasetSpec from a decoded mapping (or itself); a spec this software cannot honour
    (newer version, unknown keys, bad values) is a MessageError saying why."""
    from cropchips.spec import DatasetSpec  # spec.py imports this module's band names

    if isinstance(value, DatasetSpec):
        return value
    if not isinstance(value, dict):
        raise MessageError(f"{what} spec must be an object (the run's dataset spec), got {type(value).__name__}")
    try:
        return DatasetSpec.from_mapping(value, allow_files=False)
    except ConfigError as exc:
        raise MessageError(f"{what} carries a dataset spec this worker cannot honour: {exc}") from None


def _fields(body: Any, cls: type, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise MessageError(f"{what} must be a JSON object")
    known = set(cls.__dataclass_fields__)
    unknown = set(body) - known
    if unknown:
        raise MessageError(f"{what} has unknown fields {sorted(unknown)}")
    out = dict(body)
    for key in ("bbox", "bounds"):
        if key in out and isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out
