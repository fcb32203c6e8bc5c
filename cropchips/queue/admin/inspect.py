"""Read the results and dead-letter topics: ``read_all``, results tail, dead-letter listing."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kafka import TopicPartition

from cropchips.errors import BrokerError, MessageError
from cropchips.queue.kafka import KafkaSettings, make_consumer
from cropchips.queue.messages import Result, decode
from cropchips.queue.admin._client import READ_TIMEOUT_S
from cropchips.queue.admin._format import _one_line, _text

log = logging.getLogger(__name__)


def read_all(settings: KafkaSettings, topic: str, *, wait: float = 60.0, timeout: float = READ_TIMEOUT_S) -> list[Any]:
    """Every record of ``topic`` from its start up to the high watermark each partition had
    when first fetched. No group, nothing committed. One partition keeps its offset order
    (arrival order); several are merged by timestamp.

    Reading from the start is deliberate: "latest" offsets are wrong on some brokers (Tansu),
    and the results and dead-letter topics hold one small message per task, so a full read is
    cheap (about 30k messages a second).
    """
    consumer = make_consumer(settings, group_id=None, wait=wait, fetch_max_wait_ms=50)
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise BrokerError(f"topic {topic} does not exist on {settings.bootstrap_servers}; "
                              "create it with `admin.py topics create`")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        targets: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + timeout
        while True:
            for recs in consumer.poll(timeout_ms=100).values():
                records.extend(r for r in recs if r.offset < targets.get(TopicPartition(r.topic, r.partition), 1 << 62))
            for tp in tps:
                if tp not in targets and consumer.highwater(tp) is not None:
                    targets[tp] = consumer.highwater(tp)  # the end as of now; later records are not waited for
            if len(targets) == len(tps) and all(consumer.position(tp) >= targets[tp] for tp in tps):
                break
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic} did not finish within {timeout:.0f} s "
                                  f"({len(records)} records read)")
        if len(tps) == 1:
            return records  # offset order is arrival order; timestamps come from the producers' clocks
        return sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset))
    finally:
        consumer.close()


def _iso(ms: int | None) -> str:
    if ms is None or ms < 0:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ResultLine:
    """One result, flattened for ``results tail``."""

    time: str
    """When the worker finished (ISO 8601 UTC; the record's timestamp if the result has none)."""
    run_id: str
    """Run of the task."""
    task_id: str
    """Task id."""
    status: str
    """ok, no_scenes, no_fields or failed."""
    worker: str
    """Worker id ``N@host``."""
    chips: int
    """Chips written."""
    error: str | None
    """Reason when the task did not end ``ok``."""
    reused: bool
    """True when the outputs existed already."""
    offset: int
    """Offset of the record in the results topic."""


def tail_results(settings: KafkaSettings, topic: str, n: int, *, run_id: str | None = None,
                 wait: float = 60.0) -> tuple[list[ResultLine], int]:
    """The last ``n`` results (oldest first) of ``topic``, of run ``run_id`` if given, and the
    number of unreadable messages skipped. Run headers are not results and are skipped."""
    results: list[ResultLine] = []
    invalid = 0
    for record in read_all(settings, topic, wait=wait):
        try:
            message = decode(record.value)
        except MessageError as exc:
            invalid += 1
            log.warning("skipping unreadable message %s/%d@%d: %s", record.topic, record.partition, record.offset, exc)
            continue
        if isinstance(message, Result) and (run_id is None or message.run_id == run_id):
            results.append(ResultLine(message.finished_at or _iso(record.timestamp), message.run_id, message.task_id,
                                      message.status, message.worker_id, len(message.chips), message.error,
                                      message.reused, record.offset))
    return (results[-n:] if n > 0 else results), invalid


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    time: str
    """When it was dead-lettered (record timestamp, ISO 8601 UTC)."""
    key: str | None
    """Record key (the task id)."""
    error: str | None
    """``error`` header: why it could not be processed."""
    worker: str | None
    """``worker`` header: who gave up on it."""
    source: str | None
    """``source`` header: ``topic/partition/offset`` of the original task."""
    preview: str
    """The start of the original message."""
    size: int
    """Size of the original message in bytes."""
    offset: int
    """Offset in the dead-letter topic."""


def dead_letters(settings: KafkaSettings, topic: str, *, last: int = 0, preview: int = 120,
                 wait: float = 60.0) -> list[DeadLetter]:
    """The dead letters of ``topic`` (the last ``last`` if > 0), oldest first."""
    letters = []
    for record in read_all(settings, topic, wait=wait):
        headers = {k: v for k, v in (record.headers or [])}
        value = record.value or b""
        text = value[:preview * 4].decode("utf-8", errors="replace").replace("\n", " ")
        letters.append(DeadLetter(_iso(record.timestamp), _text(record.key), _text(headers.get("error")),
                                  _text(headers.get("worker")), _text(headers.get("source")),
                                  text[:preview] + ("..." if len(value) > preview else ""), len(value), record.offset))
    return letters[-last:] if last > 0 else letters


def format_result(line: ResultLine) -> str:
    error = "" if not line.error else f"  error={_one_line(line.error, 200)}"
    reused = " (reused)" if line.reused else ""
    return (f"{line.time}  {line.task_id}  {line.status:9}  worker={line.worker}  chips={line.chips}{reused}"
            f"{error}")


def format_dead_letter(letter: DeadLetter) -> str:
    return (f"{letter.time}  key={letter.key or '-'}  worker={letter.worker or '-'}  source={letter.source or '-'}\n"
            f"    error: {_one_line(letter.error or '-', 500)}\n"
            f"    value: {letter.preview} ({letter.size} bytes)")
