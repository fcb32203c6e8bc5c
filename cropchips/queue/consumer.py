"""The worker loop: consume tasks one at a time, process them off the polling thread, publish results, commit.

A task's result is published and its offset committed while the next task already runs (the
next record is usually fetched already): the few milliseconds of broker round trips a task
are not idle time of the task thread (see :meth:`Worker._handle`).

Delivery is at-least-once, and a finished task is never redone: a task's offset is committed
only after its files are written and its result is acknowledged by the broker, and a task
delivered again finds its manifest and is re-reported, not recomputed. What the loop
guarantees, whatever arrives on the topic or goes wrong around it:

* **Nothing kills it.** Any failure to read or validate a message is a dead letter with its
  reason, and the offset is committed; any unexpected failure while processing a task is a
  ``failed`` result plus a dead letter. The next task is taken either way.
* **Outages are waited out, not dead-lettered.** A failure of the infrastructure (scene
  server, storage, network; :class:`~cropchips.errors.RetryableError`) keeps the task
  uncommitted; the worker backs off and tries again for ``retry_for_s``, polling with its
  partitions paused so it stays in the group, then exits non-zero so that the task goes to
  another worker. Only a task that can never succeed reaches the dead-letter topic.
* **Kafka errors are sorted.** A send that can never succeed (a record over the size limit,
  no authorisation) fails at once and is handled; only retriable ones are retried.
* **Rebalances do not make finished work run again.** While a task runs the consumer keeps
  polling with its partitions paused, so a slow task never exceeds ``max_poll_interval_ms``.
  When a rebalance takes away the partition of the running task, the worker waits (a bounded
  time) for the task, publishes its result and commits before letting the partition go. A
  commit refused because the group is rebalancing is tried again once the group is stable,
  if the partition is still ours. Static membership (``group_instance_id``) lets a restarted
  worker rejoin without a rebalance.

Tasks are taken **one partition at a time, lowest-numbered first** (:class:`_PartitionFocus`):
the master's ``grid`` partitioning puts each partition's cells on one run of the Hilbert
curve, in curve order, so a worker then runs its cells along the curve, and the scene tiles
neighbouring cells share are decoded again while still in GDAL's block cache (the broker's
own fetch order jumps between partitions). The other partitions are only paused: records
are still consumed one at a time, and their offsets and commits are as without it.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from kafka import TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from cropchips.errors import BrokerError, ConfigError, MessageError, RetryableError
from cropchips.queue.kafka import (DEFAULT_RETENTION_MS, KafkaSettings, ensure_topics, is_retriable,
                       make_consumer, make_producer)
from cropchips.queue.messages import Result, Task, check_safe_id, decode, encode
from cropchips.processing import utc_now
from cropchips.retry import OUTAGE, PUBLISH, retry

log = logging.getLogger(__name__)

#: Commit errors that mean "the group is rebalancing or moved on": try again once it is stable.
_REBALANCING = ("RebalanceInProgressError", "CommitFailedError", "IllegalGenerationError", "UnknownMemberIdError")
#: The start of an original message kept in a dead letter the broker refuses whole.
DEAD_LETTER_PREVIEW_BYTES = 64 * 1024


#: ``--assignor`` -> kafka-python assignors. kafka-python refuses to list an eager and a cooperative
#: one together, so a group switches from one to the other with all its workers stopped.
ASSIGNORS: dict[str, tuple[type, ...]] = {
    "cooperative-sticky": (CooperativeStickyAssignor,),
    "range": (RangePartitionAssignor,),
}


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
    group_instance_id: str | None = None
    """Static membership id (KIP-345), unique per worker process: a worker restarted with the
    same id gets its partitions back without a rebalance of the others. None: dynamic member."""
    assignor: str = "range"
    """How the group shares partitions: ``range`` (every member gives up every partition at each
    rebalance: Kafka's classic eager protocol) or ``cooperative-sticky`` (only the partitions that
    must move are revoked; measured slower on Tansu, see ``bench/join.py``)."""
    tasks_partitions: int = 10
    """Partitions of the tasks topic if this worker has to create it."""
    retention_ms: int = DEFAULT_RETENTION_MS
    """``retention.ms`` of topics this worker has to create (-1: keep forever)."""
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
    retry_for_s: float = 600.0
    """How long a task failing on the infrastructure (storage, scene server, network) is retried
    in place before the worker gives up and exits non-zero, leaving the task uncommitted."""
    revoke_wait_s: float = 30.0
    """When a rebalance takes the running task's partition, how long to wait for the task to end
    so that its result is published and committed before the partition goes."""

    def __post_init__(self) -> None:
        if self.group_instance_id is not None:
            check_safe_id(self.group_instance_id, "group instance id")
        if self.assignor not in ASSIGNORS:
            raise ConfigError(f"assignor must be one of {sorted(ASSIGNORS)}, got {self.assignor!r}")


@dataclass
class WorkerSummary:
    """Counters a worker logs when it stops."""

    statuses: Counter = field(default_factory=Counter)
    chips: int = 0
    dead_lettered: int = 0
    commit_failures: int = 0
    commits_retried: int = 0
    abandoned: int = 0
    retries: int = 0
    handed_over: int = 0

    def line(self, worker_id: str, seconds: float) -> str:
        done = sum(self.statuses.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())) or "none"
        return (f"worker {worker_id} stopped after {seconds:.1f} s: {done} tasks ({parts}), {self.chips} chips, "
                f"{self.dead_lettered} dead-lettered, {self.retries} retried after infrastructure failures, "
                f"{self.commits_retried} commits retried after a rebalance, {self.commit_failures} commits refused, "
                f"{self.handed_over} finished during a rebalance, {self.abandoned} abandoned")


class WorkerGaveUp(RetryableError):
    """The infrastructure stayed broken past ``retry_for_s``: the worker exits, its task uncommitted."""


class PublishRefused(BrokerError):
    """The broker refused a record for good (too large, not authorised): retrying cannot help."""


class _TaskThread:
    """One task's run on the worker's task thread (:class:`_TaskRunner`), and what came of it."""

    def __init__(self, fn: Any, arg: Any):
        self.result: Any = None
        self.error: BaseException | None = None
        self._fn, self._arg = fn, arg
        self._done = threading.Event()

    def run(self) -> None:
        """Called on the task thread."""
        try:
            self.result = self._fn(self._arg)
        except BaseException as exc:  # surfaced to the polling thread
            self.error = exc
        finally:
            self._fn = self._arg = None
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the task to end; True once it has."""
        return self._done.wait(timeout)


