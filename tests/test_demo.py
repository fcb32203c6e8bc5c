"""The README's first command: `make demo` runs `python -m cropchips.demo`, the whole pipeline on one machine.

The demo is also the issue's acceptance test of the dataset: every written chip is indexed, the three
splits are non-empty with train the largest, no two chips of different splits overlap, no pair of chips
shares more than 25 % of a chip, and fields of no class are 255 in the masks.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pystac
import rasterio
import shapely
from conftest import REPO


def run_demo(tmp_path, *args):
    done = subprocess.run([sys.executable, "-m", "cropchips.demo", "--output", str(tmp_path / "demo"), *args],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    # The master's and the monitor's own lines come first; the demo's summary is the last JSON object.
    start = done.stdout.rfind("\n{\n") + 1
    summary, end = json.JSONDecoder().raw_decode(done.stdout[start:])
    assert "catalog.json (STAC)" in done.stdout[start + end:]
    return summary, tmp_path / "demo" / "dataset"


def test_demo_runs_the_whole_pipeline_and_leaves_a_dataset_that_trains_well(tmp_path):
    summary, dataset = run_demo(tmp_path)
    assert summary["statuses"]["failed"] == 0 and summary["statuses"]["ok"] == 12 and summary["chips"] > 0
    images = sorted(p.stem for p in (dataset / "images").glob("*.tif"))
    assert len(images) == summary["chips"]
    index = gpd.read_parquet(dataset / "index.parquet")
    # Every written chip is indexed: none dropped for overlapping a chip of another split.
    assert sorted(index["name"]) == images and summary["dataset"]["chips"] == len(index)
    assert sum(summary["dataset"]["dropped_for_overlap"].values()) == 0
    counts = index["split"].value_counts().to_dict()
    assert set(counts) == {"train", "val", "test"} and counts["train"] > max(counts["val"], counts["test"]), counts
    # No chip of one split overlaps a chip of another; no two chips share more than 25 % of a chip.
    boxes = shapely.box(index["left"], index["bottom"], index["right"], index["top"])
    area = shapely.area(boxes[0])
    for i, j in itertools.combinations(range(len(index)), 2):
        if index["crs"].iat[i] != index["crs"].iat[j]:
            continue
        shared = shapely.intersection(boxes[i], boxes[j]).area
        assert shared <= 0.25 * area + 1e-6, (index["name"].iat[i], index["name"].iat[j], shared / area)
        if index["split"].iat[i] != index["split"].iat[j]:
            assert shared == 0, (index["name"].iat[i], index["name"].iat[j])
    # Fields of no class (the sample's maize and pasture) are 255, the ignore index, in some masks.
    assert index["class_255_pixels"].sum() > 0
    values = set()
    for row in index.itertuples():
        with rasterio.open(dataset / row.mask) as src:
            values |= set(np.unique(src.read(1)).tolist())
            assert src.nodata == 255
        assert (dataset / row.instances).exists() and (dataset / row.boundaries).exists()
    assert 255 in values and 0 in values and values <= {*range(9), 255}
    assert list(index["label_layers"].iat[0]) == ["classes", "instances", "boundaries"]
    stats = json.loads((dataset / "stats.json").read_text())
    assert stats["split"] == "train" and stats["chips"] == counts["train"]
    catalog = pystac.Catalog.from_file(str(dataset / "catalog.json"))
    assert sorted(item.id for item in catalog.get_items(recursive=True)) == sorted(index["name"])
    assert "<svg" in (dataset / "report.html").read_text()


def test_the_time_series_demo_gives_every_chip_the_same_monthly_bins(tmp_path):
    summary, dataset = run_demo(tmp_path, "--timeseries", "--chip-size", "64")
    assert summary["statuses"]["failed"] == 0 and summary["chips"] > 0
    index = gpd.read_parquet(dataset / "index.parquet")
    assert {tuple(d) for d in index["bin_dates"]} == {("2023-05-15", "2023-06-15")}
    for row in index.itertuples():
        with rasterio.open(dataset / row.image) as src:
            assert src.count == 2 * 10
            assert src.descriptions[0] == "2023-05-15 B02" and src.descriptions[10] == "2023-06-15 B02"
        assert len(row.bin_clear_fractions) == len(row.bin_valid) == 2 and any(row.bin_valid)
