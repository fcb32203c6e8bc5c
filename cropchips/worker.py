"""The worker loop: consume tasks one at a time, process them off the polling thread, publish results, commit.

Delivery is at-least-once: a task's offset is committed only after its files are written
and its result is acknowledged by the broker. While a task runs, the consumer keeps
polling with its partitions paused, so a slow task never exceeds ``max_poll_interval_ms``
and never gets the worker evicted from the group (the classic Kafka task-queue failure).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from .errors import BrokerError, MessageError
from .kafka_io import KafkaSettings, backoff_delays, ensure_topics, make_consumer, make_producer
from .messages import Result, Task, check_safe_id, decode, encode
from .processing import TaskProcessor, utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker talks to Kafka."""

    kafka: KafkaSettings
    """Broker connection."""
    tasks_topic: str = "satellite-tasks"
    """Topic to consume tasks from."""
    results_topic: str = "satellite-results"
    """Topic to publish results to."""
    dlq_topic: str = "satellite-tasks-dlq"
    """Dead-letter topic for tasks that failed or could not be read."""
    group_id: str = "satellite-workers"
    """Consumer group shared by all workers."""
    tasks_partitions: int = 10
    """Partitions of the tasks topic if this worker has to create it."""
    burst: bool = False
    """Exit once no task has arrived for ``burst_idle_s``."""
    burst_idle_s: float = 10.0
    """Idle seconds before a burst worker exits."""
    max_poll_interval_ms: int = 300_000
    """Kafka's limit between polls; the loop polls every fraction of a second, even mid-task."""
    session_timeout_ms: int = 10_000
    """A worker silent this long (crashed, cut off) is dropped from the group and its tasks move."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM/SIGINT, how long the current task may still run before it is abandoned uncommitted."""
    broker_wait_s: float = 60.0
    """How long to wait for an unreachable broker at start."""
    publish_retry_s: float = 600.0
    """How long to keep retrying a result the broker does not acknowledge (then the worker stops)."""


@dataclass
class WorkerSummary:
    """Counters a worker logs when it stops."""

    statuses: Counter = field(default_factory=Counter)
    chips: int = 0
    dead_lettered: int = 0
    commit_failures: int = 0
    abandoned: int = 0

    def line(self, worker_id: str, seconds: float) -> str:
        done = sum(self.statuses.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())) or "none"
        return (f"worker {worker_id} stopped after {seconds:.1f} s: {done} tasks ({parts}), {self.chips} chips, "
                f"{self.dead_lettered} dead-lettered, {self.commit_failures} commits refused, {self.abandoned} abandoned")