class _TaskRunner:
    """The daemon thread that runs a worker's tasks, one at a time, kept from one task to the next.

    A thread per task would rebuild what libraries keep per thread for every task: pyproj's PROJ
    context and its transformers (5 ms a task, measured), GDAL's thread-local state. A daemon, so
    that an abandoned task cannot block exit; if the previous task is still running (abandoned
    past the shutdown grace), the next one gets a thread of its own.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_TaskThread] | None = None
        self._last: _TaskThread | None = None

    def start(self, fn: Any, arg: Any) -> _TaskThread:
        """Run ``fn(arg)`` on the task thread (called from the polling thread only)."""
        job = _TaskThread(fn, arg)
        if self._jobs is None or (self._last is not None and not self._last.done):
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(self._jobs,), daemon=True, name="task").start()
        self._last = job
        self._jobs.put(job)
        return job

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[_TaskThread]) -> None:
        while True:
            jobs.get().run()


@dataclass
class _InFlight:
    """The record being worked on, shared by the polling thread and the rebalance listener."""

    record: Any
    task: Task
    tp: TopicPartition
    runner: _TaskThread | None = None
    delivered: bool = False
    """Its result (or dead letter) was published."""
    committed: bool = False
    """Its offset was committed."""
    revoked: bool = False
    """Its partition was taken away before it could be finished: leave it to the new owner."""
    result: Result | None = None
    """What it ended with, once it ended: published and committed while the next task runs."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class _PartitionFocus:
    """Which assigned partition the worker consumes now: the lowest-numbered one with tasks left.

    The others are paused (kafka-python keeps what it already fetched for them and hands it out,
    at the right position, once they are resumed). Chosen again when the focused partition runs
    out, when an empty poll came back, and after every (re)assignment; with no partition left
    to run, or the end offsets unknown (the broker not answering), every partition is resumed
    and records come in the broker's order.
    """

    def __init__(self) -> None:
        self.tp: TopicPartition | None = None
        self.end = 0
        self.stale = True

    def choose(self, consumer: Any) -> None:
        self.stale = False
        self.tp = None
        assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        if not assigned:
            return
        try:
            ends = consumer.end_offsets(assigned, timeout_ms=5000)
            left = [tp for tp in assigned if consumer.position(tp, timeout_ms=5000) < ends[tp]]
        except (KafkaError, KeyError, TypeError) as exc:  # unknown ends: consume in the broker's order
            log.debug("end offsets unknown (%s): consuming every partition", exc)
            left = []
        if left:
            self.tp, self.end = left[0], ends[left[0]]
            others = [tp for tp in assigned if tp != self.tp]
            if others:
                consumer.pause(*others)
            consumer.resume(self.tp)
        else:
            consumer.resume(*consumer.paused())

    def resume(self, consumer: Any) -> None:
        """Resume after every partition was paused (a task ran): the focused one only."""
        if self.tp is not None and self.tp in consumer.assignment():
            consumer.resume(self.tp)
        else:
            self.stale = True
            consumer.resume(*consumer.paused())

    def taken(self, tp: TopicPartition, offset: int) -> None:
        """A record of ``tp`` was taken: choose again if it was the focused partition's last."""
        if tp != self.tp or offset + 1 >= self.end:
            self.stale = True


