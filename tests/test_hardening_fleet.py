"""Failures that are not the task's fault, crash loops, rebalances and oversize runs, on the real broker and scripts."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, SAMPLE_CHIP_SIZE, run_script
from cropchips.testing.cog_server import CogServer
from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.spec import DatasetSpec
from cropchips.queue.messages import Cell, Result, RunHeader, Task, decode, encode
from cropchips.processing import utc_now
from cropchips.queue.consumer import Worker, WorkerOptions
from helpers import WorkerProcess, final_summary, http_items, kafka_args, publish_area, send_records


def master_args(sample, items):
    return ["--gpkg", str(sample.gpkg), "--layer", sample.layer, "--start-x", str(sample.start_x),
            "--start-y", str(sample.start_y), "--grid-step", str(sample.grid_step), "--x-cells", str(sample.x_cells),
            "--y-cells", str(sample.y_cells), "--stac-items", str(items), "--datetime", sample.datetime,
            "--max-cloud", "100", "--min-polygons", "1", "--chip-size", str(SAMPLE_CHIP_SIZE)]


def results_of(kafka, topic):
    return [m for m in (decode(r.value) for r in read_topic(kafka, topic)) if isinstance(m, Result)]


# --------------------------------------------------------------------------- outages


def test_an_outage_of_the_scene_server_is_waited_out_not_dead_lettered(broker, topics, sample_area, tmp_path):
    kafka = KafkaSettings(broker.bootstrap_servers)
    server = CogServer(sample_area.root, latency_s=0.02).start()
    try:
        items = http_items(sample_area, server, tmp_path / "items.json")
        published = run_script("master.py", *master_args(sample_area, items), "--run-id", "run-outage",
                               "--chip-size", "64", *kafka_args(broker.bootstrap_servers, topics))
        assert published.returncode == 0, published.stderr
        worker = WorkerProcess(1, sample_area, tmp_path / "out", broker.bootstrap_servers, topics,
                               "--allowed-hrefs", f"{server.url}/", "--read-cache-mb", "0", "--retry-for", "300",
                               "--burst", "--burst-idle", "5")
        worker.wait_for(") started", timeout=90)
        server.stop()  # the scene server goes away mid-task: connections are refused
        worker.wait_for("retrying in", timeout=60)
        time.sleep(8)  # longer than every read retry (ours and GDAL's) put together
        server.start()  # same port
        assert worker.wait(timeout=240) == 0, worker.log[-4000:]
    finally:
        server.stop()
    dead = read_topic(kafka, topics["dlq"])
    assert not dead, [dict(r.headers)["error"] for r in dead]  # a passing outage dead-letters nothing
    code, summary = final_summary(broker.bootstrap_servers, topics, "run-outage")
    assert code == 0 and summary["statuses"]["ok"] == 4, summary
    assert "infrastructure failure" in worker.log and "the task stays uncommitted" in worker.log
    assert "Traceback" not in worker.log


def test_an_outage_past_the_retry_bound_stops_the_worker_and_loses_nothing(broker, topics, sample_area, tmp_path):
    kafka = KafkaSettings(broker.bootstrap_servers)
    server = CogServer(sample_area.root).start()
    try:
        items = http_items(sample_area, server, tmp_path / "items.json")
        published = run_script("master.py", *master_args(sample_area, items), "--run-id", "run-long-outage",
                               "--chip-size", "64", *kafka_args(broker.bootstrap_servers, topics))
        assert published.returncode == 0, published.stderr
        common = ["--allowed-hrefs", f"{server.url}/", "--read-cache-mb", "0", "--session-timeout-ms", "3000"]
        server.stop()  # down before any worker starts, and for longer than --retry-for
        first = WorkerProcess(1, sample_area, tmp_path / "out", broker.bootstrap_servers, topics, *common,
                              "--retry-for", "4")
        assert first.wait(timeout=120) == 1, first.log[-4000:]
        assert "kept failing on the infrastructure" in first.log and "Traceback" not in first.log
        assert read_topic(kafka, topics["dlq"]) == []
        server.start()
        second = WorkerProcess(2, sample_area, tmp_path / "out", broker.bootstrap_servers, topics, *common,
                               "--burst", "--burst-idle", "5")
        try:
            code = second.wait(timeout=240)
        except subprocess.TimeoutExpired:
            second.proc.kill()
            raise AssertionError(second.log[-6000:]) from None
        assert code == 0, second.log[-4000:]
    finally:
        server.stop()
    code, summary = final_summary(broker.bootstrap_servers, topics, "run-long-outage")
    assert code == 0 and summary["statuses"]["ok"] == 4, summary
    assert read_topic(kafka, topics["dlq"]) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB file system (tmpfs), so that writes fail with ENOSPC like a full NFS share."""
    from conftest import IN_CI

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs (root needed): {done.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_waited_out_not_dead_lettered(broker, topics, sample_area, tmp_path, small_disk):
    kafka = KafkaSettings(broker.bootstrap_servers)
    publish_area(sample_area, broker.bootstrap_servers, topics, "--run-id", "run-full", "--chip-size", "32")
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:  # fill the disk to the last block
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    worker = WorkerProcess(1, sample_area, small_disk / "out", broker.bootstrap_servers, topics,
                           "--retry-for", "300", "--burst", "--burst-idle", "5")
    worker.wait_for("retrying in", timeout=120)
    assert "No space left on device" in worker.log
    filler.unlink()  # the operator frees space
    assert worker.wait(timeout=240) == 0, worker.log[-4000:]
    assert read_topic(kafka, topics["dlq"]) == []
    code, summary = final_summary(broker.bootstrap_servers, topics, "run-full")
    assert code == 0 and summary["statuses"]["ok"] == 4 and summary["chips"] == 20, summary


# --------------------------------------------------------------------------- crash loops


def test_a_task_that_crashes_three_workers_is_dead_lettered(broker, topics, sample_area, tmp_path):
    kafka = KafkaSettings(broker.bootstrap_servers)
    # Slow reads, so that each worker is killed in the middle of the one task.
    with CogServer(sample_area.root, latency_s=0.3) as server:
        items = http_items(sample_area, server, tmp_path / "items.json")
        published = run_script("master.py", *master_args(sample_area, items), "--x-cells", "1", "--y-cells", "1",
                               "--run-id", "run-crash", "--chip-size", "64",
                               *kafka_args(broker.bootstrap_servers, topics))
        assert published.returncode == 0, published.stderr
        common = ["--allowed-hrefs", f"{server.url}/", "--read-cache-mb", "0", "--session-timeout-ms", "3000"]
        starts = tmp_path / "out" / "leases" / f"{decode(read_topic(kafka, topics['tasks'])[0].value).cell.id}.starts.json"
        for n in range(3):  # what an OOM kill or a segfault in GDAL does
            victim = WorkerProcess(1, sample_area, tmp_path / "out", broker.bootstrap_servers, topics, *common)
            victim.wait_for(") started", timeout=90)
            deadline = time.monotonic() + 30  # until this start is on record, mid-read
            while not (starts.exists() and json.loads(starts.read_text()).get("unfinished") == n + 1):
                assert time.monotonic() < deadline, victim.log[-3000:]
                time.sleep(0.02)
            victim.proc.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
        last = WorkerProcess(1, sample_area, tmp_path / "out", broker.bootstrap_servers, topics, *common,
                             "--burst", "--burst-idle", "4")
        assert last.wait(timeout=180) == 0, last.log[-4000:]
    dead = read_topic(kafka, topics["dlq"])
    assert len(dead) == 1
    assert "crashed 3 workers" in dict(dead[0].headers)["error"].decode()
    result = results_of(kafka, topics["results"])[-1]
    assert result.status == "failed" and result.deliveries == 4
    assert not list((tmp_path / "out" / "manifests").glob("*.json"))


# --------------------------------------------------------------------------- rebalances


class Slow:
    """Stands in for the raster work (not for Kafka): sleeps, records calls."""

    def __init__(self, name, seconds):
        self.worker_id = name
        self.seconds = seconds
        self.calls: list[tuple[str, float]] = []

    def process(self, task: Task) -> Result:
        self.calls.append((task.task_id, time.monotonic()))
        time.sleep(self.seconds)
        return Result(run_id=task.run_id, task_id=task.task_id, cell_id=task.cell.id, worker_id=self.worker_id,
                      status="no_fields", error="scripted", finished_at=utc_now())


def test_a_worker_joining_mid_task_makes_no_task_run_twice(broker, topics):
    tasks = []
    for i in range(6):
        cell = Cell(id=f"cell-{i}", row=0, col=i, bbox=(0.0 + i, 0.0, 0.5 + i, 0.5))
        tasks.append(Task(run_id="run-join", task_id=Task.make_id(cell, []), cell=cell, scenes=(), spec=DatasetSpec()))
    send_records(broker.bootstrap_servers, topics["tasks"], [encode(task) for task in tasks],
                 keys=[task.cell.id.encode() for task in tasks])

    def options(instance):
        return WorkerOptions(kafka=KafkaSettings(broker.bootstrap_servers), tasks_topic=topics["tasks"],
                             results_topic=topics["results"], dlq_topic=topics["dlq"], group_id=topics["group"],
                             burst=True, burst_idle_s=6.0, session_timeout_ms=6000)

    first, second = Slow("a@test", 4.0), Slow("b@test", 4.0)
    workers = [Worker(options("host-a"), first), Worker(options("host-b"), second)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    threads[0].start()
    deadline = time.monotonic() + 60
    while not first.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    threads[1].start()  # joins while the first worker is in the middle of a task
    for thread in threads:
        thread.join(timeout=180)
    assert not any(t.is_alive() for t in threads)
    ran = [task_id for task_id, _ in first.calls + second.calls]
    assert sorted(ran) == sorted(t.task_id for t in tasks), "a task ran twice or not at all"
    results = results_of(KafkaSettings(broker.bootstrap_servers), topics["results"])
    assert sorted(r.task_id for r in results) == sorted(t.task_id for t in tasks)
    summary = workers[0].summary
    # The running task was finished and committed during the rebalance, or its commit retried after it.
    assert summary.handed_over + summary.commits_retried >= 1 or summary.commit_failures == 0, summary
    assert summary.commit_failures == 0 and workers[1].summary.commit_failures == 0


# --------------------------------------------------------------------------- oversize runs


def test_a_run_whose_tasks_are_too_large_publishes_nothing(broker, topics, sample_area, tmp_path):
    kafka = KafkaSettings(broker.bootstrap_servers)
    doc = json.loads(sample_area.items.read_text())
    many = []
    for k in range(320):  # 960 scenes over the 4 cells: a long date range of a cloudy tile
        for item in doc["features"]:
            clone = json.loads(json.dumps(item))
            clone["id"] = f"{item['id']}-{k:03d}"
            clone["properties"]["eo:cloud_cover"] = float(k % 90)
            many.append(clone)
    items = tmp_path / "many.json"
    items.write_text(json.dumps({"type": "FeatureCollection", "features": many}))
    refused = run_script("master.py", *master_args(sample_area, items), "--run-id", "run-big",
                         *kafka_args(broker.bootstrap_servers, topics))
    assert refused.returncode == 1, refused.stderr
    assert "would be larger than 1000000 bytes" in refused.stderr and "--max-task-scenes" in refused.stderr
    assert "nothing was published" in refused.stderr and "Traceback" not in refused.stderr
    assert read_topic(kafka, topics["tasks"]) == [] and read_topic(kafka, topics["results"]) == []

    fits = run_script("master.py", *master_args(sample_area, items), "--run-id", "run-big", "--max-task-scenes", "40",
                      *kafka_args(broker.bootstrap_servers, topics))
    assert fits.returncode == 0, fits.stderr
    published = [decode(r.value) for r in read_topic(kafka, topics["tasks"])]
    assert len(published) == 4 and all(len(t.scenes) == 40 for t in published)
    # The least cloudy 40 of each cell's 960, kept in date order.
    for task in published:
        assert max(s.cloud_cover for s in task.scenes) <= 4.0
        assert [s.datetime for s in task.scenes] == sorted(s.datetime for s in task.scenes)
    headers = [m for m in (decode(r.value) for r in read_topic(kafka, topics["results"])) if isinstance(m, RunHeader)]
    assert [h.task_count for h in headers] == [4]


# --------------------------------------------------------------------------- topic retention


class RecordingProxy:
    """A TCP relay in front of a real broker that keeps every byte the clients send."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, record):
        try:
            while data := src.recv(65536):
                if record:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_topics_are_created_with_explicit_retention(tmp_path):
    from cropchips.demo.broker import free_port, tansu_binary, wait_for_port

    broker_port = free_port()
    proxy = RecordingProxy(broker_port)
    # The broker advertises the proxy, so that every request of the clients passes through it.
    tansu = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
                              "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}",
                              "--storage-engine", "memory://tansu/"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", broker_port, timeout=15)
        bootstrap = f"127.0.0.1:{proxy.port}"
        created = run_script("admin.py", "topics", "create", "--bootstrap-servers", bootstrap,
                             "--tasks-topic", "ret-tasks", "--results-topic", "ret-results", "--dlq-topic", "ret-dlq")
        assert created.returncode == 0, created.stderr
        with proxy.lock:
            default = bytes(proxy.sent)
        # Each CreateTopics entry carries the config name then its value "-1" (a length-prefixed string).
        assert len(re.findall(rb"retention\.ms.{1,2}-1", default, re.DOTALL)) == 3, default
        proxy.sent.clear()
        created = run_script("admin.py", "topics", "create", "--bootstrap-servers", bootstrap, "--tasks-topic", "t2",
                             "--results-topic", "r2", "--dlq-topic", "d2", "--topic-retention-ms", "604800000")
        assert created.returncode == 0, created.stderr
        assert b"retention.ms" in proxy.sent and b"604800000" in proxy.sent
        bad = run_script("admin.py", "topics", "create", "--bootstrap-servers", bootstrap, "--topic-retention-ms", "0")
        assert bad.returncode == 2 and "retention" in bad.stderr
    finally:
        tansu.terminate()
        tansu.wait(timeout=10)
        proxy.close()


def test_the_monitor_and_master_create_topics_with_the_same_retention():
    """One option, defined once, on every script that creates topics."""
    sys.path.insert(0, str(REPO))
    import admin
    import master
    import monitor
    import worker

    for module, argv in ((master, []), (worker, ["1"]), (monitor, []), (admin, ["topics", "create"])):
        args = module.build_parser({}).parse_args(argv)
        assert args.topic_retention_ms == -1, module.__name__
        env = {"CROPCHIPS_TOPIC_RETENTION_MS": "86400000"}
        assert module.build_parser(env).parse_args(argv).topic_retention_ms == 86400000
