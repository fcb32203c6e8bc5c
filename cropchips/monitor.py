"""The monitor: follow the results topic, count each task once, show progress and a final summary."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition

from .errors import BrokerError, MessageError
from .kafka_io import DEFAULT_RETENTION_MS, KafkaSettings, ensure_topics, make_consumer
from .messages import Result, RunHeader, Task, decode

log = logging.getLogger(__name__)

#: A result with one of these statuses ends a task well.
SUCCESS = ("ok", "no_scenes", "no_fields")


@dataclass
class RunProgress:
    """What is known about one run, each task counted once."""

    run_id: str
    header: RunHeader | None = None
    results: dict[str, Result] = field(default_factory=dict)
    first_seen: float = field(default_factory=time.monotonic)
    duplicates: int = 0

    def add(self, result: Result) -> None:
        previous = self.results.get(result.task_id)
        if previous is not None:
            self.duplicates += 1
            # A redelivered task may report twice: a success is final, otherwise the latest wins.
            if previous.status in SUCCESS and result.status not in SUCCESS:
                return
        self.results[result.task_id] = result

    @property
    def total(self) -> int | None:
        return self.header.task_count if self.header else None

    @property
    def done(self) -> int:
        return len(self.results)

    def statuses(self) -> Counter:
        return Counter(r.status for r in self.results.values())

    def complete(self) -> bool:
        return self.total is not None and self.done >= self.total

    def summary(self, elapsed: float) -> dict[str, Any]:
        classes: Counter = Counter()
        per_worker: dict[str, dict[str, float]] = defaultdict(lambda: {"tasks": 0, "chips": 0, "seconds": 0.0})
        chips = 0
        for result in self.results.values():
            classes.update(result.class_pixels())
            chips += len(result.chips)
            worker = per_worker[result.worker_id]
            worker["tasks"] += 1
            worker["chips"] += len(result.chips)
            worker["seconds"] += float(result.seconds.get("total", 0.0))
        statuses = self.statuses()
        return {
            "run_id": self.run_id,
            "tasks_total": self.total,
            "tasks_done": self.done,
            "statuses": {s: statuses.get(s, 0) for s in ("ok", "no_scenes", "no_fields", "failed")},
            "chips": chips,
            "class_pixels": {str(k): v for k, v in sorted(classes.items())},
            "workers": {w: {"tasks": int(v["tasks"]), "chips": int(v["chips"]),
                            "chips_per_s": round(v["chips"] / v["seconds"], 3) if v["seconds"] else None}
                        for w, v in sorted(per_worker.items())},
            "duplicates_ignored": self.duplicates,
            "redelivered_tasks": sum(1 for r in self.results.values() if r.deliveries > 1),
            "deliveries": sum(r.deliveries for r in self.results.values()),
            "failures": {r.task_id: r.error for r in self.results.values() if r.status == "failed"},
            "elapsed_s": round(elapsed, 1),
        }


class Monitor:
    """Reads the results topic from the start; tracks the latest run (or a chosen one)."""

    def __init__(self, kafka: KafkaSettings, results_topic: str, *, run_id: str | None = None,
                 broker_wait_s: float = 60.0, retention_ms: int = DEFAULT_RETENTION_MS):
        self.retention_ms = retention_ms
        self.kafka = kafka
        self.results_topic = results_topic
        self.pinned_run = run_id
        self.broker_wait_s = broker_wait_s
        self.runs: dict[str, RunProgress] = {}
        self.current: str | None = run_id
        self.invalid = 0

    def _run(self, run_id: str) -> RunProgress:
        if run_id not in self.runs:
            self.runs[run_id] = RunProgress(run_id)
        return self.runs[run_id]

    def handle(self, raw: bytes) -> None:
        """Take one message of the results topic; anything unreadable is counted and skipped."""
        try:
            message = decode(raw)
        except MessageError as exc:
            self.invalid += 1
            log.warning("ignoring an unreadable message on %s: %s", self.results_topic, exc)
            return
        if isinstance(message, Task):
            self.invalid += 1
            log.warning("ignoring a task message on %s (tasks belong on the tasks topic)", self.results_topic)
            return
        if isinstance(message, RunHeader):
            self._run(message.run_id).header = message
            if self.pinned_run is None:
                self.current = message.run_id  # the latest master run
        elif isinstance(message, Result):
            self._run(message.run_id).add(message)

    @property
    def progress(self) -> RunProgress | None:
        return self.runs.get(self.current) if self.current else None

    def follow(self, *, exit_when_done: bool = False, timeout_s: float | None = None, show_progress: bool = True,
               idle_exit_s: float | None = None) -> RunProgress | None:
        """Consume results until the run is complete (with ``exit_when_done``), the timeout passes,
        or (when ``idle_exit_s`` is set) nothing arrives for that long."""
        ensure_topics(self.kafka, {self.results_topic: 1}, wait=self.broker_wait_s, retention_ms=self.retention_ms)
        consumer = make_consumer(self.kafka, group_id=None, wait=self.broker_wait_s)
        display = None
        started = time.monotonic()
        last_message = started
        try:
            parts = consumer.partitions_for_topic(self.results_topic) or {0}
            tps = [TopicPartition(self.results_topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            while True:
                batch = consumer.poll(timeout_ms=500)
                for recs in batch.values():
                    for record in recs:
                        self.handle(record.value)
                        last_message = time.monotonic()
                display = self._show(display, show_progress)
                progress = self.progress
                if exit_when_done and progress is not None and progress.complete():
                    break
                now = time.monotonic()
                if timeout_s is not None and now - started > timeout_s:
                    raise BrokerError(f"the run did not finish within {timeout_s:.0f} s")
                if idle_exit_s is not None and now - last_message > idle_exit_s:
                    break
        finally:
            if display is not None:
                display.close()
            consumer.close()
        return self.progress

    def _show(self, display: "ProgressDisplay | None", enabled: bool) -> "ProgressDisplay | None":
        progress = self.progress
        if progress is None or progress.total is None:
            return display
        if display is None:
            display = ProgressDisplay(progress.run_id, bars=enabled)
        display.update(progress)
        return display


class ProgressDisplay:
    """A progress bar (done/total, rate, ETA) plus a status line with failures, chips, class
    balance and per-worker throughput; without bars, the same as a log line every 10 s."""

    def __init__(self, run_id: str, *, bars: bool, log_every_s: float = 10.0):
        self.log_every_s = log_every_s
        self.last_log = 0.0
        self.bar = self.status = None
        if bars:
            from tqdm import tqdm

            self.bar = tqdm(total=0, desc=run_id, unit="task", dynamic_ncols=True, position=0)
            self.status = tqdm(total=0, bar_format="{desc}", dynamic_ncols=True, position=1)

    @staticmethod
    def status_text(progress: RunProgress) -> str:
        summary = progress.summary(0.0)
        pixels = sum(summary["class_pixels"].values()) or 1
        classes = " ".join(f"{k}:{100 * v / pixels:.0f}%" for k, v in summary["class_pixels"].items())
        workers = " ".join(f"{w}:{v['chips_per_s'] or 0:.1f}/s" for w, v in summary["workers"].items())
        st = summary["statuses"]
        return (f"ok {st['ok']} no_scenes {st['no_scenes']} no_fields {st['no_fields']} failed {st['failed']} | "
                f"chips {summary['chips']} | classes {classes or '-'} | chips/s per worker {workers or '-'}"
                + (f" | duplicates {summary['duplicates_ignored']}" if summary["duplicates_ignored"] else ""))

    def update(self, progress: RunProgress) -> None:
        text = self.status_text(progress)
        if self.bar is not None:
            if self.bar.total != progress.total:
                self.bar.total = progress.total
            if progress.done > self.bar.n:
                self.bar.update(progress.done - self.bar.n)  # update() keeps tqdm's rate and ETA right
            self.status.set_description_str(text)
            self.bar.refresh()
        elif time.monotonic() - self.last_log >= self.log_every_s or progress.complete():
            self.last_log = time.monotonic()
            log.info("%d/%d tasks | %s", progress.done, progress.total, text)

    def close(self) -> None:
        for bar in (self.status, self.bar):
            if bar is not None:
                bar.close()


def format_summary(summary: dict[str, Any], class_names: dict[int, str] | None = None) -> str:
    """Human-readable final summary."""
    names = class_names or {}
    lines = [f"run {summary['run_id']}: {summary['tasks_done']}/{summary['tasks_total']} tasks in "
             f"{summary['elapsed_s']} s, {summary['chips']} chips",
             "  statuses: " + ", ".join(f"{k} {v}" for k, v in summary["statuses"].items())]
    if summary["class_pixels"]:
        lines.append("  class pixels: " + ", ".join(
            f"{k} {names.get(int(k), '')} {v}".replace("  ", " ") for k, v in summary["class_pixels"].items()))
    if summary.get("duplicates_ignored") or summary.get("redelivered_tasks"):
        lines.append(f"  duplicates: {summary['duplicates_ignored']} results reported twice (ignored), "
                     f"{summary['redelivered_tasks']} tasks delivered more than once")
    for worker, stats in summary["workers"].items():
        lines.append(f"  worker {worker}: {stats['tasks']} tasks, {stats['chips']} chips, "
                     f"{stats['chips_per_s']} chips/s")
    for task_id, error in list(summary["failures"].items())[:20]:
        lines.append(f"  FAILED {task_id}: {error}")
    return "\n".join(lines)
