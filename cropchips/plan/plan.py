"""The master: grid the area, count fields per cell, find scenes once, publish one task per useful cell."""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import shapely
from shapely.geometry.base import BaseGeometry

from cropchips.errors import ConfigError, InputDataError
from cropchips.fields.gpkg import FieldLayer, layer_fingerprint, open_layer, read_points
from cropchips.plan.grid import Grid
from cropchips.plan.splits import assign_splits, block_cells
from cropchips.queue.kafka import DEFAULT_RETENTION_MS, KafkaSettings
from cropchips.queue.messages import MAX_MESSAGE_BYTES, Cell, RunHeader, Scene, Task, encode
from cropchips.raster.chips import chip_fits, inner_box
from cropchips.raster.grid import utm_epsg
from cropchips.sources.stac import DEFAULT_STAC_API, filter_items, load_items_file, scenes_for_cell, search_stac, to_scenes
from cropchips.sources import source_for
from cropchips.spec import DatasetSpec

log = logging.getLogger(__name__)


#: Kafka's and Redpanda's default message limit is 1 MiB (message.max.bytes, kafka_batch_max_bytes), and so
#: is kafka-python's producer limit (max_request_size): a task must stay below it with room for the batch framing.
DEFAULT_MAX_TASK_BYTES = 1_000_000
#: What a worker accepts at all (messages.MAX_MESSAGE_BYTES).
MAX_TASK_BYTES_LIMIT = MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class MasterOptions:
    """Everything the master needs; built by ``master.py`` from the spec file, flags and environment."""

    gpkg: str
    """EuroCrops GeoPackage (the master's copy; workers read theirs and check its fingerprint)."""
    spec: DatasetSpec = field(default_factory=DatasetSpec)
    """The dataset: area, scenes, chips (see :class:`~cropchips.spec.DatasetSpec`)."""
    stac_api: str | None = DEFAULT_STAC_API
    """STAC API to search (ignored when ``stac_items`` is set)."""
    stac_items: str | None = None
    """Local ItemCollection JSON to use instead of the API."""
    kafka: KafkaSettings = field(default_factory=lambda: KafkaSettings("localhost:9092"))
    """Broker connection."""
    tasks_topic: str = "satellite-tasks"
    """Topic for tasks."""
    results_topic: str = "satellite-results"
    """Topic for the run header (workers publish results there too)."""
    dlq_topic: str = "satellite-tasks-dlq"
    """Dead-letter topic, created with the others."""
    tasks_partitions: int = 10
    """Partitions of the tasks topic when it is created."""
    task_partitioning: str = "grid"
    """How tasks are spread over the partitions: ``grid`` (see :func:`grid_order`) or ``hash``
    (Kafka's hash of the cell id)."""
    run_id: str | None = None
    """Run identifier (None: generated from the time)."""
    broker_wait_s: float = 60.0
    """How long to wait for an unreachable broker."""
    max_task_bytes: int = DEFAULT_MAX_TASK_BYTES
    """A task message larger than this refuses the whole run before anything is published."""
    retention_ms: int = DEFAULT_RETENTION_MS
    """``retention.ms`` of the topics the master has to create (-1: keep forever)."""
    force: bool = False
    """Tasks redo complete cells and replace the output folder's ``dataset.yaml`` if it differs."""

    def __post_init__(self) -> None:
        if not 1024 <= self.max_task_bytes <= MAX_TASK_BYTES_LIMIT:
            raise ConfigError(f"--max-task-bytes must lie between 1024 and {MAX_TASK_BYTES_LIMIT}")


@dataclass
class Plan:
    """What the master will publish."""

    run_id: str
    tasks: list[Task]
    cells_total: int
    dropped: Counter
    scenes: int
    spec: DatasetSpec
    """The spec the tasks carry (layer and GeoPackage fingerprint set)."""
    grid: Grid
    """The grid the cells belong to."""
    counts: np.ndarray
    """Field polygons per cell of the grid, ``(y_cells, x_cells)`` (:meth:`~cropchips.plan.grid.Grid.count`)."""
    aoi: BaseGeometry | None = None
    """The area of interest's polygons (EPSG:4326), when the spec gives the area as ``aoi``."""

    @property
    def polygons(self) -> int:
        """Field polygons in the grid."""
        return int(self.counts.sum())

    def header(self, params: dict[str, Any]) -> RunHeader:
        return RunHeader(run_id=self.run_id, task_count=len(self.tasks),
                         created_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                         cells_total=self.cells_total, cells_dropped=dict(self.dropped), params=params,
                         spec=self.spec)