class _Rebalance(AsyncConsumerRebalanceListener):
    """Pauses partitions assigned mid-task; finishes the running task before its partition goes.

    An async listener: kafka-python runs listeners on its network thread, and awaiting there
    (instead of blocking) keeps the heartbeats going while the task is waited for.
    """

    def __init__(self, worker: "Worker"):
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.worker.rebalancing = True  # a burst worker is not idle while the group reshuffles
        if revoked:
            log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))
            await self.worker._finish_before_revocation(set(revoked))

    async def on_partitions_lost(self, lost: Any) -> None:
        # Evicted (session expired): the partitions are already someone else's; nothing can be committed.
        if lost:
            log.warning("partitions lost (this worker was dropped from the group): %s",
                        sorted(tp.partition for tp in lost))
            inflight = self.worker.inflight
            # A task that ended (waiting for the next to start) still publishes its result:
            # its commit is then refused, and its new owner re-reports it from the manifest.
            if inflight is not None and inflight.tp in lost and inflight.result is None:
                inflight.revoked = True

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))
        self.worker.rebalancing = False
        self.worker.assigned_once = True
        self.worker.idle_since = time.monotonic()  # burst idleness counts from a (re)assignment
        self.worker.focus.stale = True  # the loop chooses again before it takes a task
        if self.worker.busy and assigned:
            self.worker.consumer.pause(*assigned)


