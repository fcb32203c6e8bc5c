"""master.py: seed defaults, environment twins, and bad input that publishes nothing."""

import json

import numpy as np
import pytest
import yaml

import master
from conftest import run_script, shared_data
from cropchips.cli.options import env_table
from cropchips.errors import ConfigError
from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.spec import DatasetSpec
from cropchips.queue.messages import Task, decode

SEED_DEFAULTS = {
    "gpkg": "/export/mimmo/es_2023_all.gpkg", "start_x": -5.80, "start_y": 37.20, "grid_step": 0.05, "x_cells": 10,
    "y_cells": 10, "min_polygons": 5, "stac_api": "https://earth-search.aws.element84.com/v1",
    "collection": "sentinel-2-l2a", "datetime": "2023-05-15/2023-06-30", "max_cloud": 10.0,
    "bootstrap_servers": "localhost:9092", "tasks_topic": "satellite-tasks", "results_topic": "satellite-results",
}


def test_defaults_are_the_seed_values():
    options, args = master.parse_args([], env={})
    for key, value in SEED_DEFAULTS.items():
        # Host and broker settings are the master's own; the dataset's come from its spec.
        assert (getattr(args, key) if hasattr(options, key) or key in ("bootstrap_servers",)
                else getattr(options.spec, key)) == value, key


def test_every_option_has_an_environment_twin():
    table = dict(env_table(master.build_parser(env={})))
    assert table["--gpkg"] == "CROPCHIPS_GPKG"
    assert table["--bootstrap-servers"] == "CROPCHIPS_BOOTSTRAP_SERVERS"
    assert len(table) >= 18


def test_environment_then_command_line_precedence():
    options, _ = master.parse_args([], env={"CROPCHIPS_GRID_STEP": "0.1", "CROPCHIPS_TASKS_TOPIC": "t"})
    assert options.spec.grid_step == 0.1 and options.tasks_topic == "t"
    options, _ = master.parse_args(["--grid-step", "0.2"], env={"CROPCHIPS_GRID_STEP": "0.1"})
    assert options.spec.grid_step == 0.2
    with pytest.raises(ConfigError, match="CROPCHIPS_X_CELLS"):
        master.parse_args([], env={"CROPCHIPS_X_CELLS": "many"})


def test_stac_items_and_api_are_exclusive():
    with pytest.raises(SystemExit):
        master.parse_args(["--stac-items", "a.json", "--stac-api", "http://x"], env={})
    options, _ = master.parse_args(["--stac-items", "a.json"], env={})
    assert options.stac_items == "a.json" and options.stac_api is None


def si_grid_args():
    # The real Slovenian parcels lie within 15.60-15.74E, 45.98-46.15N.
    return ["--gpkg", f"zip://{shared_data('eurocrops', 'SI_2021.zip')}", "--start-x", "15.60", "--start-y", "45.95",
            "--grid-step", "0.05", "--x-cells", "4", "--y-cells", "4", "--min-polygons", "1"]


def assert_clean_failure(result, needle, broker, topics):
    assert result.returncode == 1, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert read_topic(KafkaSettings(broker.bootstrap_servers), topics["tasks"], idle_s=0.5) == []


def kafka_args(broker, topics):
    return ["--bootstrap-servers", broker.bootstrap_servers, "--tasks-topic", topics["tasks"],
            "--results-topic", topics["results"], "--dlq-topic", topics["dlq"]]


def test_write_spec_prints_the_file_with_the_flags_over_it_and_publishes_nothing(broker, topics, tmp_path):
    settings = {"layer": "fields", "x_cells": 3, "y_cells": 2, "datetime": "2023-04-01/2023-09-30",
                "chip_size": 64, "max_chips_per_cell": 2, "composite": "least-cloudy", "format": "cog"}
    spec_file = tmp_path / "dataset.yaml"
    spec_file.write_text(yaml.safe_dump(settings))
    result = run_script("master.py", "--spec", str(spec_file), "--chip-size", "48", "--write-spec",
                        *kafka_args(broker, topics))
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["chip_size"] == 48  # the flag overrides the file...
    assert {key: printed[key] for key in settings if key != "chip_size"} == {
        key: value for key, value in settings.items() if key != "chip_size"}  # ...which gives the rest
    assert DatasetSpec.from_yaml(result.stdout) == DatasetSpec.from_yaml(spec_file).with_overrides({"chip_size": 48})
    kafka = KafkaSettings(broker.bootstrap_servers)
    assert read_topic(kafka, topics["tasks"], idle_s=0.5) == []
    assert read_topic(kafka, topics["results"], idle_s=0.5) == []


