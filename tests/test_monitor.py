"""The monitor: each task counted once, latest run followed, exit codes, summary and status line."""

import json

from conftest import run_script
from cropchips.kafka_io import KafkaSettings, make_producer
from cropchips.messages import ChipRecord, Result, RunHeader, encode
from cropchips.monitor import ProgressDisplay, RunProgress


def result(task, status, run="run-m", worker="1@a", chips=0, pixels=None):
    records = tuple(ChipRecord(name=f"{task}-chip{k:02d}", image=f"images/{task}-chip{k:02d}.tif",
                               mask=f"masks/{task}-chip{k:02d}.tif", crs="EPSG:32630", bounds=(0, 0, 1, 1),
                               class_pixels=pixels or {"0": 3, "5": 1}) for k in range(chips))
    return Result(run_id=run, task_id=task, cell_id=task, worker_id=worker, status=status, chips=records,
                  error="boom" if status == "failed" else None, seconds={"total": 2.0})


def test_a_task_reported_twice_counts_once_and_success_is_final():
    progress = RunProgress("run-m", header=RunHeader(run_id="run-m", task_count=3, created_at="x"))
    progress.add(result("a", "ok", chips=2))
    progress.add(result("a", "ok", chips=2, worker="2@b"))  # redelivered to another worker
    progress.add(result("b", "failed"))
    progress.add(result("b", "ok", chips=1))  # a retry that worked
    progress.add(result("a", "failed"))  # a late failure never undoes a success
    assert progress.done == 2 and not progress.complete()
    assert progress.statuses() == {"ok": 2}
    assert progress.duplicates == 3
    summary = progress.summary(1.0)
    assert summary["chips"] == 3 and summary["class_pixels"] == {"0": 9, "5": 3}
    progress.add(result("c", "no_fields"))
    assert progress.complete()


def test_status_line_shows_failures_chips_classes_and_workers():
    progress = RunProgress("run-m", header=RunHeader(run_id="run-m", task_count=3, created_at="x"))
    progress.add(result("a", "ok", chips=2, pixels={"0": 1, "5": 3}))
    progress.add(result("b", "failed", worker="2@b"))
    text = ProgressDisplay.status_text(progress)
    assert "failed 1" in text and "chips 2" in text and "5:75%" in text and "1@a:1.0/s" in text


def publish(broker, topic, messages):
    producer = make_producer(KafkaSettings(broker.bootstrap_servers))
    for message in messages:
        producer.send(topic, value=encode(message)).get(timeout=10)
    producer.close()


def monitor_args(broker, topics):
    return ["--bootstrap-servers", broker.bootstrap_servers, "--results-topic", topics["results"],
            "--tasks-topic", topics["tasks"], "--dlq-topic", topics["dlq"], "--exit-when-done", "--json",
            "--no-progress", "--timeout", "60"]


def test_follows_the_latest_run_and_exits_2_on_failure(broker, topics):
    old = RunHeader(run_id="run-old", task_count=5, created_at="x")
    new = RunHeader(run_id="run-m", task_count=3, created_at="y")
    publish(broker, topics["results"], [
        old, result("z", "ok", run="run-old"),
        result("a", "ok", chips=1), new, result("b", "failed"), result("a", "ok", chips=1, worker="2@b"),
        result("c", "no_scenes")])
    # An unreadable message on the topic is skipped, not fatal.
    producer = make_producer(KafkaSettings(broker.bootstrap_servers))
    producer.send(topics["results"], value=b"{garbage").get(timeout=10)
    producer.close()
    done = run_script("monitor.py", *monitor_args(broker, topics), timeout=120)
    assert done.returncode == 2, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["run_id"] == "run-m" and summary["tasks_total"] == 3 and summary["tasks_done"] == 3
    assert summary["statuses"] == {"ok": 1, "no_scenes": 1, "no_fields": 0, "failed": 1}
    assert summary["duplicates_ignored"] == 1 and summary["failures"] == {"b": "boom"}
    pinned = run_script("monitor.py", *monitor_args(broker, topics), "--run-id", "run-old", "--timeout", "3")
    assert pinned.returncode == 1 and "did not finish" in pinned.stderr  # 1 of 5 tasks: still running
