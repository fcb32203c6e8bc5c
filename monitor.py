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
from cropchips.kafka_io import KafkaSettings
from cropchips.monitor import Monitor, format_summary

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
    p.option("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
               ) -> tuple[KafkaSettings, argparse.Namespace]:
    args = build_parser(env).parse_args(argv)
    return config.kafka_settings(args, "cropchips-monitor", env), args


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        kafka, args = parse_args(argv)
        setup_logging(args.log_level)
        monitor = Monitor(kafka, args.results_topic,
                          run_id=args.run_id, broker_wait_s=args.broker_wait)
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
