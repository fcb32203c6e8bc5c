"""Grid an area of a EuroCrops GeoPackage, find Sentinel-2 scenes and publish one task per useful cell."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence

from cropchips.cli import options as config
from cropchips.cli.run import EXIT_OK, run, setup_logging
from cropchips.errors import ConfigError
from cropchips.plan.plan import MasterOptions, make_plan
from cropchips.queue.publish import TASK_PARTITIONINGS, publish
from cropchips.plan.plan_map import check_plan_out, plan_map, write_plan_map
from cropchips.cli.spec_flags import add_spec_options, spec_from_args


def build_parser(env: Mapping[str, str] | None = None) -> config.EnvArgumentParser:
    p = config.EnvArgumentParser(prog="master.py", description=__doc__, env=env)
    p.option("--gpkg", default="/export/mimmo/es_2023_all.gpkg", help="EuroCrops GeoPackage with the field polygons")
    add_spec_options(p)
    s = p.add_argument_group("scene search")
    src = s.add_mutually_exclusive_group()
    p.option("--stac-api", default=config.DEFAULT_STAC_API, group=src, help="STAC API to search")
    p.option("--stac-items", default=None, group=src,
             help="local STAC ItemCollection/FeatureCollection JSON to use instead of --stac-api")
    p.option("--max-task-bytes", type=config.positive_int, default=1_000_000, group=s,
             help="refuse the run, publishing nothing, if a task message would be larger (the brokers' and "
                  "clients' own limit is 1 MiB)")
    config.add_kafka_options(p)
    p.option("--task-partitioning", default="grid", choices=TASK_PARTITIONINGS,
             help="grid: cells ordered along a Hilbert curve, one run of it per partition, so each worker gets a "
                  "compact region of cells that share COG tiles, spread evenly; hash: Kafka's hash of the cell id")
    p.option("--run-id", default=None, help="identifier of this run (generated from the time when not given)")
    p.flag("--force", help="redo cells whose outputs are complete, and start the output folder's dataset over "
                           "if its dataset.yaml differs from this run's spec")
    p.flag("--dry-run", help="plan the tasks and print a summary, publish nothing")
    p.option("--plan-out", default=None,
             help="also write the plan as GeoJSON (EPSG:4326): one feature per grid cell with its status (task, "
                  "too_few_polygons, outside_aoi), polygons, scenes and estimated chips and fetched bytes (see "
                  "cropchips/plan/plan_map.py). Its folder must exist. With --dry-run the file is all that is written; "
                  "without, it is written before the tasks are published")
    p.option("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> tuple[MasterOptions, argparse.Namespace]:
    args = build_parser(env).parse_args(argv)
    if args.stac_items and args.stac_api != config.DEFAULT_STAC_API and args.stac_api:
        raise ConfigError("--stac-api and --stac-items are mutually exclusive; give one")
    options = MasterOptions(
        gpkg=args.gpkg, spec=spec_from_args(args), stac_api=None if args.stac_items else args.stac_api,
        stac_items=args.stac_items, kafka=config.kafka_settings(args, "cropchips-master", env),
        tasks_topic=args.tasks_topic, results_topic=args.results_topic, dlq_topic=args.dlq_topic,
        tasks_partitions=args.tasks_partitions, task_partitioning=args.task_partitioning, run_id=args.run_id,
        broker_wait_s=args.broker_wait, max_task_bytes=args.max_task_bytes, retention_ms=args.topic_retention_ms,
        force=args.force)
    return options, args


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        options, args = parse_args(argv)
        if args.write_spec:
            sys.stdout.write(options.spec.to_yaml())
            return EXIT_OK
        setup_logging(args.log_level)
        if args.plan_out:
            check_plan_out(args.plan_out)  # before planning: a wrong folder fails at once
        plan = make_plan(options)
        cells = plan_map(plan) if args.plan_out or args.dry_run else None
        if args.plan_out:
            write_plan_map(args.plan_out, cells)
        if args.dry_run:
            totals = cells.totals()
            print(json.dumps({"run_id": plan.run_id, "tasks": len(plan.tasks), "cells_total": plan.cells_total,
                              "cells_dropped": dict(plan.dropped), "polygons": plan.polygons, "scenes": plan.scenes,
                              "dataset_id": plan.spec.dataset_id(), "est_chips": totals["est_chips"],
                              "est_fetch_bytes": totals["est_fetch_bytes"],
                              **({"plan_out": args.plan_out} if args.plan_out else {})}))
            return EXIT_OK
        publish(plan, options)
        print(f"published {len(plan.tasks)} tasks (run {plan.run_id}) to {options.tasks_topic}")
        return EXIT_OK

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
