"""One task from start to end: fields, read, composite, rasterize, chip, write -> a Result."""

from __future__ import annotations

import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import geopandas as gpd
import numpy as np
from affine import Affine

from cropchips import __version__
from cropchips.crs import transformer
from cropchips.raster.chips import ChipWindow, plan_chips
from cropchips.raster.composite import buffer_clear, has_data
from cropchips.raster.composite import Compositor, compositor as composite_method
from cropchips.errors import ConfigError, CropChipsError, InputDataError, RetryableError, is_transient
from cropchips.fields.gpkg import FieldLayer, layer_fingerprint, open_layer, read_fields
from cropchips.plan.grid import cell_contains
from cropchips.sources.hrefs import HrefPolicy
from cropchips.fields.classes import IGNORE_LABEL
from cropchips.raster.labels import (load_rasterizer, chip_instances, classes_of_instances, field_boundaries, mask_nodata,
                                     rasterize_instances)
from cropchips.raster.temporal import Binned, BinSelection, compose_bins, compose_selected_bins, select_bins
from cropchips.output.leases import LEASES_DIR, CellLeases, Lease, Starts, read_starts, write_starts
from cropchips.output.manifest import (chip_name, chips_from_manifest, is_chip_of, manifest_path, read_complete_manifest,
                                       remove_other_chips, write_manifest)