def test_a_misspelt_spec_key_is_refused_with_a_suggestion(broker, topics, tmp_path):
    spec_file = tmp_path / "dataset.yaml"
    spec_file.write_text("chip_sise: 64\n")
    result = run_script("master.py", "--spec", str(spec_file), *si_grid_args(), *kafka_args(broker, topics))
    assert_clean_failure(result, "did you mean 'chip_size'", broker, topics)
    assert str(spec_file) in result.stderr  # and says which file


def test_missing_geopackage(broker, topics, tmp_path):
    result = run_script("master.py", "--gpkg", str(tmp_path / "nope.gpkg"), *kafka_args(broker, topics))
    assert_clean_failure(result, "GeoPackage not found", broker, topics)


def test_layer_without_eurocrops_columns(broker, topics):
    # A real Spanish FEGA declaration file: parcels, but no EC_hcat_c / EC_hcat_n.
    gpkg = f"zip://{shared_data('eurocrops', '1501_ALAVA_cd_2025_20250105.gpkg.zip')}"
    result = run_script("master.py", "--gpkg", gpkg, "--layer", "cultivo_declarado", *kafka_args(broker, topics))
    assert_clean_failure(result, "has no EuroCrops columns", broker, topics)


def test_empty_grid(broker, topics):
    args = si_grid_args()
    args[args.index("--start-x") + 1] = "-5.80"
    args[args.index("--start-y") + 1] = "37.20"
    result = run_script("master.py", *args, *kafka_args(broker, topics))
    assert_clean_failure(result, "has at least 1 polygons", broker, topics)


def test_bad_datetime(broker, topics):
    result = run_script("master.py", *si_grid_args(), "--datetime", "2023-31-05/2023-06-30", *kafka_args(broker, topics))
    assert_clean_failure(result, "is not a date", broker, topics)


def test_unreachable_stac_api(broker, topics):
    result = run_script("master.py", *si_grid_args(), "--stac-api", "http://127.0.0.1:9/v1", *kafka_args(broker, topics))
    assert_clean_failure(result, "cannot search the STAC API", broker, topics)


def test_no_scenes_in_items_file(broker, topics, tmp_path):
    items = tmp_path / "items.json"
    items.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    result = run_script("master.py", *si_grid_args(), "--stac-items", str(items), *kafka_args(broker, topics))
    assert_clean_failure(result, "no sentinel-2-l2a scene covers", broker, topics)


def test_publishes_deterministic_tasks_and_a_run_header(broker, topics, sample_area):
    args = ["--gpkg", str(sample_area.gpkg), "--layer", sample_area.layer, "--start-x", str(sample_area.start_x),
            "--start-y", str(sample_area.start_y), "--grid-step", str(sample_area.grid_step),
            "--x-cells", str(sample_area.x_cells), "--y-cells", str(sample_area.y_cells),
            "--stac-items", str(sample_area.items), "--datetime", sample_area.datetime, "--max-cloud", "100",
            "--chip-size", "128", "--run-id", "run-a", *kafka_args(broker, topics)]
    first = run_script("master.py", *args)
    assert first.returncode == 0, first.stderr
    second = run_script("master.py", *args)
    assert second.returncode == 0, second.stderr
    kafka = KafkaSettings(broker.bootstrap_servers)
    records = read_topic(kafka, topics["tasks"])
    tasks = [decode(r.value) for r in records]
    n = sample_area.x_cells * sample_area.y_cells
    assert len(tasks) == 2 * n and all(isinstance(t, Task) for t in tasks)
    by_id = {}
    for record, task in zip(records, tasks):
        assert record.key == task.cell.id.encode()
        by_id.setdefault(task.task_id, set()).add(record.value)
    assert len(by_id) == n and all(len(v) == 1 for v in by_id.values())  # same bytes both times
    for task in tasks:
        assert task.scenes and all(len(s.assets) == 11 for s in task.scenes)
    headers = [decode(r.value) for r in read_topic(kafka, topics["results"])]
    assert [h.task_count for h in headers] == [n, n] and headers[0].run_id == "run-a"


def test_hilbert_order_steps_to_a_neighbour_every_time():
    from cropchips.queue.publish import hilbert_index

    for side in (2, 4, 16):
        at = {hilbert_index(c, r, side): (c, r) for c in range(side) for r in range(side)}
        assert sorted(at) == list(range(side * side))  # every cell once
        steps = [abs(at[i][0] - at[i + 1][0]) + abs(at[i][1] - at[i + 1][1]) for i in range(side * side - 1)]
        assert set(steps) == {1}


def _spread(cells) -> float:
    """Mean distance (in cells) of a set of cells from its own centre."""
    cols, rows = np.array([c.col for c in cells]), np.array([c.row for c in cells])
    return float(np.hypot(cols - cols.mean(), rows - rows.mean()).mean())


