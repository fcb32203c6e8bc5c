"""Administer the pipeline's topics and consumer group, inspect results and dead letters, check a host.

Works against any Kafka-protocol broker (Redpanda, Apache Kafka, the embedded Tansu): it
replaces the seed's `docker exec redpanda rpk ...` commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from cropchips.queue import admin
from cropchips.cli import options as config
from cropchips.cli.run import EXIT_ERROR, EXIT_OK, EXIT_USAGE, run, setup_logging
from cropchips.queue.kafka import KafkaSettings


def _leaf(sub: argparse._SubParsersAction, name: str, help: str, env: Mapping[str, str] | None,
          *, json_output: bool = False) -> config.EnvArgumentParser:
    """A subcommand with the Kafka options, --log-level and optionally --json."""
    p = sub.add_parser(name, help=help, description=help, env=env)
    config.add_kafka_options(p)
    if json_output:
        p.flag("--json", help="print JSON instead of a table")
    p.option("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def build_parser(env: Mapping[str, str] | None = None) -> config.EnvArgumentParser:
    p = config.EnvArgumentParser(prog="admin.py", description=__doc__, env=env)
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    topics = commands.add_parser("topics", help="create, list or reset the topics", env=env).add_subparsers(
        dest="action", metavar="ACTION", required=True)
    _leaf(topics, "create", "create the tasks (--tasks-partitions), results (1) and dead-letter (1) topics "
          "that are missing; existing topics are left as they are", env)
    lst = _leaf(topics, "list", "topics with their partition counts, and records per partition for the "
                "pipeline's topics", env, json_output=True)
    lst.toggle("--count", env="CROPCHIPS_COUNT_RECORDS", default=True,
               help="count the records of the pipeline's topics (--no-count: partitions only)")
    reset = _leaf(topics, "reset", "delete the tasks topic and create it again, empty, with --tasks-partitions "
                  "partitions (stop the master and workers first)", env)
    reset.flag("--yes", env="CROPCHIPS_RESET_YES",
               help="really delete the tasks topic (without it: print what would be done, exit 2)")
    reset.option("--group-id", default=config.DEFAULT_GROUP_ID,
                 help="workers' group whose committed offsets on the tasks topic must not survive the reset")

    group = commands.add_parser("group", help="consumer group status", env=env).add_subparsers(
        dest="action", metavar="ACTION", required=True)
    describe = _leaf(group, "describe", "members, and per partition of the tasks topic the committed offset, "
                     "end offset and lag", env, json_output=True)
    describe.option("--group-id", default=config.DEFAULT_GROUP_ID, help="consumer group of the workers")

    results = commands.add_parser("results", help="read the results topic", env=env).add_subparsers(
        dest="action", metavar="ACTION", required=True)
    tail = _leaf(results, "tail", "the last results, oldest first: time, task, status, worker, chips, error",
                 env, json_output=True)
    tail.option("-n", dest="last", env="CROPCHIPS_LAST", type=config.positive_int, default=10,
                help="how many results to show")
    tail.option("--run-id", default=None, help="only results of this run")

    dlq = commands.add_parser("dlq", help="read the dead-letter topic", env=env).add_subparsers(
        dest="action", metavar="ACTION", required=True)
    dlq_list = _leaf(dlq, "list", "dead letters with their error, worker and source headers and the start "
                     "of the original message", env, json_output=True)
    dlq_list.option("-n", dest="last", env="CROPCHIPS_LAST", type=config.non_negative_int, default=0,
                    help="show only the last N dead letters (0: all)")

    replay = _leaf(dlq, "replay", "publish the tasks held by dead letters to the tasks topic again, once their "
                   "cause is fixed (unreadable messages are skipped); finished cells are re-reported, not redone", env)
    replay.option("--offsets", default="", help="dead-letter offsets to replay, e.g. 3,5-9 (default: all)")
    replay.flag("--yes", env="CROPCHIPS_REPLAY_YES",
                help="really publish (without it: print what would be replayed, exit 2)")

    doc = _leaf(commands, "doctor", "check the broker, the topics, the output folder and the GeoPackage; "
                "exit 0 if all pass, 1 otherwise", env)
    doc.option("--output-dir", default="/mnt/mimmo", help="the workers' output folder (shared storage)")
    doc.flag("--expect-mount", help="the output folder must be a mount point (the NFS share)")
    doc.option("--gpkg", default="/mnt/mimmo/es_2023_all.gpkg", help="EuroCrops GeoPackage the workers read")
    doc.option("--layer", default=None, help="layer of the GeoPackage (default: the first with EuroCrops columns)")
    doc.option("--skip", env="CROPCHIPS_DOCTOR_SKIP", default="",
               help=f"comma-separated checks to skip: {', '.join(admin.DOCTOR_CHECKS)} (broker implies topics)")
    return p


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
               ) -> tuple[KafkaSettings, argparse.Namespace]:
    args = build_parser(env).parse_args(argv)
    return config.kafka_settings(args, "cropchips-admin", env), args


def _specs(args: argparse.Namespace) -> list[admin.TopicSpec]:
    return admin.pipeline_topics(args.tasks_topic, args.results_topic, args.dlq_topic, args.tasks_partitions)


def _json(value: object) -> None:
    print(json.dumps(value, sort_keys=True))


def _show(items: Sequence, as_json: bool, line: Callable[[Any], str], empty: str) -> None:
    """Dataclass ``items`` as one JSON object a line, or one readable line each, or ``empty``."""
    if as_json:
        for item in items:
            _json(asdict(item))
    elif items:
        print("\n".join(line(item) for item in items))
    else:
        print(empty)


def topics_create(kafka: KafkaSettings, args: argparse.Namespace) -> int:
    print(admin.format_created(admin.create_topics(kafka, _specs(args), wait=args.broker_wait,
                                                   retention_ms=args.topic_retention_ms)))
    return EXIT_OK


def topics_list(kafka: KafkaSettings, args: argparse.Namespace) -> int:
    infos = admin.list_topics(kafka, _specs(args), count=args.count, wait=args.broker_wait)
    if args.json:
        _json([{**asdict(i), "records": None if i.records is None else {str(k): v for k, v in i.records.items()},
                "total": i.total} for i in infos])
    else:
        print(admin.format_topic_list(infos))
    return EXIT_OK


def topics_reset(kafka: KafkaSettings, args: argparse.Namespace) -> int:
    if not args.yes:
        print(f"would delete topic {args.tasks_topic} on {kafka.bootstrap_servers} (every task in it is lost) and "
              f"create it again with {args.tasks_partitions} partitions; stop the master and workers first, "
              "then add --yes")
        return EXIT_USAGE
    report = admin.reset_topic(kafka, args.tasks_topic, args.tasks_partitions, group_id=args.group_id,
                               wait=args.broker_wait, retention_ms=args.topic_retention_ms)
    if report.existed:
        records = "?" if report.deleted_records is None else report.deleted_records
        print(f"deleted  {report.topic}  {report.old_partitions} partitions, {records} records")
    else:
        print(f"missing  {report.topic}  (nothing to delete)")
    print(f"created  {report.topic}  {report.partitions} partitions, empty")
    if report.group_offsets_reset:
        print(f"reset    group {args.group_id}: committed offsets of partitions {report.group_offsets_reset} set to 0")
    return EXIT_OK


def group_describe(kafka: KafkaSettings, args: argparse.Namespace) -> int:
    report = admin.describe_group(kafka, args.group_id, args.tasks_topic, wait=args.broker_wait)
    if args.json:
        _json(report.to_dict())
    else:
        print(admin.format_group(report))
    return EXIT_OK


def results_tail(kafka: KafkaSettings, args: argparse.Namespace) -> int:
    lines, _invalid = admin.tail_results(kafka, args.results_topic, args.last, run_id=args.run_id,
                                         wait=args.broker_wait)
    _show(lines, args.json, admin.format_result,
          f"no results on {args.results_topic}" + (f" for run {args.run_id}" if args.run_id else ""))
    return EXIT_OK


def dlq_list(kafka: KafkaSettings, args: argparse.Namespace) -> int:
    letters = admin.dead_letters(kafka, args.dlq_topic, last=args.last, wait=args.broker_wait)
    _show(letters, args.json, admin.format_dead_letter, f"no dead letters on {args.dlq_topic}")
    return EXIT_OK


def dlq_replay(kafka: KafkaSettings, args: argparse.Namespace) -> int:
    entries = admin.replay_dead_letters(kafka, args.dlq_topic, args.tasks_topic,
                                        offsets=admin.parse_offsets(args.offsets), yes=args.yes,
                                        wait=args.broker_wait)
    if not entries:
        print(f"no dead letters on {args.dlq_topic}" + (f" at offsets {args.offsets}" if args.offsets else ""))
        return EXIT_OK
    print("\n".join(admin.format_replay(e, args.yes) for e in entries))
    count = sum(e.replayed for e in entries)
    if not args.yes:
        print(f"{count} task(s) would be published to {args.tasks_topic}; add --yes to do it")
        return EXIT_USAGE
    print(f"replayed {count} task(s) to {args.tasks_topic}")
    return EXIT_OK


def doctor(kafka: KafkaSettings, args: argparse.Namespace) -> int:
    checks = admin.doctor(admin.DoctorOptions(
        kafka=kafka, topics=_specs(args), output_dir=args.output_dir, gpkg=args.gpkg, layer=args.layer,
        expect_mount=args.expect_mount, skip=admin.parse_skip(args.skip), broker_wait=args.broker_wait))
    for check in checks:
        print(admin.format_check(check))
    failed = [c.name for c in checks if c.ok is False]
    print(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "all checks passed")
    return EXIT_ERROR if failed else EXIT_OK


COMMANDS: dict[tuple[str, str | None], Callable[[KafkaSettings, argparse.Namespace], int]] = {
    ("topics", "create"): topics_create,
    ("topics", "list"): topics_list,
    ("topics", "reset"): topics_reset,
    ("group", "describe"): group_describe,
    ("results", "tail"): results_tail,
    ("dlq", "list"): dlq_list,
    ("dlq", "replay"): dlq_replay,
    ("doctor", None): doctor,
}


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        kafka, args = parse_args(argv)
        setup_logging(args.log_level)
        return COMMANDS[(args.command, getattr(args, "action", None))](kafka, args)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