from cropchips.queue.messages import Cell, ChipRecord, Result, Task, compact_chip
from cropchips.sources import SceneRadiometry, Source, remove_offset, source_for
from cropchips.raster.grid import GRID_MARGIN_PX, TargetGrid, cell_grid, choose_epsg
from cropchips.raster.read import CogReader, SceneReader, SceneStack, clearest_first, task_memory_bytes
from cropchips.raster.tile_cache import TileCache
from cropchips.spec import DatasetSpec
from cropchips.output.spec_file import check_folder_spec
from cropchips.output.storage import open_storage
from cropchips.raster.write import METADATA_DIR, OUTPUT_SUBDIRS, write_chip, write_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessingOptions:
    """How a worker's host takes part: where things are, how many threads, how much memory.

    Nothing here shapes the chips: that is the task's :class:`~cropchips.spec.DatasetSpec`.
    """

    output_dir: Path | str
    """Where ``images/`` and ``masks/`` are written: the shared NFS folder, or an object-store
    URL such as ``s3://bucket/prefix`` (see :mod:`cropchips.output.storage`)."""
    gpkg: str
    """The EuroCrops GeoPackage as this host sees it (the NFS-mounted copy of the master's)."""
    read_threads: int = 8
    """Band files read concurrently."""
    read_cache_mb: int = 256
    """MiB of decoded tiles kept across tasks with the band files open (0: close each file after reading it)."""
    tile_cache_dir: str | None = None
    """The host-wide cache of fetched scene bytes (:mod:`cropchips.raster.tile_cache`), None: none."""
    tile_cache_mb: int = 8192
    """MiB ``tile_cache_dir`` may hold."""
    hrefs: HrefPolicy = field(default_factory=HrefPolicy)
    """Which scene hrefs may be opened."""
    max_task_memory_mb: int = 4096
    """A task whose scene stack and composite would take more MiB than this is refused before reading
    (see :func:`~cropchips.raster.read.task_memory_bytes`)."""
    max_task_starts: int = 3
    """A task whose starts crashed this many workers (killed mid-task) is dead-lettered instead."""
    lease_ttl_s: float = 120.0
    """A cell's lease expires this long after its holder last renewed it (every third of it)."""
    read_whole_cell: bool = False
    """Read and composite the bands over the whole cell, not only over the box of its chips (same chips)."""
    write_threads: int = 4
    """Chips of a task written at once (encoding releases the GIL; on NFS and object stores each file is
    round trips: fsync, rename, upload)."""

    def __post_init__(self) -> None:
        if self.read_threads < 1:
            raise ConfigError("--read-threads must be >= 1")
        if self.write_threads < 1:
            raise ConfigError(f"--write-threads must be >= 1, got {self.write_threads}")
        if self.max_task_starts < 1:
            raise ConfigError("--max-task-starts must be >= 1")
        if self.lease_ttl_s < 3:
            raise ConfigError("--lease-ttl must be at least 3 seconds")
        if self.read_cache_mb < 0:
            raise ConfigError("--read-cache-mb must be >= 0 (0: no cache)")
        if self.tile_cache_mb < 1:
            raise ConfigError(f"--tile-cache-mb must be >= 1, got {self.tile_cache_mb}")
        if self.max_task_memory_mb < 1:
            raise ConfigError(f"--max-task-memory-mb must be >= 1, got {self.max_task_memory_mb}")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Stopwatch:
    """Seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


class TaskProcessor:
    """Processes tasks for one worker, each after its own spec; opens the GeoPackage's layers once."""

    def __init__(self, options: ProcessingOptions, worker_id: str, reader: SceneReader | None = None):
        self.options = options
        self.worker_id = worker_id
        self.storage = open_storage(options.output_dir)
        self.storage.prepare((*OUTPUT_SUBDIRS, LEASES_DIR))
        if not self.storage.conditional_writes:
            # Refuse at start, not task by task: without leases two writers could mix one cell's files.
            raise ConfigError(f"--output-dir {options.output_dir}: workers give each cell one writer with a lease, "
                              "which needs atomic conditional writes: a folder (local or NFS) or s3:// (AWS S3 and "
                              "S3-compatible servers); this store offers neither")
        self.leases = CellLeases(self.storage, worker_id, options.lease_ttl_s)
        self._started: set[str] = set()  # tasks whose start this process counted and has not ended
        self._lease: Lease | None = None
        self._layers: dict[str | None, tuple[FieldLayer, str]] = {}  # spec layer -> (layer, fingerprint)
        self._folder_specs: set[str] = set()  # dataset digests checked against the folder's dataset.yaml
        # geocube's imports (1.4 CPU s) would otherwise fall on the first task: they run now, beside the
        # group join. A task waits for them to end before it rasterizes: importing the same packages from
        # two threads at once can fail (seen: KeyError 'numpy.polynomial' from the task's own import).
        self._rasterizer = threading.Thread(target=load_rasterizer, name="load-rasterizer", daemon=True)
        self._rasterizer.start()
        # Band files stay open across tasks, so that the next cell reuses the decoded tiles it shares.
        # With a tile cache, the bytes of remote files are fetched once per host whichever worker needs them.
        tiles = (TileCache(options.tile_cache_dir, options.tile_cache_mb * 2**20, threads=options.read_threads)
                 if options.tile_cache_dir and reader is None else None)
        self.reader = reader or CogReader(threads=options.read_threads, cache_bytes=options.read_cache_mb * 2**20,
                                          tiles=tiles)
        self._writers = _DaemonPool(options.write_threads, "write") if options.write_threads > 1 else None

    def layer(self, spec: DatasetSpec) -> FieldLayer:
        """The spec's layer of this host's GeoPackage, checked against the master's fingerprint."""
        if spec.layer not in self._layers:
            layer = open_layer(self.options.gpkg, spec.layer)
            self._layers[spec.layer] = (layer, layer_fingerprint(layer))
        layer, fingerprint = self._layers[spec.layer]
        if spec.gpkg_fingerprint is not None and spec.gpkg_fingerprint != fingerprint:
            raise InputDataError(
                f"the GeoPackage {self.options.gpkg} (layer {layer.layer}) on this worker differs from the one "
                f"the master planned with (fingerprint {fingerprint}, the run's is {spec.gpkg_fingerprint}): "
                "mount the master's copy at --gpkg, or re-run the master on the file the workers read")
        return layer

    def manifest_key(self, spec: DatasetSpec, split: str | None = None) -> dict[str, str]:
        """What a manifest must match besides the task id to count as done: the spec's dataset, the split
        the master gave the cell and the software that made it."""
        return {"dataset_digest": spec.dataset_digest(), "split": split or "", "software": __version__}

    def close(self) -> None:
        """Close the band files kept open across tasks, and end the chip writers' threads."""
        self.reader.close()
        if self._writers is not None:
            self._writers.close()

    def _result(self, task: Task, status: str, watch: Stopwatch, **kwargs) -> Result:
        return Result(run_id=task.run_id, task_id=task.task_id, cell_id=task.cell.id, worker_id=self.worker_id,
                      status=status, seconds=dict(watch.seconds), finished_at=utc_now(), **kwargs)

    def process(self, task: Task) -> Result:
        """Process ``task``: the task's own failures (bad input, a bug) become a ``failed`` result
        with a readable error; failures of the infrastructure (storage, scene server, network,
        another worker holding the cell) raise RetryableError, for the worker to wait out."""
        watch = Stopwatch()
        start = time.perf_counter()
        try:
            result = self._process_leased(task, watch)
        except RetryableError as exc:
            log.warning("task %s: infrastructure failure: %s", task.task_id, exc)
            raise
        except CropChipsError as exc:
            log.warning("task %s failed: %s", task.task_id, exc)
            result = self._result(task, "failed", watch, error=str(exc))
        except Exception as exc:  # an unexpected failure must not kill the worker: report it
            if is_transient(exc):
                log.warning("task %s: infrastructure failure: %s: %s", task.task_id, type(exc).__name__, exc)
                raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
            log.exception("task %s failed unexpectedly", task.task_id)
            result = self._result(task, "failed", watch, error=f"internal error: {exc.__class__.__name__}: {exc}")
        result.seconds["total"] = round(time.perf_counter() - start, 4)
        return result

    def abandon(self, task: Task, *, crashed: bool = False) -> None:
        """The worker gives ``task`` up unfinished (shutdown, or an outage it could not wait out).
        A start given back on shutdown does not count as a crash; one given up after an outage
        does, so that a task that always fails the same "transient" way ends in the dead letters."""
        if task.task_id not in self._started:
            return
        self._started.discard(task.task_id)
        if crashed:
            return
        try:
            lease = self.leases.acquire(task.cell.id, task.task_id)
        except RetryableError:
            return  # the task's own thread still holds the cell: its start stays counted
        try:
            starts = read_starts(self.storage, task.cell.id, task.task_id)
            starts.unfinished = max(0, starts.unfinished - 1)
            write_starts(self.storage, task.cell.id, starts)
        finally:
            lease.release()

    def _process_leased(self, task: Task, watch: Stopwatch) -> Result:
        """Check the hrefs and the spec, take the cell's lease, count the start, and process (or re-report)."""
        opts = self.options
        cell = task.cell
        spec = task.spec
        task = replace(task, scenes=tuple(
            replace(scene, assets={band: opts.hrefs.check(href) for band, href in scene.assets.items()})
            for scene in task.scenes))
        if not task.scenes:
            return self._result(task, "no_scenes", watch, error=f"no {spec.collection} scene covers the cell")
        source = source_for(spec.collection)
        for scene in task.scenes:
            source.check_scene(scene)
        self.layer(spec)  # this host's GeoPackage must be the master's
        if task.force or spec.dataset_digest() not in self._folder_specs:
            check_folder_spec(self.storage, spec, force=task.force)
            self._folder_specs.add(spec.dataset_digest())
        lease = self.leases.acquire(cell.id, task.task_id)
        try:
            # A retry in place of the same delivery (after an outage) is neither a new delivery nor a new start.
            first = task.task_id not in self._started
            starts = read_starts(self.storage, cell.id, task.task_id)
            if first:
                starts.deliveries += 1
            if not task.force:
                done = read_complete_manifest(self.storage, cell.id, task.task_id, self.manifest_key(spec, task.split))
                if done is not None:
                    log.info("task %s already complete (%d chips): re-reporting it", task.task_id, len(done["chips"]))
                    self._ended(task, starts)
                    return self._result(task, "ok", watch, chips=tuple(map(compact_chip, chips_from_manifest(done))),
                                        scenes_used=tuple(done["scenes_used"]), chips_skipped=done["chips_skipped"],
                                        reused=True, deliveries=max(1, starts.deliveries))
            if first:
                if starts.unfinished >= opts.max_task_starts:
                    crashed, starts.unfinished = starts.unfinished, 0  # a replay from the dead letters starts afresh
                    write_starts(self.storage, cell.id, starts)
                    return self._result(task, "failed", watch, deliveries=max(1, starts.deliveries),
                                        error=f"crashed {crashed} workers: each start of this task ended without a "
                                              "result (killed: out of memory, a crash in GDAL, kill -9); check the "
                                              "workers' logs and the cell's scenes, then replay it with "
                                              "`admin.py dlq replay`")
                starts.unfinished += 1
                self._started.add(task.task_id)
            write_starts(self.storage, cell.id, starts)
            if first and starts.deliveries > 1:
                log.info("task %s: delivery %d (%d earlier start(s) ended without a result)", task.task_id,
                         starts.deliveries, starts.unfinished - 1)
            self._lease = lease
            try:
                result = self._process(task, watch)
            except Exception as exc:
                if not is_transient(exc):
                    self._ended(task, starts)  # a failure, not a crash
                raise
            finally:
                self._lease = None
            self._ended(task, starts)
            return replace(result, deliveries=max(1, starts.deliveries))
        finally:
            lease.release()

    def _ended(self, task: Task, starts: Starts) -> None:
        """This delivery of ``task`` ended (well or with a final failure): it was no crash."""
        if task.task_id in self._started:
            starts.unfinished = max(0, starts.unfinished - 1)
            self._started.discard(task.task_id)
        write_starts(self.storage, task.cell.id, starts)

    def _check_lease(self) -> None:
        """Before the outputs are made final: the cell must still be ours."""
        if self._lease is not None:
            self._lease.check()

    def _process(self, task: Task, watch: Stopwatch) -> Result:
        """Source -> grid and fields -> quality bands -> labels -> chips -> bands over the chips' box ->
        compositor -> writer (:meth:`_chips_first`); or, where the compositor chooses on the bands themselves
        (no ``select``) or with ``read_whole_cell``: grid and fields -> every band over the whole cell ->
        compositor -> labels -> chips -> writer. Both make the same chips."""
        spec, cell = task.spec, task.cell
        source = source_for(spec.collection)
        grid = self._grid(task, source)
        with watch.stage("fields"):
            fields = self._fields(task, grid)
        if fields is None:
            return self._result(task, "no_fields", watch, error="no field polygon lies in the cell")
        self._rasterizer.join()  # at once after the first task
        chips_first = None if self.options.read_whole_cell else self._chips_first(task, source, grid, fields, watch)
        if chips_first is not None:
            made, labels, windows, skipped = chips_first
        else:
            with watch.stage("read"):
                # With max_scenes, the scenes are chosen on their quality band alone before any other band is read.
                chosen, stack = self.reader.read(task.scenes, grid, source, bands=spec.bands,
                                                 clear_classes=spec.clear_classes, max_scenes=spec.max_scenes,
                                                 before_allocating=self._memory_budget(cell, grid))
            with watch.stage("composite"):
                made = composite_cell(task, source, chosen, stack)
                del stack
            if made is not None:
                with watch.stage("rasterize"):
                    labels = cell_labels(fields, grid, made.covered, spec)
                windows, skipped = self._plan(task, fields, grid, labels, made.rejecter(spec))
        if made is None:
            return self._result(task, "no_scenes", watch,
                                error=f"all {len(task.scenes)} scenes are empty (nodata) over the cell")
        with watch.stage("write"):
            records = self._write(task, grid, made, labels, windows, skipped)
        scene_ids = tuple(task.scenes[i].id for i in made.used)
        log.info("task %s: %d chips from %d scenes (%s)", task.task_id, len(records), len(scene_ids),
                 ", ".join(f"{k} skipped: {v}" for k, v in skipped.items()) or "none skipped")
        return self._result(task, "ok", watch, chips=tuple(map(compact_chip, records)), scenes_used=scene_ids,
                            chips_skipped=dict(skipped))

    @staticmethod
    def _plan(task: Task, fields: gpd.GeoDataFrame, grid: TargetGrid, labels: Mapping[str, np.ndarray],
              reject: Callable[[ChipWindow], str | None]) -> tuple[list[ChipWindow], dict[str, int]]:
        spec = task.spec
        return plan_chips(fields, task.cell, grid, chip_size=spec.chip_size, max_chips=spec.max_chips_per_cell,
                          placement=spec.chip_placement, max_overlap=spec.max_chip_overlap, labels=labels["classes"],
                          min_labelled_fraction=spec.min_labelled_fraction, reject=reject)

    def _chips_first(self, task: Task, source: Source, grid: TargetGrid, fields: gpd.GeoDataFrame,
                     watch: Stopwatch) -> tuple[CellImage | None, dict[str, np.ndarray], list[ChipWindow],
                                                dict[str, int]] | None:
        """The cell's image, labels and chips with the bands read and composited over the chips' box alone.

        Which scenes take part (and, in a time series, which days make each bin), where the cell is
        covered and clear, the labels and so the chips depend on the quality bands and the fields only:
        they are found first, over the whole grid (:func:`choose_from_masks`); then the bands of the
        scenes used are read over the box that holds the chips, and composited there
        (:func:`compose_box`). Each step is the one of the whole-cell path (:func:`composite_cell`), so
        the chips are the same.

        None when the task has to go the whole-cell way: a compositor that chooses on the bands (no
        :meth:`~cropchips.raster.composite.Compositor.select`), a reader without the part reads, or a
        scene the masks count in whose bands hold nothing over the whole grid (the whole-cell path
        leaves such a scene out, and with it its coverage: known only once its bands are read).
        """
        spec, scenes, reader = task.spec, task.scenes, self.reader
        if type(composite_method(spec.composite)).select is Compositor.select or not all(
                callable(getattr(reader, name, None)) for name in ("quality", "clear_fractions", "bands", "has_data")):
            return None
        budget = self._memory_budget(task.cell, grid)
        with watch.stage("read"):
            chosen = list(range(len(scenes)))
            if spec.max_scenes and len(scenes) > spec.max_scenes:  # as read_scenes chooses them
                budget(1)
                fractions = reader.clear_fractions(scenes, grid, source, clear_classes=spec.clear_classes)
                chosen = sorted(clearest_first(fractions)[:spec.max_scenes])
            budget(len(chosen))
            quality = reader.quality([scenes[i] for i in chosen], grid, source)
        with watch.stage("composite"):
            choice = choose_from_masks(spec, source, quality, [scenes[i].datetime[:10] for i in chosen])
            del quality
        if choice is None:
            return None
        if not choice.positions:
            return None, {}, [], {}
        with watch.stage("rasterize"):
            labels = cell_labels(fields, grid, choice.covered, spec)
        windows, skipped = self._plan(task, fields, grid, labels,
                                      chip_rejecter(choice.covered, choice.clear_fraction, choice.binned, spec))
        used = [chosen[p] for p in choice.used]
        box = chips_box(windows)
        with watch.stage("read"):
            data = (reader.bands([scenes[i] for i in used], grid, source, bands=spec.bands, within=box)
                    if box is not None and used else None)
            seen = {p for k, p in enumerate(choice.used) if data is not None and data[k].any()}
            if any(not reader.has_data(scenes[chosen[p]], grid, spec.bands) for p in choice.checked if p not in seen):
                log.info("task %s: a scene's quality band has data over the cell but its bands have none: "
                         "reading the whole cell", task.task_id)
                return None
        with watch.stage("composite"):
            radio = {chosen[p]: source.radiometry(scenes[chosen[p]], spec.harmonize) for p in choice.positions}
            if data is not None:
                for k, i in enumerate(used):
                    remove_offset(data[k], radio[i].applied_dn)
            descriptions = (choice.binned.descriptions(spec.bands) if choice.binned is not None else
                            composite_method(spec.composite).descriptions(
                                spec.bands, [scenes[i].datetime[:10] for i in used]))
            image = compose_box(spec, choice, data, box, len(descriptions))
        if image is None:
            log.warning("task %s: compositor %r left out scenes it selected: reading the whole cell",
                        task.task_id, spec.composite)
            return None
        binned = replace(choice.binned, image=image) if choice.binned is not None else None
        return (CellImage(image=image, descriptions=descriptions, clear_fraction=choice.clear_fraction,
                          covered=choice.covered, used=tuple(used), radiometry=radio, binned=binned,
                          origin=box[:2] if box else (0, 0)),
                labels, windows, skipped)

    def _grid(self, task: Task, source: Source) -> TargetGrid:
        """The cell's pixel grid: in its UTM zone, on the lattice of the source's finest band, the cell's box
        and :data:`GRID_MARGIN_PX` more. Chips lie inside the cell, so nothing beyond is read or composited."""
        epsg = choose_epsg(task.cell, task.scenes)
        in_zone = [s for s in task.scenes if s.epsg == epsg]
        origin = self.reader.origin(in_zone[0].assets[source.origin_band], source.origin_band)
        return cell_grid(task.cell, epsg, origin, task.spec.resolution, GRID_MARGIN_PX)

    def _fields(self, task: Task, grid: TargetGrid) -> gpd.GeoDataFrame | None:
        """The field polygons over the grid, labelled by the spec's class map; None if none lies in the cell."""
        to_lonlat = transformer(grid.crs, "EPSG:4326")
        grid_bbox = to_lonlat.transform_bounds(*grid.bounds, densify_pts=21)
        fields = read_fields(self.layer(task.spec), grid_bbox, task.spec.classes(),
                             unmapped_label=task.spec.unmapped_label)
        if not len(fields) or not cell_contains(task.cell, fields["lon"].to_numpy(), fields["lat"].to_numpy()).any():
            return None
        return fields

    def _memory_budget(self, cell: Cell, grid: TargetGrid) -> Callable[[int], None]:
        """A check that refuses the task before the bands of ``n`` scenes are allocated, if they would not fit."""
        limit = self.options.max_task_memory_mb

        def within_budget(n_scenes: int) -> None:
            need = task_memory_bytes(n_scenes, grid)
            if need > limit * 2**20:
                raise InputDataError(
                    f"cell {cell.id} needs ~{math.ceil(need / 2**20)} MiB for {n_scenes} scenes on a "
                    f"{grid.height}x{grid.width} grid, over --max-task-memory-mb {limit}; "
                    "use smaller cells (--grid-step) or fewer scenes (--max-scenes)")

        return within_budget

    def _write(self, task: Task, grid: TargetGrid, made: CellImage, labels: Mapping[str, np.ndarray],
               windows: list[ChipWindow], skipped: dict[str, int]) -> list[ChipRecord]:
        """Write each chip (image, label layers, provenance sidecar), up to ``write_threads`` at once; then,
        once all have ended, if the cell is still ours, remove the cell's chips this run no longer makes
        and write the manifest. A chip that fails fails the task, after the others have ended."""
        spec, cell = task.spec, task.cell
        if self._writers is None or len(windows) <= 1:
            records = [self._write_chip(task, grid, made, labels, k, window) for k, window in enumerate(windows)]
        else:
            futures = [self._writers.submit(self._write_chip, task, grid, made, labels, k, window)
                       for k, window in enumerate(windows)]
            wait(futures)  # none still writing once the task has ended, whatever happened
            records = [future.result() for future in futures]  # the first failure, in chip order, is raised
        self._check_lease()  # another writer must not have taken the cell meanwhile
        remove_other_chips(self.storage, cell.id, keep={r.name for r in records}, layers=spec.labels,
                           names=self._chip_names(task))
        write_manifest(self.storage, cell.id, {
            "task_id": task.task_id, "run_id": task.run_id, "cell_id": cell.id, "settings": self.manifest_key(spec, task.split),
            "chips": [asdict(r) for r in records], "scenes_used": [task.scenes[i].id for i in made.used],
            "chips_skipped": dict(skipped), "worker_id": self.worker_id, "written_at": utc_now()})
        return records

    def _chip_names(self, task: Task) -> set[str] | None:
        """Every name a chip of the task's cell can have in the folder, so that the stale ones are removed
        without listing the folders (:func:`remove_other_chips`): the folder holds one dataset spec, so a
        chip's number is below its ``max_chips_per_cell`` whoever wrote it, finished or killed; and the
        names in the cell's manifest (a run of the spec the folder held before a ``--force``).

        None (list the folders) for a task published with ``--force``, which may replace the folder's
        spec by one of fewer chips, and when the manifest cannot be read. Left behind: chips of a run
        killed mid-cell under a spec that a later ``--force`` run replaced without covering that cell."""
        if task.force:
            return None
        cell_id = task.cell.id
        names = {chip_name(cell_id, k) for k in range(task.spec.max_chips_per_cell)}
        try:
            body = self.storage.read_json(manifest_path(cell_id))
        except FileNotFoundError:
            return names
        except (OSError, ValueError):
            return None
        chips = body.get("chips") if isinstance(body, dict) else None
        if not isinstance(chips, list):
            return None
        listed = [chip.get("name") for chip in chips if isinstance(chip, dict)]
        return names | {name for name in listed if isinstance(name, str) and is_chip_of(name, cell_id)}

    def _write_chip(self, task: Task, grid: TargetGrid, made: CellImage, labels: Mapping[str, np.ndarray], k: int,
                    window: ChipWindow) -> ChipRecord:
        """The files of chip ``k``: image, classes mask and the spec's other label layers, then its sidecar."""
        spec, cell = task.spec, task.cell
        source = source_for(spec.collection)
        rows, cols = window.slices()
        name = chip_name(cell.id, k)
        chip_mask = labels["classes"][rows, cols]
        transform = grid.transform * Affine.translation(window.col, window.row)
        image_rel, mask_rel = write_chip(self.storage, name, made.chip(window), chip_mask,
                                         crs=grid.crs, transform=transform, descriptions=made.descriptions,
                                         fmt=spec.format, compression=spec.compression,
                                         level=spec.compression_level)
        extra = {layer: labels[layer][rows, cols] for layer in spec.labels if layer != "classes"}
        if "instances" in extra:
            extra["instances"] = chip_instances(extra["instances"])  # ids unique within the chip
        layers = {"classes": mask_rel, **write_layers(self.storage, name, extra, crs=grid.crs,
                                                      transform=transform, fmt=spec.format,
                                                      compression=spec.compression,
                                                      level=spec.compression_level)}
        classes, counts = np.unique(chip_mask, return_counts=True)
        left, top = transform.c, transform.f
        size = window.size * grid.resolution
        record = ChipRecord(
            name=name, image=image_rel, mask=mask_rel, crs=grid.crs,
            bounds=(left, top - size, left + size, top),
            class_pixels={str(int(c)): int(n) for c, n in zip(classes, counts)}, field_id=window.field_id,
            cell_id=cell.id, method=spec.composite, scenes=made.provenance(task), bands=made.descriptions,
            clear_fraction=round(float(made.clear_fraction[rows, cols].mean()), 4),
            nodata_fraction=round(float(1.0 - made.covered[rows, cols].mean()), 4),
            resolution=grid.resolution, format=spec.format, software=__version__,
            dataset_id=spec.dataset_id(), split=task.split or "", layers=layers, **made.bin_record(window, spec))
        # The provenance sidecar sits beside the chip for tools that never see Kafka.
        self.storage.write_json(f"{METADATA_DIR}/{name}.json",
                                {"task_id": task.task_id, "run_id": task.run_id, "worker_id": self.worker_id,
                                 **asdict(record),
                                 "masking": {"quality_band": source.quality_band,
                                             "clear_classes": list(spec.clear_classes),
                                             "cloud_buffer_px": spec.cloud_buffer_px,
                                             "unmapped_label": spec.unmapped_label}})
        return record


