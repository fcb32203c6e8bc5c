"""Faults on a real broker: kill -9 chaos, graceful shutdown, a broker that comes up late."""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import replace

import pytest

from cropchips.demo.broker import EmbeddedBroker, free_port
from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.queue.messages import Result, decode
from cropchips.output.storage import TMP_PREFIX
from cropchips.testing.cog_server import CogServer
from helpers import WorkerProcess, final_summary, http_items, kill_at_random, publish_area


@pytest.fixture(scope="module")
def big_area(tmp_path_factory):
    from cropchips.demo.sample import generate_sample

    # 100 small cells with 3 fields each: 100 quick tasks.
    return generate_sample(tmp_path_factory.mktemp("big"), x_cells=10, y_cells=10, grid_step=0.01,
                           fields_per_cell=3, margin_m=1000)


def test_kill_9_chaos_loses_nothing_and_doubles_nothing(broker, topics, big_area, tmp_path):
    rng = random.Random(7)
    bootstrap = broker.bootstrap_servers
    # The scenes come over HTTP from a store answering each request after 50 ms, as object storage
    # does, and the workers keep no copy of what they fetched (no tile cache, no block cache, GDAL's
    # /vsicurl/ cache off): the 100 tiny cells share a few tiles, and a task that reads them afresh
    # lasts about a second rather than a tenth of one, long enough to be killed mid-way.
    with CogServer(big_area.root, latency_s=0.05) as server:
        items = http_items(big_area, server, tmp_path / "items-http.json")
        publish_area(replace(big_area, items=items), bootstrap, topics, "--run-id", "run-chaos", "--chip-size", "64",
                     "--max-chips-per-cell", "3")
        # A task killed with three workers would be dead-lettered (--max-task-starts): the kills here
        # are the test's, not the task's, so a task may take more of them.
        extra = ["--allowed-hrefs", f"{server.url}/", "--burst", "--burst-idle", "10", "--session-timeout-ms", "3000",
                 "--read-cache-mb", "0", "--max-task-starts", "20"]
        env = {**os.environ, "CPL_VSIL_CURL_NON_CACHED": f"/vsicurl/{server.url}/"}
        out = tmp_path / "out"
        workers = {n: WorkerProcess(n, big_area, out, bootstrap, topics, *extra, env=env) for n in (1, 2, 3)}
        for w in workers.values():
            w.wait_for("partitions assigned")
        kafka = KafkaSettings(bootstrap)
        kills = kill_at_random(workers, lambda n: WorkerProcess(n, big_area, out, bootstrap, topics, *extra, env=env), kafka,
                               topics["results"], tasks=100, rng=rng, pause=(2.0, 4.0), seconds=150, max_kills=10)
        for w in workers.values():
            assert w.wait(timeout=180) == 0, w.log[-3000:]
    assert kills >= 3, "the run ended before the chaos began: make the tasks slower"

    code, summary = final_summary(bootstrap, topics, "run-chaos")
    assert code == 0, summary
    assert summary["tasks_total"] == 100 and summary["statuses"]["ok"] == 100 and summary["statuses"]["failed"] == 0
    results = [m for m in (decode(r.value) for r in read_topic(kafka, topics["results"])) if isinstance(m, Result)]
    first_ok = {}
    for r in results:
        first_ok.setdefault(r.task_id, r)
    names = sorted(c.name for r in first_ok.values() for c in r.chips)
    assert len(names) == len(set(names)) == summary["chips"]
    images = sorted(p.stem for p in (out / "images").glob("*.tif"))
    masks = sorted(p.stem for p in (out / "masks").glob("*.tif"))
    assert images == masks == names  # every reported chip exists once, nothing else does
    assert not list(out.rglob(f"{TMP_PREFIX}*")), "temporary files left behind"


def test_sigterm_finishes_the_current_task_commits_and_exits_0(broker, topics, sample_area, tmp_path):
    bootstrap = broker.bootstrap_servers
    publish_area(sample_area, bootstrap, topics, "--run-id", "run-term")
    first = WorkerProcess(1, sample_area, tmp_path, bootstrap, topics)
    first.wait_for(") started", timeout=60)  # "task ... (cell ..., N scenes) started": mid-task
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, first.log
    assert "finishing the current task" in first.log and "stopped after" in first.log
    finished = [line for line in first.lines if " ok: " in line and "task " in line]
    assert len(finished) == 1, first.log  # the task in hand was finished, no new one was taken
    second = WorkerProcess(2, sample_area, tmp_path, bootstrap, topics, "--burst", "--burst-idle", "5")
    assert second.wait(timeout=180) == 0, second.log
    code, summary = final_summary(bootstrap, topics, "run-term")
    assert code == 0 and summary["statuses"]["ok"] == summary["tasks_total"] == 4
    results = [m for m in (decode(r.value) for r in read_topic(KafkaSettings(bootstrap), topics["results"]))
               if isinstance(m, Result)]
    # The first worker's task was committed: nobody processed it again.
    assert len(results) == 4 and len({r.task_id for r in results}) == 4
    assert sum(r.worker_id.startswith("1@") for r in results) == 1


def test_workers_wait_for_a_broker_that_comes_up_late(sample_area, tmp_path):
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topics = {"tasks": "late-tasks", "results": "late-results", "dlq": "late-dlq", "group": "late-workers"}
    worker = WorkerProcess(1, sample_area, tmp_path, bootstrap, topics, "--burst", "--burst-idle", "5")
    worker.wait_for("not reachable", timeout=30)
    time.sleep(2)
    with EmbeddedBroker(port=port):
        publish_area(sample_area, bootstrap, topics, "--run-id", "run-late", "--chip-size", "32")
        assert worker.wait(timeout=180) == 0, worker.log
        code, summary = final_summary(bootstrap, topics, "run-late")
    assert code == 0 and summary["statuses"]["ok"] == 4
    assert "retrying in" in worker.log and "Traceback" not in worker.log
