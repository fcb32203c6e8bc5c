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
def plan(sample_master_options):
    """The sample area's plan with split blocks of one cell: its 4 cells go 2 / 1 / 1 to train, val, test."""
    from cropchips.plan.plan import make_plan

    return make_plan(replace(sample_master_options,
                             spec=replace(sample_master_options.spec, split_block_size=2000.0, chip_size=CHIP)))


@pytest.fixture(scope="module")
def dataset(sample_area, plan, tmp_path_factory):
    """The sample area processed task by task into a dataset folder (no Kafka needed here)."""
    out = tmp_path_factory.mktemp("dataset")
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


def test_index_rows_match_the_chips(dataset, plan):
    out, results = dataset
    summary = finalize(out)
    index = gpd.read_parquet(out / "index.parquet")
    chips = {c.name: c for r in results for c in r.chips}
    used = {c.name: r.scenes_used for r in results for c in r.chips}  # results list the scene ids once
    split_of_cell = {task.cell.id: task.split for task in plan.tasks}
    assert sorted(split_of_cell.values()) == ["test", "train", "train", "val"]
    # Every chip is indexed, in its cell's split: none is dropped for overlapping another split.
    assert summary["chips"] == len(index) == len(chips) and sum(summary["dropped_for_overlap"].values()) == 0
    assert index.crs.to_epsg() == 4326 and set(index["split"]) == {"train", "val", "test"}
    assert summary["splits"] == dict(Counter(split_of_cell[chips[n].cell_id] for n in index["name"]))
    for row in index.itertuples():
        chip = chips[row.name]
        assert row.split == split_of_cell[chip.cell_id] == chip.split
        assert (out / row.image).exists() and (out / row.mask).exists()
        assert (row.left, row.bottom, row.right, row.top) == tuple(chip.bounds) and row.crs == chip.crs
        assert sum(getattr(row, f"class_{k}_pixels") for k in (*range(9), 255)) == CHIP * CHIP
        assert list(row.label_layers) == ["classes"] and row.instances == "" and list(row.bin_dates) == []
        assert list(row.scene_ids) == list(used[row.name])
        # The footprint in lon/lat contains the chip's centre.
        centre = gpd.GeoSeries([shapely.Point((row.left + row.right) / 2, (row.bottom + row.top) / 2)], crs=row.crs)
        assert row.geometry.contains(centre.to_crs(4326).iloc[0])
        assert row.run_id == "run-sample" and row.worker_id == "d@test" and row.task_id
        assert row.dataset_id == chip.dataset_id and len(row.dataset_id) == 12


def assert_no_cross_split_overlap(index) -> None:
    """No two chips of different splits share a pixel (their native boxes, computed here with shapely)."""
    boxes = shapely.box(index["left"], index["bottom"], index["right"], index["top"])
    splits = index["split"].to_numpy()
    for i in range(len(index)):
        for j in range(i + 1, len(index)):
            if splits[i] != splits[j]:
                assert boxes[i].intersection(boxes[j]).area == 0, (index["name"].iat[i], index["name"].iat[j])


def test_no_chip_of_one_split_overlaps_a_chip_of_another(dataset):
    out, _ = dataset
    index, dropped = build_index(records_from_metadata(out))
    assert not dropped and set(index["split"]) == {"train", "val", "test"}
    assert_no_cross_split_overlap(index)


def test_records_of_older_versions_are_split_by_block_and_cross_split_overlaps_dropped(dataset):
    """Chips of cropchips < 0.3 carry no split and may cross their cell's edge: the index splits them by
    their block and drops one of each pair of overlapping chips of different splits."""
    out, _ = dataset
    records = [{k: v for k, v in r.items() if k != "split"} for r in records_from_metadata(out)]
    index, dropped = build_index(records, SplitPolicy(block_size_m=400, ratios=(0.5, 0.25, 0.25)))
    assert set(index["split"]) == {"train", "val", "test"}
    assert sum(dropped.values()) > 0 and len(index) + sum(dropped.values()) == len(records)
    assert_no_cross_split_overlap(index)


def test_rebuild_index_from_the_files_alone_with_the_folders_splits(dataset, tmp_path):
    out, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "index.parquet").unlink(missing_ok=True)
    original = gpd.read_parquet(out / "index.parquet") if (out / "index.parquet").exists() else None
    done = run_script("monitor.py", "--rebuild-index", "--output-dir", str(copy))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    index = gpd.read_parquet(copy / "index.parquet")
    assert summary["chips"] == len(index) > 0 and sum(summary["splits"].values()) == len(index)
    # The splits are the chips' own (their sidecars say what the master gave their cells).
    sidecars = {r["name"]: r["split"] for r in records_from_metadata(copy)}
    assert dict(zip(index["name"], index["split"])) == sidecars and len(set(sidecars.values())) == 3
    if original is not None:
        assert dict(zip(original["name"], original["split"])) == sidecars
    # Chips of another dataset than dataset.yaml's (a --force run elsewhere) are left out, with a warning.
    spec = DatasetSpec.from_yaml(copy / "dataset.yaml")
    (copy / "dataset.yaml").write_text(replace(spec, chip_size=32).to_yaml())
    other = run_script("monitor.py", "--rebuild-index", "--output-dir", str(copy))
    assert other.returncode == 0 and json.loads(other.stdout)["chips"] == 0
    assert "belong to another dataset" in other.stderr
    (copy / "dataset.yaml").write_text(spec.to_yaml())
    moved = run_script("monitor.py", "--rebuild-index", "--output-dir", str(copy), "--split-block-size", "400")
    assert moved.returncode == 1 and "part of the run's dataset spec now" in moved.stderr
    assert np.array_equal(np.sort(index["name"].to_numpy()), np.sort(index["name"].unique()))
    missing = run_script("monitor.py", "--rebuild-index", "--output-dir", str(copy / "nope"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
