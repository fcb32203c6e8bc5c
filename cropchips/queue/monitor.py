"""The monitor: follow the results topic, count each task once, show progress and a final summary."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from kafka import TopicPartition

from cropchips.errors import BrokerError, MessageError
from cropchips.queue.kafka import DEFAULT_RETENTION_MS, KafkaSettings, ensure_topics, make_consumer
from cropchips.queue.messages import Result, RunHeader, Task, decode

log = logging.getLogger(__name__)

#: A result with one of these statuses ends a task well.
SUCCESS = ("ok", "no_scenes", "no_fields")

#: Seconds between two plain progress lines (off a terminal) or log lines (without progress display).
DEFAULT_PROGRESS_INTERVAL_S = 5.0


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
               idle_exit_s: float | None = None, progress_interval_s: float = DEFAULT_PROGRESS_INTERVAL_S,
               progress_stream: TextIO | None = None) -> RunProgress | None:
        """Consume results until the run is complete (with ``exit_when_done``), the timeout passes,
        or (when ``idle_exit_s`` is set) nothing arrives for that long.

        Progress goes to ``progress_stream`` (standard error by default), see :class:`ProgressDisplay`."""
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
                display = self._show(display, show_progress, progress_interval_s, progress_stream)
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

    def _show(self, display: "ProgressDisplay | None", enabled: bool, interval_s: float,
              stream: TextIO | None) -> "ProgressDisplay | None":
        progress = self.progress
        if progress is None or progress.total is None:
            return display
        if display is None:
            display = ProgressDisplay(progress.run_id, enabled=enabled, interval_s=interval_s, stream=stream)
        display.update(progress)
        return display


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal; a closed or file-less stream is not."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class ProgressDisplay:
    """Shows a run's progress where it fits the reader.

    On a terminal: a tqdm bar (done/total, rate, ETA) plus a status line with failures, chips, class
    balance and per-worker throughput, redrawn in place. Anywhere else (systemd's journal, Kubernetes
    or CI logs, a pipe): one plain line every ``interval_s``, since redraw sequences (``\\r``, ANSI
    escapes) there become one garbled line per update. With ``enabled=False``: a log line every
    ``interval_s`` and nothing on ``stream``. ``stream`` (standard error by default) decides by its
    ``isatty()``; ``clock`` is injectable for tests.
    """

    #: Seconds of history the plain line's rate is measured over, so that reading a backlog of
    #: results at start-up inflates it only for a while.
    RATE_WINDOW_S = 60.0

    def __init__(self, run_id: str, *, enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float = DEFAULT_PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        if not interval_s > 0:
            raise ValueError(f"the progress interval must be > 0 seconds, got {interval_s}")
        self.stream = sys.stderr if stream is None else stream
        self.interval_s = interval_s
        self.clock = clock
        self.mode = ("bars" if is_terminal(self.stream) else "lines") if enabled else "log"
        self.last_line: float | None = None
        self.last_done: int | None = None
        self.samples: deque[tuple[float, int]] = deque()
        self.bar = self.status = None
        if self.mode == "bars":
            from tqdm import tqdm

            self.bar = tqdm(total=0, desc=run_id, unit="task", dynamic_ncols=True, position=0, file=self.stream)
            self.status = tqdm(total=0, bar_format="{desc}", dynamic_ncols=True, position=1, file=self.stream)

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

    @staticmethod
    def progress_line(progress: RunProgress, rate: float | None) -> str:
        """``progress: 12/40 tasks (30%), 57 chips, 1 failed, 0.8 tasks/s, ETA 35 s``: plain text only."""
        total = progress.total or 0
        percent = f"{100 * progress.done / total:.0f}%" if total else "-"
        chips = sum(len(r.chips) for r in progress.results.values())
        failed = progress.statuses().get("failed", 0)
        if rate is None:
            speed, eta = "? tasks/s", "ETA ?"
        else:
            speed = f"{rate:.1f} tasks/s" if rate >= 1 else f"{rate:.2f} tasks/s"
            left = max(total - progress.done, 0)
            eta = "ETA 0 s" if left == 0 else (f"ETA {format_duration(left / rate)}" if rate > 0 else "ETA ?")
        return f"progress: {progress.done}/{total} tasks ({percent}), {chips} chips, {failed} failed, {speed}, {eta}"

    def _rate(self, now: float, done: int) -> float | None:
        """Tasks per second over the last RATE_WINDOW_S; None until some time has passed."""
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.RATE_WINDOW_S:
            self.samples.popleft()
        then, done_then = self.samples[0]
        return (done - done_then) / (now - then) if now > then else None

    def update(self, progress: RunProgress) -> None:
        now = self.clock()
        if self.mode == "bars":
            if self.bar.total != progress.total:
                self.bar.total = progress.total
            if progress.done > self.bar.n:
                self.bar.update(progress.done - self.bar.n)  # update() keeps tqdm's rate and ETA right
            self.status.set_description_str(self.status_text(progress))
            self.bar.refresh()
            return
        rate = self._rate(now, progress.done) if self.mode == "lines" else None
        if progress.complete():
            due = progress.done != self.last_done  # at once, and once: a finished run's line never changes
        else:
            due = self.last_line is None or now - self.last_line >= self.interval_s
        if not due:
            return
        self.last_line, self.last_done = now, progress.done
        if self.mode == "lines":
            self.stream.write(self.progress_line(progress, rate) + "\n")
            self.stream.flush()  # a pipe is block-buffered: without this the line may come minutes late
        else:
            log.info("%d/%d tasks | %s", progress.done, progress.total, self.status_text(progress))

    def close(self) -> None:
        for bar in (self.status, self.bar):
            if bar is not None:
                bar.close()


def format_duration(seconds: float) -> str:
    """35 s, 12 min, 2.5 h: a short ETA."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