class _DaemonPool:
    """``n`` threads kept from task to task (GDAL and PROJ keep state per thread), daemons like the task
    thread: the writes of a task abandoned past the shutdown grace (a hung NFS mount) cannot keep the
    worker from exiting, as a ``ThreadPoolExecutor``'s threads, joined at exit, would."""

    def __init__(self, n: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, daemon=True, name=f"{name}_{i}") for i in range(n)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # surfaced by future.result() in the task's thread
                    future.set_exception(exc)

    def close(self) -> None:
        """Let the threads end once they are idle (not waited for)."""
        for _ in self._threads:
            self._jobs.put(None)


@dataclass(frozen=True)
class CellImage:
    """A cell's composited image and what the chip checks and the provenance need of it."""

    image: np.ndarray
    """(bands out, rows, cols) uint16 on the cell's grid."""
    descriptions: tuple[str, ...]
    """Band descriptions in file order."""
    clear_fraction: np.ndarray
    """(rows, cols) share of clear observations."""
    covered: np.ndarray
    """(rows, cols) True inside some used scene's data."""
    used: tuple[int, ...]
    """Indices (into the task's scenes) of the scenes in the image, date order."""
    radiometry: Mapping[int, SceneRadiometry]
    """Task scene index -> what its DNs meant and what was subtracted."""
    binned: Binned | None = None
    """With a temporal_period: the time series the image is (its bins and where each is clear)."""
    origin: tuple[int, int] = (0, 0)
    """Grid (row, col) of ``image``'s first pixel: the image may cover only the box of the chips."""

    def chip(self, window: ChipWindow) -> np.ndarray:
        """The chip's bands: (bands out, size, size)."""
        row, col = window.row - self.origin[0], window.col - self.origin[1]
        if row < 0 or col < 0 or row + window.size > self.image.shape[1] or col + window.size > self.image.shape[2]:
            raise ValueError(f"chip at ({window.row}, {window.col}) lies outside the image composited at {self.origin}")
        return self.image[:, row:row + window.size, col:col + window.size]

    def bin_record(self, window: ChipWindow, spec: DatasetSpec) -> dict[str, tuple]:
        """The chip record's bin fields (empty without a temporal_period)."""
        if self.binned is None:
            return {}
        rows, cols = window.slices()
        fractions = self.binned.bin_clear[:, rows, cols].mean(axis=(1, 2))
        return {"bin_dates": tuple(first for first, _ in self.binned.bins),
                "bin_clear_fractions": tuple(round(float(f), 4) for f in fractions),
                "bin_valid": tuple(bool(f >= spec.min_clear_fraction) for f in fractions)}

    def rejecter(self, spec: DatasetSpec) -> Callable[[ChipWindow], str | None]:
        """Why a chip window is not written; see :func:`chip_rejecter`."""
        return chip_rejecter(self.covered, self.clear_fraction, self.binned, spec)

    def provenance(self, task: Task) -> tuple[dict[str, object], ...]:
        """Per scene used, oldest first: id, date, collection, item link and radiometry (the sidecar's ``scenes``)."""
        return tuple({"id": task.scenes[i].id, "datetime": task.scenes[i].datetime,
                      "collection": task.scenes[i].collection, "item_href": task.scenes[i].item_href,
                      "processing_baseline": self.radiometry[i].processing_baseline,
                      "published_offset": self.radiometry[i].published_offset,
                      "offset_dn": self.radiometry[i].offset_dn, "applied_dn": self.radiometry[i].applied_dn}
                     for i in self.used)


