"""Publish the tasks held by dead letters to the tasks topic again."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kafka.errors import KafkaError

from cropchips.errors import BrokerError, ConfigError, MessageError
from cropchips.queue.kafka import KafkaSettings, make_producer
from cropchips.queue.messages import Task, decode, encode
from cropchips.queue.admin._format import _one_line, _text
from cropchips.queue.admin.inspect import read_all

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replay:
    """What ``dlq replay`` did (or would do) with one dead letter."""

    offset: int
    """Offset in the dead-letter topic."""
    task_id: str | None
    """The task, when the dead letter holds a valid one."""
    replayed: bool
    """True when it was (or, without ``yes``, would be) published to the tasks topic again."""
    reason: str
    """Why it was skipped, or the error it was dead-lettered with."""


def parse_offsets(text: str | None) -> frozenset[int] | None:
    """``"3,5-7"`` -> {3, 5, 6, 7}; empty or None -> None (every offset)."""
    if not text or not text.strip():
        return None
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                if high < low or high - low > 1_000_000:
                    raise ValueError
                chosen.update(range(low, high + 1))
            elif part:
                chosen.add(int(part))
        except ValueError:
            raise ConfigError(f"--offsets {text!r}: give offsets and ranges such as 3,5-9") from None
    return frozenset(chosen)


def replay_dead_letters(settings: KafkaSettings, dlq_topic: str, tasks_topic: str, *,
                        offsets: frozenset[int] | None = None, yes: bool = False,
                        wait: float = 60.0) -> list[Replay]:
    """Publish the tasks held by dead letters (those at ``offsets``, or all) to the tasks topic
    again, once their cause is fixed. Only valid task messages are replayed, unchanged; poison
    (unreadable) and truncated dead letters are reported and skipped. Without ``yes`` nothing
    is published: the list says what would be.

    A replayed task that is already complete is re-reported, not redone (its manifest), so
    replaying twice does no harm.
    """
    plan: list[tuple[Replay, Any]] = []
    for record in read_all(settings, dlq_topic, wait=wait):
        if offsets is not None and record.offset not in offsets:
            continue
        headers = {k: v for k, v in (record.headers or [])}
        error = _text(headers.get("error")) or ""
        if "truncated" in headers:
            plan.append((Replay(record.offset, None, False, "only the start of the message was kept (it was too "
                                "large for the dead-letter topic): republish it from the master"), None))
            continue
        try:
            message = decode(record.value)
        except MessageError as exc:
            plan.append((Replay(record.offset, None, False, f"not a valid task: {exc}"), None))
            continue
        if not isinstance(message, Task):
            plan.append((Replay(record.offset, None, False, f"a {type(message).__name__}, not a task"), None))
            continue
        plan.append((Replay(record.offset, message.task_id, True, error), message))
    if yes and any(task is not None for _, task in plan):
        producer = make_producer(settings, wait=wait)
        try:
            futures = [producer.send(tasks_topic, key=task.cell.id.encode(), value=encode(task))
                       for _, task in plan if task is not None]
            for future in futures:
                future.get(timeout=30)
        except KafkaError as exc:
            raise BrokerError(f"replaying to {tasks_topic} failed: {exc}; nothing is lost, run it again") from exc
        finally:
            producer.close(timeout=10)
        log.info("replayed %d dead letters of %s to %s", len(futures), dlq_topic, tasks_topic)
    return [entry for entry, _ in plan]


def format_replay(entry: Replay, done: bool) -> str:
    verb = ("replayed" if done else "would replay") if entry.replayed else "skipped"
    return f"{verb:12}  offset {entry.offset}  {entry.task_id or '-'}  {_one_line(entry.reason or '-', 300)}"
