"""Storage: a local folder and a real S3-compatible server (moto, its own process).

Every file is published whole (one upload of a finished local file), so a reader never sees a
partial object, and a worker killed mid-task loses nothing: the task is redone from Kafka. A
folder's paths stay inside it (no ``..``, no links followed, checked on every operation), and
both backends offer the conditional create/read-version/delete that leases are built on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

import boto3
import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import IN_CI, REPO, run_script

from cropchips.dataset.index import SplitPolicy, finalize
from cropchips.sources.hrefs import HrefPolicy
from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.queue.messages import Result, decode
from cropchips.sources.sentinel2 import BANDS
from cropchips.processing import ProcessingOptions, TaskProcessor
from cropchips.errors import ConfigError
from cropchips.dataset.report import build_report
from cropchips.output.storage import TMP_PREFIX, LocalStorage, ObjectStorage, UnsafePathError, open_storage, scratch_dir
from helpers import SpecProcessor, WorkerProcess, final_summary, kafka_args, kill_at_random, publish_area

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


def assert_matches_manifest(data: bytes, recorded: dict) -> None:
    """A file as a manifest vouches for it: its size and SHA-256."""
    assert len(data) == recorded["size"] and hashlib.sha256(data).hexdigest() == recorded["sha256"], recorded


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/some/prefix")


def scratch_of(tmp_dir) -> "os.PathLike":
    """Where scratch_dir() puts this user's upload scratch files under a temporary folder."""
    return tmp_dir / f"cropchips-scratch-{os.getuid()}"