def chip_rejecter(covered: np.ndarray, clear_fraction: np.ndarray, binned: Binned | None,
                  spec: DatasetSpec) -> Callable[[ChipWindow], str | None]:
    """Why a chip window is not written (``nodata``, ``too_cloudy``, ``too_few_valid_bins``), or None, from the
    cell's coverage and clear fraction (:class:`CellImage`). A time series is judged bin by bin: a bin is valid
    where its clear share reaches min_clear_fraction."""
    def reject(window: ChipWindow) -> str | None:
        rows, cols = window.slices()
        if 1.0 - covered[rows, cols].mean() > spec.max_nodata_fraction:
            return "nodata"
        if binned is not None:
            valid = binned.clear_bins(rows, cols, spec.min_clear_fraction)
            return "too_few_valid_bins" if valid < spec.min_valid_bins else None
        if clear_fraction[rows, cols].mean() < spec.min_clear_fraction:
            return "too_cloudy"
        return None

    return reject


@dataclass(frozen=True)
class MaskChoice:
    """What a task takes of its scenes, found from their quality bands alone (:func:`choose_from_masks`)."""

    positions: list[int]
    """Stack positions of the scenes whose quality band has data (empty: no scene covers the cell)."""
    used: list[int]
    """Stack positions of the scenes the image is made of, ascending."""
    checked: list[int]
    """Stack positions whose bands must hold data for the choice to be the whole-cell path's."""
    valid: np.ndarray
    """(scenes, rows, cols) inside each scene's data."""
    clear: np.ndarray
    """(scenes, rows, cols) clear (cloud buffer applied)."""
    covered: np.ndarray
    """(rows, cols) the :attr:`CellImage.covered` to be."""
    clear_fraction: np.ndarray
    """(rows, cols) the :attr:`CellImage.clear_fraction` to be."""
    selection: BinSelection | None = None
    """A time series: its bins' choices."""
    binned: Binned | None = None
    """A time series: its :class:`Binned`, without the image yet."""


