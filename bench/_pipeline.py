"""One measured run against the COG server: the pipeline (the master's plan, ``worker.py`` processes, the
broker) or the sequential baseline (``bench/baseline.py``), with what it fetched, how long each stage took and
the CPU it used."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._floor import decode_cpu_s
from bench._workers import CpuSampler, Worker, proc_stat, wait_ready
from bench.areas import REPO, area_options, tile_bytes, tile_index, tiles_for_bounds


@dataclass
class Setting:
    latency_s: float
    chip_size: int
    chips_per_cell: int
    partitions: int = 10
    read_threads: int = 8
    tile_cache: bool = True
    """Workers share a host-wide tile cache (``--tile-cache-dir``), fresh for each run."""
    compression: str = "deflate"
    """The run's spec: the chips' codec (``compression``) ..."""
    compression_level: int = 0
    """... and its level (0: the codec's usual)."""


_counter = iter(range(10**6))


def run_pipeline(area, items_http: Path, server, n_workers: int, setting: Setting, broker, workdir: Path,
                 url_to_local: dict[str, str], *, round_robin: bool = False,
                 worker_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start ``n_workers`` workers, wait for the group, publish one task per cell, wait for every result.

    ``round_robin`` publishes task i to partition i mod P instead of by the hash of its cell id (what
    ``cropchips.plan.plan.publish`` does); ``worker_env`` adds environment variables to the workers'.
    Both exist only to measure proposed changes."""
    from kafka import TopicPartition

    from cropchips.queue.kafka import (
        KafkaSettings,
        ensure_topics,
        make_consumer,
        read_topic,
    )
    from cropchips.plan.plan import make_plan, new_run_id
    from cropchips.queue.publish import publish
    from cropchips.queue.messages import Result, decode

    k = next(_counter)
    tag = f"bench{os.getpid()}-{k}"
    topics = {"tasks": f"{tag}-tasks", "results": f"{tag}-results", "dlq": f"{tag}-dlq"}
    kafka = KafkaSettings(broker.bootstrap_servers)
    ensure_topics(kafka, {topics["tasks"]: setting.partitions, topics["results"]: 1, topics["dlq"]: 1})
    output = workdir / f"out-{k}"
    kafka_args = ["--bootstrap-servers", broker.bootstrap_servers, "--tasks-topic", topics["tasks"],
                  "--results-topic", topics["results"], "--dlq-topic", topics["dlq"], "--group-id", f"{tag}-workers"]
    # The chips' size and count are the run's spec, which the tasks carry (see the options below).
    args = ["--gpkg", str(area.gpkg), "--output-dir", str(output), "--allowed-hrefs", f"{server.url}/",
            "--read-threads", str(setting.read_threads), *kafka_args]
    if setting.tile_cache:
        args += ["--tile-cache-dir", str(workdir / f"tiles-{k}")]
    workers = [Worker(n, args, worker_env) for n in range(1, n_workers + 1)]
    sampler = CpuSampler(workers)
    try:
        settle_s = wait_ready(workers, setting.partitions)
        time.sleep(0.3)
        run_id = new_run_id() + f"-{k}"
        options = area_options(
            area, items_http, {"chip_size": setting.chip_size, "max_chips_per_cell": setting.chips_per_cell,
                               "compression": setting.compression, "compression_level": setting.compression_level},
            kafka=kafka, tasks_topic=topics["tasks"], results_topic=topics["results"], dlq_topic=topics["dlq"],
            tasks_partitions=setting.partitions, run_id=run_id)
        plan = make_plan(options)
        server.reset_stats()
        cpu0 = _cpu_times(broker)
        workers0 = _workers_stat(workers)
        machine0 = _machine_busy()
        sampler.start()
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
        workers1 = _workers_stat(workers)
        machine1 = _machine_busy()
        sampler.stop()
        consumer.close()
        stats = server.stats
    finally:
        sampler.stop()
        for w in workers:
            w.stop()
    published = {}
    for rec in read_topic(kafka, topics["tasks"], idle_s=0.5):
        message = decode(rec.value)
        published[message.task_id] = rec.timestamp / 1000.0
    out = analyse_run(plan, results, published, workers, stats, url_to_local, server, n_workers, settle_s,
                      setting.partitions)
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(workdir / f"tiles-{k}", ignore_errors=True)
    # CPU seconds while the tasks ran: the workers (from publication to the last result), this process (the COG
    # server's threads, the result consumer) and the broker; against the machine's cores x wall time.
    worker_cpu, worker_system, worker_faults = (b - a for a, b in zip(workers0, workers1))  # publication -> last result
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
                  **_after_first_task(workers, results, sampler),
                  # Of it, the kernel's (system time) and the fresh pages the workers were handed (minor
                  # page faults; each is a page the kernel zeroes): what several workers a host cost each other.
                  "worker_kernel_share": round(worker_system / worker_cpu, 3) if worker_cpu > 0 else None,
                  "worker_page_faults_per_chip": round(worker_faults / chips),
                  # The most chips/s this machine could give if every core did nothing but this work.
                  "cpu_ceiling_chips_per_s": round(cores * chips / used, 3) if used > 0 else None}
    return out


def _after_first_task(workers, results, sampler: CpuSampler) -> dict[str, Any]:
    """The workers' CPU a chip once each has ended its first task, and what that first task cost.

    A worker's first task is cold: every band file opened for the first time (its header fetched and
    parsed), every tile fetched and decoded with nothing cached yet. A long run pays that once a worker,
    so on the bench's small areas (8 tasks on 4 x 2 cells) it weighs on ``worker_cpu_s_per_chip`` far
    more than it does on a national run's ~100 tasks a worker: this is the figure without it, from the
    moment each worker logged its first task's end to the last result, over the chips of its later tasks.
    """
    warm_cpu, warm_chips, first_cpu = 0.0, 0, []
    for w in workers:
        started, ended = w.task_times()
        order = list(started)  # in the order the worker started them
        samples = sampler.samples.get(w.n) or []
        if not order or order[0] not in ended or len(samples) < 2:
            continue
        at_first_end = sampler.cpu_at(w.n, ended[order[0]])
        if at_first_end is None:
            continue
        first_cpu.append(at_first_end - samples[0][1])
        warm_cpu += samples[-1][1] - at_first_end
        warm_chips += sum(len(results[i][0].chips) for i in order[1:] if i in results)
    return {"worker_cpu_s_per_chip_after_first_task": round(warm_cpu / warm_chips, 4) if warm_chips else None,
            "first_task_worker_cpu_s": [round(x, 3) for x in first_cpu]}


def _publish_round_robin(plan, options) -> None:
    """Like ``cropchips.plan.plan.publish``, but task i goes to partition i mod P (same keys, same header)."""
    from cropchips.queue.kafka import make_producer
    from cropchips.plan.plan import record_params
    from cropchips.queue.messages import encode

    producer = make_producer(options.kafka)
    try:
        futures = [producer.send(options.tasks_topic, key=task.cell.id.encode(), value=encode(task),
                                 partition=i % options.tasks_partitions) for i, task in enumerate(plan.tasks)]
        producer.flush(timeout=60)
        for future in futures:
            future.get(timeout=30)
        producer.send(options.results_topic, key=plan.run_id.encode(),
                      value=encode(plan.header(record_params(options, plan)))).get(timeout=30)
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


def _proc_stat(pid: int) -> tuple[float, float, int]:
    """:func:`bench._workers.proc_stat`, zeros for a process that is gone."""
    return proc_stat(pid) or (0.0, 0.0, 0)


def _workers_stat(workers) -> tuple[float, float, int]:
    """:func:`_proc_stat` summed over the worker processes."""
    cpu, system, faults = zip(*(_proc_stat(w.proc.pid) for w in workers))
    return sum(cpu), sum(system), sum(faults)


def _cpu_times(broker) -> tuple[float, float]:
    """CPU seconds used so far by this process and by the broker process."""
    own = os.times()
    mine = own.user + own.system
    return mine, _proc_stat(broker.process.pid)[0] if broker.process is not None else 0.0


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
        started, ended = w.task_times()
        for task_id, ts in started.items():
            starts.setdefault(task_id, ts)
        for task_id, ts in ended.items():
            noticed.setdefault(task_id, ts)
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
    decode_floor = decode_cpu_s(global_tiles)

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
        # CPU to decode each of those distinct tiles once (bench/_floor.py): no read path decodes less.
        "decode_floor_cpu_s_per_chip": round(decode_floor / chips, 4) if chips else None,
        "stages_median_s": {s: round(statistics.median(v), 4) if v else None for s, v in stage_lists.items()},
        "stages_sum_s": {s: round(sum(v), 3) for s, v in stage_lists.items()},
        "kafka": {
            "overhead_share": round(overhead_share, 4),
            "overhead_s": round(sum(spans) - sum(busy), 3),
            # The same once each worker has its first task: what a run of many tasks a worker sees.
            # The first dispatch is a waiting fetch answered; Tansu answers it at its deadline
            # (fetch_max_wait_ms, 100 ms), not when the task arrives: 22 ms median, measured.
            "overhead_share_after_first_task": (
                round((sum(spans) - sum(busy) - sum(first_dispatch)) / (sum(spans) - sum(first_dispatch)), 4)
                if sum(spans) - sum(first_dispatch) > 0 else None),
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
