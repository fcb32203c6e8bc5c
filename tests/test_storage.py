"""Object storage: the dataset written to a real S3-compatible server (moto, its own process).

Every file is published whole (one upload of a finished local file), so a reader never sees a
partial object, and a worker killed mid-task loses nothing: the task is redone from Kafka.
"""

from __future__ import annotations

import io
import json
import os
import random

import boto3
import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import run_script

from cropchips.dataset import SplitPolicy, finalize
from cropchips.hrefs import HrefPolicy
from cropchips.kafka_io import KafkaSettings, read_topic
from cropchips.messages import BANDS, Result, decode
from cropchips.processing import ProcessingOptions, TaskProcessor
from cropchips.report import build_report
from cropchips.storage import TMP_PREFIX, LocalStorage, ObjectStorage, open_storage
from helpers import WorkerProcess, final_summary, kafka_args, kill_at_random, publish_area

CHIP = 64


def keys(bucket: str, prefix: str) -> list[str]:
    """Every object under ``prefix``, listed by plain boto3 (not through the code under test)."""
    s3 = boto3.client("s3")
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [o["Key"][len(prefix):] for o in page.get("Contents", ())]
    return sorted(found)


def get(bucket: str, key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/some/prefix")


def test_storage_publishes_whole_files_lists_by_prefix_and_deletes(storage, tmp_path, monkeypatch):
    import cropchips.storage as module

    monkeypatch.setattr(module, "SCRATCH_DIR", tmp_path / "scratch")
    storage.prepare()
    storage.write_bytes("images/c1-chip00.tif", b"a" * 10)
    storage.write_bytes("images/c1-chip01.tif", b"b" * 20)
    storage.write_bytes("images/c10-chip00.tif", b"c")
    storage.write_json("metadata/c1-chip00.json", {"x": [1, 2]})
    assert storage.list("images") == ["images/c1-chip00.tif", "images/c1-chip01.tif", "images/c10-chip00.tif"]
    assert storage.list("images", "c1-chip") == ["images/c1-chip00.tif", "images/c1-chip01.tif"]
    assert storage.list("nothing-here") == []
    assert storage.size("images/c1-chip01.tif") == 20 and storage.read_json("metadata/c1-chip00.json") == {"x": [1, 2]}
    storage.write_bytes("images/c1-chip01.tif", b"new")  # replaced whole
    assert storage.read_bytes("images/c1-chip01.tif") == b"new"

    def half_then_fail(path):
        path.write_bytes(b"partial")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        storage.publish("images/c2-chip00.tif", half_then_fail)
    assert not storage.exists("images/c2-chip00.tif")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("images/c2-chip00.tif")
    storage.delete("images/c1-chip00.tif")
    storage.delete("images/never-written.tif")  # no error
    assert storage.list("images", "c1-") == ["images/c1-chip01.tif"]
    if isinstance(storage, LocalStorage):
        leftovers = list(storage.root.rglob(f"{TMP_PREFIX}*"))
    else:
        leftovers = list((tmp_path / "scratch").rglob("*")) if (tmp_path / "scratch").exists() else []
    assert not leftovers, leftovers


def test_bad_locations_are_clear_errors(s3_bucket):
    from cropchips.errors import ConfigError

    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        open_storage("s3://no-such-bucket/x").prepare()
    with pytest.raises(ConfigError, match="give a bucket"):
        open_storage("s3://")
    with pytest.raises(ConfigError, match="no file system for nosuch://"):
        open_storage("nosuch://bucket/x")
    assert isinstance(open_storage(f"s3://{s3_bucket}/x"), ObjectStorage)


def test_tasks_written_to_s3_equal_the_local_ones_and_are_reused(s3_bucket, sample_area, sample_plan, tmp_path):
    url = f"s3://{s3_bucket}/run1"

    def processor(output):
        return TaskProcessor(ProcessingOptions(
            output_dir=output, gpkg=str(sample_area.gpkg), layer=sample_area.layer, chip_size=CHIP,
            max_chips_per_cell=3, hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),))), "s3@test")

    remote, local = processor(url), processor(tmp_path / "local")
    tasks = sample_plan.tasks[:2]
    results = [remote.process(t) for t in tasks]
    assert [r.status for r in results] == ["ok", "ok"] and all(r.chips for r in results)
    local_results = [local.process(t) for t in tasks]
    names = sorted(c.name for r in results for c in r.chips)
    assert names == sorted(c.name for r in local_results for c in r.chips)

    stored = keys(s3_bucket, "run1/")
    assert [k for k in stored if k.startswith("images/")] == [f"images/{n}.tif" for n in names]
    assert [k for k in stored if k.startswith("masks/")] == [f"masks/{n}.tif" for n in names]
    assert [k for k in stored if k.startswith("metadata/")] == [f"metadata/{n}.json" for n in names]
    assert [k for k in stored if k.startswith("manifests/")] == sorted(f"manifests/{t.cell.id}.json" for t in tasks)
    for name in names:  # the same pixels, georeferencing and band names as on a local disk
        with rasterio.open(io.BytesIO(get(s3_bucket, f"run1/images/{name}.tif"))) as src, \
                rasterio.open(tmp_path / "local" / "images" / f"{name}.tif") as ref:
            assert src.descriptions == ref.descriptions == BANDS
            assert src.crs == ref.crs and src.transform == ref.transform
            assert np.array_equal(src.read(), ref.read())
        with rasterio.open(io.BytesIO(get(s3_bucket, f"run1/masks/{name}.tif"))) as src, \
                rasterio.open(tmp_path / "local" / "masks" / f"{name}.tif") as ref:
            assert np.array_equal(src.read(), ref.read())
    manifest = json.loads(get(s3_bucket, f"run1/manifests/{tasks[0].cell.id}.json"))
    for rel, size in manifest["files"].items():
        assert len(get(s3_bucket, f"run1/{rel}")) == size

    again = processor(url).process(tasks[0])  # a redelivered task: re-reported from the manifest
    assert again.reused and sorted(c.name for c in again.chips) == sorted(c.name for c in results[0].chips)

    summary = finalize(url, policy=SplitPolicy(block_size_m=500))  # from the sidecars in the bucket
    index = gpd.read_parquet(io.BytesIO(get(s3_bucket, "run1/index.parquet")))
    assert summary["chips"] == len(index) and sorted(index["name"]) == names
    assert set(index["image"]) == {f"images/{n}.tif" for n in names}
    assert summary["catalog"] == f"s3://{s3_bucket}/run1/catalog.json"
    assert [k for k in keys(s3_bucket, "run1/stac/items/")] == [f"{n}.json" for n in names]
    catalog = json.loads(get(s3_bucket, "run1/catalog.json"))
    collection_link = next(link["href"] for link in catalog["links"] if link["rel"] == "child")
    collection = json.loads(get(s3_bucket, "run1/" + collection_link.removeprefix("./")))
    item_links = [link["href"] for link in collection["links"] if link["rel"] == "item"]
    assert len(item_links) == len(names)
    item = json.loads(get(s3_bucket, f"run1/stac/items/{names[0]}.json"))
    assert item["assets"]["image"]["href"] == f"../../images/{names[0]}.tif"
    # The example Dataset reads the bucket with plain geopandas (fsspec) and rasterio (GDAL's /vsis3/).
    from examples.chip_dataset import ChipDataset

    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"AWS_S3_ENDPOINT": endpoint, "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}.items():
            patch.setenv(key, value)
        chips = ChipDataset(url, split=None)
        assert len(chips) == len(names)
        for i in range(len(chips)):
            image, mask = chips[i]
            name = chips.rows.iloc[i]["name"]
            with rasterio.open(tmp_path / "local" / "images" / f"{name}.tif") as ref:
                assert np.allclose(image, ref.read() * 1e-4)
            with rasterio.open(tmp_path / "local" / "masks" / f"{name}.tif") as ref:
                assert np.array_equal(mask, ref.read(1))
    report = build_report(url, quicklooks=True)
    assert report == f"s3://{s3_bucket}/run1/report.html"
    page = get(s3_bucket, "run1/report.html").decode()
    assert page.count('class="quicklook"') == len(names)
    assert [k for k in keys(s3_bucket, "run1/") if k.startswith("quicklooks/")] == [f"quicklooks/{n}.png"
                                                                                     for n in names]


