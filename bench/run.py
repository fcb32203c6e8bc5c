"""The benchmark harness: ``python -m bench.run [--quick] [--out bench/results.json]``.

Measures, on generated data with Earth-Search-like COGs (1024 x 1024 tiles) served over HTTP with a
per-request latency (``cropchips.cog_server.CogServer``) and a real Kafka-protocol broker
(``cropchips.embedded_broker.EmbeddedBroker``):

1. throughput (chips/s, median of ``--reps`` runs) of 1, 2 and 4 ``worker.py`` processes;
2. per chip: HTTP requests, bytes fetched, header bytes and read amplification (bytes fetched / bytes
   of the COG tiles the chips' windows intersect, from each file's TileOffsets/TileByteCounts);
3. per task: seconds per stage, Kafka overhead (dispatch latency, share of wall time outside task
   processing) and worker peak memory (ru_maxrss from wait4), plus a 0.05 degree cell with 10 scenes;
4. the master's gridding of a large GeoPackage against a bare ``pyogrio.read_dataframe`` of it;
5. the pipeline against a plain sequential stackstac script (``bench/baseline.py``).

See bench/README.md for what each number means and the measured results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.areas import (
    CACHE,
    LAYER,
    AreaSpec,
    ParcelsSpec,
    build_area,
    build_parcels,
    serve_items,
    tile_bytes,
    tile_index,
    tiles_for_bounds,
)

#: The goals the numbers are held against.
TARGETS = {
    "read_amplification": ("<=", 1.3),
    "speedup_vs_baseline": (">=", 3.0),
    "scaling_4_vs_1": (">=", 3.0),
    "master_vs_bare_read": ("<=", 1.5),
    "worker_peak_memory_mib": ("<=", 1536.0),
    "kafka_overhead_share": ("<", 0.02),
}


# --------------------------------------------------------------------------- workers


class Worker:
    """``worker.py N`` as a child process (through bench/_worker.py for millisecond log times)."""

    _LINE = re.compile(r"^@(\d+\.\d+) \S+\s+\S+: (.*)$")

    def __init__(self, n: int, args: list[str], env: dict[str, str] | None = None):
        self.n = n
        self.lines: list[tuple[float, str]] = []
        self.raw: list[str] = []
        self.spawned = time.time()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "_worker.py"), str(REPO / "worker.py"),
                                      str(n), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO, env={**os.environ, **(env or {})})
        self.maxrss_kib: int | None = None
        self.cpu_s: float | None = None
        self.returncode: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            match = self._LINE.match(line.rstrip("\n"))
            if match:
                self.lines.append((float(match.group(1)), match.group(2)))

    def assignment(self) -> set[int] | None:
        """Partitions currently held, from the log (None: never assigned)."""
        state: set[int] | None = None
        for _, text in list(self.lines):
            if text.startswith("partitions assigned:"):
                state = set(json.loads(text.split(":", 1)[1].strip()))
            elif text.startswith("partitions revoked:"):
                state = set()
        return state

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the worker finishes, leaves the group and exits), then reap it with wait4 for its peak RSS
        and CPU time (SIGKILL after ``timeout``)."""
        if self.returncode is not None:
            return
        if self.proc.returncode is None:  # not reaped yet (Popen.poll reaps a child that died early)
            try:
                os.kill(self.proc.pid, signal.SIGTERM)  # not Popen.send_signal: its poll() could reap the child
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            try:
                while True:
                    pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.monotonic() > deadline:
                        os.kill(self.proc.pid, signal.SIGKILL)
                        pid, status, usage = os.wait4(self.proc.pid, 0)
                        break
                    time.sleep(0.05)
                self.maxrss_kib = usage.ru_maxrss
                self.cpu_s = usage.ru_utime + usage.ru_stime
                self.proc.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped elsewhere
                pass
        self.returncode = self.proc.returncode
        self._reader.join(timeout=5)

    @property
    def log(self) -> str:
        return "".join(self.raw)


def wait_ready(workers: list[Worker], partitions: int, timeout: float = 120.0) -> float:
    """Wait until the group is settled: every worker holds partitions, together all of them, once each."""
    start = time.monotonic()
    while True:
        states = [w.assignment() for w in workers]
        if all(s for s in states):
            union: set[int] = set()
            total = 0
            for s in states:
                union |= s  # type: ignore[operator]
                total += len(s)  # type: ignore[arg-type]
            if total == partitions and len(union) == partitions:
                return time.monotonic() - start
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker {w.n} exited early:\n{w.log[-3000:]}")
        if time.monotonic() - start > timeout:
            raise RuntimeError("workers did not settle into the group:\n" + "\n".join(w.log[-1500:] for w in workers))
        time.sleep(0.05)


# --------------------------------------------------------------------------- one pipeline run


@dataclass
class Setting:
    latency_s: float
    chip_size: int
    chips_per_cell: int
    partitions: int = 10
    read_threads: int = 8


_counter = iter(range(10**6))


