"""End to end on a real broker: master -> 2 workers -> chips and masks -> results -> monitor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import yaml

from conftest import REPO, run_script
from cropchips.fields.classes import load_class_map
from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.queue.messages import Result, decode
from cropchips.sources.sentinel2 import BANDS
from cropchips.spec import DatasetSpec
from cropchips.output.spec_file import SPEC_FILE
from cropchips.output.storage import TMP_PREFIX

#: The run's chip settings, given to the master in its --spec file only.
CHIP_SETTINGS = {"chip_size": 64, "max_chips_per_cell": 3, "composite": "median"}
CHIP = CHIP_SETTINGS["chip_size"]
MAX_CHIPS = CHIP_SETTINGS["max_chips_per_cell"]
#: Old worker settings left in the workers' environment: they conflict with the spec, which must win.
STALE_WORKER_ENV = {"CROPCHIPS_CHIP_SIZE": "16", "CROPCHIPS_COMPOSITE": "least-cloudy",
                    "CROPCHIPS_MAX_CHIPS_PER_CELL": "1"}


def spec_settings(sample):
    """Everything the run's chips depend on, as the --spec file holds it: the area, the scenes, the chips."""
    return {"layer": sample.layer, "start_x": sample.start_x, "start_y": sample.start_y,
            "grid_step": sample.grid_step, "x_cells": sample.x_cells, "y_cells": sample.y_cells,
            "datetime": sample.datetime, "max_cloud": 100, **CHIP_SETTINGS}


def master_args(sample, spec_path, broker, topics, run_id):
    """Host and broker settings only: the dataset is all in the spec file."""
    return ["--gpkg", str(sample.gpkg), "--stac-items", str(sample.items), "--spec", str(spec_path),
            "--run-id", run_id, *kafka_args(broker, topics)]


def kafka_args(broker, topics):
    return ["--bootstrap-servers", broker.bootstrap_servers, "--tasks-topic", topics["tasks"],
            "--results-topic", topics["results"], "--dlq-topic", topics["dlq"]]


