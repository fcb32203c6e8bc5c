"""Several hosts on one machine (network namespaces): a worker cut off from the broker mid-task.

The broker runs in one namespace, two workers in two others, joined by veth pairs to a
bridge. One worker's link goes down for longer than the session timeout while it works:
its partitions move to the other worker, which redoes the task; when the link comes back,
the cut-off worker's result is late and its commit is refused, and no file is corrupted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio

from conftest import IN_CI, REPO
from cropchips.demo.broker import tansu_binary
from helpers import WorkerProcess

SUBNET = "10.213.77"
PORT = 19092


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def netns_allowed() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"ccprobe{os.getpid()}"
    try:
        sh("ip", "netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create network namespaces here: {exc.stderr.strip()}"
    sh("ip", "netns", "delete", probe)
    return None


@pytest.fixture
def hosts():
    """Namespaces b (broker, with the bridge), w1 and w2 (workers); deleted afterwards."""
    reason = netns_allowed()
    if reason:
        if IN_CI:
            pytest.fail(f"CI must run the multi-host test: {reason}")
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    names = {"b": f"cc{tag}b", "w1": f"cc{tag}w1", "w2": f"cc{tag}w2"}
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        b = names["b"]
        sh("ip", "-n", b, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", b, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        sh("ip", "-n", b, "link", "set", "br0", "up")
        for i, key in enumerate(("w1", "w2"), start=2):
            outer, inner = f"v{tag}{key}b", f"v{tag}{key}"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", outer, "netns", b)
            sh("ip", "link", "set", inner, "netns", names[key])
            sh("ip", "-n", b, "link", "set", outer, "master", "br0")
            sh("ip", "-n", b, "link", "set", outer, "up")
            sh("ip", "-n", names[key], "addr", "add", f"{SUBNET}.{i}/24", "dev", inner)
            sh("ip", "-n", names[key], "link", "set", inner, "up")
        names["links"] = {key: f"v{tag}{key}b" for key in ("w1", "w2")}
        yield names
    finally:
        for ns in ("b", "w1", "w2"):
            subprocess.run(["ip", "netns", "delete", names[ns]], capture_output=True)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def test_cut_off_worker_loses_its_partitions_and_its_late_commit_is_refused(hosts, sample_area, tmp_path):
    bootstrap = f"{SUBNET}.1:{PORT}"
    url = f"tcp://{bootstrap}"
    broker = subprocess.Popen(in_ns(hosts["b"], str(tansu_binary()), "broker", "--listener-url", url,
                                    "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        time.sleep(0.5)
        topics = {"tasks": "mh-tasks", "results": "mh-results", "dlq": "mh-dlq", "group": "mh-workers"}
        # The master publishes from the broker's host.
        master = subprocess.run(in_ns(hosts["b"], sys.executable, str(REPO / "master.py"), "--gpkg", str(sample_area.gpkg),
                                      "--layer", sample_area.layer, "--start-x", str(sample_area.start_x),
                                      "--start-y", str(sample_area.start_y), "--grid-step", str(sample_area.grid_step),
                                      "--x-cells", str(sample_area.x_cells), "--y-cells", str(sample_area.y_cells),
                                      "--stac-items", str(sample_area.items), "--datetime", sample_area.datetime,
                                      "--max-cloud", "100", "--chip-size", "128", "--run-id", "run-mh",
                                      "--bootstrap-servers", bootstrap,
                                      "--tasks-topic", topics["tasks"], "--results-topic", topics["results"],
                                      "--dlq-topic", topics["dlq"]),
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert master.returncode == 0, master.stderr
        extra = ["--burst", "--burst-idle", "8", "--session-timeout-ms", "3000"]
        # Worker 1 (alone in the group) takes a task; then its cable is cut.
        cut = WorkerProcess(1, sample_area, tmp_path, bootstrap, topics, *extra, wrap=in_ns(hosts["w1"]))
        workers = [cut]
        cut.wait_for(") started", timeout=90)
        link = hosts["links"]["w1"]
        sh("ip", "-n", hosts["b"], "link", "set", link, "down")
        task_line = next(line for line in cut.lines if ") started" in line)
        cut_task = task_line.split("task ", 1)[1].split(" ", 1)[0]
        # Worker 2 joins; worker 1 misses its heartbeats, the group drops it and its partitions
        # (with the uncommitted task) go to worker 2.
        other = WorkerProcess(2, sample_area, tmp_path, bootstrap, topics, *extra, wrap=in_ns(hosts["w2"]))
        workers.append(other)
        deadline = time.monotonic() + 120
        while other.log.count(" ok: ") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert other.log.count(" ok: ") == 4, other.log[-4000:]  # all four, the cut one included
        assert f"task {cut_task} ok" in other.log
        sh("ip", "-n", hosts["b"], "link", "set", link, "up")
        for worker in workers:
            assert worker.wait(timeout=240) == 0, worker.log[-4000:]
        # Worker 1 finished its task during the cut, held its result until the broker was back,
        # then had its commit refused: the group had moved its partition to worker 2.
        assert f"task {cut_task} ok" in cut.log
        assert "1 commits refused" in cut.log and "moved to another worker" in cut.log, cut.log[-4000:]
        code, summary = subprocess_summary(hosts["b"], bootstrap, topics)
        assert code == 0 and summary["statuses"]["ok"] == 4 and summary["tasks_total"] == 4, summary
        assert summary["duplicates_ignored"] >= 1  # the cut task was reported by both workers
        # Every chip file is complete and readable: the two writers never corrupted one another.
        for image in (tmp_path / "images").glob("*.tif"):
            with rasterio.open(image) as src:
                assert src.read().shape == (10, 128, 128)
            with rasterio.open(tmp_path / "masks" / image.name) as src:
                assert np.isin(src.read(1), [*range(9), 255]).all()  # 255: fields of no class
        assert len(list((tmp_path / "images").glob("*.tif"))) == summary["chips"]
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
        broker.terminate()
        broker.wait(timeout=10)


def subprocess_summary(ns, bootstrap, topics):
    import json
    done = subprocess.run(in_ns(ns, sys.executable, str(REPO / "monitor.py"), "--exit-when-done", "--json",
                                "--no-progress", "--timeout", "60", "--run-id", "run-mh", "--bootstrap-servers",
                                bootstrap, "--results-topic", topics["results"], "--tasks-topic", topics["tasks"],
                                "--dlq-topic", topics["dlq"]),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
