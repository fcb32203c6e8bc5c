#!/usr/bin/env python3
"""Follow the results topic: live progress, per-class pixel counts, per-worker throughput, final summary."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence

from cropchips import config
from cropchips.cli import EXIT_ERROR, EXIT_OK, run, setup_logging
from cropchips.dataset import SplitPolicy, finalize, records_from_metadata
from cropchips.errors import ConfigError
from cropchips.kafka_io import KafkaSettings
from cropchips.monitor import Monitor, format_summary
from cropchips.report import build_report, cells_from_results, grid_from_header

EXIT_TASKS_FAILED = 2


def build_parser(env: Mapping[str, str] | None = None) -> config.EnvArgumentParser:
    p = config.EnvArgumentParser(prog="monitor.py", description=__doc__, env=env)
    config.add_kafka_options(p)
    p.option("--run-id", default=None, help="follow this run (default: the latest master run)")
    p.flag("--exit-when-done", help="exit once every task of the run is accounted for: 0 if none failed, 2 if any did")
    p.flag("--json", help="print the final summary as one JSON object on stdout")
    p.option("--timeout", type=config.positive_float, default=None,
             help="give up (exit 1) if the run is not done after this many seconds")
    p.flag("--no-progress", help="no progress bar (logs only)")
    d = p.add_argument_group("dataset index")
    p.option("--output-dir", default=None, group=d,
             help="the workers' output folder or object-store URL (s3://bucket/prefix): when the run is "
             "done, write OUTPUT/index.parquet and the STAC catalog there")
    p.flag("--rebuild-index", group=d,
           help="rebuild OUTPUT/index.parquet from the chips' metadata sidecars alone (no broker needed) and exit")
    p.flag("--report", group=d, help="with --output-dir: once the index is written, also write OUTPUT/report.html "
           "(summary, class balance, splits, cell map, quicklook gallery)")
    p.flag("--quicklooks", group=d,
           help="with --report: also write OUTPUT/quicklooks/NAME.png (true colour | class overlay) for every chip")
    p.option("--split-block-size", type=config.positive_float, default=10000.0, group=d,
             help="side in metres of the spatial blocks assigned whole to train/val/test")
    p.option("--split-ratios", type=split_ratios, default=(0.8, 0.1, 0.1), group=d,
             help="train,val,test shares of the blocks")
    p.option("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def split_ratios(text: str) -> tuple[float, float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 3 or any(v < 0 for v in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError("give three non-negative numbers adding up to 1, e.g. 0.8,0.1,0.1")
    return parts[0], parts[1], parts[2]


split_ratios.__name__ = "train,val,test ratios"


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
               ) -> tuple[KafkaSettings, argparse.Namespace]:
    args = build_parser(env).parse_args(argv)
    return config.kafka_settings(args, "cropchips-monitor", env), args


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        kafka, args = parse_args(argv)
        setup_logging(args.log_level)
        policy = SplitPolicy(block_size_m=args.split_block_size, ratios=args.split_ratios)
        if (args.rebuild_index or args.report) and not args.output_dir:
            raise ConfigError("--rebuild-index and --report need --output-dir")
        if args.rebuild_index:
            rebuilt = finalize(args.output_dir, policy=policy)
            if args.report:
                rebuilt["report"] = str(build_report(args.output_dir, quicklooks=args.quicklooks))
            print(json.dumps(rebuilt, sort_keys=True))
            return EXIT_OK
        monitor = Monitor(kafka, args.results_topic,
                          run_id=args.run_id, broker_wait_s=args.broker_wait, retention_ms=args.topic_retention_ms)
        started = time.monotonic()
        try:
            progress = monitor.follow(exit_when_done=args.exit_when_done, timeout_s=args.timeout,
                                      show_progress=not args.no_progress)
        except KeyboardInterrupt:
            progress = monitor.progress
        if progress is None:
            print("no run found on the results topic yet", file=sys.stderr)
            return EXIT_ERROR
        summary = progress.summary(time.monotonic() - started)
        if args.output_dir and progress.complete():
            # The run's chips, with their full provenance from the sidecars beside them.
            names = [chip.name for r in progress.results.values() if r.status == "ok" for chip in r.chips]
            summary["dataset"] = finalize(args.output_dir, records_from_metadata(args.output_dir, names), policy)
            if args.report:
                cells = cells_from_results(progress.results.values(), grid_from_header(progress.header))
                summary["report"] = str(build_report(args.output_dir, cells=cells, run_summary=summary,
                                                     quicklooks=args.quicklooks))
        if args.json:
            print(json.dumps(summary, sort_keys=True))
        else:
            from cropchips.classes import CLASS_NAMES
            print(format_summary(summary, CLASS_NAMES))
        if args.exit_when_done:
            return EXIT_TASKS_FAILED if summary["statuses"]["failed"] else EXIT_OK
        return EXIT_OK

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