@pytest.mark.parametrize("x_cells,y_cells", [(10, 10), (16, 4), (37, 23)])
def test_grid_partitioning_gives_each_worker_a_compact_region_evenly(x_cells, y_cells):
    from cropchips.plan.grid import Grid
    from cropchips.queue.publish import grid_order

    grid = Grid(start_x=-5.8, start_y=37.2, step=0.05, x_cells=x_cells, y_cells=y_cells)
    tasks = [Task(run_id="r", task_id=f"t-{cell.id}", cell=cell, scenes=(), spec=DatasetSpec()) for cell in grid.cells()]
    placed = grid_order(tasks, 10)
    assert sorted(t.task_id for t, _ in placed) == sorted(t.task_id for t in tasks)
    counts = np.bincount([p for _, p in placed], minlength=10)
    assert counts.max() - counts.min() <= 1  # even (Kafka's hash of the ids gives 40/22/18/20 for 10 x 10)
    assert [p for _, p in placed] == sorted(p for _, p in placed)  # each partition one run of the order
    # A partition's cells lie together: far less spread than as many cells taken at random (the
    # curve leaves a non-square grid and comes back elsewhere, so a partition may hold two patches).
    rng = np.random.default_rng(0)
    cells = [t.cell for t in tasks]
    spreads, random_spreads = [], []
    for p in range(10):
        mine = [t.cell for t, q in placed if q == p]
        spreads.append(_spread(mine))
        random_spreads += [_spread([cells[i] for i in rng.choice(len(cells), len(mine), replace=False)])
                           for _ in range(5)]
    assert np.median(spreads) < 0.5 * np.median(random_spreads), (spreads, np.median(random_spreads))
    # Within a partition, the worker's next cell is next door (the curve leaves the grid only at its edges).
    steps = [max(abs(a.cell.col - b.cell.col), abs(a.cell.row - b.cell.row))
             for (a, p), (b, q) in zip(placed, placed[1:]) if p == q]
    assert np.mean(steps) <= 1.5
    assert grid_order(list(reversed(tasks)), 10) == placed  # the same plan, the same placement


@pytest.mark.parametrize("partitioning", ["grid", "hash"])
def test_publish_puts_each_cell_in_its_partition(broker, topics, sample_master_options, sample_plan, partitioning):
    from dataclasses import replace

    from kafka.partitioner.default import murmur2

    from cropchips.queue.publish import grid_order, publish

    options = replace(sample_master_options, kafka=KafkaSettings(broker.bootstrap_servers),
                      tasks_topic=topics["tasks"], results_topic=topics["results"], dlq_topic=topics["dlq"],
                      task_partitioning=partitioning)
    publish(sample_plan, options)
    publish(sample_plan, options)  # a re-published task lands behind its earlier copy
    records = read_topic(options.kafka, topics["tasks"])
    assert len(records) == 2 * len(sample_plan.tasks)
    placed = {task.task_id: p for task, p in grid_order(sample_plan.tasks, 10)}
    for record in records:
        task = decode(record.value)
        assert record.key == task.cell.id.encode()  # the key stays the cell id
        if partitioning == "grid":
            assert record.partition == placed[task.task_id]
        else:
            assert record.partition == (murmur2(record.key) & 0x7FFFFFFF) % 10  # Kafka's default partitioner
    if partitioning == "grid":
        assert len({r.partition for r in records}) == len(sample_plan.tasks)  # 4 cells, 4 partitions


@pytest.mark.parametrize("placement, chip_size", [("fields", 256), ("lattice", 128)])
def test_cells_smaller_than_a_chip_are_refused_before_publishing(broker, topics, sample_area, placement, chip_size):
    """Chips stay inside their cells: 0.02 degree cells (1.7 x 2.2 km) hold no 256 px chip, and no lattice chip
    of 128 px wherever the lattice falls (that needs twice a chip)."""
    args = ["--gpkg", str(sample_area.gpkg), "--layer", sample_area.layer, "--start-x", str(sample_area.start_x),
            "--start-y", str(sample_area.start_y), "--grid-step", str(sample_area.grid_step),
            "--x-cells", str(sample_area.x_cells), "--y-cells", str(sample_area.y_cells),
            "--stac-items", str(sample_area.items), "--datetime", sample_area.datetime, "--max-cloud", "100",
            "--chip-size", str(chip_size), "--chip-placement", placement, *kafka_args(broker, topics)]
    result = run_script("master.py", *args)
    assert_clean_failure(result, "chips stay inside their cells", broker, topics)
    assert "larger --grid-step" in result.stderr and f"{chip_size} px x 10 m" in result.stderr
