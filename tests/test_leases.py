"""One writer per cell (leases), crash counting, and manifests that vouch for every file by sha256."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from cropchips.errors import RetryableError
from cropchips.sources.hrefs import HrefPolicy
from cropchips.output.leases import CellBusy, CellLeases, LeaseLost, lease_path, read_starts, starts_path
from cropchips.output.manifest import manifest_path
from cropchips.output.storage import open_storage
from helpers import SpecProcessor


@pytest.fixture(params=["folder", "s3"])
def storage(request, tmp_path):
    if request.param == "folder":
        return open_storage(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/chips")


def foreign_lease(storage, cell_id, *, host="other-host", pid=1, expires_in=600.0):
    """A lease written the way another worker would hold it."""
    body = {"owner": "9@other", "host": host, "pid": pid, "token": "x", "task_id": "t-other",
            "acquired_at": time.time(), "expires_at": time.time() + expires_in}
    assert storage.create_exclusive(lease_path(cell_id), json.dumps(body).encode())


def test_a_held_lease_keeps_others_out_until_released(storage):
    leases = CellLeases(storage, "1@here", ttl_s=60)
    lease = leases.acquire("cell-a", "task-1")
    with pytest.raises(CellBusy, match="being written by 1@here"):
        CellLeases(storage, "2@there", ttl_s=60).acquire("cell-a", "task-2")
    other = CellLeases(storage, "2@there", ttl_s=60).acquire("cell-b", "task-3")  # other cells are free
    lease.release()
    other.release()
    again = CellLeases(storage, "2@there", ttl_s=60).acquire("cell-a", "task-2")
    assert json.loads(storage.read_bytes(lease_path("cell-a")))["owner"] == "2@there"
    again.release()
    assert not storage.exists(lease_path("cell-a"))


def test_an_expired_lease_or_one_of_a_dead_process_here_is_taken_over(storage):
    foreign_lease(storage, "cell-x", expires_in=-120.0)  # its holder stopped renewing two minutes ago
    taken = CellLeases(storage, "1@here").acquire("cell-x", "t")
    assert json.loads(storage.read_bytes(lease_path("cell-x")))["owner"] == "1@here"
    taken.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    foreign_lease(storage, "cell-y", host=socket.gethostname(), pid=dead.pid)
    CellLeases(storage, "1@here").acquire("cell-y", "t").release()
    foreign_lease(storage, "cell-z")  # alive on another host, not expired: busy
    with pytest.raises(CellBusy):
        CellLeases(storage, "1@here").acquire("cell-z", "t")


def test_only_one_of_many_racing_workers_gets_the_lease(storage):
    winners, busy = [], []
    barrier = threading.Barrier(8)

    def race(n):
        barrier.wait()
        try:
            winners.append(CellLeases(storage, f"{n}@race", ttl_s=60).acquire("cell-r", "t"))
        except CellBusy:
            busy.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(winners) == 1 and len(busy) == 7
    assert json.loads(storage.read_bytes(lease_path("cell-r")))["owner"] == winners[0].body["owner"]
    winners[0].release()


def test_a_lease_renews_itself_and_notices_when_it_was_taken(tmp_path):
    storage = open_storage(tmp_path)
    lease = CellLeases(storage, "1@here", ttl_s=3).acquire("cell-q", "t")
    first = json.loads(storage.read_bytes(lease_path("cell-q")))["expires_at"]
    time.sleep(1.5)  # a third of the ttl: renewed
    assert json.loads(storage.read_bytes(lease_path("cell-q")))["expires_at"] > first
    lease.check()
    # Someone else replaced it (our worker froze past the expiry and another took the cell over).
    storage.write_bytes(lease_path("cell-q"), json.dumps({"owner": "2@there", "expires_at": time.time() + 60}).encode())
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()  # never deletes the other worker's lease
    assert json.loads(storage.read_bytes(lease_path("cell-q")))["owner"] == "2@there"


def processor(sample_area, out, **over):
    return SpecProcessor("p@test", output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer, chip_size=32,
                         hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)), **over)


def test_a_cell_held_by_another_writer_is_retried_later_and_untouched(sample_area, sample_task, tmp_path):
    storage = open_storage(tmp_path)
    foreign_lease(storage, sample_task.cell.id)
    with pytest.raises(RetryableError, match="being written by 9@other"):
        processor(sample_area, tmp_path).process(sample_task)
    assert not list(tmp_path.rglob("*.tif")) and not (tmp_path / manifest_path(sample_task.cell.id)).exists()
    storage.delete(lease_path(sample_task.cell.id))  # the other writer finished
    result = processor(sample_area, tmp_path).process(sample_task)
    assert result.status == "ok" and len(result.chips) == 5
    assert not storage.exists(lease_path(sample_task.cell.id))  # released after the task


def test_starts_are_counted_and_a_crash_looping_task_fails_once_then_starts_afresh(sample_area, sample_task,
                                                                                    tmp_path):
    storage = open_storage(tmp_path)
    cell = sample_task.cell.id
    # Three earlier deliveries of this task ended without a result (their workers were killed).
    storage.write_bytes(starts_path(cell), json.dumps(
        {"task_id": sample_task.task_id, "deliveries": 3, "unfinished": 3}).encode())
    failed = processor(sample_area, tmp_path).process(sample_task)
    assert failed.status == "failed" and "crashed 3 workers" in failed.error and failed.deliveries == 4
    assert not list(tmp_path.rglob("*.tif"))
    # Replayed from the dead letters once the cause is fixed: it runs.
    replayed = processor(sample_area, tmp_path).process(sample_task)
    assert replayed.status == "ok" and replayed.deliveries == 5
    assert read_starts(storage, cell, sample_task.task_id).unfinished == 0
    # Another task id for the cell starts its own count.
    other = replace(sample_task, task_id=sample_task.task_id + "b")
    assert read_starts(storage, cell, other.task_id).deliveries == 0


def test_a_changed_sidecar_or_image_means_a_redo_even_at_the_same_size(sample_area, sample_task, tmp_path):
    first = processor(sample_area, tmp_path).process(sample_task)
    manifest = json.loads((tmp_path / manifest_path(sample_task.cell.id)).read_text())
    sidecar = f"metadata/{first.chips[1].name}.json"
    assert set(manifest["files"]) >= {first.chips[1].image, first.chips[1].mask, sidecar}
    assert all(len(v["sha256"]) == 64 for v in manifest["files"].values())
    # Another writer's sidecar of the same size (another run id, same length).
    path = tmp_path / sidecar
    text = path.read_text()
    path.write_text(text.replace('"run_id": "run-sample"', '"run_id": "run-samplX"'))
    assert path.stat().st_size == len(text.encode())
    redo = processor(sample_area, tmp_path).process(sample_task)
    assert not redo.reused and "run-sample\"" in path.read_text()
    again = processor(sample_area, tmp_path).process(sample_task)
    assert again.reused
    # An image rewritten in place with the same size: caught too.
    image = tmp_path / first.chips[0].image
    data = bytearray(image.read_bytes())
    data[-10] ^= 0xFF
    image.write_bytes(bytes(data))
    assert not processor(sample_area, tmp_path).process(sample_task).reused


def test_two_masters_on_one_area_leave_every_reported_chip_in_place(sample_area, sample_plan, tmp_path):
    """Two tasks for each cell (two masters), run at the same time by two workers on one folder:
    every chip that either reports ok exists, whole, as its manifest recorded it."""
    from cropchips.output.manifest import read_complete_manifest

    tasks_a = list(sample_plan.tasks)
    tasks_b = [replace(t, run_id="run-other") for t in sample_plan.tasks]
    results = {"a": [], "b": []}

    def work(name, tasks):
        proc = processor(sample_area, tmp_path)
        proc.worker_id = f"{name}@test"
        for task in tasks:
            while True:  # what the worker loop does with a busy cell: back off, try again
                try:
                    results[name].append(proc.process(task))
                    break
                except RetryableError:
                    time.sleep(0.2)

    threads = [threading.Thread(target=work, args=("a", tasks_a)), threading.Thread(target=work, args=("b", tasks_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    storage = open_storage(tmp_path)
    assert all(r.status == "ok" for r in results["a"] + results["b"])
    for r in results["a"] + results["b"]:
        for chip in r.chips:
            assert (tmp_path / chip.image).exists() and (tmp_path / chip.mask).exists()
    for task in tasks_a:
        worker = processor(sample_area, tmp_path)
        done = read_complete_manifest(storage, task.cell.id, task.task_id, worker.manifest_key(worker.task(task).spec, task.split))
        assert done is not None  # every file as recorded (sizes and sha256)
    # The same cell and scenes make the same task id: the later of the two re-reported it.
    assert sum(r.reused for r in results["a"] + results["b"]) == len(tasks_a)