def choose_from_masks(spec: DatasetSpec, source: Source, quality: np.ndarray,
                      dates: Sequence[str]) -> MaskChoice | None:
    """The scenes, coverage and clear fraction :func:`composite_cell` would find, from the quality bands
    (``quality``: scenes x rows x cols, ``dates``: each one's day) alone, as if every scene whose quality
    band has data held band data too; None if the spec's compositor needs the bands to choose."""
    valid = source.valid_mask(quality)
    usable = valid.reshape(len(valid), -1).any(axis=1)
    positions = [int(p) for p in np.flatnonzero(usable)]
    clear = source.clear_mask(quality, spec.clear_classes)
    if not positions:
        return MaskChoice(positions=[], used=[], checked=[], valid=valid, clear=clear, covered=usable[:0],
                          clear_fraction=usable[:0])
    if spec.cloud_buffer_px:
        clear = buffer_clear(clear, source.cloud_mask(quality), spec.cloud_buffer_px)
    if spec.temporal_period:
        selection = select_bins(clear, valid, dates, spec.bins(), spec.composite, usable)
        if selection is None:
            return None
        binned = selection.binned(np.zeros((0, 0, 0), dtype="uint16"))
        # Every scene with data is in the coverage, used or not.
        return MaskChoice(positions=positions, used=list(selection.used), checked=positions, valid=valid, clear=clear,
                          covered=valid[positions].any(axis=0), clear_fraction=binned.clear_fraction,
                          selection=selection, binned=binned)
    picked = composite_method(spec.composite).select(clear[positions])
    if picked is None:
        return None
    used = [positions[i] for i in picked.used]
    return MaskChoice(positions=positions, used=used, checked=used, valid=valid, clear=clear,
                      covered=valid[used].any(axis=0), clear_fraction=picked.clear_fraction)


