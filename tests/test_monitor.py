"""The monitor: each task counted once, latest run followed, exit codes, summary and status line."""

import io
import json
import logging
import os

import pytest

from conftest import run_script
from cropchips.queue.messages import ChipRecord, Result, RunHeader, encode
from cropchips.queue.monitor import ProgressDisplay, RunProgress, is_terminal
from helpers import send_records


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


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeTerminal(io.StringIO):
    """What tqdm writes, kept; isatty() says terminal."""

    def isatty(self):
        return True


def assert_plain(text):
    assert "\r" not in text and "\x1b" not in text, repr(text)


def test_off_a_terminal_progress_is_one_plain_line_per_interval():
    clock, out = FakeClock(), io.StringIO()  # a real stream that is not a terminal, like a pipe or a log file
    progress = RunProgress("run-m", header=RunHeader(run_id="run-m", task_count=4, created_at="x"))
    display = ProgressDisplay("run-m", stream=out, interval_s=5.0, clock=clock)
    assert display.mode == "lines" and display.bar is None
    display.update(progress)  # the first update shows at once
    steps = [(1, result("a", "ok", chips=3)), (4, result("b", "failed")), (5, result("c", "ok", chips=2)),
             (9, None), (10, result("d", "no_fields"))]  # the last one completes the run
    for seconds, new in steps:
        clock.now = 100.0 + seconds
        if new is not None:
            progress.add(new)
        display.update(progress)
    clock.now = 200.0
    display.update(progress)  # complete and already shown: not repeated, however long the monitor stays
    display.close()
    text = out.getvalue()
    assert_plain(text)
    assert text.splitlines() == [
        "progress: 0/4 tasks (0%), 0 chips, 0 failed, ? tasks/s, ETA ?",
        "progress: 3/4 tasks (75%), 5 chips, 1 failed, 0.60 tasks/s, ETA 2 s",  # 5 s after the first line
        "progress: 4/4 tasks (100%), 5 chips, 1 failed, 0.40 tasks/s, ETA 0 s",  # done: shown before the interval
    ]


def test_a_pipe_is_not_a_terminal_and_gets_plain_lines():
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd) as reader, os.fdopen(write_fd, "w") as writer:
        assert not is_terminal(writer)
        progress = RunProgress("run-m", header=RunHeader(run_id="run-m", task_count=2, created_at="x"))
        progress.add(result("a", "ok", chips=1))
        display = ProgressDisplay("run-m", stream=writer)
        display.update(progress)
        display.close()
        line = reader.readline()  # flushed at once: a pipe's buffer would otherwise hold it back
    assert line.startswith("progress: 1/2 tasks (50%), 1 chips, 0 failed") and line.endswith("\n")
    assert_plain(line)


def test_on_a_terminal_progress_is_the_tqdm_bar():
    out = FakeTerminal()
    progress = RunProgress("run-m", header=RunHeader(run_id="run-m", task_count=4, created_at="x"))
    progress.add(result("a", "ok", chips=3))
    display = ProgressDisplay("run-m", stream=out)
    assert display.mode == "bars" and display.bar is not None
    display.update(progress)
    display.close()
    text = out.getvalue()
    assert "\r" in text and "1/4" in text and "chips 3" in text and "progress:" not in text


def test_without_progress_display_the_same_goes_to_the_log(caplog):
    out, clock = FakeTerminal(), FakeClock()
    progress = RunProgress("run-m", header=RunHeader(run_id="run-m", task_count=4, created_at="x"))
    display = ProgressDisplay("run-m", enabled=False, stream=out, interval_s=2.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="cropchips.queue.monitor"):
        for seconds in (0, 1, 2):
            clock.now = 100.0 + seconds
            display.update(progress)
    assert out.getvalue() == "" and display.bar is None
    assert [r.getMessage().split(" |")[0] for r in caplog.records] == ["0/4 tasks", "0/4 tasks"]
    with pytest.raises(ValueError, match="interval"):
        ProgressDisplay("run-m", interval_s=0)


def publish(broker, topic, messages):
    send_records(broker.bootstrap_servers, topic, [encode(message) for message in messages])


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
    send_records(broker.bootstrap_servers, topics["results"], [b"{garbage"])
    done = run_script("monitor.py", *monitor_args(broker, topics), timeout=120)
    assert done.returncode == 2, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["run_id"] == "run-m" and summary["tasks_total"] == 3 and summary["tasks_done"] == 3
    assert summary["statuses"] == {"ok": 1, "no_scenes": 1, "no_fields": 0, "failed": 1}
    assert summary["duplicates_ignored"] == 1 and summary["failures"] == {"b": "boom"}
    # With progress shown: captured standard error is a pipe, not a terminal, so plain lines, no bar redraws.
    args = [a for a in monitor_args(broker, topics) if a != "--no-progress"]
    pinned = run_script("monitor.py", *args, "--run-id", "run-old", "--timeout", "3", "--progress-interval", "1")
    assert pinned.returncode == 1 and "did not finish" in pinned.stderr  # 1 of 5 tasks: still running
    assert "progress: 1/5 tasks (20%), 0 chips, 0 failed" in pinned.stderr
    assert_plain(pinned.stderr)
