"""Consume tasks, read Sentinel-2 scenes, composite, rasterize field masks and write image/mask chips."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence

from cropchips.cli import options as config
from cropchips.cli.run import EXIT_OK, run, setup_logging
from cropchips.errors import ConfigError
from cropchips.sources.hrefs import DEFAULT_ALLOWED_PREFIXES, HrefPolicy
from cropchips.processing import ProcessingOptions, TaskProcessor, default_worker_id
from cropchips.queue.consumer import Worker, WorkerOptions

log = logging.getLogger("worker")


def build_parser(env: Mapping[str, str] | None = None) -> config.EnvArgumentParser:
    p = config.EnvArgumentParser(prog="worker.py", description=__doc__, env=env)
    p.add_argument("number", help="this worker's number (N in `worker.py N`), part of its id N@host")
    p.option("--gpkg", default="/mnt/mimmo/es_2023_all.gpkg", help="EuroCrops GeoPackage (the NFS-mounted copy)")
    p.option("--output-dir", default="/mnt/mimmo", help="where images/ and masks/ are written: the shared folder, or an object store URL "
             "such as s3://bucket/prefix (credentials and endpoint from the usual AWS_* variables)")
    c = p.add_argument_group("reading", "what the chips are (size, composite, bands, ...) is the run's dataset spec, "
                             "which every task carries: set it on the master")
    p.option("--allowed-hrefs", default=",".join(DEFAULT_ALLOWED_PREFIXES), group=c,
             help="comma-separated URL prefixes scene hrefs must start with (default: Earth Search's buckets)")
    p.option("--local-scenes-dir", default=None, group=c,
             help="comma-separated folders from which local scene files may be read (default: none)")
    p.option("--read-threads", type=config.positive_int, default=8, group=c, help="band files read concurrently")
    p.option("--write-threads", type=config.positive_int, default=4, group=c,
             help="chips of a task written concurrently (encoding, fsync and rename, or the upload to an object "
                  "store); 1: one after the other")
    p.option("--read-cache-mb", type=config.non_negative_int, default=256, group=c,
             help="MiB of decoded COG tiles kept across tasks, with the band files left open, so that neighbouring "
                  "cells do not fetch and decode shared tiles again (0: close every file after reading it)")
    p.option("--tile-cache-dir", default=None, group=c,
             help="a folder on this host's local disk (not NFS) shared by its workers: each byte range of a remote "
                  "scene file (COG header block or tile) is fetched once per host and read from here by the other "
                  "workers and later tasks (default: none, every process fetches what it needs)")
    p.option("--tile-cache-mb", type=config.positive_int, default=8192, group=c,
             help="MiB the --tile-cache-dir may hold; the least recently used ranges are removed beyond it")
    p.flag("--read-whole-cell", group=c,
           help="read and composite the bands over the whole cell, not only over the box of the cell's chips "
                "(chosen first, from the quality bands and the fields): the same chips, more CPU and bytes; "
                "for comparison")
    p.option("--max-task-memory-mb", type=config.positive_int, default=4096, group=c,
             help="refuse (dead-letter) a task whose scene stack and composite would take more MiB than this, "
                  "before reading it: a huge cell or too many scenes must not take the worker down")
    config.add_kafka_options(p)
    k = p.add_argument_group("consumer")
    p.option("--group-id", default=config.DEFAULT_GROUP_ID, group=k, help="consumer group shared by all workers")
    p.flag("--burst", group=k, help="exit 0 once no task has arrived for --burst-idle seconds (tests, batch runs)")
    p.option("--burst-idle", type=config.positive_float, default=10.0, group=k, help="idle seconds before --burst exits")
    p.option("--max-poll-interval-ms", type=config.positive_int, default=300000, group=k,
             help="Kafka max.poll.interval.ms (the worker keeps polling during a task, so long tasks are safe)")
    p.option("--session-timeout-ms", type=config.positive_int, default=10000, group=k,
             help="a worker silent this long is dropped from the group and its tasks go to the others")
    p.option("--shutdown-grace", type=config.non_negative_float, default=30.0, group=k,
             help="on SIGTERM/SIGINT, seconds the current task may still run before it is abandoned uncommitted")
    p.option("--group-instance-id", default=None, group=k,
             help="static group membership (KIP-345) on Redpanda/Kafka: an id unique per worker process, or 'auto' "
                  "for HOST-N; a worker restarted with the same id within --session-timeout-ms gets its partitions "
                  "back without a rebalance of the others (default: a dynamic member; see the README before "
                  "using it on other brokers)")
    p.option("--assignor", default="range", choices=("range", "cooperative-sticky"), group=k,
             help="partition assignment: range (eager: a rebalance pauses every worker for a few seconds) or "
                  "cooperative-sticky (only moved partitions pause; measured slower on the embedded broker)")
    p.option("--revoke-wait", type=config.non_negative_float, default=30.0, group=k,
             help="when a rebalance takes the running task's partition, seconds to wait for the task so that it "
                  "is published and committed before the partition goes")
    r = p.add_argument_group("failures")
    p.option("--retry-for", type=config.non_negative_float, default=600.0, group=r,
             help="seconds a task failing on the infrastructure (storage, scene server, network) is retried, "
                  "uncommitted, before the worker exits 1 so that another worker takes it")
    p.option("--max-task-starts", type=config.positive_int, default=3, group=r,
             help="a task that crashed this many workers (killed mid-task: out of memory, a GDAL crash) is "
                  "dead-lettered instead of started again")
    p.option("--lease-ttl", type=config.positive_float, default=120.0, group=r,
             help="seconds a cell's lease (one writer per cell) outlives a worker that stopped renewing it "
                  "without dying on this host (cut off, frozen, or on another host)")
    p.option("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


#: Flags workers had before the run's dataset spec took over what they set (see the README's migration notes).
MOVED_TO_MASTER = ("--layer", "--chip-size", "--max-chips-per-cell", "--composite", "--resolution", "--temporal",
                   "--max-scenes", "--harmonize", "--no-harmonize", "--min-clear-fraction", "--max-nodata-fraction",
                   "--format", "--class-map", "--force")


def moved_flags(argv: Sequence[str]) -> list[str]:
    """The dataset flags of older versions given on this worker's command line."""
    return [arg.split("=", 1)[0] for arg in argv if arg.split("=", 1)[0] in MOVED_TO_MASTER]


