#!/usr/bin/env python3
"""Grid an area of a EuroCrops GeoPackage, find Sentinel-2 scenes and publish one task per useful cell."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence

from cropchips import config
from cropchips.cli import EXIT_OK, run, setup_logging
from cropchips.errors import ConfigError
from cropchips.grid import Grid
from cropchips.master import TASK_PARTITIONINGS, MasterOptions, make_plan, publish


def build_parser(env: Mapping[str, str] | None = None) -> config.EnvArgumentParser:
    p = config.EnvArgumentParser(prog="master.py", description=__doc__, env=env)
    p.option("--gpkg", default="/export/mimmo/es_2023_all.gpkg", help="EuroCrops GeoPackage with the field polygons")
    p.option("--layer", default=None, help="layer of the GeoPackage (default: the first with EuroCrops columns)")
    g = p.add_argument_group("grid (EPSG:4326 degrees)")
    p.option("--start-x", type=float, default=-5.80, group=g, help="longitude of the south-west corner")
    p.option("--start-y", type=float, default=37.20, group=g, help="latitude of the south-west corner")
    p.option("--grid-step", type=config.positive_float, default=0.05, group=g, help="cell size in degrees (0.05 ~ 5.5 km)")
    p.option("--x-cells", type=config.positive_int, default=10, group=g, help="cells from west to east")
    p.option("--y-cells", type=config.positive_int, default=10, group=g, help="cells from south to north")
    p.option("--min-polygons", type=config.non_negative_int, default=5, group=g,
             help="publish only cells with at least this many polygons")
    s = p.add_argument_group("scenes")
    src = s.add_mutually_exclusive_group()
    p.option("--stac-api", default=config.DEFAULT_STAC_API, group=src, help="STAC API to search")
    p.option("--stac-items", default=None, group=src,
             help="local STAC ItemCollection/FeatureCollection JSON to use instead of --stac-api")
    p.option("--collection", default=config.DEFAULT_COLLECTION, group=s,
             help="STAC collection (sentinel-2-l2a or sentinel-2-c1-l2a)")
    p.option("--datetime", default=config.DEFAULT_DATETIME, group=s, help="date range START/END (YYYY-MM-DD)")
    p.option("--max-cloud", type=float, default=10.0, group=s, help="use scenes with eo:cloud_cover below this percentage")
    p.option("--max-scenes", type=config.non_negative_int, default=0, group=s,
             help="put at most this many scenes in a task, the least cloudy by eo:cloud_cover (0: all)")
    p.option("--max-task-bytes", type=config.positive_int, default=1_000_000, group=s,
             help="refuse the run, publishing nothing, if a task message would be larger (the brokers' and "
                  "clients' default limit is 1 MiB)")
    config.add_kafka_options(p)
    p.option("--task-partitioning", default="grid", choices=TASK_PARTITIONINGS,
             help="grid: cells ordered along a Hilbert curve, one run of it per partition, so each worker gets a "
                  "compact region of cells that share COG tiles, spread evenly; hash: Kafka's hash of the cell id")
    p.option("--run-id", default=None, help="identifier of this run (default: generated from the time)")
    p.flag("--dry-run", help="plan the tasks and print a summary, publish nothing")
    p.option("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> tuple[MasterOptions, argparse.Namespace]:
    args = build_parser(env).parse_args(argv)
    if args.stac_items and args.stac_api != config.DEFAULT_STAC_API and args.stac_api:
        raise ConfigError("--stac-api and --stac-items are mutually exclusive; give one")
    options = MasterOptions(
        gpkg=args.gpkg, layer=args.layer,
        grid=Grid(start_x=args.start_x, start_y=args.start_y, step=args.grid_step, x_cells=args.x_cells, y_cells=args.y_cells),
        min_polygons=args.min_polygons, stac_api=None if args.stac_items else args.stac_api, stac_items=args.stac_items,
        collection=args.collection, datetime=args.datetime, max_cloud=args.max_cloud,
        kafka=config.kafka_settings(args, "cropchips-master", env),
        tasks_topic=args.tasks_topic, results_topic=args.results_topic, dlq_topic=args.dlq_topic,
        tasks_partitions=args.tasks_partitions, task_partitioning=args.task_partitioning, run_id=args.run_id,
        broker_wait_s=args.broker_wait, max_scenes=args.max_scenes, max_task_bytes=args.max_task_bytes,
        retention_ms=args.topic_retention_ms)
    return options, args


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        options, args = parse_args(argv)
        setup_logging(args.log_level)
        plan = make_plan(options)
        if args.dry_run:
            print(json.dumps({"run_id": plan.run_id, "tasks": len(plan.tasks), "cells_total": plan.cells_total,
                              "cells_dropped": dict(plan.dropped), "polygons": plan.polygons, "scenes": plan.scenes}))
            return EXIT_OK
        publish(plan, options)
        print(f"published {len(plan.tasks)} tasks (run {plan.run_id}) to {options.tasks_topic}")
        return EXIT_OK

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