def test_storage_publishes_whole_files_lists_by_prefix_and_deletes(storage, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
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
        leftovers = list(scratch_of(tmp_path).rglob("*")) if scratch_of(tmp_path).exists() else []
    assert not leftovers, leftovers


def expected_version(storage, rel: str) -> str:
    """The version token as the file system or the store itself reports it (not the code under test)."""
    if isinstance(storage, LocalStorage):
        info = os.stat(storage.root / rel)
        return f"{info.st_ino}-{info.st_mtime_ns}-{info.st_size}"
    bucket, key = storage.url(rel).removeprefix("s3://").split("/", 1)
    return boto3.client("s3").head_object(Bucket=bucket, Key=key)["ETag"]


def stored_names(storage) -> list[str]:
    """Every file under the storage root, temporaries included, listed without the code under test."""
    if isinstance(storage, LocalStorage):
        return sorted(str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if not p.is_dir())
    bucket, prefix = storage.url().removeprefix("s3://").split("/", 1)
    return keys(bucket, prefix + "/")


def test_create_exclusive_read_version_and_delete_if_version(storage, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rel = "leases/cell-7.json"
    assert storage.create_exclusive(rel, b'{"owner": "a"}') is True
    assert storage.create_exclusive(rel, b'{"owner": "b"}') is False, "an existing file is never replaced"
    assert storage.read_bytes(rel) == b'{"owner": "a"}'
    assert stored_names(storage) == [rel], "no temporary is left beside the file"

    data, first = storage.read_version(rel)
    assert data == b'{"owner": "a"}' and first == expected_version(storage, rel)
    storage.write_bytes(rel, b'{"owner": "c", "renewed": 1}')  # replaced whole by someone else
    _, second = storage.read_version(rel)
    assert second != first and second == expected_version(storage, rel)

    assert storage.delete_if_version(rel, first) is False, "a replaced file is not deleted"
    assert storage.read_bytes(rel) == b'{"owner": "c", "renewed": 1}'
    assert storage.read_version(rel)[1] == second, "the check leaves the file as it was"
    assert storage.delete_if_version(rel, second) is True
    assert not storage.exists(rel)
    assert storage.delete_if_version(rel, second) is False, "nothing left to delete"
    with pytest.raises(FileNotFoundError):
        storage.read_version(rel)
    assert storage.create_exclusive(rel, b"again") is True, "a released name can be taken again"
    assert stored_names(storage) == [rel]


def test_sha256_of_small_and_large_files(storage, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    storage.write_bytes("a.txt", b"abc")
    # The FIPS 180-2 test vector for "abc".
    assert storage.sha256("a.txt") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = bytes(range(256)) * (5 * 2**20 // 256 + 7)  # more than one 4 MiB read
    storage.write_bytes("images/big.tif", big)
    assert storage.sha256("images/big.tif") == hashlib.sha256(big).hexdigest()
    with pytest.raises(FileNotFoundError):
        storage.sha256("images/none.tif")


def race(count: int, call):
    """Run ``call(i)`` in ``count`` threads released together; their results, in order."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(i):
        barrier.wait()
        results[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_exactly_one_of_many_racing_writers_creates_the_file(storage, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for round_ in range(3):
        rel = f"leases/cell-{round_}.json"
        results = race(8, lambda i: storage.create_exclusive(rel, f"writer {i} of round {round_}".encode()))
        assert results.count(True) == 1 and results.count(False) == 7, results
        assert storage.read_bytes(rel) == f"writer {results.index(True)} of round {round_}".encode()
        _, version = storage.read_version(rel)
        deleted = race(8, lambda i: storage.delete_if_version(rel, version))
        assert deleted.count(True) == 1, deleted
        assert not storage.exists(rel)
    assert stored_names(storage) == [], "no temporaries left by the losers"


# --------------------------------------------------------------------------- a folder's paths stay inside it

OUTSIDE_PATHS = ["../outside.txt", "/tmp/outside.txt", "images/../../outside.txt", "images//x.tif", "./x.tif", ""]


@pytest.mark.parametrize("rel", OUTSIDE_PATHS)
def test_paths_that_leave_the_folder_are_refused(tmp_path, rel):
    root = tmp_path / "out"
    storage = LocalStorage(root)
    storage.prepare()
    (tmp_path / "outside.txt").write_bytes(b"not yours")
    calls = {
        "write_bytes": lambda: storage.write_bytes(rel, b"x"),
        "read_bytes": lambda: storage.read_bytes(rel),
        "size": lambda: storage.size(rel),
        "delete": lambda: storage.delete(rel),
        "create_exclusive": lambda: storage.create_exclusive(rel, b"x"),
        "read_version": lambda: storage.read_version(rel),
        "delete_if_version": lambda: storage.delete_if_version(rel, "1-2-3"),
        "sha256": lambda: storage.sha256(rel),
        "source": lambda: storage.source(rel),
    }
    for name, call in calls.items():
        with pytest.raises(UnsafePathError, match="not a path inside the output folder"):
            call()
    assert isinstance(UnsafePathError("x"), ConfigError)
    assert (tmp_path / "outside.txt").read_bytes() == b"not yours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "outside.txt"]
    assert list(root.rglob("*")) == []


@pytest.fixture
def linked(tmp_path):
    """An output folder prepared with images/, then images/ swapped for a link to a folder outside."""
    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.tif").write_bytes(b"someone else's")
    storage = LocalStorage(root)
    storage.prepare(["images", "stac"])
    storage.write_bytes("images/a.tif", b"chip")
    storage.write_bytes("stac/items/a.json", b"{}")
    shutil.rmtree(root / "images")
    (root / "images").symlink_to(outside)
    shutil.rmtree(root / "stac" / "items")
    (root / "stac" / "items").symlink_to(outside)
    return storage, outside


@pytest.mark.parametrize("folder", ["images", "stac/items"])
def test_a_folder_swapped_for_a_link_after_start_is_refused(linked, folder):
    storage, outside = linked
    before = sorted(p.name for p in outside.iterdir())
    for call in (lambda: storage.write_bytes(f"{folder}/b.tif", b"x"),
                 lambda: storage.create_exclusive(f"{folder}/b.tif", b"x"),
                 lambda: storage.read_bytes(f"{folder}/secret.tif"),
                 lambda: storage.read_version(f"{folder}/secret.tif"),
                 lambda: storage.size(f"{folder}/secret.tif"),
                 lambda: storage.source(f"{folder}/secret.tif"),
                 lambda: storage.delete(f"{folder}/secret.tif"),
                 lambda: storage.delete_if_version(f"{folder}/secret.tif", "1-2-3"),
                 lambda: storage.list(folder)):
        with pytest.raises(UnsafePathError, match="is a symbolic link"):
            call()
    assert sorted(p.name for p in outside.iterdir()) == before, "nothing was written or removed outside"
    assert (outside / "secret.tif").read_bytes() == b"someone else's"


def test_a_link_at_the_file_name_is_replaced_never_followed(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / "precious.txt"
    target.write_bytes(b"precious")
    storage = LocalStorage(root)
    storage.prepare(["images"])
    (root / "images").mkdir()
    (root / "images" / "c.tif").symlink_to(target)
    (root / "images" / "d.tif").symlink_to(target)
    (root / "images" / "lock.json").symlink_to(outside / "not-there")

    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        storage.read_bytes("images/c.tif")
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        storage.size("images/c.tif")
    assert storage.list("images") == [], "links are not listed as files"
    # rename(2) over a link replaces the link itself: the target keeps its content.
    storage.write_bytes("images/c.tif", b"new chip")
    assert not (root / "images" / "c.tif").is_symlink() and (root / "images" / "c.tif").read_bytes() == b"new chip"
    storage.delete("images/d.tif")
    assert not os.path.lexists(root / "images" / "d.tif")
    # A dangling link holds the name: nothing is created through it.
    assert storage.create_exclusive("images/lock.json", b"x") is False
    assert not (outside / "not-there").exists()
    assert target.read_bytes() == b"precious"


def test_a_fifo_at_the_file_name_does_not_hang_a_reader(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    storage.prepare()
    os.mkfifo(tmp_path / "out" / "x.tif")
    outcome = []

    def read():
        try:
            storage.read_bytes("x.tif")
        except UnsafePathError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert outcome and "not a regular file" in outcome[0]


def strace_or_skip() -> str:
    strace = shutil.which("strace")
    usable = strace and subprocess.run([strace, "-o", os.devnull, "true"], capture_output=True).returncode == 0
    if not usable:
        if IN_CI:
            pytest.fail("strace is missing or cannot trace here, and CI=true requires it (Debian package strace)")
        pytest.skip("strace not installed or not allowed to trace (Debian package strace)")
    return strace


def test_the_folder_is_fsynced_after_each_rename_and_link(tmp_path):
    """A rename is durable only once its directory is synced: seen in the system calls themselves."""
    strace = strace_or_skip()
    root = (tmp_path / "out").resolve()
    script = ("from pathlib import Path; from cropchips.output.storage import LocalStorage, atomic_output; "
              "s = LocalStorage(%r); s.write_bytes('images/a.tif', b'x'); "
              "s.create_exclusive('leases/c.json', b'1'); s.delete_if_version('leases/c.json', s.read_version("
              "'leases/c.json')[1])\nwith atomic_output(Path(%r) / 'plain' / 'b.tif') as tmp: tmp.write_bytes(b'y')"
              % (str(root), str(root)))
    trace = tmp_path / "trace"
    # -y prints the path behind each file descriptor, so a directory fsync names its directory.
    syscalls = "trace=rename,renameat,renameat2,link,linkat,fsync,fdatasync"
    subprocess.run([strace, "-f", "-y", "-qq", "-o", str(trace), "-e", syscalls, sys.executable, "-c", script],
                   check=True, cwd=REPO, timeout=120)
    calls = [line.split(None, 1)[1] if line[:1].isdigit() else line for line in trace.read_text().splitlines()]

    def synced_after(index: int, folder) -> bool:
        return any(c.startswith(("fsync(", "fdatasync(")) and f"<{folder}>)" in c for c in calls[index + 1:])

    renames = [i for i, c in enumerate(calls) if c.startswith("rename") and ('"a.tif"' in c or '/a.tif"' in c)]
    assert renames, calls
    assert synced_after(renames[-1], root / "images"), "no fsync of images/ after the rename:\n" + "\n".join(calls)
    links = [i for i, c in enumerate(calls) if c.startswith("link") and '"c.json"' in c]
    assert links and synced_after(links[-1], root / "leases"), "\n".join(calls)
    asides = [i for i, c in enumerate(calls) if c.startswith("rename") and '"c.json"' in c]
    assert asides and synced_after(asides[-1], root / "leases"), "\n".join(calls)
    plain = [i for i, c in enumerate(calls) if c.startswith("rename") and '"b.tif"' in c]
    assert plain and synced_after(plain[-1], root / "plain"), "\n".join(calls)


# --------------------------------------------------------------------------- scratch files for uploads


def test_upload_scratch_folder_is_private_to_this_user(tmp_path, monkeypatch, s3_bucket):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scratch = scratch_of(tmp_path)
    open_storage(f"s3://{s3_bucket}/p").write_bytes("images/a.tif", b"x")
    info = os.lstat(scratch)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    assert stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)
    assert scratch_dir() == scratch

    # Ours but open to others: whatever is in it may have been planted, so it is made afresh.
    scratch.chmod(0o777)
    (scratch / "planted").write_bytes(b"x")
    assert scratch_dir() == scratch
    assert stat.S_IMODE(os.lstat(scratch).st_mode) == 0o700 and list(scratch.iterdir()) == []

    # A link, or a folder of another user, is refused with what to do.
    shutil.rmtree(scratch)
    (tmp_path / "theirs").mkdir(mode=0o700)
    scratch.symlink_to(tmp_path / "theirs")
    with pytest.raises(ConfigError, match="not a directory.*set TMPDIR"):
        open_storage(f"s3://{s3_bucket}/p").write_bytes("images/b.tif", b"x")
    scratch.unlink()
    if os.getuid() == 0:  # only root can give a folder away
        scratch.mkdir(mode=0o700)
        os.chown(scratch, 12345, 12345)
        with pytest.raises(ConfigError, match="belongs to uid 12345"):
            scratch_dir()
    assert keys(s3_bucket, "p/") == ["images/a.tif"]


def test_bad_locations_are_clear_errors(s3_bucket):
    from cropchips.errors import ConfigError

    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        open_storage("s3://no-such-bucket/x").prepare()
    with pytest.raises(ConfigError, match="give a bucket"):
        open_storage("s3://")
    with pytest.raises(ConfigError, match="no file system for nosuch://"):
        open_storage("nosuch://bucket/x")
    assert isinstance(open_storage(f"s3://{s3_bucket}/x"), ObjectStorage)


def test_conditional_writes_on_a_store_without_them_are_a_clear_error():
    store = open_storage("memory://cropchips-test/leases")
    assert isinstance(store, ObjectStorage)
    for call in (lambda: store.create_exclusive("a.json", b"x"), lambda: store.read_version("a.json"),
                 lambda: store.delete_if_version("a.json", "etag")):
        with pytest.raises(ConfigError, match="implemented for s3:// .* only"):
            call()


def test_a_worker_refuses_at_start_a_store_without_conditional_writes(sample_area, s3_bucket, tmp_path):
    """Refused once, at start, with what to use instead: not every task dead-lettered one by one."""
    assert not open_storage("memory://cropchips-test/out").conditional_writes
    assert open_storage(tmp_path).conditional_writes and open_storage(f"s3://{s3_bucket}/x").conditional_writes
    with pytest.raises(ConfigError, match="a folder .local or NFS. or s3://"):
        TaskProcessor(ProcessingOptions(output_dir="memory://cropchips-test/out", gpkg=str(sample_area.gpkg)), "m@test")


def test_tasks_written_to_s3_equal_the_local_ones_and_are_reused(s3_bucket, sample_area, sample_plan, tmp_path):
    url = f"s3://{s3_bucket}/run1"

    def processor(output):
        return SpecProcessor("s3@test", output_dir=output, gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                             chip_size=CHIP, max_chips_per_cell=3,
                             hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)))

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
    for rel, recorded in manifest["files"].items():
        assert_matches_manifest(get(s3_bucket, f"run1/{rel}"), recorded)

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
    done = run_script("worker.py", "1", "--gpkg", str(sample_area.gpkg), "--output-dir", "s3://no-such-bucket/chips",
                      "--burst", *kafka_args(broker.bootstrap_servers, topics), timeout=120)
    assert done.returncode == 1, done.stderr
    assert "no-such-bucket" in done.stderr and "does not exist" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def s3_area(tmp_path_factory):
    from cropchips.demo.sample import generate_sample

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
    publish_area(s3_area, bootstrap, topics, "--run-id", "run-s3", "--chip-size", str(CHIP),
                 "--max-chips-per-cell", "3")
    extra = ["--burst", "--burst-idle", "10", "--session-timeout-ms", "3000"]
    workers = {n: WorkerProcess(n, s3_area, url, bootstrap, topics, *extra) for n in (1, 2)}
    for w in workers.values():
        w.wait_for("partitions assigned")
    kafka = KafkaSettings(bootstrap)
    kills = kill_at_random(workers, lambda n: WorkerProcess(n, s3_area, url, bootstrap, topics, *extra), kafka,
                           topics["results"], tasks=30, rng=rng, pause=(1.5, 3.0), seconds=90, max_kills=4)
    for w in workers.values():
        try:
            assert w.wait(timeout=180) == 0, w.log[-3000:]
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {w.n} did not exit within 180 s:\n{w.log[-5000:]}")
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
        for rel, recorded in json.loads(get(s3_bucket, f"chaos/{key}"))["files"].items():
            assert_matches_manifest(get(s3_bucket, f"chaos/{rel}"), recorded)
    # A restarted worker clears the scratch files its killed predecessors left on this host.
    scratch = scratch_of(tmp_path / "tmp")
    assert not (list(scratch.iterdir()) if scratch.exists() else []), "scratch files left behind"

    # The monitor writes the index into the bucket too.
    index_run = run_script("monitor.py", "--exit-when-done", "--json", "--no-progress", "--timeout", "60",
                           "--run-id", "run-s3", "--output-dir", url, *kafka_args(bootstrap, topics),
                           env=dict(os.environ))
    assert index_run.returncode == 0, index_run.stderr
    index = gpd.read_parquet(io.BytesIO(get(s3_bucket, "chaos/index.parquet")))
    assert sorted(index["name"]) == names


def test_doctor_checks_an_object_store_output(s3_bucket):
    from cropchips.queue.admin import _check_output

    [good] = _check_output(f"s3://{s3_bucket}/chips", expect_mount=False)
    assert good.ok and "wrote, read back and deleted" in good.detail
    assert keys(s3_bucket, "chips/") == []  # the probe is gone
    [bad] = _check_output("s3://no-such-bucket/chips", expect_mount=False)
    assert not bad.ok and "does not exist" in bad.detail and "AWS_ENDPOINT_URL" in bad.fix