def ignored_environment(env: Mapping[str, str]) -> list[str]:
    """``CROPCHIPS_*`` twins of the moved flags set in the environment: ignored, since the spec decides."""
    names = {config.env_name(flag) for flag in MOVED_TO_MASTER if not flag.startswith("--no-")}
    return sorted(name for name in names if env.get(name))


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
               ) -> tuple[ProcessingOptions, WorkerOptions, argparse.Namespace]:
    argv = list(sys.argv[1:] if argv is None else argv)
    moved = moved_flags(argv)
    if moved:
        raise ConfigError(f"{', '.join(moved)}: the dataset (chip size, composite, bands, class map, ...) is the "
                          "run's spec now, which the master publishes with every task; give these to master.py "
                          "(or its --spec file) and start workers without them (see the README, 'The dataset spec')"
                          + ("; --temporal stack is now --composite stack" if "--temporal" in moved else ""))
    args = build_parser(env).parse_args(argv)
    processing = ProcessingOptions(
        output_dir=args.output_dir, gpkg=args.gpkg, read_threads=args.read_threads, read_cache_mb=args.read_cache_mb,
        tile_cache_dir=args.tile_cache_dir or None, tile_cache_mb=args.tile_cache_mb,
        max_task_memory_mb=args.max_task_memory_mb, read_whole_cell=args.read_whole_cell,
        write_threads=args.write_threads, max_task_starts=args.max_task_starts, lease_ttl_s=args.lease_ttl,
        hrefs=HrefPolicy.from_options(args.allowed_hrefs, args.local_scenes_dir))
    worker = WorkerOptions(
        kafka=config.kafka_settings(args, f"cropchips-worker-{args.number}", env),
        tasks_topic=args.tasks_topic, results_topic=args.results_topic, dlq_topic=args.dlq_topic,
        group_id=args.group_id, tasks_partitions=args.tasks_partitions, burst=args.burst,
        burst_idle_s=args.burst_idle, max_poll_interval_ms=args.max_poll_interval_ms,
        session_timeout_ms=args.session_timeout_ms,
        shutdown_grace_s=args.shutdown_grace, broker_wait_s=args.broker_wait, retry_for_s=args.retry_for,
        revoke_wait_s=args.revoke_wait, retention_ms=args.topic_retention_ms, assignor=args.assignor,
        group_instance_id=group_instance_id(args.group_instance_id, args.number))
    return processing, worker, args


def group_instance_id(flag: str | None, number: str) -> str | None:
    """``--group-instance-id``: None (a dynamic member), an id, or ``auto`` for HOST-N, one per
    worker process of a host (two workers started with the same id would fence each other)."""
    if flag is None or flag.strip().lower() in ("", "none"):
        return None
    if flag.strip().lower() == "auto":
        return f"{socket.gethostname()}-{number}"
    return flag.strip()


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        processing, options, args = parse_args(argv)
        setup_logging(args.log_level)
        ignored = ignored_environment(os.environ)
        if ignored:
            log.warning("ignoring %s: the run's dataset spec, which every task carries, decides the chips",
                        ", ".join(ignored))
        processor = TaskProcessor(processing, default_worker_id(args.number))
        # Everything imported and built so far lives as long as the worker: keep it out of the garbage
        # collector's scans, which otherwise walk the whole heap (geopandas, GDAL bindings) every few
        # thousand allocations (measured: 0.4 CPU s less per 8 tasks read through the tile cache).
        gc.freeze()  # (the rasterizer imports still loading in their thread are not frozen: harmless)
        try:
            worker = Worker(options, processor)
            worker.install_signal_handlers()
            worker.run()
        finally:
            processor.close()
        return EXIT_OK

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