def compose_box(spec: DatasetSpec, choice: MaskChoice, data: np.ndarray | None,
                box: tuple[int, int, int, int] | None, n_out: int) -> np.ndarray | None:
    """The image (``n_out`` bands) over ``box`` from ``data``, the bands of ``choice.used`` read there (None:
    nothing to composite; zeros); None if the compositor left out a scene it selected."""
    if data is None:
        return np.zeros((n_out, *(box[2:] if box is not None else (0, 0))), dtype="uint16")
    row, col, height, width = box
    part = (slice(None), slice(row, row + height), slice(col, col + width))
    if choice.selection is not None:
        return compose_selected_bins(choice.selection, data, {p: k for k, p in enumerate(choice.used)},
                                     choice.clear[part], choice.valid[part], spec.composite)
    made = composite_method(spec.composite).compose(data, choice.clear[choice.used][part])
    return made.image if made.used == tuple(range(len(choice.used))) else None


def chips_box(windows: Sequence[ChipWindow]) -> tuple[int, int, int, int] | None:
    """(row, col, height, width) of the smallest box of the grid holding every window; None without one."""
    if not windows:
        return None
    row, col = min(w.row for w in windows), min(w.col for w in windows)
    bottom, right = max(w.row + w.size for w in windows), max(w.col + w.size for w in windows)
    return row, col, bottom - row, right - col


