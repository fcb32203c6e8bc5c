"""The chip index: GeoParquet rows, spatially disjoint splits, rebuildable from the files alone."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from collections import Counter

import geopandas as gpd
import numpy as np
import pytest
import shapely
from conftest import run_script

from cropchips.spec import DatasetSpec
from cropchips.dataset.index import SplitPolicy, build_index, finalize, records_from_metadata
from cropchips.sources.hrefs import HrefPolicy
from helpers import SpecProcessor

CHIP = 64


@pytest.fixture(scope="module")
def dataset(sample_area, sample_plan, tmp_path_factory):
    """The sample area processed task by task into a dataset folder (no Kafka needed here)."""
    out = tmp_path_factory.mktemp("dataset")
    plan = sample_plan
    processor = SpecProcessor("d@test", output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                              chip_size=CHIP, max_chips_per_cell=8,
                              hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)))
    results = [processor.process(task) for task in plan.tasks]
    assert all(r.status == "ok" for r in results)
    return out, results


def test_split_policy_is_deterministic_and_follows_the_ratios():
    policy = SplitPolicy(block_size_m=1000, ratios=(0.7, 0.2, 0.1))
    blocks = [policy.split_of("EPSG:32630", 500 + 1000 * i, 500 + 1000 * j) for i in range(60) for j in range(60)]
    shares = Counter(blocks)
    assert abs(shares["train"] / 3600 - 0.7) < 0.03 and abs(shares["val"] / 3600 - 0.2) < 0.03
    assert blocks == [policy.split_of("EPSG:32630", 500 + 1000 * i, 500 + 1000 * j) for i in range(60) for j in range(60)]
    # Every point of one block gets the block's split.
    assert {policy.split_of("EPSG:32630", 10_000 + dx, 20_000 + dy) for dx in (1, 500, 999) for dy in (1, 999)} == {
        policy.split_of("EPSG:32630", 10_500, 20_500)}
    with pytest.raises(ValueError, match="adding up to 1"):
        SplitPolicy(ratios=(0.8, 0.1, 0.2))


def test_index_rows_match_the_chips(dataset):
    out, results = dataset
    summary = finalize(out)
    index = gpd.read_parquet(out / "index.parquet")
    chips = {c.name: c for r in results for c in r.chips}
    used = {c.name: r.scenes_used for r in results for c in r.chips}  # results list the scene ids once
    assert summary["chips"] == len(index) == len(chips)  # one 10 km block: a single split, nothing dropped
    assert index.crs.to_epsg() == 4326 and set(index["split"]) <= {"train", "val", "test"}
    for row in index.itertuples():
        chip = chips[row.name]
        assert (out / row.image).exists() and (out / row.mask).exists()
        assert (row.left, row.bottom, row.right, row.top) == tuple(chip.bounds) and row.crs == chip.crs
        assert sum(getattr(row, f"class_{k}_pixels") for k in range(9)) == CHIP * CHIP
        assert list(row.scene_ids) == list(used[row.name])
        # The footprint in lon/lat contains the chip's centre.
        centre = gpd.GeoSeries([shapely.Point((row.left + row.right) / 2, (row.bottom + row.top) / 2)], crs=row.crs)
        assert row.geometry.contains(centre.to_crs(4326).iloc[0])
        assert row.run_id == "run-sample" and row.worker_id == "d@test" and row.task_id
        assert row.dataset_id == chip.dataset_id and len(row.dataset_id) == 12


def test_small_blocks_split_the_area_and_no_chip_overlaps_another_split(dataset):
    out, _ = dataset
    records = records_from_metadata(out)
    index, dropped = build_index(records, SplitPolicy(block_size_m=400, ratios=(0.5, 0.25, 0.25)))
    assert set(index["split"]) == {"train", "val", "test"}
    assert sum(dropped.values()) > 0 and len(index) + sum(dropped.values()) == len(records)
    boxes = shapely.box(index["left"], index["bottom"], index["right"], index["top"])
    splits = index["split"].to_numpy()
    for i in range(len(index)):
        for j in range(i + 1, len(index)):
            if splits[i] != splits[j]:
                assert boxes[i].intersection(boxes[j]).area == 0, (index["name"].iat[i], index["name"].iat[j])


def test_rebuild_index_from_the_files_alone_with_the_folders_splits(dataset, tmp_path):
    out, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "index.parquet").unlink(missing_ok=True)
    one_block = run_script("monitor.py", "--rebuild-index", "--output-dir", str(copy))
    assert one_block.returncode == 0, one_block.stderr
    assert sum(1 for n in json.loads(one_block.stdout)["splits"].values() if n) == 1  # 10 km blocks: one split
    # The splits are the dataset's: dataset.yaml says 400 m blocks, and the rebuilt index follows it.
    spec = DatasetSpec.from_yaml(copy / "dataset.yaml")
    (copy / "dataset.yaml").write_text(replace(spec, split_block_size=400.0).to_yaml())
    done = run_script("monitor.py", "--rebuild-index", "--output-dir", str(copy))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    index = gpd.read_parquet(copy / "index.parquet")
    assert summary["chips"] == len(index) > 0 and sum(summary["splits"].values()) == len(index)
    assert len(set(index["split"])) > 1
    moved = run_script("monitor.py", "--rebuild-index", "--output-dir", str(copy), "--split-block-size", "400")
    assert moved.returncode == 1 and "part of the run's dataset spec now" in moved.stderr
    assert np.array_equal(np.sort(index["name"].to_numpy()), np.sort(index["name"].unique()))
    missing = run_script("monitor.py", "--rebuild-index", "--output-dir", str(copy / "nope"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