def new_run_id() -> str:
    return f"run-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def read_aoi(path: str) -> BaseGeometry:
    """The union of the polygons of a vector file (any OGR format and CRS), in EPSG:4326."""
    try:
        frame = pyogrio.read_dataframe(path)
    except Exception as exc:  # pyogrio's DataSourceError and friends
        raise InputDataError(f"cannot read the aoi {path} as a file of polygons ({exc}); give a GeoPackage, "
                             "GeoJSON or shapefile of the area's polygons") from None
    if frame.crs is None:
        raise InputDataError(f"the aoi {path} has no CRS; assign one (e.g. ogr2ogr -a_srs EPSG:4326)")
    polygons = frame.geometry[frame.geometry.notna() & ~frame.geometry.is_empty].to_crs("EPSG:4326")
    polygons = polygons[polygons.geom_type.isin(("Polygon", "MultiPolygon"))]
    if polygons.empty:
        raise InputDataError(f"the aoi {path} holds no polygon; give the area as polygons (or use --bbox)")
    return shapely.union_all(shapely.make_valid(polygons.values))


def plan_spec(options: MasterOptions, layer: FieldLayer) -> DatasetSpec:
    """The run's spec as the tasks carry it: the layer resolved and the GeoPackage's fingerprint set, so
    that workers read the same layer of the same file."""
    return replace(options.spec, layer=layer.layer, gpkg_fingerprint=layer_fingerprint(layer))


