"""master.py --plan-out: the plan as a GeoJSON map of every cell, its status, counts and estimates."""

import json
import math
from dataclasses import replace

import geopandas as gpd
import numpy as np
import pytest
import shapely

from conftest import SAMPLE_CHIP_SIZE, run_script
from cropchips.errors import ConfigError
from cropchips.plan.plan import make_plan
from cropchips.queue.messages import Cell
from cropchips.plan.plan_map import (COMPRESSION_FACTOR, build_plan_map, check_plan_out, estimate_fetch_bytes, plan_map,
                                write_plan_map)
from cropchips.spec import DatasetSpec


def master_args(sample, plan_out, *extra):
    return ["--dry-run", "--plan-out", str(plan_out), "--gpkg", str(sample.gpkg), "--layer", sample.layer,
            "--start-x", str(sample.start_x), "--start-y", str(sample.start_y), "--grid-step", str(sample.grid_step),
            "--x-cells", str(sample.x_cells), "--y-cells", str(sample.y_cells), "--stac-items", str(sample.items),
            "--datetime", sample.datetime, "--max-cloud", "100", "--chip-size", str(SAMPLE_CHIP_SIZE), *extra]


def polygons_per_cell(sample, boxes: dict[str, tuple[float, float, float, float]]) -> dict[str, int]:
    """Polygons whose representative point lies in each box (half-open: west/south edges in, east/north out),
    counted with geopandas and shapely, apart from the master's code."""
    fields = gpd.read_file(sample.gpkg, layer=sample.layer)
    points = fields.geometry.representative_point().to_crs("EPSG:4326")
    x, y = points.x.to_numpy(), points.y.to_numpy()
    return {cid: int(((x >= b[0]) & (x < b[2]) & (y >= b[1]) & (y < b[3])).sum()) for cid, b in boxes.items()}


def signed_area(ring) -> float:
    """Shoelace area: positive for a counter-clockwise ring."""
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:])) / 2


def assert_valid_geojson(doc, path):
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    for feature in doc["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5
        assert signed_area(ring) > 0, f"{feature['id']} ring is clockwise"
        minx, miny, maxx, maxy = feature["bbox"]
        assert shapely.Polygon(ring).equals(shapely.box(minx, miny, maxx, maxy))
    frame = gpd.read_file(path)
    assert len(frame) == len(doc["features"]) and frame.crs.to_epsg() == 4326
    assert list(frame["cell_id"]) == [f["properties"]["cell_id"] for f in doc["features"]]


def test_dry_run_maps_every_cell_of_the_plan(sample_area, sample_plan, tmp_path):
    path = tmp_path / "plan.geojson"
    result = run_script("master.py", *master_args(sample_area, path))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    doc = json.loads(path.read_text())
    assert_valid_geojson(doc, path)

    features = {f["properties"]["cell_id"]: f["properties"] for f in doc["features"]}
    assert len(doc["features"]) == sample_area.x_cells * sample_area.y_cells == len(features)
    assert set(features) == {cell.id for cell in sample_plan.grid.cells()}
    assert {cid for cid, p in features.items() if p["status"] == "task"} == {t.cell.id for t in sample_plan.tasks}

    boxes = {f["properties"]["cell_id"]: tuple(f["bbox"]) for f in doc["features"]}
    assert boxes == {cell.id: cell.bbox for cell in sample_plan.grid.cells()}
    expected = polygons_per_cell(sample_area, boxes)
    assert {cid: p["polygons"] for cid, p in features.items()} == expected
    assert sum(expected.values()) == sample_plan.polygons

    spec = sample_plan.spec
    for task in sample_plan.tasks:
        p = features[task.cell.id]
        assert (p["row"], p["col"], p["scenes"]) == (task.cell.row, task.cell.col, len(task.scenes))
        assert p["est_chips"] == min(spec.max_chips_per_cell, p["polygons"]) <= spec.max_chips_per_cell
        assert p["est_fetch_bytes"] == estimate_fetch_bytes(task.cell, len(task.scenes), spec) > 0

    totals = {"tasks": len(sample_plan.tasks), "est_chips": sum(p["est_chips"] for p in features.values()),
              "est_fetch_bytes": sum(p["est_fetch_bytes"] for p in features.values())}
    assert {key: doc[key] for key in totals} == totals
    assert doc["run_id"] == summary["run_id"] and doc["dataset_id"] == summary["dataset_id"] == spec.dataset_id()
    assert summary["est_chips"] == totals["est_chips"] and summary["est_fetch_bytes"] == totals["est_fetch_bytes"]
    assert summary["plan_out"] == str(path)


def test_a_cell_below_min_polygons_is_marked_too_few(sample_area, sample_plan, tmp_path):
    # One more column east of the sample's fields: its cells hold no polygon.
    path = tmp_path / "plan.geojson"
    args = master_args(sample_area, path)
    args[args.index("--x-cells") + 1] = str(sample_area.x_cells + 1)
    result = run_script("master.py", *args)
    assert result.returncode == 0, result.stderr
    doc = json.loads(path.read_text())
    assert_valid_geojson(doc, path)
    assert len(doc["features"]) == (sample_area.x_cells + 1) * sample_area.y_cells
    by_status = {}
    for feature in doc["features"]:
        by_status.setdefault(feature["properties"]["status"], []).append(feature["properties"])
    assert {p["cell_id"] for p in by_status["task"]} == {t.cell.id for t in sample_plan.tasks}
    too_few = by_status["too_few_polygons"]
    assert [p["col"] for p in too_few] == [sample_area.x_cells] * sample_area.y_cells
    assert all(p["polygons"] < 5 and p["scenes"] == p["est_chips"] == p["est_fetch_bytes"] == 0 for p in too_few)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["cells_dropped"] == {"too_few_polygons": sample_area.y_cells}


def test_cells_outside_the_aoi_are_marked_so(sample_area, sample_master_options, tmp_path):
    # An L over the sample grid: its bounds are the grid's, but the north-east cell lies off it.
    x0, y0, step = sample_area.start_x, sample_area.start_y, sample_area.grid_step
    x1, y1, x2, y2, d = x0 + step, y0 + step, x0 + 2 * step, y0 + 2 * step, step / 4
    aoi = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[shapely.Polygon([(x0, y0), (x2, y0), (x2, y1 - d), (x1 - d, y1 - d), (x1 - d, y2),
                                                (x0, y2)])], crs="EPSG:4326").to_file(aoi)
    spec = DatasetSpec(aoi=str(aoi), grid_step=step, layer=sample_area.layer, datetime=sample_area.datetime,
                       max_cloud=100, min_polygons=1, chip_size=SAMPLE_CHIP_SIZE)
    plan = make_plan(replace(sample_master_options, spec=spec))
    cells = plan_map(plan)
    status = {(c.cell.row, c.cell.col): c.status for c in cells.cells}
    assert status == {(0, 0): "task", (0, 1): "task", (1, 0): "task", (1, 1): "outside_aoi"}
    assert cells.totals()["tasks"] == len(plan.tasks) == 3