def test_worker_with_a_missing_bucket_exits_with_a_clear_message(s3_bucket, sample_area, broker, topics):
    done = run_script("worker.py", "1", "--gpkg", str(sample_area.gpkg), "--layer", sample_area.layer,
                      "--output-dir", "s3://no-such-bucket/chips", "--burst", *kafka_args(broker.bootstrap_servers,
                                                                                          topics), timeout=120)
    assert done.returncode == 1, done.stderr
    assert "no-such-bucket" in done.stderr and "does not exist" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def s3_area(tmp_path_factory):
    from cropchips.sample import generate_sample

    # 30 small cells with 3 fields each: quick tasks, many uploads.
    return generate_sample(tmp_path_factory.mktemp("s3area"), x_cells=6, y_cells=5, grid_step=0.01,
                           fields_per_cell=3, margin_m=1000)


def test_killed_workers_leave_no_partial_object_and_lose_nothing(broker, topics, s3_area, s3_bucket, tmp_path,
                                                                 monkeypatch):
    rng = random.Random(11)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the workers' local scratch folder
    (tmp_path / "tmp").mkdir()
    url = f"s3://{s3_bucket}/chaos"
    bootstrap = broker.bootstrap_servers
    publish_area(s3_area, bootstrap, topics, "--run-id", "run-s3")
    extra = ["--chip-size", "64", "--max-chips-per-cell", "3", "--burst", "--burst-idle", "10",
             "--session-timeout-ms", "3000"]
    workers = {n: WorkerProcess(n, s3_area, url, bootstrap, topics, *extra) for n in (1, 2)}
    for w in workers.values():
        w.wait_for("partitions assigned")
    kafka = KafkaSettings(bootstrap)
    kills = kill_at_random(workers, lambda n: WorkerProcess(n, s3_area, url, bootstrap, topics, *extra), kafka,
                           topics["results"], tasks=30, rng=rng, pause=(1.5, 3.0), seconds=90, max_kills=4)
    for w in workers.values():
        assert w.wait(timeout=180) == 0, w.log[-3000:]
    assert kills >= 2, "the run ended before the kills began: make the tasks slower"

    code, summary = final_summary(bootstrap, topics, "run-s3")
    assert code == 0 and summary["statuses"]["ok"] == 30, summary
    results = [m for m in (decode(r.value) for r in read_topic(kafka, topics["results"])) if isinstance(m, Result)]
    first_ok = {}
    for r in results:
        first_ok.setdefault(r.task_id, r)
    names = sorted(c.name for r in first_ok.values() for c in r.chips)
    assert len(names) == len(set(names)) == summary["chips"] > 0

    stored = keys(s3_bucket, "chaos/")
    assert [k for k in stored if k.startswith("images/")] == [f"images/{n}.tif" for n in names]
    assert [k for k in stored if k.startswith("masks/")] == [f"masks/{n}.tif" for n in names]
    assert not [k for k in stored if TMP_PREFIX in k], "temporaries in the bucket"
    for name in names:  # every object is a whole GeoTIFF: all its tiles decode
        with rasterio.open(io.BytesIO(get(s3_bucket, f"chaos/images/{name}.tif"))) as src:
            assert src.count == len(BANDS) and src.read().shape == (len(BANDS), CHIP, CHIP)
        with rasterio.open(io.BytesIO(get(s3_bucket, f"chaos/masks/{name}.tif"))) as src:
            assert src.read(1).shape == (CHIP, CHIP)
    for key in (k for k in stored if k.startswith("manifests/")):
        for rel, size in json.loads(get(s3_bucket, f"chaos/{key}"))["files"].items():
            assert len(get(s3_bucket, f"chaos/{rel}")) == size
    # A restarted worker clears the scratch files its killed predecessors left on this host.
    scratch = tmp_path / "tmp" / "cropchips-scratch"
    assert not (list(scratch.iterdir()) if scratch.exists() else []), "scratch files left behind"

    # The monitor writes the index into the bucket too.
    index_run = run_script("monitor.py", "--exit-when-done", "--json", "--no-progress", "--timeout", "60",
                           "--run-id", "run-s3", "--output-dir", url, *kafka_args(bootstrap, topics),
                           env=dict(os.environ))
    assert index_run.returncode == 0, index_run.stderr
    index = gpd.read_parquet(io.BytesIO(get(s3_bucket, "chaos/index.parquet")))
    assert sorted(index["name"]) == names


def test_doctor_checks_an_object_store_output(s3_bucket):
    from cropchips.admin import _check_output

    [good] = _check_output(f"s3://{s3_bucket}/chips", expect_mount=False)
    assert good.ok and "wrote, read back and deleted" in good.detail
    assert keys(s3_bucket, "chips/") == []  # the probe is gone
    [bad] = _check_output("s3://no-such-bucket/chips", expect_mount=False)
    assert not bad.ok and "does not exist" in bad.detail and "AWS_ENDPOINT_URL" in bad.fix