def run_pipeline(area, items_http: Path, server, n_workers: int, setting: Setting, broker, workdir: Path,
                 url_to_local: dict[str, str], *, round_robin: bool = False,
                 worker_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start ``n_workers`` workers, wait for the group, publish one task per cell, wait for every result.

    ``round_robin`` publishes task i to partition i mod P instead of by the hash of its cell id (what
    ``cropchips.master.publish`` does); ``worker_env`` adds environment variables to the workers'.
    Both exist only to measure proposed changes."""
    from kafka import TopicPartition

    from cropchips.grid import Grid
    from cropchips.kafka_io import (
        KafkaSettings,
        ensure_topics,
        make_consumer,
        read_topic,
    )
    from cropchips.master import MasterOptions, make_plan, new_run_id, publish
    from cropchips.messages import Result, decode

    k = next(_counter)
    tag = f"bench{os.getpid()}-{k}"
    topics = {"tasks": f"{tag}-tasks", "results": f"{tag}-results", "dlq": f"{tag}-dlq"}
    kafka = KafkaSettings(broker.bootstrap_servers)
    ensure_topics(kafka, {topics["tasks"]: setting.partitions, topics["results"]: 1, topics["dlq"]: 1})
    output = workdir / f"out-{k}"
    kafka_args = ["--bootstrap-servers", broker.bootstrap_servers, "--tasks-topic", topics["tasks"],
                  "--results-topic", topics["results"], "--dlq-topic", topics["dlq"], "--group-id", f"{tag}-workers"]
    args = ["--gpkg", str(area.gpkg), "--layer", area.layer, "--output-dir", str(output),
            "--allowed-hrefs", f"{server.url}/", "--chip-size", str(setting.chip_size),
            "--max-chips-per-cell", str(setting.chips_per_cell), "--read-threads", str(setting.read_threads),
            *kafka_args]
    workers = [Worker(n, args, worker_env) for n in range(1, n_workers + 1)]
    try:
        settle_s = wait_ready(workers, setting.partitions)
        time.sleep(0.3)
        run_id = new_run_id() + f"-{k}"
        options = MasterOptions(
            gpkg=str(area.gpkg), layer=area.layer,
            grid=Grid(area.start_x, area.start_y, area.grid_step, area.x_cells, area.y_cells),
            min_polygons=1, stac_api=None, stac_items=str(items_http), collection=area.collection,
            datetime=area.datetime, max_cloud=100.0, kafka=kafka, tasks_topic=topics["tasks"],
            results_topic=topics["results"], dlq_topic=topics["dlq"], tasks_partitions=setting.partitions,
            run_id=run_id)
        plan = make_plan(options)
        server.reset_stats()
        cpu0 = _cpu_times(broker)
        workers_cpu0 = sum(_proc_cpu(w.proc.pid) for w in workers)
        machine0 = _machine_busy()
        consumer = make_consumer(kafka, group_id=None)
        tp = TopicPartition(topics["results"], 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        if round_robin:
            _publish_round_robin(plan, options)
        else:
            publish(plan, options)
        results: dict[str, tuple[Result, float]] = {}
        deadline = time.monotonic() + 600
        while len(results) < len(plan.tasks):
            for recs in consumer.poll(timeout_ms=200).values():
                for rec in recs:
                    message = decode(rec.value)
                    if isinstance(message, Result) and message.run_id == run_id:
                        results.setdefault(message.task_id, (message, rec.timestamp / 1000.0))
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(results)} of {len(plan.tasks)} results within 600 s")
            for w in workers:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.n} died:\n{w.log[-3000:]}")
        cpu1 = _cpu_times(broker)
        workers_cpu1 = sum(_proc_cpu(w.proc.pid) for w in workers)
        machine1 = _machine_busy()
        consumer.close()
        stats = server.stats
    finally:
        for w in workers:
            w.stop()
    published = {}
    for rec in read_topic(kafka, topics["tasks"], idle_s=0.5):
        message = decode(rec.value)
        published[message.task_id] = rec.timestamp / 1000.0
    out = analyse_run(plan, results, published, workers, stats, url_to_local, server, n_workers, settle_s,
                      setting.partitions)
    shutil.rmtree(output, ignore_errors=True)
    # CPU seconds while the tasks ran: the workers (whole life, start-up included), this process (the COG
    # server's threads, the result consumer) and the broker; against the machine's cores x wall time.
    worker_cpu = workers_cpu1 - workers_cpu0  # from publication to the last result
    server_cpu, broker_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cores = os.cpu_count() or 1
    used = worker_cpu + server_cpu + broker_cpu
    # Processes that are not part of this benchmark (anything else running on the machine) skew every number.
    others = max(0.0, (machine1 - machine0) - used)
    chips = out["chips"] or 1
    out["cpu"] = {"workers_s": round(worker_cpu, 2), "harness_and_cog_server_s": round(server_cpu, 2),
                  "broker_s": round(broker_cpu, 2), "other_processes_s": round(others, 2),
                  "machine_capacity_s": round(cores * out["wall_s"], 2),
                  "utilisation": round(used / (cores * out["wall_s"]), 3) if out["wall_s"] else None,
                  "other_processes_share": round(others / (cores * out["wall_s"]), 3) if out["wall_s"] else None,
                  "worker_cpu_s_per_chip": round(worker_cpu / chips, 4),
                  # The most chips/s this machine could give if every core did nothing but this work.
                  "cpu_ceiling_chips_per_s": round(cores * chips / used, 3) if used > 0 else None}
    return out


def _publish_round_robin(plan, options) -> None:
    """Like ``cropchips.master.publish``, but task i goes to partition i mod P (same keys, same header)."""
    from cropchips.kafka_io import make_producer
    from cropchips.master import record_params
    from cropchips.messages import encode

    producer = make_producer(options.kafka)
    try:
        futures = [producer.send(options.tasks_topic, key=task.cell.id.encode(), value=encode(task),
                                 partition=i % options.tasks_partitions) for i, task in enumerate(plan.tasks)]
        producer.flush(timeout=60)
        for future in futures:
            future.get(timeout=30)
        producer.send(options.results_topic, key=plan.run_id.encode(),
                      value=encode(plan.header(record_params(options)))).get(timeout=30)
    finally:
        producer.close(timeout=10)


def _machine_busy() -> float:
    """CPU seconds all processes of the machine have used (non-idle time in /proc/stat)."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _cpu_times(broker) -> tuple[float, float]:
    """CPU seconds used so far by this process and by the broker process."""
    own = os.times()
    mine = own.user + own.system
    return mine, _proc_cpu(broker.process.pid) if broker.process is not None else 0.0


def analyse_run(plan, results, published, workers, stats, url_to_local, server, n_workers, settle_s,
                partitions) -> dict[str, Any]:
    from urllib.parse import unquote, urlsplit

    tasks = {t.task_id: t for t in plan.tasks}
    chips = sum(len(r.chips) for r, _ in results.values())
    statuses = Counter(r.status for r, _ in results.values())
    first_publish = min(published.values())
    last_result = max(ts for _, ts in results.values())
    wall = last_result - first_publish

    # --- Kafka overhead, per worker: the span from publication to its last result, minus its task time.
    starts: dict[str, float] = {}
    noticed: dict[str, float] = {}
    for w in workers:
        for ts, text in w.lines:
            m = re.match(r"task (\S+) \(cell .*\) started", text)
            if m:
                starts.setdefault(m.group(1), ts)
            m = re.match(r"task (\S+) (ok|no_scenes|no_fields|failed): \d+ chips in", text)
            if m:
                noticed.setdefault(m.group(1), ts)
    per_worker: dict[str, list[str]] = defaultdict(list)
    for task_id, (result, _) in results.items():
        per_worker[result.worker_id].append(task_id)
    spans, busy, first_dispatch, notice_lag, between = [], [], [], [], []
    worker_rows = {}
    for worker_id, ids in sorted(per_worker.items()):
        ids.sort(key=lambda i: starts.get(i, results[i][1]))
        span = max(results[i][1] for i in ids) - first_publish
        work = sum(results[i][0].seconds.get("total", 0.0) for i in ids)
        spans.append(span)
        busy.append(work)
        worker_rows[worker_id] = {"tasks": len(ids), "chips": sum(len(results[i][0].chips) for i in ids),
                                  "span_s": round(span, 3), "busy_s": round(work, 3)}
        if ids[0] in starts:
            first_dispatch.append(starts[ids[0]] - published[ids[0]])
        for j, i in enumerate(ids):
            if i in starts and i in noticed:
                notice_lag.append(noticed[i] - starts[i] - results[i][0].seconds.get("total", 0.0))
            if j + 1 < len(ids) and ids[j + 1] in starts:
                between.append(starts[ids[j + 1]] - results[i][1])
    dispatch = [starts[i] - published[i] for i in results if i in starts and i in published]
    overhead_share = (sum(spans) - sum(busy)) / sum(spans) if sum(spans) > 0 else 0.0

    # --- Bytes: fetched (server counters) against the tiles the chips need.
    fetched = stats.bytes
    header = 0
    unique = 0
    for fs in stats.files.values():
        header += sum(e - s + 1 for s, e in fs.ranges if s == 0)
        merged: list[list[int]] = []
        for s, e in sorted(fs.ranges):
            if merged and s <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        unique += sum(e - s + 1 for s, e in merged)
    need_task = 0
    global_tiles: dict[str, set] = defaultdict(set)
    for task_id, (result, _) in results.items():
        task = tasks[task_id]
        for scene in task.scenes:
            for href in scene.assets.values():
                local = url_to_local.get(href) or unquote(urlsplit(href).path)
                index = tile_index(local)
                tiles: set = set()
                for chip in result.chips:
                    tiles |= tiles_for_bounds(index, tuple(chip.bounds), chip.crs)
                need_task += tile_bytes(index, tiles)
                global_tiles[local] |= tiles
    need_global = sum(tile_bytes(tile_index(p), t) for p, t in global_tiles.items())

    stage_names = ("fields", "read", "composite", "rasterize", "write", "total")
    stage_lists = {s: [r.seconds.get(s, 0.0) for r, _ in results.values() if r.status == "ok"] for s in stage_names}
    rss = [w.maxrss_kib / 1024 for w in workers if w.maxrss_kib]
    out = {
        "workers": n_workers,
        "partitions": partitions,
        "tasks": len(results),
        "statuses": dict(statuses),
        "chips": chips,
        "wall_s": round(wall, 3),
        "chips_per_s": round(chips / wall, 4) if wall > 0 else None,
        "seconds_per_chip": round(wall / chips, 4) if chips else None,
        "group_settle_s": round(settle_s, 2),
        "http": {
            "requests": stats.requests,
            "bytes": fetched,
            "header_bytes": header,
            "unique_bytes": unique,
            "needed_tile_bytes_per_task": need_task,
            "needed_tile_bytes_global": need_global,
            "requests_per_chip": round(stats.requests / chips, 2) if chips else None,
            "bytes_per_chip": round(fetched / chips) if chips else None,
            "header_bytes_per_chip": round(header / chips) if chips else None,
            # Bytes fetched / bytes of the distinct tiles the chips' windows intersect (each tile once).
            "read_amplification": round(fetched / need_global, 3) if need_global else None,
            "read_amplification_without_headers": round((fetched - header) / need_global, 3) if need_global else None,
            # Against what the tasks need each on its own (a tile shared by two cells' chips counted twice):
            # the over-read inside a task, apart from the re-fetching of shared tiles across tasks.
            "read_amplification_per_task": round(fetched / need_task, 3) if need_task else None,
        },
        "stages_median_s": {s: round(statistics.median(v), 4) if v else None for s, v in stage_lists.items()},
        "stages_sum_s": {s: round(sum(v), 3) for s, v in stage_lists.items()},
        "kafka": {
            "overhead_share": round(overhead_share, 4),
            "overhead_s": round(sum(spans) - sum(busy), 3),
            "first_task_dispatch_s": [round(x, 3) for x in first_dispatch],
            # Publication to start for every task: includes the wait behind earlier tasks of the same worker.
            "queue_and_dispatch_median_s": round(statistics.median(dispatch), 3) if dispatch else None,
            "finish_notice_lag_median_s": round(statistics.median(notice_lag), 3) if notice_lag else None,
            "finish_notice_lag_sum_s": round(sum(notice_lag), 3),
            "between_tasks_median_s": round(statistics.median(between), 3) if between else None,
            "between_tasks_sum_s": round(sum(between), 3),
        },
        "per_worker": worker_rows,
        # The busiest worker's span against the mean task time per worker: 1.0 = perfectly even.
        "imbalance": round(max(spans) / (sum(busy) / n_workers), 3) if busy and sum(busy) else None,
        # Chips/s if the same task times were spread evenly over the workers (no Kafka overhead):
        # what the hardware gives, apart from the key-hash partitioning.
        "balanced_chips_per_s": round(n_workers * chips / sum(busy), 4) if sum(busy) else None,
        "worker_peak_rss_mib": [round(x, 1) for x in rss],
        "worker_exit_codes": [w.returncode for w in workers],
    }
    return out


# --------------------------------------------------------------------------- read paths


def bench_read_paths(area, max_tasks: int = 4) -> dict[str, Any]:
    """CPU of the worker's read (``read_stack``) against a plain windowed RasterIO read of the same local files
    onto the same grid, one thread, no HTTP. ``read_stack`` warped every band when this was written (hence the
    ``warpedvrt_*`` keys); it now resamples on the file's lattice in numpy and warps only off-lattice grids."""
    import numpy as np
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import from_bounds

    from cropchips.grid import Grid
    from cropchips.master import MasterOptions, make_plan
    from cropchips.messages import BANDS, SCL
    from cropchips.reading import (
        GDAL_OPTIONS,
        cell_grid,
        choose_epsg,
        grid_origin,
        read_stack,
    )

    options = MasterOptions(gpkg=str(area.gpkg), layer=area.layer,
                            grid=Grid(area.start_x, area.start_y, area.grid_step, area.x_cells, area.y_cells),
                            min_polygons=1, stac_api=None, stac_items=str(area.items), datetime=area.datetime,
                            max_cloud=100.0)
    tasks = make_plan(options).tasks[:max_tasks]
    grids = []
    for task in tasks:
        epsg = choose_epsg(task.cell, task.scenes)
        grids.append(cell_grid(task.cell, epsg, grid_origin(task.scenes[0].assets["B02"]), 10.0, 129))

    def plain(task, grid) -> np.ndarray:
        out = np.zeros((len(task.scenes), len(BANDS) + 1, grid.height, grid.width), dtype="uint16")
        with rasterio.Env(**GDAL_OPTIONS):
            for i, scene in enumerate(task.scenes):
                for b, band in enumerate(BANDS + (SCL,)):
                    with rasterio.open(scene.assets[band]) as src:
                        window = from_bounds(*grid.bounds, transform=src.transform)
                        same = abs(src.transform.a - grid.resolution) < 1e-9
                        out[i, b] = src.read(1, window=window, out_shape=(grid.height, grid.width), boundless=True,
                                             fill_value=0, resampling=Resampling.nearest if same or band == SCL
                                             else Resampling.bilinear)
        return out

    def timed(fn) -> tuple[float, float, list]:
        c0, w0 = os.times(), time.perf_counter()
        arrays = [fn(task, grid) for task, grid in zip(tasks, grids)]
        c1 = os.times()
        return (c1.user + c1.system - c0.user - c0.system) / len(tasks), (time.perf_counter() - w0) / len(tasks), arrays

    def warped(task, grid) -> np.ndarray:
        stack = read_stack(task.scenes, grid, threads=1)
        return np.concatenate([stack.data, stack.scl[:, None].astype("uint16")], axis=1)

    warped(tasks[0], grids[0])  # warm the page cache
    w_cpu, w_wall, w_arrays = timed(warped)
    p_cpu, p_wall, p_arrays = timed(plain)
    ten = [b for b, band in enumerate(BANDS) if band in ("B02", "B03", "B04", "B08")] + [len(BANDS)]
    twenty = [b for b, band in enumerate(BANDS) if band not in ("B02", "B03", "B04", "B08")]
    same_10m = all(np.array_equal(a[:, ten], b[:, ten]) for a, b in zip(w_arrays, p_arrays))
    diff_20m = max(int(np.abs(a[:, twenty].astype("int32") - b[:, twenty].astype("int32")).max())
                   for a, b in zip(w_arrays, p_arrays))
    equal_20m = float(np.mean([np.mean(a[:, twenty] == b[:, twenty]) for a, b in zip(w_arrays, p_arrays)]))
    return {"tasks": len(tasks), "warpedvrt_cpu_s_per_task": round(w_cpu, 3), "warpedvrt_wall_s_per_task": round(w_wall, 3),
            "plain_read_cpu_s_per_task": round(p_cpu, 3), "plain_read_wall_s_per_task": round(p_wall, 3),
            "plain_10m_and_scl_identical": same_10m, "plain_20m_max_abs_diff_dn": diff_20m,
            "plain_20m_share_identical": round(equal_20m, 4)}


# --------------------------------------------------------------------------- master


def bench_master(spec: ParcelsSpec, reps: int) -> dict[str, Any]:
    """Seconds of the master's planning (make_plan: open, read_points, count, scenes) vs a bare read."""
    import pyogrio
    import shapely
    from pyproj import Transformer

    from cropchips.fields import bbox_in_crs, open_layer, read_points
    from cropchips.grid import Grid
    from cropchips.master import MasterOptions, make_plan

    path, gen_s = build_parcels(spec)
    grid = Grid(spec.start_x, spec.start_y, spec.grid_step, spec.x_cells, spec.y_cells)
    items = _items_covering(grid.bbox, path.parent / f"{spec.key}.items.json")
    options = MasterOptions(gpkg=str(path), layer=LAYER, grid=grid, stac_api=None, stac_items=str(items),
                            max_cloud=100.0, datetime="2023-05-15/2023-06-30")
    pyogrio.read_dataframe(path, columns=[])  # warm the page cache for both
    plan_s, bare_s, points_s = [], [], []
    tasks = 0
    for _ in range(reps):
        t = time.perf_counter()
        frame = pyogrio.read_dataframe(path, columns=[])
        bare_s.append(time.perf_counter() - t)
        n_bare = len(frame)
        del frame
        t = time.perf_counter()
        plan = make_plan(options)
        plan_s.append(time.perf_counter() - t)
        tasks = len(plan.tasks)
        t = time.perf_counter()
        layer = open_layer(str(path), LAYER)
        lon, lat = read_points(layer, grid.bbox)
        grid.count(lon, lat)
        points_s.append(time.perf_counter() - t)

    # Where read_points spends its time (one more pass, step by step).
    layer = open_layer(str(path), LAYER)
    parts = {}
    t = time.perf_counter()
    meta, table = pyogrio.read_arrow(str(path), layer=LAYER, columns=[], bbox=bbox_in_crs(grid.bbox, layer.crs))
    parts["read_arrow_with_bbox"] = time.perf_counter() - t
    t = time.perf_counter()
    pyogrio.read_arrow(str(path), layer=LAYER, columns=[])
    parts["read_arrow_without_bbox"] = time.perf_counter() - t
    t = time.perf_counter()
    geoms = shapely.from_wkb(table.column(meta.get("geometry_name") or "geom").to_numpy(zero_copy_only=False))
    parts["from_wkb"] = time.perf_counter() - t
    t = time.perf_counter()
    points = shapely.point_on_surface(geoms)
    parts["point_on_surface"] = time.perf_counter() - t
    t = time.perf_counter()
    shapely.centroid(geoms)
    parts["centroid_instead"] = time.perf_counter() - t
    t = time.perf_counter()
    Transformer.from_crs(layer.crs, "EPSG:4326", always_xy=True).transform(shapely.get_x(points), shapely.get_y(points))
    parts["to_lonlat"] = time.perf_counter() - t
    plan_med, bare_med = statistics.median(plan_s), statistics.median(bare_s)
    return {"parcels": spec.n, "features_read_bare": n_bare, "cells": spec.x_cells * spec.y_cells, "tasks": tasks,
            "generation_s": round(gen_s, 1), "file_mib": round(path.stat().st_size / 2**20, 1),
            "make_plan_s": round(plan_med, 3), "grid_points_s": round(statistics.median(points_s), 3),
            "bare_read_s": round(bare_med, 3), "ratio": round(plan_med / bare_med, 3),
            "runs": {"make_plan_s": [round(x, 3) for x in plan_s], "bare_read_s": [round(x, 3) for x in bare_s]},
            "read_points_parts_s": {k: round(v, 3) for k, v in parts.items()}}


def _items_covering(bbox: tuple[float, float, float, float], path: Path) -> Path:
    """One Earth-Search-shaped item whose footprint covers ``bbox`` (the master needs a scene per cell)."""
    import shapely
    import shapely.geometry

    minx, miny, maxx, maxy = bbox
    epsg = 32600 + int((minx + maxx) / 2 // 6 + 31)
    keys = ["blue", "green", "red", "nir", "rededge1", "rededge2", "rededge3", "nir08", "swir16", "swir22", "scl"]
    footprint = shapely.box(minx - 0.01, miny - 0.01, maxx + 0.01, maxy + 0.01)
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "S2B_BENCH_20230601_0_L2A", "collection": "sentinel-2-l2a",
            "geometry": shapely.geometry.mapping(footprint), "bbox": list(footprint.bounds), "links": [],
            "properties": {"datetime": "2023-06-01T11:07:00Z", "eo:cloud_cover": 1.0, "proj:epsg": epsg,
                           "s2:processing_baseline": "05.09"},
            "assets": {k: {"href": f"https://sentinel-cogs.s3.us-west-2.amazonaws.com/bench/{k}.tif"} for k in keys}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    return path


# --------------------------------------------------------------------------- baseline


def run_baseline(area, items_http: Path, server, setting: Setting, max_cells: int, workdir: Path) -> dict[str, Any]:
    server.reset_stats()
    cmd = [sys.executable, "-m", "bench.baseline", "--items", str(items_http), "--gpkg", str(area.gpkg),
           "--layer", area.layer, "--start-x", str(area.start_x), "--start-y", str(area.start_y),
           "--grid-step", str(area.grid_step), "--x-cells", str(area.x_cells), "--y-cells", str(area.y_cells),
           "--max-cells", str(max_cells), "--chip-size", str(setting.chip_size),
           "--chips-per-cell", str(setting.chips_per_cell), "--out", str(workdir / "baseline")]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"baseline failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    stats = server.stats
    out["http"] = {"requests": stats.requests, "bytes": stats.bytes,
                   "requests_per_chip": round(stats.requests / out["chips"], 2) if out["chips"] else None,
                   "bytes_per_chip": round(stats.bytes / out["chips"]) if out["chips"] else None}
    return out


# --------------------------------------------------------------------------- report


def verdict(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    op, goal = TARGETS[name]
    ok = {"<=": value <= goal, ">=": value >= goal, "<": value < goal}[op]
    if ok:
        return "met"
    if op in ("<=", "<"):
        return f"missed by {value / goal:.2f}x ({value:.3g} vs {op} {goal:g})"
    return f"missed by {goal / value:.2f}x ({value:.3g} vs {op} {goal:g})" if value > 0 else "missed"


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    tp = report["throughput"]
    by_n = {n: _median(r["chips_per_s"] for r in runs) for n, runs in tp.items()}
    balanced = {n: _median(r["balanced_chips_per_s"] for r in runs) for n, runs in tp.items()}
    one = tp.get("1") or next(iter(tp.values()))
    first_n = min(tp, key=int)
    base = report.get("baseline") or {}
    memory = report.get("memory_case") or {}
    values = {
        "read_amplification": _median(r["http"]["read_amplification"] for r in one),
        "speedup_vs_baseline": (base["seconds_per_chip"] * by_n[first_n]
                                if base.get("seconds_per_chip") and by_n[first_n] else None),
        "scaling_4_vs_1": by_n["4"] / by_n["1"] if "4" in by_n and "1" in by_n and by_n["1"] else None,
        "master_vs_bare_read": report["master"]["ratio"] if report.get("master") else None,
        "worker_peak_memory_mib": max(memory["worker_peak_rss_mib"]) if memory.get("worker_peak_rss_mib") else None,
        "kafka_overhead_share": _median(r["kafka"]["overhead_share"] for r in one),
    }
    extra = {
        "read_amplification_per_task": _median(r["http"]["read_amplification_per_task"] for r in one),
        "scaling_4_vs_1_if_balanced": (balanced["4"] / balanced["1"]
                                       if "4" in balanced and "1" in balanced and balanced["1"] else None),
        "cpu_ceiling_chips_per_s": _median(r["cpu"]["cpu_ceiling_chips_per_s"] for r in one),
    }
    what_if = {}
    wi = report.get("what_if") or {}
    if wi.get("round_robin_partitions"):
        runs = wi["round_robin_partitions"]
        n = str(runs[0]["workers"])
        rr = _median(r["chips_per_s"] for r in runs)
        what_if["round_robin_partitions"] = {
            "workers": int(n), "partitions": runs[0]["partitions"], "chips_per_s": rr, "chips_per_s_hash_keys": by_n.get(n),
            "imbalance": _median(r["imbalance"] for r in runs),
            "imbalance_hash_keys": _median(r["imbalance"] for r in tp.get(n, [])),
            "scaling_vs_1": rr / by_n["1"] if rr and by_n.get("1") else None}
    if wi.get("curl_cache_512mib"):
        runs = wi["curl_cache_512mib"]
        what_if["curl_cache_512mib"] = {
            "chips_per_s": _median(r["chips_per_s"] for r in runs), "chips_per_s_default": by_n.get("1"),
            "requests_per_chip": _median(r["http"]["requests_per_chip"] for r in runs),
            "requests_per_chip_default": _median(r["http"]["requests_per_chip"] for r in one),
            "bytes_per_chip": _median(r["http"]["bytes_per_chip"] for r in runs),
            "bytes_per_chip_default": _median(r["http"]["bytes_per_chip"] for r in one),
            "read_amplification": _median(r["http"]["read_amplification"] for r in runs)}
    if wi.get("read_paths"):
        what_if["read_paths"] = wi["read_paths"]
    all_runs = [r for runs in tp.values() for r in runs] + [r for runs in wi.values() if isinstance(runs, list)
                                                             for r in runs]
    for key in ("memory_case", "zero_latency"):
        if report.get(key):
            all_runs.append(report[key])
    others = [r["cpu"]["other_processes_share"] for r in all_runs if r["cpu"].get("other_processes_share") is not None]
    return {"what_if": what_if,
            "other_processes_share_max": max(others) if others else None,
            "chips_per_s_median": {n: round(v, 4) for n, v in by_n.items() if v is not None},
            "balanced_chips_per_s_median": {n: round(v, 4) for n, v in balanced.items() if v is not None},
            "values": {k: (round(v, 4) if v is not None else None) for k, v in values.items()},
            "diagnostics": {k: (round(v, 4) if v is not None else None) for k, v in extra.items()},
            "targets": {k: f"{op} {goal:g}" for k, (op, goal) in TARGETS.items()},
            "verdicts": {k: verdict(k, v) for k, v in values.items()}}


def print_table(report: dict[str, Any]) -> None:
    s = report["summary"]
    tp = report["throughput"]
    p = report["params"]
    print()
    print(f"cropchips benchmark  {report['date']}  {report['machine']}")
    print(f"area: {p['area']}; COG server latency {p['latency_ms']:g} ms/request; {p['reps']} run(s) per row")
    print()
    head = (f"{'workers':>7} {'chips/s':>8} {'runs':>20} {'s/chip':>7} {'tasks/worker':>12} "
            f"{'req/chip':>8} {'MB/chip':>8} {'hdr KB/chip':>11} {'ampl.':>6} {'ampl/task':>9} {'kafka ovh':>9} "
            f"{'CPU use':>7} {'other':>5} {'RSS MiB':>7}")
    print(head)
    for n, runs in tp.items():
        med = s["chips_per_s_median"].get(n) or 0.0
        r0 = runs[0]
        rss = max((x for r in runs for x in r["worker_peak_rss_mib"]), default=0)
        loads = "/".join(str(v["tasks"]) for v in sorted(r0["per_worker"].values(), key=lambda v: -v["tasks"]))
        print(f"{n:>7} {med:>8.3f} {' '.join(format(r['chips_per_s'], '.3f') for r in runs):>20} "
              f"{1 / med if med else 0:>7.3f} {loads:>12} "
              f"{_median(r['http']['requests_per_chip'] for r in runs):>8.1f} "
              f"{_median(r['http']['bytes_per_chip'] for r in runs) / 1e6:>8.2f} "
              f"{_median(r['http']['header_bytes_per_chip'] for r in runs) / 1e3:>11.0f} "
              f"{_median(r['http']['read_amplification'] for r in runs):>6.2f} "
              f"{_median(r['http']['read_amplification_per_task'] for r in runs):>9.3f} "
              f"{_median(r['kafka']['overhead_share'] for r in runs):>9.2%} "
              f"{_median(r['cpu']['utilisation'] for r in runs):>7.0%} "
              f"{_median(r['cpu']['other_processes_share'] for r in runs):>5.0%} {rss:>7.0f}")
    print()
    names = ("fields", "read", "composite", "rasterize", "write", "total")
    print("median seconds per task and stage (worker CPU s per chip; Kafka: first dispatch, finish-notice lag, gap between tasks):")
    print(f"{'workers':>7} " + " ".join(f"{x:>9}" for x in names) + f" {'CPU/chip':>9} {'dispatch':>9} {'lag':>6} {'gap':>6}")
    rows = list(tp.items())
    if report.get("zero_latency"):
        rows.append(("1 @0ms", [report["zero_latency"]]))
    if report.get("memory_case"):
        rows.append(("memory", [report["memory_case"]]))
    for n, runs in rows:
        row = [_median(r["stages_median_s"][x] for r in runs) or 0.0 for x in names]
        print(f"{n:>7} " + " ".join(f"{x:>9.3f}" for x in row)
              + f" {_median(r['cpu']['worker_cpu_s_per_chip'] for r in runs):>9.3f}"
              + f" {_median(x for r in runs for x in r['kafka']['first_task_dispatch_s']) or 0:>9.3f}"
              + f" {_median(r['kafka']['finish_notice_lag_median_s'] for r in runs) or 0:>6.3f}"
              + f" {_median(r['kafka']['between_tasks_median_s'] for r in runs) or 0:>6.3f}")
    if report.get("memory_case"):
        m = report["memory_case"]
        print(f"\nmemory case: one {p['memory_step']:g} deg cell, {p['memory_dates']} scenes, median composite: "
              f"worker peak RSS {max(m['worker_peak_rss_mib']):.0f} MiB, task {m['stages_median_s']['total']:.2f} s, "
              f"Kafka overhead {m['kafka']['overhead_share']:.1%}")
    if report.get("baseline"):
        b = report["baseline"]
        print(f"\nbaseline (stackstac, sequential, 1 process): {b['chips']} chips from {b['cells']} cells, "
              f"{b['seconds_per_chip']:.3f} s/chip, {b['http']['requests_per_chip']} req/chip, "
              f"{b['http']['bytes_per_chip'] / 1e6:.2f} MB/chip, peak RSS {b['peak_rss_mb']:.0f} MiB; "
              f"seconds: {b['stages']}")
    if report.get("master"):
        m = report["master"]
        print(f"\nmaster: {m['parcels']:,} parcels, {m['cells']} cells: make_plan {m['make_plan_s']:.2f} s vs bare "
              f"read_dataframe(columns=[]) {m['bare_read_s']:.2f} s = {m['ratio']:.2f}x; read_points parts "
              f"{m['read_points_parts_s']}")
    w = s.get("what_if") or {}
    if w:
        print("\nwhat-if (proposed changes, measured without editing the pipeline):")
    if "round_robin_partitions" in w:
        x = w["round_robin_partitions"]
        print(f"  tasks round-robin over {x['partitions']} partitions, {x['workers']} workers: {x['chips_per_s']:.3f} chips/s "
              f"(default partitioning {x['chips_per_s_hash_keys']:.3f}); imbalance {x['imbalance']} (default "
              f"{x['imbalance_hash_keys']}); {x['scaling_vs_1']:.2f}x one worker")
    if "curl_cache_512mib" in w:
        x = w["curl_cache_512mib"]
        print(f"  CPL_VSIL_CURL_CACHE_SIZE=512 MiB, 1 worker: {x['chips_per_s']:.3f} chips/s (default "
              f"{x['chips_per_s_default']:.3f}), {x['requests_per_chip']} req/chip (default "
              f"{x['requests_per_chip_default']}), {x['bytes_per_chip'] / 1e6:.2f} MB/chip (default "
              f"{x['bytes_per_chip_default'] / 1e6:.2f}), read amplification {x['read_amplification']}")
    if "read_paths" in w:
        x = w["read_paths"]
        print(f"  plain windowed RasterIO read instead of read_stack (local files, 1 thread): {x['plain_read_cpu_s_per_task']} "
              f"vs {x['warpedvrt_cpu_s_per_task']} CPU s per task; 10 m + SCL identical: "
              f"{x['plain_10m_and_scl_identical']}, 20 m identical share {x['plain_20m_share_identical']}")
    d = s["diagnostics"]
    print("\ntargets:")
    for k, v in s["values"].items():
        shown = "n/a" if v is None else (f"{v:.2%}" if k == "kafka_overhead_share" else f"{v:.3f}")
        print(f"  {k:<24} {shown:>9}  target {s['targets'][k]:<8} {s['verdicts'][k]}")
    print(f"  (read amplification against each task's own tiles: {d['read_amplification_per_task']}; "
          f"CPU ceiling of this machine: {d['cpu_ceiling_chips_per_s']} chips/s = "
          f"{d['cpu_ceiling_chips_per_s'] / s['chips_per_s_median']['1']:.2f}x one worker)"
          if d.get("cpu_ceiling_chips_per_s") and s["chips_per_s_median"].get("1") else
          f"  (read amplification against each task's own tiles: {d['read_amplification_per_task']})")


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one run per worker count, 100k parcels, 2 baseline cells, no zero-latency run (< 3 min)")
    p.add_argument("--out", default=str(REPO / "bench" / "results.json"), help="JSON report path")
    p.add_argument("--latency-ms", type=float, default=40.0, help="per-request latency of the COG server")
    p.add_argument("--workers", default="1,2,4", help="worker counts, comma separated")
    p.add_argument("--reps", type=int, default=None, help="runs per worker count (default 3, --quick 1)")
    p.add_argument("--x-cells", type=int, default=4)
    p.add_argument("--y-cells", type=int, default=2)
    p.add_argument("--grid-step", type=float, default=0.05, help="cell size in degrees")
    p.add_argument("--dates", type=int, default=3, help="scenes in the throughput area")
    p.add_argument("--fields-per-cell", type=int, default=12)
    p.add_argument("--chip-size", type=int, default=256)
    p.add_argument("--chips-per-cell", type=int, default=5)
    p.add_argument("--parcels", type=int, default=None,
                   help="parcels in the master's GeoPackage (default 1M, --quick 100k; 0: skip)")
    p.add_argument("--master-reps", type=int, default=3)
    p.add_argument("--memory-step", type=float, default=0.05, help="cell size of the memory case (degrees; 0: skip)")
    p.add_argument("--memory-dates", type=int, default=10, help="scenes in the memory case")
    p.add_argument("--baseline-cells", type=int, default=None,
                   help="cells the baseline processes (default all, --quick 2; 0: skip)")
    p.add_argument("--zero-latency-run", action=argparse.BooleanOptionalAction, default=None,
                   help="one more 1-worker run with no server latency (default: on, off with --quick)")
    p.add_argument("--what-if", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure proposed changes without editing the pipeline: tasks spread round-robin over "
                        "the partitions (4 workers), a 512 MiB GDAL /vsicurl/ cache (1 worker), plain windowed reads "
                        "instead of WarpedVRT (default: on, off with --quick)")
    p.add_argument("--cache", default=str(CACHE), help="where generated inputs are kept")
    p.add_argument("--show", metavar="JSON", default=None, help="print the table of a saved report and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        saved["summary"] = summarise(saved)
        print_table(saved)
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    from cropchips.cog_server import CogServer
    from cropchips.embedded_broker import EmbeddedBroker

    reps = args.reps or (1 if args.quick else 3)
    parcels = args.parcels if args.parcels is not None else (100_000 if args.quick else 1_000_000)
    baseline_cells = args.baseline_cells if args.baseline_cells is not None else (
        2 if args.quick else args.x_cells * args.y_cells)
    zero_latency = args.zero_latency_run if args.zero_latency_run is not None else not args.quick
    what_if = args.what_if if args.what_if is not None else not args.quick
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    cache = Path(args.cache)
    setting = Setting(latency_s=args.latency_ms / 1000.0, chip_size=args.chip_size, chips_per_cell=args.chips_per_cell)
    started = time.perf_counter()
    spec = AreaSpec(x_cells=args.x_cells, y_cells=args.y_cells, grid_step=args.grid_step, dates=args.dates,
                    fields_per_cell=args.fields_per_cell)
    t = time.perf_counter()
    area = build_area(spec, cache)
    log(f"area {spec.key} ready ({time.perf_counter() - t:.1f} s)")
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {_mem_gib():.0f} GiB RAM, {platform.platform()}, Python {platform.python_version()}",
        "params": {"area": f"{spec.x_cells}x{spec.y_cells} cells of {spec.grid_step:g} deg, {spec.dates} scenes, "
                           f"COG tiles {spec.blocksize}, chip {args.chip_size}, <= {args.chips_per_cell} chips/cell",
                   "latency_ms": args.latency_ms, "reps": reps, "workers": counts, "parcels": parcels,
                   "memory_dates": args.memory_dates, "memory_step": args.memory_step, "quick": args.quick,
                   "baseline_cells": baseline_cells, "read_threads": setting.read_threads,
                   "partitions": setting.partitions},
        "code": _code_version(),
        "throughput": {},
    }
    with tempfile.TemporaryDirectory(prefix="cropchips-bench-") as tmp, EmbeddedBroker() as broker:
        workdir = Path(tmp)
        with CogServer(area.root, latency_s=setting.latency_s) as server:
            items_http = workdir / "items-http.json"
            urls = serve_items(area, server, items_http)
            for n in counts:
                runs = []
                for rep in range(reps):
                    t = time.perf_counter()
                    result = run_pipeline(area, items_http, server, n, setting, broker, workdir, urls)
                    runs.append(result)
                    log(f"{n} worker(s), run {rep + 1}/{reps}: {result['chips']} chips in {result['wall_s']:.2f} s "
                        f"= {result['chips_per_s']:.3f} chips/s ({time.perf_counter() - t:.1f} s with start-up)")
                report["throughput"][str(n)] = runs
            if what_if:
                report["what_if"] = {}
                # Round-robin over a partition count that every worker count divides (1, 2, 4 -> 4).
                partitions = math.lcm(*counts)
                rr = Setting(**{**asdict(setting), "partitions": partitions})
                for name, n, s_, kwargs in (
                        ("round_robin_partitions", max(counts), rr, {"round_robin": True}),
                        ("curl_cache_512mib", 1, setting, {"worker_env": {"CPL_VSIL_CURL_CACHE_SIZE": str(512 * 2**20)}})):
                    runs = []
                    for rep in range(reps):
                        t = time.perf_counter()
                        runs.append(run_pipeline(area, items_http, server, n, s_, broker, workdir, urls, **kwargs))
                        log(f"what-if {name}, {n} worker(s), run {rep + 1}/{reps}: {runs[-1]['chips_per_s']:.3f} chips/s "
                            f"({time.perf_counter() - t:.1f} s with start-up)")
                    report["what_if"][name] = runs
            if baseline_cells > 0:
                t = time.perf_counter()
                report["baseline"] = run_baseline(area, items_http, server, setting, baseline_cells, workdir)
                log(f"baseline: {report['baseline']['chips']} chips, {report['baseline']['seconds_per_chip']} s/chip "
                    f"({time.perf_counter() - t:.1f} s)")
        if zero_latency:
            t = time.perf_counter()
            with CogServer(area.root, latency_s=0.0) as server:
                items_http = workdir / "items-http-0ms.json"
                urls = serve_items(area, server, items_http)
                report["zero_latency"] = run_pipeline(area, items_http, server, 1, setting, broker, workdir, urls)
            log(f"1 worker, no latency: {report['zero_latency']['chips_per_s']} chips/s ({time.perf_counter() - t:.1f} s)")
        if args.memory_step > 0:
            mspec = AreaSpec(x_cells=1, y_cells=1, grid_step=args.memory_step, dates=args.memory_dates,
                             fields_per_cell=args.fields_per_cell)
            t = time.perf_counter()
            marea = build_area(mspec, cache)
            with CogServer(marea.root, latency_s=setting.latency_s) as server:
                items_http = workdir / "items-memory.json"
                urls = serve_items(marea, server, items_http)
                report["memory_case"] = run_pipeline(marea, items_http, server, 1, setting, broker, workdir, urls)
            log(f"memory case: peak RSS {report['memory_case']['worker_peak_rss_mib']} MiB "
                f"({time.perf_counter() - t:.1f} s)")
    if what_if:
        t = time.perf_counter()
        report.setdefault("what_if", {})["read_paths"] = bench_read_paths(area)
        log(f"read paths: {report['what_if']['read_paths']} ({time.perf_counter() - t:.1f} s)")
    if parcels > 0:
        t = time.perf_counter()
        report["master"] = bench_master(ParcelsSpec(n=parcels), args.master_reps)
        log(f"master: ratio {report['master']['ratio']} ({time.perf_counter() - t:.1f} s)")
    report["summary"] = summarise(report)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    busy = report["summary"]["other_processes_share_max"]
    if busy is not None and busy > 0.1:
        log(f"WARNING: other processes used up to {busy:.0%} of the machine's CPU during a run: the numbers are "
            "skewed; run again on a quiet machine")
    log(f"report written to {out} ({report['elapsed_s']:.0f} s in all)")
    return 0


def _code_version() -> dict[str, Any]:
    """The commit measured and the files that differed from it (read-only git commands)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], check=False, capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD") or None, "modified": changed}


def log(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _mem_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


if __name__ == "__main__":
    sys.exit(main())