class Worker:
    """Consumes tasks from Kafka and hands them to a :class:`~cropchips.processing.TaskProcessor`."""

    def __init__(self, options: WorkerOptions, processor: Any):
        self.options = options
        self.processor = processor
        self.worker_id = processor.worker_id
        self.summary = WorkerSummary()
        self.stop_requested = threading.Event()
        self.busy = False
        self.assigned_once = False
        self.rebalancing = False
        self.idle_since = time.monotonic()
        self.consumer: Any = None
        self.producer: Any = None
        self.inflight: _InFlight | None = None
        self.ended: _InFlight | None = None
        """A task that ended with a result not yet published and committed (see :meth:`_handle`)."""
        self.focus = _PartitionFocus()
        self._tasks = _TaskRunner()

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
        """Consume until stopped (or idle, in burst mode). Raises WorkerGaveUp when the
        infrastructure stayed broken for ``retry_for_s`` (the task in hand stays uncommitted)."""
        opts = self.options
        started = time.monotonic()
        ensure_topics(opts.kafka, {opts.tasks_topic: opts.tasks_partitions, opts.results_topic: 1,
                                   opts.dlq_topic: 1}, wait=opts.broker_wait_s, retention_ms=opts.retention_ms)
        # A result is sent alone and waited for: lingering for company would only delay the next task.
        self.producer = make_producer(opts.kafka, wait=opts.broker_wait_s, linger_ms=0)
        self.consumer = make_consumer(opts.kafka, group_id=opts.group_id, wait=opts.broker_wait_s,
                                      max_poll_records=1, max_poll_interval_ms=opts.max_poll_interval_ms,
                                      session_timeout_ms=opts.session_timeout_ms,
                                      heartbeat_interval_ms=max(100, opts.session_timeout_ms // 6),
                                      group_instance_id=opts.group_instance_id,
                                      partition_assignment_strategy=list(ASSIGNORS[opts.assignor]))
        self.consumer.subscribe([opts.tasks_topic], listener=_Rebalance(self))
        log.info("worker %s started, waiting for tasks on %s (group %s%s)", self.worker_id, opts.tasks_topic,
                 opts.group_id, f", static member {opts.group_instance_id}" if opts.group_instance_id else "")
        self.idle_since = time.monotonic()
        try:
            while not self.stop_requested.is_set():
                if self.focus.stale:
                    self.focus.choose(self.consumer)
                # With a task ended but not finished, take only what is already fetched: the next
                # task starts first and the ended one is finished while it runs; with none at
                # hand, it is finished now.
                batch = self.consumer.poll(timeout_ms=0 if self.ended is not None else 500)
                records = [rec for recs in batch.values() for rec in recs]
                if not records and self.ended is not None:
                    self._finish_ended()
                    self.idle_since = time.monotonic()  # a slow commit (rebalance) is not idleness
                    continue
                if not records:
                    if self.focus.tp is not None:
                        self.focus.stale = True  # ran out, or the tasks left are elsewhere
                    if opts.burst and self._burst_done():
                        log.info("no task for %.0f s: burst mode, exiting", opts.burst_idle_s)
                        break
                    continue
                for record in records:
                    tp = TopicPartition(record.topic, record.partition)
                    if self.focus.stale and self.focus.tp != tp:
                        # Fetched in the poll that (re)assigned the partitions, before the loop
                        # could choose: give it back, it comes again in its turn.
                        self.consumer.seek(tp, record.offset)
                        break
                    self.focus.taken(tp, record.offset)
                    self._handle(record)
                    if self.stop_requested.is_set():
                        break
                self.idle_since = time.monotonic()
            self._finish_ended()  # stopped: the last task's result still goes out, committed
        finally:
            self._close()
            log.info(self.summary.line(self.worker_id, time.monotonic() - started))
        return self.summary

    def _burst_done(self) -> bool:
        """Idle long enough to exit? Joining the group takes seconds, so idleness only counts
        once partitions were assigned (a worker that never gets any waits a minute more)."""
        if self.rebalancing:
            self.idle_since = time.monotonic()
            return False
        idle = time.monotonic() - self.idle_since
        if self.assigned_once:
            return idle >= self.options.burst_idle_s
        return idle >= self.options.burst_idle_s + 60.0

    def _close(self) -> None:
        if self.consumer is not None:
            try:
                self._leave_even_if_static()
                self.consumer.close()  # leaves the group: the others rebalance at once
            except Exception as exc:  # pragma: no cover - best effort at shutdown
                log.warning("closing the consumer failed: %s", exc)
        if self.producer is not None:
            try:
                self.producer.flush(timeout=10)
                self.producer.close(timeout=10)
            except Exception as exc:  # pragma: no cover
                log.warning("closing the producer failed: %s", exc)

    def _leave_even_if_static(self) -> None:
        """Make ``close()`` send LeaveGroup for a static member too.

        A static member (KIP-345) normally stays in the group after closing, until its session
        times out, so that a quick restart gets its partitions back. But this method runs only on
        a deliberate exit (burst done, SIGTERM, giving up after an outage): the partitions should
        move at once. And some brokers never expire a static member that does not come back
        (measured on Tansu: a new member then waits forever), so leaving is the safe choice. A
        killed worker (kill -9, OOM) leaves nothing and, restarted with the same id, rejoins
        without a rebalance.
        """
        if self.options.group_instance_id is None:
            return
        coordinator = getattr(self.consumer, "_coordinator", None)
        if coordinator is not None and hasattr(coordinator, "is_dynamic_member"):
            coordinator.is_dynamic_member = lambda: True  # kafka-python 3.0 skips LeaveGroup for static members

    # ------------------------------------------------------------------ one record

    def _handle(self, record: Any) -> None:
        """Run the record's task, or dead-letter the record.

        A task that ends with a result is not finished (result published, offset committed) here
        but kept in ``self.ended``: the next task starts first and the ended one is finished on
        this thread while the next runs, so that a task's publish and commit (~4 ms against a
        broker on the same host) do not leave the task thread idle. Commits stay in offset order:
        nothing else is committed before the ended task is. Until the next task starts, the
        ended one is still ``self.inflight``, so a rebalance in the poll between them finishes
        it before its partition goes (:meth:`_finish_before_revocation`).
        """
        tp = TopicPartition(record.topic, record.partition)
        try:
            message = decode(record.value)
            if not isinstance(message, Task):
                raise MessageError(f"expected a task message, got a {type(message).__name__}")
        except Exception as exc:  # noqa: BLE001 - a message must never stop the worker
            reason = str(exc) if isinstance(exc, MessageError) else f"unreadable message: {type(exc).__name__}: {exc}"
            self._finish_ended()
            self._dead_letter(record, reason, _poison_result(record, self.worker_id, reason))
            self._commit(tp, record.offset)
            return
        inflight = self.inflight = _InFlight(record=record, task=message, tp=tp)
        result = None
        try:
            result = self._run_with_retries(inflight)
        finally:
            if result is None:
                self.inflight = None
            else:
                inflight.result, self.ended = result, inflight

    def _finish_ended(self) -> None:
        """Publish and commit the task that ended (if any): see :meth:`_handle`."""
        ended, self.ended = self.ended, None
        if ended is None:
            return
        try:
            self._finish(ended, ended.result)
        finally:
            if self.inflight is ended:
                self.inflight = None

    def _run_with_retries(self, inflight: _InFlight) -> Result | None:
        """The task's result; None when it was abandoned (shutdown), finished during a rebalance,
        or its partition was taken away. Infrastructure failures are retried with backoff for
        ``retry_for_s``, then WorkerGaveUp is raised."""
        task = inflight.task
        first_failure: float | None = None
        delays = OUTAGE.delays()  # waited out polling, partitions paused: not a plain retry() loop
        while True:
            runner = self._run_task(inflight, started=self._finish_ended)
            if runner is None or inflight.delivered:
                return None
            if inflight.revoked:
                if runner.error is not None:
                    self._abandon(task)  # it did not finish here: its start is given back, not a crash
                return None
            error = runner.error
            if error is None:
                return runner.result
            if not isinstance(error, RetryableError):
                # process() turns every failure into a result; anything else is a bug, reported, never fatal.
                log.error("task %s raised %s: %s", task.task_id, type(error).__name__, error)
                return Result(run_id=task.run_id, task_id=task.task_id, cell_id=task.cell.id,
                              worker_id=self.worker_id, status="failed", finished_at=utc_now(),
                              error=f"internal error: {type(error).__name__}: {error}")
            now = time.monotonic()
            first_failure = first_failure if first_failure is not None else now
            if now - first_failure >= self.options.retry_for_s:
                self._abandon(task, crashed=True)
                raise WorkerGaveUp(
                    f"task {task.task_id} kept failing on the infrastructure for {now - first_failure:.0f} s "
                    f"(last: {error}); this worker exits so that the task, left uncommitted, goes to another "
                    "worker. Check the scene server, the storage and the network") from error
            delay = next(delays)
            self.summary.retries += 1
            log.warning("task %s: %s; retrying in %.1f s (for up to %.0f s more), the task stays uncommitted",
                        task.task_id, error, delay, self.options.retry_for_s - (now - first_failure))
            if not self._idle(delay, inflight):
                self._abandon(task)  # stopped or handed over while waiting: not a crash
                return None

    def _idle(self, seconds: float, inflight: _InFlight) -> bool:
        """Poll with every partition paused for ``seconds`` (staying in the group); False if a
        stop was requested or the task's partition was taken away meanwhile."""
        consumer = self.consumer
        self.busy = True
        consumer.pause(*consumer.assignment())
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if self.stop_requested.is_set() or inflight.revoked:
                    return False
                self._poll_paused(0.2)
            return not (self.stop_requested.is_set() or inflight.revoked)
        finally:
            self.busy = False
            self.focus.resume(consumer)

    def _poll_paused(self, seconds: float = 0.0) -> None:
        """Poll for up to ``seconds`` with the partitions paused: keeps this member alive and lets
        rebalances happen.

        kafka-python (3.0.12) runs a join round on its network thread but hands its assignment
        over only inside a poll (and, unmended, threw away a round that ended between two polls:
        see :func:`~cropchips.queue.kafka.collect_finished_joins`). So a wait between polls is
        spent inside the poll (paused partitions return nothing), not beside it: the assignment
        is taken the moment it comes.
        """
        consumer = self.consumer
        stray = consumer.poll(timeout_ms=int(seconds * 1000))
        for tp, recs in stray.items():
            # Only possible for partitions assigned before the listener paused them: rewind so that
            # those records are consumed later, in order.
            consumer.seek(tp, min(r.offset for r in recs))
        consumer.pause(*consumer.assignment())

    def _run_task(self, inflight: _InFlight, started: Any = None) -> _TaskThread | None:
        """Run the task on its own thread while polling; the finished thread, or None when it was
        abandoned past the shutdown grace. ``started()`` is called once the task runs (before
        any poll)."""
        task = inflight.task
        consumer = self.consumer
        self.busy = True
        consumer.pause(*consumer.assignment())
        log.info("task %s (cell %s, %d scenes) started", task.task_id, task.cell.id, len(task.scenes))
        runner = inflight.runner = self._tasks.start(self.processor.process, task)
        stop_deadline: float | None = None
        try:
            if started is not None:
                try:
                    started()
                except BaseException:
                    # The previous task could not be finished (the broker kept refusing): the worker
                    # stops. This task is left uncommitted, once it ended (within the grace), so
                    # that it is not cut off mid-write.
                    runner.wait(self.options.shutdown_grace_s)
                    self._abandon(task)
                    raise
            # Wake up as soon as the task ends (not at the end of a poll), and poll every 200 ms
            # meanwhile: polling keeps this member alive in the group; paused partitions return
            # nothing. While the group rebalances the wait is spent in the poll instead (the join
            # completes only there, see _poll_paused): the task's end is then seen <= 200 ms late.
            while not runner.wait(0.0 if self._rejoining() else 0.2):
                self._poll_paused(0.2 if self._rejoining() else 0.0)
                if self.stop_requested.is_set():
                    stop_deadline = stop_deadline or time.monotonic() + self.options.shutdown_grace_s
                    if time.monotonic() > stop_deadline:
                        log.warning("task %s still running after %.0f s of grace: abandoned uncommitted",
                                    task.task_id, self.options.shutdown_grace_s)
                        self.summary.abandoned += 1
                        return None
        finally:
            self.busy = False
            self.focus.resume(consumer)
        if runner.error is None and runner.result is not None:
            result: Result = runner.result
            log.info("task %s %s: %d chips in %.1f s", task.task_id, result.status, len(result.chips),
                     result.seconds.get("total", 0.0))
        return runner

    def _rejoining(self) -> bool:
        """Is this member (re)joining its group, a JoinGroup/SyncGroup round under way?"""
        coordinator = getattr(self.consumer, "_coordinator", None)
        need_rejoin = getattr(coordinator, "need_rejoin", None)
        return bool(need_rejoin()) if need_rejoin is not None else False

    def _abandon(self, task: Task, *, crashed: bool = False) -> None:
        """Tell the processor that this delivery of ``task`` ends unfinished (its start is not a
        crash unless ``crashed``)."""
        abandon = getattr(self.processor, "abandon", None)
        if abandon is not None:
            try:
                abandon(task, crashed=crashed)
            except Exception as exc:  # noqa: BLE001 - the task is redelivered either way
                log.warning("could not record that task %s was abandoned: %s", task.task_id, exc)

    # ------------------------------------------------------------------ finishing

    def _deliver(self, inflight: _InFlight, result: Result, retry_s: float | None = None) -> None:
        """Publish the task's result (a failure also as a dead letter). A result the broker
        refuses for good becomes a dead letter saying so."""
        record = inflight.record
        if result.status == "failed":
            self._dead_letter(record, result.error or "failed", result, retry_s)
        else:
            try:
                self._publish(self.options.results_topic, result.task_id, encode(result), retry_s=retry_s)
            except PublishRefused as exc:
                failed = replace(result, status="failed", chips=(), reused=False,
                                 error=f"its chips were written but the result could not be published: {exc}")
                self._dead_letter(record, failed.error or "", failed, retry_s)
                result = failed
        self.summary.statuses[result.status] += 1
        self.summary.chips += len(result.chips)

    def _finish(self, inflight: _InFlight, result: Result) -> None:
        """Publish and commit, once each (the rebalance listener may have done either already)."""
        with inflight.lock:
            if inflight.delivered or inflight.revoked:
                return
            self._deliver(inflight, result)
            inflight.delivered = True
        self._commit(inflight.tp, inflight.record.offset, inflight)

    async def _finish_before_revocation(self, revoked: set[TopicPartition]) -> None:
        """Called on the network thread when a rebalance takes ``revoked``: if the running task's
        partition is among them, wait (awaiting, so heartbeats go on) up to ``revoke_wait_s`` for
        the task, then publish and commit while the partition is still this worker's."""
        inflight = self.inflight
        if inflight is None or inflight.tp not in revoked or inflight.committed or inflight.revoked:
            return
        net = getattr(self.consumer, "_net", None)
        coordinator = getattr(self.consumer, "_coordinator", None)
        commit = getattr(coordinator, "_commit_offsets_sync_async", None)
        runner = inflight.runner
        if net is None or commit is None or runner is None:
            inflight.revoked = True  # cannot wait here: the new owner re-reports it from the manifest
            return
        deadline = time.monotonic() + self.options.revoke_wait_s
        while not (runner.done or inflight.delivered) and time.monotonic() < deadline:
            await net.sleep(0.1)
        result = inflight.result  # an ended task waiting for the next to start (see _handle)
        if result is None and runner.done and runner.error is None:
            result = runner.result
        if not inflight.delivered and result is None:
            log.warning("task %s not finished when its partition %d was revoked: the new owner takes it over",
                        inflight.task.task_id, inflight.tp.partition)
            inflight.revoked = True
            return
        try:
            with inflight.lock:
                if not inflight.delivered:
                    self._deliver(inflight, result, retry_s=5.0)
                    inflight.delivered = True
            await commit({inflight.tp: OffsetAndMetadata(inflight.record.offset + 1, "", -1)}, timeout_ms=10000)
        except Exception as exc:  # noqa: BLE001 - the new owner re-reports the task from its manifest
            log.warning("could not finish task %s before its partition %d went (%s): the new owner re-reports it",
                        inflight.task.task_id, inflight.tp.partition, exc)
            inflight.revoked = True
            return
        inflight.committed = True
        self.summary.handed_over += 1
        log.info("task %s finished and committed before its partition %d was revoked", inflight.task.task_id,
                 inflight.tp.partition)

    def _publish(self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]] | None = None,
                 retry_s: float | None = None) -> None:
        """Publish and wait for the acknowledgement (the result is durable before the offset is
        committed). Retriable errors (broker unreachable, leader moving) are retried with backoff
        for up to ``retry_s`` (default ``publish_retry_s``), then BrokerError; an error that
        cannot succeed on retry (record too large, not authorised) is PublishRefused at once."""
        window = self.options.publish_retry_s if retry_s is None else retry_s

        def send() -> None:
            self.producer.send(topic, key=key.encode(), value=value, headers=headers or []).get(timeout=30)

        def report(exc: BaseException, attempt: int, delay: float) -> None:
            log.warning("publishing to %s failed (%s); the broker may be unreachable, retrying in %.1f s",
                        topic, exc.__class__.__name__, delay)

        try:
            retry(send, f"publishing to {topic}", transient=lambda exc: isinstance(exc, KafkaError) and is_retriable(exc),
                  deadline=time.monotonic() + window, backoff=PUBLISH, on_retry=report)
        except KafkaError as exc:
            if not is_retriable(exc):
                raise PublishRefused(f"the broker refused a record of {len(value)} bytes for {topic}: "
                                     f"{type(exc).__name__}: {exc}") from exc
            raise BrokerError(f"could not publish to {topic} for {window:.0f} s: {exc}") from exc

    def _dead_letter(self, record: Any, reason: str, result: Result, retry_s: float | None = None) -> None:
        """The original record, unchanged, to the dead-letter topic (its start only, if the broker
        refuses it whole), and the failed result to the results topic."""
        headers = [("error", reason.encode()[:4000]), ("worker", self.worker_id.encode()),
                   ("source", f"{record.topic}/{record.partition}/{record.offset}".encode())]
        value = record.value if record.value is not None else b""
        try:
            self._publish(self.options.dlq_topic, result.task_id, value, headers, retry_s)
        except PublishRefused as exc:
            log.warning("the dead letter of %s/%d@%d was refused whole (%s); keeping its first %d bytes",
                        record.topic, record.partition, record.offset, exc, DEAD_LETTER_PREVIEW_BYTES)
            headers += [("truncated", str(len(value)).encode())]
            self._publish(self.options.dlq_topic, result.task_id, value[:DEAD_LETTER_PREVIEW_BYTES], headers, retry_s)
        try:
            self._publish(self.options.results_topic, result.task_id, encode(result), retry_s=retry_s)
        except PublishRefused as exc:
            log.error("the failed result of %s was refused (%s); publishing it without chips", result.task_id, exc)
            self._publish(self.options.results_topic, result.task_id,
                          encode(replace(result, chips=(), scenes_used=(), error=(result.error or "")[:2000])),
                          retry_s=retry_s)
        self.summary.dead_lettered += 1
        log.warning("dead-lettered %s/%d@%d to %s: %s", record.topic, record.partition, record.offset,
                    self.options.dlq_topic, reason)

    def _commit(self, tp: TopicPartition, offset: int, inflight: _InFlight | None = None) -> None:
        """Commit ``offset + 1``. A commit refused because the group is rebalancing is retried once
        the group is stable again, while the partition is still this worker's; if it moved, its new
        owner gets the task again and re-reports it from the manifest."""
        offsets = {tp: OffsetAndMetadata(offset + 1, "", -1)}
        deadline = time.monotonic() + max(30.0, 3 * self.options.session_timeout_ms / 1000)
        retried = False
        while True:
            if inflight is not None and (inflight.committed or inflight.revoked):
                return  # the rebalance listener committed it, or found it gone
            try:
                self.consumer.commit(offsets)
                if inflight is not None:
                    inflight.committed = True
                if retried:
                    self.summary.commits_retried += 1
                    log.info("commit of %s/%d@%d went through after the rebalance", tp.topic, tp.partition, offset)
                return
            except KafkaError as exc:
                rebalancing = type(exc).__name__ in _REBALANCING
                if not rebalancing or time.monotonic() > deadline:
                    self.summary.commit_failures += 1
                    log.warning("commit of %s/%d@%d refused (%s); the task may be delivered again and re-reported",
                                tp.topic, tp.partition, offset, exc)
                    return
                log.info("commit of %s/%d@%d refused while the group rebalances; retrying once it is stable",
                         tp.topic, tp.partition, offset)
                retried = True
                self._wait_for_stable_group()
                if tp not in self.consumer.assignment():
                    self.summary.commit_failures += 1
                    log.warning("partition %d moved to another worker before %s/%d@%d could be committed; "
                                "its new owner re-reports the task", tp.partition, tp.topic, tp.partition, offset)
                    return
                # The rejoin reset the fetch position to the last commit: skip the finished record,
                # and the running one if it is of this partition (an ended task is committed while
                # the next one runs).
                running = self.inflight
                after = offset + 1
                if running is not None and running is not inflight and running.tp == tp:
                    after = max(after, running.record.offset + 1)
                self.consumer.seek(tp, after)

    def _wait_for_stable_group(self, seconds: float = 1.0) -> None:
        """Poll (paused, nothing is consumed) so that kafka-python completes the rebalance. Called
        while a task runs too (an ended task's commit): its partitions then stay paused.

        Zero-timeout polls with sleeps between them, not waiting polls (see _poll_paused): with
        waiting polls the join completed here, and with cooperative-sticky on Tansu a worker
        whose commit then went through got no record of its partitions afterwards (18 of 60
        tasks left unrun by burst workers, in 4 of 6 bench.join rounds: likely kafka-python's
        parked records, mended since, see :func:`~cropchips.queue.kafka.hand_out_parked_records`;
        waiting polls here are not measured again yet). As
        it is, a commit refused during a cooperative rebalance is retried for up to 30 s and
        may be given up (the task is then re-reported by whoever runs it again)."""
        was_busy, self.busy = self.busy, True
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                self._poll_paused()
                time.sleep(0.1)
        finally:
            self.busy = was_busy
            if not was_busy:
                self.focus.resume(self.consumer)


def _poison_result(record: Any, worker_id: str, reason: str) -> Result:
    """A ``failed`` result for a message that could not be decoded, keeping any usable ids."""
    import json

    body: dict[str, Any] = {}
    try:
        parsed = json.loads(record.value)
        body = parsed if isinstance(parsed, dict) else {}
    except Exception:  # noqa: BLE001 - hostile bytes: keep nothing
        pass

    def safe(value: Any, fallback: str) -> str:
        try:
            return check_safe_id(value, "id")
        except MessageError:
            return fallback

    where = f"{record.partition}-{record.offset}"
    cell = body.get("cell")
    return Result(run_id=safe(body.get("run_id"), "unknown"), task_id=safe(body.get("task_id"), f"poison-{where}"),
                  cell_id=safe(cell.get("id") if isinstance(cell, dict) else None, "unknown"),
                  worker_id=worker_id, status="failed", error=f"invalid task message: {reason}"[:4000],
                  finished_at=utc_now())

