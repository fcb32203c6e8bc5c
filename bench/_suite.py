"""The measurements a run of the harness makes, in order: the inputs, the pipeline at each worker count, the
what-ifs, the baseline, the zero-latency run, the memory case, the read paths and the master."""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._master import bench_master
from bench._pipeline import Setting, run_baseline, run_pipeline
from bench._reads import bench_read_paths
from bench._writes import bench_writes
from bench.areas import REPO, AreaSpec, ParcelsSpec, build_area, serve_items


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``args`` (``bench.run``'s flags) asks for, as the report's dict (without its summary)."""
    from cropchips.testing.cog_server import CogServer
    from cropchips.demo.broker import EmbeddedBroker

    reps = args.reps or (1 if args.quick else 3)
    parcels = args.parcels if args.parcels is not None else (100_000 if args.quick else 1_000_000)
    baseline_cells = args.baseline_cells if args.baseline_cells is not None else (
        2 if args.quick else args.x_cells * args.y_cells)
    zero_latency = args.zero_latency_run if args.zero_latency_run is not None else not args.quick
    what_if = args.what_if if args.what_if is not None else not args.quick
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    cache = Path(args.cache)
    setting = Setting(latency_s=args.latency_ms / 1000.0, chip_size=args.chip_size, chips_per_cell=args.chips_per_cell)
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
    runs_dir = args.workdir or run_folder_parent()
    report["params"]["workdir"] = runs_dir or tempfile.gettempdir()
    with tempfile.TemporaryDirectory(prefix="cropchips-bench-", dir=runs_dir) as tmp, EmbeddedBroker() as broker:
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
                uncached = Setting(**{**asdict(setting), "tile_cache": False})
                zstd_1 = Setting(**{**asdict(setting), "compression": "zstd", "compression_level": 1})
                deflate_6 = Setting(**{**asdict(setting), "compression_level": 6})
                # beside: a default run just before each what-if run, which the report holds it against, not the
                # throughput runs made minutes before: on disk identical runs got slower as the bench went on (the
                # worker's CPU a chip rose ~20 % over 8 runs in a row, 2026-12-02; see run_folder_parent), and the
                # VM's speed drifts too.
                for name, n, s_, kwargs, beside in (
                        ("round_robin_partitions", max(counts), rr, {"round_robin": True}, False),
                        ("no_tile_cache", max(counts), uncached, {}, False),
                        ("deflate_level_6", 1, deflate_6, {}, True),
                        ("zstd_level_1", 1, zstd_1, {}, True),
                        ("whole_cell", 1, setting, {"worker_env": {"CROPCHIPS_READ_WHOLE_CELL": "1"}}, True)):
                    runs, defaults = [], []
                    for rep in range(reps):
                        if beside:
                            defaults.append(run_pipeline(area, items_http, server, n, setting, broker, workdir, urls))
                        t = time.perf_counter()
                        runs.append(run_pipeline(area, items_http, server, n, s_, broker, workdir, urls, **kwargs))
                        log(f"what-if {name}, {n} worker(s), run {rep + 1}/{reps}: {runs[-1]['chips_per_s']:.3f} chips/s "
                            f"({time.perf_counter() - t:.1f} s with start-up)"
                            + (f", the default beside it {defaults[-1]['chips_per_s']:.3f}" if defaults else ""))
                    report["what_if"][name] = runs
                    if defaults:
                        report["what_if"][f"{name}_default"] = defaults
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
    t = time.perf_counter()
    report.setdefault("what_if", {})["writes"] = bench_writes(area, args.chip_size)
    log(f"writes: {report['what_if']['writes']} ({time.perf_counter() - t:.1f} s)")
    if parcels > 0:
        t = time.perf_counter()
        report["master"] = bench_master(ParcelsSpec(n=parcels), args.master_reps)
        log(f"master: ratio {report['master']['ratio']} ({time.perf_counter() - t:.1f} s)")
    return report


#: Free bytes a RAM-backed folder must have to take the runs' outputs and tile caches (a 16 x 4 run writes ~0.7 GB,
#: removed after it).
RUN_FOLDER_MIN_FREE = 2 * 2**30


def run_folder_parent(shm: str = "/dev/shm") -> str | None:
    """Where the runs' output and tile-cache folders go: ``shm`` when it is a writable folder with
    :data:`RUN_FOLDER_MIN_FREE` free, else the system's temporary folder (None).

    On disk, each run creates thousands of files (chips, tile-cache entries) and removes them after it; on the
    development VM's ext4 (no journal, ``discard``) creating a file costs more the more files were deleted in the
    last half minute, so identical runs of one bench got slower one after the other (the workers' kernel share
    0.20 -> 0.26 over six runs, against 0.14-0.17 on tmpfs, 2026-12-03). In RAM the bench measures the workers,
    not that filesystem."""
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    if not os.access(shm, os.W_OK | os.X_OK) or st.f_bavail * st.f_frsize < RUN_FOLDER_MIN_FREE:
        return None
    return shm


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