def test_a_missing_folder_fails_cleanly_before_planning(sample_area, tmp_path):
    path = tmp_path / "no-such-folder" / "plan.geojson"
    result = run_script("master.py", *master_args(sample_area, path))
    assert result.returncode == 1
    assert f"the folder {path.parent} does not exist" in result.stderr
    assert "Traceback" not in result.stderr and "polygons in the grid" not in result.stderr  # nothing was read
    assert not path.parent.exists()
    with pytest.raises(ConfigError, match="is a folder"):
        check_plan_out(tmp_path)


def test_the_file_is_replaced_whole(sample_plan, sample_master_options, tmp_path):
    path = tmp_path / "plan.geojson"
    path.write_text("old")
    cells = plan_map(sample_plan)
    write_plan_map(path, cells)
    assert json.loads(path.read_text()) == cells.to_geojson()
    assert [p.name for p in tmp_path.iterdir()] == ["plan.geojson"]  # no temporary left beside it


def test_the_fetch_estimate_follows_the_documented_formula():
    spec = DatasetSpec(chip_size=64, resolution=10.0)
    cell = Cell(id="c", row=0, col=0, bbox=(0.0, 0.0, 0.05, 0.05))  # at the equator: ~5566 m a side
    side = math.radians(0.05) * 6_371_008.8 + 2 * 1 * 10.0  # + the one-pixel margin each side (chips stay inside)
    per_scene = (4 * math.ceil(side / 10) ** 2 * 2 + 6 * math.ceil(side / 20) ** 2 * 2
                 + math.ceil(side / 20) ** 2 * 1) * COMPRESSION_FACTOR
    assert estimate_fetch_bytes(cell, 3, spec) == round(3 * per_scene)
    assert estimate_fetch_bytes(cell, 0, spec) == 0
    # Only the spec's bands are fetched; max_scenes limits the bands, not SCL.
    scl = math.ceil(side / 20) ** 2 * COMPRESSION_FACTOR
    red_only = 3 * (math.ceil(side / 10) ** 2 * 2 * COMPRESSION_FACTOR + scl)
    assert estimate_fetch_bytes(cell, 3, replace(spec, bands=("B04",))) == round(red_only)
    assert estimate_fetch_bytes(cell, 3, replace(spec, max_scenes=1)) == round(per_scene + 2 * scl)
    # Away from the equator a cell of the same step is narrower.
    north = Cell(id="n", row=0, col=0, bbox=(0.0, 60.0, 0.05, 60.05))
    assert estimate_fetch_bytes(north, 1, spec) < estimate_fetch_bytes(cell, 1, spec)


def test_counts_must_fit_the_grid(sample_plan):
    with pytest.raises(ValueError, match="grid's shape"):
        build_plan_map(sample_plan, np.zeros((1, 1), dtype=int))
    # A task without scenes writes nothing: no chips expected.
    plan = replace(sample_plan, tasks=[replace(t, scenes=()) for t in sample_plan.tasks])
    counts = np.full((sample_plan.grid.y_cells, sample_plan.grid.x_cells), 12)
    cells = build_plan_map(plan, counts)
    assert all(c.est_chips == c.est_fetch_bytes == 0 and c.status == "task" for c in cells.cells)