def composite_cell(task: Task, source: Source, chosen: Sequence[int], stack: SceneStack) -> CellImage | None:
    """The spec's compositor over the scenes of ``stack`` that hold data (``chosen[p]`` is the task's index of
    stack position ``p``), after each scene's radiometric correction; None if no scene holds data."""
    spec = task.spec
    valid = source.valid_mask(stack.quality)
    positions = [int(p) for p in np.flatnonzero(has_data(stack.data, valid))]
    if not positions:
        return None
    clear = source.clear_mask(stack.quality, spec.clear_classes)
    if spec.cloud_buffer_px:
        clear = buffer_clear(clear, source.cloud_mask(stack.quality), spec.cloud_buffer_px)
    radio = {chosen[p]: source.radiometry(task.scenes[chosen[p]], spec.harmonize) for p in positions}
    for p in positions:
        remove_offset(stack.data[p], radio[chosen[p]].applied_dn)
    # The stack goes in whole when every scene is usable (the usual case): no copy.
    every = len(positions) == len(chosen)
    if spec.temporal_period:
        # Whole: compose_bins leaves the scenes without data out itself, without a copy of the stack.
        dates = [task.scenes[i].datetime[:10] for i in chosen]
        binned = compose_bins(stack.data, clear, valid, dates, spec.bins(), spec.composite)
        used_positions = list(binned.used)
        return CellImage(image=binned.image, clear_fraction=binned.clear_fraction,
                         descriptions=binned.descriptions(spec.bands), covered=valid[positions].any(axis=0),
                         used=tuple(chosen[p] for p in used_positions), radiometry=radio, binned=binned)
    compositor = composite_method(spec.composite)
    made = compositor.compose(stack.data if every else stack.data[positions], clear if every else clear[positions])
    used_positions = [positions[i] for i in made.used]
    used = tuple(chosen[p] for p in used_positions)
    return CellImage(image=made.image, clear_fraction=made.clear_fraction,
                     descriptions=compositor.descriptions(spec.bands, [task.scenes[i].datetime[:10] for i in used]),
                     covered=valid[used_positions].any(axis=0), used=used, radiometry=radio)


def cell_labels(fields: gpd.GeoDataFrame, grid: TargetGrid, covered: np.ndarray,
                spec: DatasetSpec) -> dict[str, np.ndarray]:
    """The cell's label layers on ``grid``: ``classes`` (255 where no scene has data), and ``instances`` and
    ``boundaries`` when the spec asks for them (boundaries are found on the whole cell, so that a chip's
    edge is no boundary)."""
    instances = rasterize_instances(fields, grid)  # the classes follow the owner of each pixel (rasterize_classes)
    labels = {"classes": mask_nodata(classes_of_instances(fields, instances), covered, IGNORE_LABEL)}
    if "instances" in spec.labels:
        labels["instances"] = instances
    if "boundaries" in spec.labels:
        labels["boundaries"] = field_boundaries(instances)
    return labels


def default_worker_id(number: str) -> str:
    return f"{number}@{socket.gethostname()}"