class _TaskThread:
    """Runs one task on a daemon thread (a daemon, so an abandoned task cannot block exit)."""

    def __init__(self, fn: Any, arg: Any):
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, arg), daemon=True, name="task")
        self._thread.start()

    def _run(self, fn: Any, arg: Any) -> None:
        try:
            self.result = fn(arg)
        except BaseException as exc:  # surfaced to the polling thread
            self.error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the task to end; True once it has."""
        return self._done.wait(timeout)


class _PauseNewPartitions(ConsumerRebalanceListener):
    """While a task runs, partitions assigned by a rebalance are paused at once."""

    def __init__(self, worker: "Worker"):
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))
        self.worker.assigned_once = True
        self.worker.idle_since = time.monotonic()  # burst idleness counts from a (re)assignment
        if self.worker.busy and assigned:
            self.worker.consumer.pause(*assigned)


class Worker:
    """Consumes tasks from Kafka and hands them to a :class:`TaskProcessor`."""

    def __init__(self, options: WorkerOptions, processor: TaskProcessor):
        self.options = options
        self.processor = processor
        self.worker_id = processor.worker_id
        self.summary = WorkerSummary()
        self.stop_requested = threading.Event()
        self.busy = False
        self.assigned_once = False
        self.idle_since = time.monotonic()
        self.consumer: Any = None
        self.producer: Any = None

    # ------------------------------------------------------------------ lifecycle

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            if self.stop_requested.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                raise KeyboardInterrupt
            log.info("%s received: finishing the current task (at most %.0f s), then leaving the group",
                     signal.Signals(signum).name, self.options.shutdown_grace_s)
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> WorkerSummary:
        opts = self.options
        started = time.monotonic()
        ensure_topics(opts.kafka, {opts.tasks_topic: opts.tasks_partitions, opts.results_topic: 1,
                                   opts.dlq_topic: 1}, wait=opts.broker_wait_s)
        self.producer = make_producer(opts.kafka, wait=opts.broker_wait_s)
        self.consumer = make_consumer(opts.kafka, group_id=opts.group_id, wait=opts.broker_wait_s,
                                      max_poll_records=1, max_poll_interval_ms=opts.max_poll_interval_ms,
                                      session_timeout_ms=opts.session_timeout_ms,
                                      heartbeat_interval_ms=max(100, opts.session_timeout_ms // 6))
        self.consumer.subscribe([opts.tasks_topic], listener=_PauseNewPartitions(self))
        log.info("worker %s started, waiting for tasks on %s (group %s)", self.worker_id, opts.tasks_topic,
                 opts.group_id)
        self.idle_since = time.monotonic()
        try:
            while not self.stop_requested.is_set():
                batch = self.consumer.poll(timeout_ms=500)
                records = [rec for recs in batch.values() for rec in recs]
                if not records:
                    if opts.burst and self._burst_done():
                        log.info("no task for %.0f s: burst mode, exiting", opts.burst_idle_s)
                        break
                    continue
                for record in records:
                    self._handle(record)
                    if self.stop_requested.is_set():
                        break
                self.idle_since = time.monotonic()
        finally:
            self._close()
        log.info(self.summary.line(self.worker_id, time.monotonic() - started))
        return self.summary

    def _burst_done(self) -> bool:
        """Idle long enough to exit? Joining the group takes seconds, so idleness only counts
        once partitions were assigned (a worker that never gets any waits a minute more)."""
        idle = time.monotonic() - self.idle_since
        if self.assigned_once:
            return idle >= self.options.burst_idle_s
        return idle >= self.options.burst_idle_s + 60.0

    def _close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()  # leaves the group: the others rebalance at once
            except Exception as exc:  # pragma: no cover - best effort at shutdown
                log.warning("closing the consumer failed: %s", exc)
        if self.producer is not None:
            try:
                self.producer.flush(timeout=10)
                self.producer.close(timeout=10)
            except Exception as exc:  # pragma: no cover
                log.warning("closing the producer failed: %s", exc)

    # ------------------------------------------------------------------ one record

    def _handle(self, record: Any) -> None:
        tp = TopicPartition(record.topic, record.partition)
        try:
            message = decode(record.value)
            if not isinstance(message, Task):
                raise MessageError(f"expected a task message, got a {type(message).__name__}")
        except MessageError as exc:
            self._dead_letter(record, str(exc), _poison_result(record, self.worker_id, str(exc)))
            self._commit(tp, record.offset)
            return
        result = self._run_task(message)
        if result is None:  # abandoned on shutdown: not committed, another worker will redo it
            return
        if result.status == "failed":
            self._dead_letter(record, result.error or "failed", result)
        else:
            self._publish(self.options.results_topic, result.task_id, encode(result))
        self.summary.statuses[result.status] += 1
        self.summary.chips += len(result.chips)
        self._commit(tp, record.offset)

    def _run_task(self, task: Task) -> Result | None:
        consumer = self.consumer
        self.busy = True
        consumer.pause(*consumer.assignment())
        log.info("task %s (cell %s, %d scenes) started", task.task_id, task.cell.id, len(task.scenes))
        runner = _TaskThread(self.processor.process, task)
        stop_deadline: float | None = None
        try:
            # Wake up as soon as the task ends (not at the end of a poll), and poll every 200 ms
            # meanwhile: polling keeps this member alive in the group; paused partitions return nothing.
            while not runner.wait(0.2):
                stray = consumer.poll(timeout_ms=0)
                for tp, recs in stray.items():
                    # Only possible for partitions assigned mid-task before the listener paused them:
                    # rewind so those records are consumed later, in order.
                    consumer.seek(tp, min(r.offset for r in recs))
                consumer.pause(*consumer.assignment())
                if self.stop_requested.is_set():
                    stop_deadline = stop_deadline or time.monotonic() + self.options.shutdown_grace_s
                    if time.monotonic() > stop_deadline:
                        log.warning("task %s still running after %.0f s of grace: abandoned uncommitted",
                                    task.task_id, self.options.shutdown_grace_s)
                        self.summary.abandoned += 1
                        return None
        finally:
            self.busy = False
            consumer.resume(*consumer.paused())
        if runner.error is not None:
            raise runner.error
        result: Result = runner.result
        log.info("task %s %s: %d chips in %.1f s", task.task_id, result.status, len(result.chips),
                 result.seconds.get("total", 0.0))
        return result

    def _publish(self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Publish and wait for the acknowledgement (the result is durable before the offset is
        committed). A broker that is unreachable (network cut) is retried with backoff for up to
        ``publish_retry_s``: the task's files are already written, so only the report waits."""
        deadline = time.monotonic() + self.options.publish_retry_s
        delays = backoff_delays(cap=15.0)
        while True:
            try:
                self.producer.send(topic, key=key.encode(), value=value, headers=headers or []).get(timeout=30)
                return
            except KafkaError as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(f"could not publish to {topic} for {self.options.publish_retry_s:.0f} s: "
                                      f"{exc}") from exc
                delay = next(delays)
                log.warning("publishing to %s failed (%s); the broker may be unreachable, retrying in %.1f s",
                            topic, exc.__class__.__name__, delay)
                time.sleep(delay)

    def _dead_letter(self, record: Any, reason: str, result: Result) -> None:
        headers = [("error", reason.encode()[:4000]), ("worker", self.worker_id.encode()),
                   ("source", f"{record.topic}/{record.partition}/{record.offset}".encode())]
        self._publish(self.options.dlq_topic, result.task_id, record.value if record.value is not None else b"",
                      headers)
        self._publish(self.options.results_topic, result.task_id, encode(result))
        self.summary.dead_lettered += 1
        log.warning("dead-lettered %s/%d@%d to %s: %s", record.topic, record.partition, record.offset,
                    self.options.dlq_topic, reason)

    def _commit(self, tp: TopicPartition, offset: int) -> None:
        try:
            self.consumer.commit({tp: OffsetAndMetadata(offset + 1, "", -1)})
        except KafkaError as exc:
            # The partition moved to another worker (e.g. after a network cut); it will redo the
            # task and overwrite the same files: harmless, but worth knowing.
            self.summary.commit_failures += 1
            log.warning("commit of %s/%d@%d refused (%s); the task may be processed again",
                        tp.topic, tp.partition, offset, exc)


def _poison_result(record: Any, worker_id: str, reason: str) -> Result:
    """A ``failed`` result for a message that could not be decoded, keeping any usable ids."""
    import json

    body: dict[str, Any] = {}
    try:
        parsed = json.loads(record.value)
        body = parsed if isinstance(parsed, dict) else {}
    except Exception:
        pass

    def safe(value: Any, fallback: str) -> str:
        try:
            return check_safe_id(value, "id")
        except MessageError:
            return fallback

    where = f"{record.partition}-{record.offset}"
    return Result(run_id=safe(body.get("run_id"), "unknown"), task_id=safe(body.get("task_id"), f"poison-{where}"),
                  cell_id=safe((body.get("cell") or {}).get("id") if isinstance(body.get("cell"), dict) else None,
                               "unknown"),
                  worker_id=worker_id, status="failed", error=f"invalid task message: {reason}",
                  finished_at=utc_now())