def start_worker(n, sample, output, broker, topics, *extra):
    """worker.py with no dataset flags, and the stale settings in its environment (not the master's)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "worker.py"), str(n), "--gpkg", str(sample.gpkg),
         "--output-dir", str(output), "--local-scenes-dir", str(sample.root),
         "--group-id", topics["group"], "--burst",
         "--burst-idle", "5", *kafka_args(broker, topics), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, **STALE_WORKER_ENV})


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, broker, sample_area):
    """Run the whole pipeline once; the tests below inspect what it produced."""
    from cropchips.queue.kafka import ensure_topics

    topics = {"tasks": "e2e-tasks", "results": "e2e-results", "dlq": "e2e-dlq", "group": "e2e-workers"}
    ensure_topics(KafkaSettings(broker.bootstrap_servers), {topics["tasks"]: 10, topics["results"]: 1, topics["dlq"]: 1})
    output = tmp_path_factory.mktemp("dataset")
    spec_path = tmp_path_factory.mktemp("spec") / "dataset.yaml"
    spec_path.write_text(yaml.safe_dump(spec_settings(sample_area), sort_keys=False))
    assert not set(STALE_WORKER_ENV) & set(os.environ), "the master must not see the workers' stale settings"
    published = run_script("master.py", *master_args(sample_area, spec_path, broker, topics, "run-e2e"))
    assert published.returncode == 0, published.stderr
    workers = [start_worker(n, sample_area, output, broker, topics) for n in (1, 2)]
    monitor = run_script("monitor.py", "--exit-when-done", "--json", "--timeout", "240", "--no-progress",
                         "--output-dir", str(output), *kafka_args(broker, topics), timeout=300)
    logs = []
    for proc in workers:
        out, _ = proc.communicate(timeout=120)
        logs.append(out)
        assert proc.returncode == 0, out
    results = [decode(r.value) for r in read_topic(KafkaSettings(broker.bootstrap_servers), topics["results"])]
    return {"output": output, "monitor": monitor, "worker_logs": logs, "spec_path": spec_path,
            "results": [r for r in results if isinstance(r, Result)], "sample": sample_area}


def test_monitor_reports_every_task_ok(pipeline_run):
    monitor = pipeline_run["monitor"]
    assert monitor.returncode == 0, monitor.stderr
    summary = json.loads(monitor.stdout.strip().splitlines()[-1])
    sample = pipeline_run["sample"]
    n = sample.x_cells * sample.y_cells
    assert summary["run_id"] == "run-e2e" and summary["tasks_total"] == n and summary["tasks_done"] == n
    assert summary["statuses"]["ok"] == n and summary["statuses"]["failed"] == 0
    assert summary["chips"] == sum(len(r.chips) for r in pipeline_run["results"]) > 0
    # Pixel counts per class add up to the chips' area.
    assert sum(summary["class_pixels"].values()) == summary["chips"] * CHIP * CHIP


def test_both_workers_joined_and_results_name_them(pipeline_run):
    for log in pipeline_run["worker_logs"]:
        assert "partitions assigned" in log and "stopped after" in log
    workers = {r.worker_id.split("@")[0] for r in pipeline_run["results"]}
    assert workers <= {"1", "2"} and workers


def test_the_chips_follow_the_spec_file_not_the_workers_environment(pipeline_run):
    output, sample = pipeline_run["output"], pipeline_run["sample"]
    counts = [len(r.chips) for r in pipeline_run["results"]]
    # Up to the spec's 3 per cell, and more than the stale CROPCHIPS_MAX_CHIPS_PER_CELL=1 somewhere.
    assert max(counts) > 1 and all(0 < n <= MAX_CHIPS for n in counts), counts
    # The folder records the run's spec: the file's settings, as the master published them.
    folder_spec = DatasetSpec.from_yaml(output / SPEC_FILE)
    for key, value in spec_settings(sample).items():
        assert getattr(folder_spec, key) == value, key
    assert folder_spec == DatasetSpec.from_yaml(pipeline_run["spec_path"]).with_overrides(
        {"gpkg_fingerprint": folder_spec.gpkg_fingerprint})  # nothing else changed on the way
    for chip in (c for r in pipeline_run["results"] for c in r.chips):
        with rasterio.open(output / chip.image) as img:
            assert img.shape == (CHIP, CHIP)  # not the stale CROPCHIPS_CHIP_SIZE=16
        sidecar = json.loads((output / "metadata" / f"{chip.name}.json").read_text())
        assert sidecar["dataset_id"] == folder_spec.dataset_id() and sidecar["method"] == "median"
    # The workers say they ignore the stale variables instead of silently using or dropping them.
    for log in pipeline_run["worker_logs"]:
        assert "ignoring" in log and all(name in log for name in STALE_WORKER_ENV), log[-3000:]


def test_chip_files_match_the_results(pipeline_run):
    output = pipeline_run["output"]
    chips = [c for r in pipeline_run["results"] for c in r.chips]
    images = sorted(p.name for p in (output / "images").glob("*.tif"))
    masks = sorted(p.name for p in (output / "masks").glob("*.tif"))
    assert images == masks == sorted(f"{c.name}.tif" for c in chips)
    assert not [p for p in output.rglob(f"{TMP_PREFIX}*")]
    for result in pipeline_run["results"]:
        assert 0 < len(result.chips) <= MAX_CHIPS
        assert [c.name for c in result.chips] == [f"{result.cell_id}-chip{k:02d}" for k in range(len(result.chips))]


def test_every_chip_is_a_well_formed_aligned_geotiff(pipeline_run):
    output, sample = pipeline_run["output"], pipeline_run["sample"]
    scene_dirs = sorted((sample.root / "scenes").iterdir())
    with rasterio.open(scene_dirs[0] / "B02.tif") as src:
        x0, y0 = src.transform.c, src.transform.f
    for chip in (c for r in pipeline_run["results"] for c in r.chips):
        with rasterio.open(output / chip.image) as img, rasterio.open(output / chip.mask) as mask:
            assert img.count == 10 and img.dtypes == ("uint16",) * 10 and img.nodata == 0
            assert img.descriptions == BANDS
            assert img.crs.to_epsg() == sample.epsg and img.shape == (CHIP, CHIP)
            assert img.res == (10.0, 10.0)
            # On the scenes' own 10 m lattice: whole pixels from the scene origin.
            assert (img.transform.c - x0) % 10 == 0 and (y0 - img.transform.f) % 10 == 0
            assert mask.count == 1 and mask.dtypes == ("uint8",) and mask.transform == img.transform
            assert mask.crs == img.crs and mask.shape == img.shape
            assert list(img.bounds) == pytest.approx(list(chip.bounds))
            counts = np.bincount(mask.read(1).ravel(), minlength=9)
            assert {str(k): int(v) for k, v in enumerate(counts) if v} == chip.class_pixels


def test_mask_classes_agree_with_the_polygons_beneath(pipeline_run):
    output, sample = pipeline_run["output"], pipeline_run["sample"]
    fields = pyogrio.read_dataframe(sample.gpkg, layer=sample.layer, fid_as_index=True)
    class_map = load_class_map()
    cells = {c.id: c for c in DatasetSpec.from_yaml(pipeline_run["spec_path"]).grid().cells()}
    shifted = 0
    fields["expected"] = class_map.classify(fields["EC_hcat_c"], fields["EC_hcat_n"], unmapped=255)
    assert (fields["expected"] == 255).any()  # the sample's maize and pasture: fields of no class
    checked = 0
    for chip in (c for r in pipeline_run["results"] for c in r.chips):
        with rasterio.open(output / chip.mask) as src:
            mask, transform, crs = src.read(1), src.transform, src.crs
        local = fields.to_crs(crs)
        rows, cols = np.mgrid[0:CHIP:3, 0:CHIP:3]
        xs, ys = rasterio.transform.xy(transform, rows.ravel(), cols.ravel())
        points = shapely.points(np.asarray(xs), np.asarray(ys))
        tree = shapely.STRtree(local.geometry.values)
        point_idx, poly_idx = tree.query(points, predicate="within")
        expected = np.zeros(len(points), dtype="uint8")
        expected[point_idx] = local["expected"].to_numpy()[poly_idx]
        assert np.array_equal(mask[rows.ravel(), cols.ravel()], expected)
        checked += len(points)
        # The chip holds its field's representative point, centred on it unless that would cross the cell's
        # edge: then it is shifted inward and lies inside the cell.
        field = local.loc[local.index.astype(str) == chip.field_id].geometry.iloc[0]
        box = shapely.box(*chip.bounds)
        assert box.contains(field.representative_point())
        cx, cy = transform.c + 10 * CHIP / 2, transform.f - 10 * CHIP / 2
        if shapely.Point(cx, cy).distance(field.representative_point()) > 10 * 2**0.5:
            shifted += 1
        cell = cells[chip.cell_id]
        polygon = gpd.GeoSeries([shapely.segmentize(shapely.box(*cell.bbox), 0.001)], crs=4326).to_crs(crs).iloc[0]
        assert polygon.contains(box)
    assert checked > 1000


def test_image_pixels_are_the_cloud_masked_median_of_the_scenes(pipeline_run):
    """Recompute one chip's red band from the scene files: SCL-clear (4, 5, 6) median, 0 where none."""
    output, sample = pipeline_run["output"], pipeline_run["sample"]
    result = next(r for r in pipeline_run["results"] if r.chips)
    chip = result.chips[0]
    with rasterio.open(output / chip.image) as src:
        red, transform = src.read(BANDS.index("B04") + 1), src.transform
    values, clear = [], []
    for scene_id in result.scenes_used:
        folder = sample.root / "scenes" / scene_id
        with rasterio.open(folder / "B04.tif") as b04, rasterio.open(folder / "SCL.tif") as scl:
            col0 = round((transform.c - b04.transform.c) / 10)
            row0 = round((b04.transform.f - transform.f) / 10)
            values.append(b04.read(1)[row0:row0 + CHIP, col0:col0 + CHIP].astype("float64"))
            # SCL is 20 m: each 10 m pixel takes the 20 m pixel holding its centre.
            rows = ((b04.transform.f - transform.f) + 10 * (np.arange(CHIP) + 0.5) - (b04.transform.f - scl.transform.f)) // 20
            cols = ((transform.c - scl.transform.c) + 10 * (np.arange(CHIP) + 0.5)) // 20
            clear.append(np.isin(scl.read(1)[np.ix_(rows.astype(int), cols.astype(int))], (4, 5, 6)))
    stack = np.where(np.array(clear), np.array(values), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmedian(stack, axis=0)
    expected = np.where(np.isnan(expected), 0, np.floor(expected + 0.5))
    # The scenes are of processing baseline 05.09 (raster:bands offset -0.1): harmonised to the
    # pre-2022 convention, DN - 1000, clipped at 1.
    items = {i["id"]: i for i in json.loads(sample.items.read_text())["features"]}
    offsets = {items[s]["assets"]["red"]["raster:bands"][0]["offset"] for s in result.scenes_used}
    assert offsets == {-0.1}
    expected = np.where(expected > 0, np.maximum(expected - 1000, 1), 0)
    assert np.array_equal(red, expected.astype("uint16"))
    # Each scene's radiometry is in the chip's provenance sidecar (the result lists scene ids only).
    sidecar = json.loads((output / "metadata" / f"{chip.name}.json").read_text())
    assert [s["id"] for s in sidecar["scenes"]] == list(result.scenes_used) and not chip.scenes
    assert all(s["applied_dn"] == 1000 and s["processing_baseline"] == "05.09" for s in sidecar["scenes"])
    assert len(result.scenes_used) >= 2 and (red > 0).mean() > 0.9


def test_the_monitor_writes_the_chip_index(pipeline_run):
    import geopandas as gpd

    summary = json.loads(pipeline_run["monitor"].stdout.strip().splitlines()[-1])
    index = gpd.read_parquet(pipeline_run["output"] / "index.parquet")
    names = sorted(c.name for r in pipeline_run["results"] for c in r.chips)
    assert summary["dataset"]["chips"] == len(index) == len(names)
    assert sorted(index["name"]) == names and set(index["split"]) <= {"train", "val", "test"}
