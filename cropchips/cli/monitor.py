"""Follow the results topic: live progress, per-class pixel counts, per-worker throughput, final summary."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence

from cropchips.cli import options as config
from cropchips.cli.run import EXIT_ERROR, EXIT_OK, run, setup_logging
from cropchips.dataset.index import finalize, records_from_metadata, split_policy
from cropchips.errors import ConfigError
from cropchips.queue.kafka import KafkaSettings
from cropchips.queue.monitor import DEFAULT_PROGRESS_INTERVAL_S, Monitor, format_summary
from cropchips.dataset.report import build_report, cells_from_results, grid_from_header

EXIT_TASKS_FAILED = 2


def build_parser(env: Mapping[str, str] | None = None) -> config.EnvArgumentParser:
    p = config.EnvArgumentParser(prog="monitor.py", description=__doc__, env=env)
    config.add_kafka_options(p)
    p.option("--run-id", default=None, help="follow this run (default: the latest master run)")
    p.flag("--exit-when-done", help="exit once every task of the run is accounted for: 0 if none failed, 2 if any did")
    p.flag("--json", help="print the final summary as one JSON object on stdout")
    p.option("--timeout", type=config.positive_float, default=None,
             help="give up (exit 1) if the run is not done after this many seconds")
    p.flag("--no-progress", help="no progress bar or progress lines: a log line every --progress-interval instead")
    p.option("--progress-interval", type=config.positive_float, default=DEFAULT_PROGRESS_INTERVAL_S,
             help="seconds between plain progress lines when standard error is not a terminal (systemd, "
             "Kubernetes, CI logs: no bar redraws there), or between log lines with --no-progress")
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
    p.option("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


#: Flags the monitor had before the run's dataset spec took over the splits.
MOVED_TO_MASTER = ("--split-block-size", "--split-ratios")


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
               ) -> tuple[KafkaSettings, argparse.Namespace]:
    argv = list(sys.argv[1:] if argv is None else argv)
    moved = [arg.split("=", 1)[0] for arg in argv if arg.split("=", 1)[0] in MOVED_TO_MASTER]
    if moved:
        raise ConfigError(f"{', '.join(moved)}: the splits are part of the run's dataset spec now; give them to "
                          "master.py (or its --spec file): the index follows the run's spec, or OUTPUT/dataset.yaml")
    args = build_parser(env).parse_args(argv)
    return config.kafka_settings(args, "cropchips-monitor", env), args


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        kafka, args = parse_args(argv)
        setup_logging(args.log_level)
        if (args.rebuild_index or args.report) and not args.output_dir:
            raise ConfigError("--rebuild-index and --report need --output-dir")
        if args.rebuild_index:
            rebuilt = finalize(args.output_dir, policy=split_policy(args.output_dir))
            if args.report:
                rebuilt["report"] = str(build_report(args.output_dir, quicklooks=args.quicklooks))
            print(json.dumps(rebuilt, sort_keys=True))
            return EXIT_OK
        monitor = Monitor(kafka, args.results_topic,
                          run_id=args.run_id, broker_wait_s=args.broker_wait, retention_ms=args.topic_retention_ms)
        started = time.monotonic()
        try:
            progress = monitor.follow(exit_when_done=args.exit_when_done, timeout_s=args.timeout,
                                      show_progress=not args.no_progress, progress_interval_s=args.progress_interval)
        except KeyboardInterrupt:
            progress = monitor.progress
        if progress is None:
            print("no run found on the results topic yet", file=sys.stderr)
            return EXIT_ERROR
        summary = progress.summary(time.monotonic() - started)
        if args.output_dir and progress.complete():
            # The run's chips, with their full provenance from the sidecars beside them.
            names = [chip.name for r in progress.results.values() if r.status == "ok" for chip in r.chips]
            policy = split_policy(args.output_dir, progress.header.spec if progress.header else None)
            summary["dataset"] = finalize(args.output_dir, records_from_metadata(args.output_dir, names), policy)
            if args.report:
                cells = cells_from_results(progress.results.values(), grid_from_header(progress.header))
                summary["report"] = str(build_report(args.output_dir, cells=cells, run_summary=summary,
                                                     quicklooks=args.quicklooks))
        if args.json:
            print(json.dumps(summary, sort_keys=True))
        else:
            from cropchips.fields.classes import CLASS_NAMES
            print(format_summary(summary, CLASS_NAMES))
        if args.exit_when_done:
            return EXIT_TASKS_FAILED if summary["statuses"]["failed"] else EXIT_OK
        return EXIT_OK

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