def make_plan(options: MasterOptions) -> Plan:
    """Read the GeoPackage and the scenes and build the tasks; nothing is published.

    Raises a CropChipsError subclass with a readable message for every bad input.
    """
    spec = options.spec
    aoi = read_aoi(spec.aoi) if spec.aoi is not None else None
    grid = spec.grid(aoi.bounds if aoi is not None else None)
    layer = open_layer(options.gpkg, spec.layer)
    spec = plan_spec(options, layer)
    lon, lat = read_points(layer, grid.bbox)
    counts = grid.count(lon, lat)
    log.info("%d polygons in the grid bbox %s of %s (layer %s)", int(counts.sum()), grid.bbox, options.gpkg,
             layer.layer)
    dropped: Counter = Counter()
    kept = []
    for cell in grid.cells():
        if aoi is not None and not aoi.intersects(shapely.box(*cell.bbox)):
            dropped["outside_aoi"] += 1
        elif counts[cell.row, cell.col] >= spec.min_polygons:
            kept.append(cell)
        else:
            dropped["too_few_polygons"] += 1
    if not kept:
        raise InputDataError(
            f"no cell of the {grid.x_cells}x{grid.y_cells} grid at {grid.bbox} has at least {spec.min_polygons} "
            f"polygons (most in one cell: {int(counts.max())}, total {int(counts.sum())}). Check the area "
            "(--start-x/--start-y, the south-west corner in degrees, and --grid-step; or --bbox, or --aoi) and that "
            "the GeoPackage covers it, or lower --min-polygons.")
    check_chips_fit(kept, spec)
    log.info("kept %d of %d cells; dropped %s", len(kept), grid.x_cells * grid.y_cells,
             ", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "none")

    if options.stac_items:
        items = filter_items(load_items_file(options.stac_items), collection=spec.collection, bbox=grid.bbox,
                             datetime_range=spec.datetime, max_cloud=spec.max_cloud)
        log.info("%d items from %s match the grid, %s and cloud < %s%%", len(items), options.stac_items,
                 spec.datetime, spec.max_cloud)
    else:
        if not options.stac_api:
            raise InputDataError("give --stac-api or --stac-items")
        items = search_stac(options.stac_api, collection=spec.collection, bbox=grid.bbox,
                            datetime_range=spec.datetime, max_cloud=spec.max_cloud)
    scenes = to_scenes(items, source_for(spec.collection))
    if not scenes:
        raise InputDataError(
            f"no {spec.collection} scene covers {grid.bbox} in {spec.datetime} with cloud cover < "
            f"{spec.max_cloud}%. Widen --datetime, raise --max-cloud or check --collection.")

    run_id = options.run_id or new_run_id()
    splits = assign_splits(kept, grid, spec.split_block_size, spec.split_ratios)
    shares = Counter(splits.values())
    log.info("splits of %d-cell blocks: %s cells", block_cells(spec.split_block_size, grid.step) ** 2,
             ", ".join(f"{s} {shares.get(s, 0)}" for s in ("train", "val", "test")))
    tasks = []
    capped = 0
    for cell in kept:
        cell_scenes = scenes_for_cell(cell, scenes)
        if not cell_scenes:
            log.warning("cell %s: no scene covers it; its task will report no_scenes", cell.id)
        if spec.max_task_scenes and len(cell_scenes) > spec.max_task_scenes:
            cell_scenes = least_cloudy(cell_scenes, spec.max_task_scenes)
            capped += 1
        tasks.append(Task(run_id=run_id, task_id=Task.make_id(cell, cell_scenes), cell=cell, scenes=tuple(cell_scenes),
                          spec=spec, force=options.force, split=splits[cell.id]))
    if capped:
        log.info("%d tasks keep only their %d least cloudy scenes (--max-task-scenes)", capped, spec.max_task_scenes)
    check_task_sizes(tasks, options.max_task_bytes)
    return Plan(run_id=run_id, tasks=tasks, cells_total=grid.x_cells * grid.y_cells, dropped=dropped,
                scenes=len(scenes), spec=spec, grid=grid, counts=counts, aoi=aoi)


def check_chips_fit(cells: Sequence[Cell], spec: DatasetSpec) -> None:
    """Refuse a grid whose cells cannot hold a chip: chips stay inside their cells (in the cell's UTM zone)."""
    for cell in cells:
        minx, miny, maxx, maxy = cell.bbox
        crs = f"EPSG:{utm_epsg((minx + maxx) / 2, (miny + maxy) / 2)}"
        if chip_fits(cell, crs, spec.chip_size, spec.resolution, placement=spec.chip_placement):
            continue
        left, bottom, right, top = inner_box(cell, crs)
        chip_m = spec.chip_size * spec.resolution
        need = "twice a chip (a lattice chip must fall whole inside)" if spec.chip_placement == "lattice" else "a chip"
        raise ConfigError(
            f"cell {cell.id} is about {right - left:.0f} x {top - bottom:.0f} m, smaller than {need} of "
            f"{spec.chip_size} px x {spec.resolution:g} m = {chip_m:.0f} m: chips stay inside their cells. Use a "
            f"larger --grid-step (now {spec.grid_step}) or a smaller --chip-size")


def least_cloudy(scenes: Sequence[Scene], n: int) -> list[Scene]:
    """The ``n`` scenes with the lowest ``eo:cloud_cover`` (unknown counts as cloudiest), in their
    original (date) order; ties keep the earlier scene."""
    order = sorted(range(len(scenes)), key=lambda i: (scenes[i].cloud_cover is None, scenes[i].cloud_cover or 0.0, i))
    return [scenes[i] for i in sorted(order[:n])]


def check_task_sizes(tasks: Sequence[Task], limit: int) -> None:
    """Refuse the run, before anything is published, if a task message would exceed ``limit``
    bytes: the broker would refuse it, and a run published in part has no run header."""
    sizes = [(len(encode(task)), task) for task in tasks]
    over = [(size, task) for size, task in sizes if size > limit]
    if not over:
        return
    size, task = max(over, key=lambda pair: pair[0])
    per_scene = max(1, size // max(1, len(task.scenes)))
    fits = max(1, (limit - 1024) // per_scene)
    raise ConfigError(
        f"{len(over)} of {len(tasks)} tasks would be larger than {limit} bytes (the largest, cell {task.cell.id} "
        f"with {len(task.scenes)} scenes, is {size} bytes), so nothing was published. Keep fewer scenes per task "
        f"with --max-task-scenes (about {fits} fit), narrow --datetime or lower --max-cloud; or, if the broker and "
        "the workers allow larger messages, raise --max-task-bytes")


def record_params(options: MasterOptions, plan: Plan) -> dict[str, Any]:
    """The master's own settings for the record (the spec travels beside them, in the header's ``spec``)."""
    params = asdict(options)
    del params["spec"]
    params["kafka"] = {"bootstrap_servers": options.kafka.bootstrap_servers}
    params["gpkg"] = str(Path(options.gpkg))
    params["grid"] = asdict(plan.grid)
    params["dataset_id"] = plan.spec.dataset_id()
    return params
