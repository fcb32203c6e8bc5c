"""Create, list and reset the pipeline's topics.

CreatePartitions is unsupported on Tansu: a topic with the wrong partition count is
reported, and ``reset_topic`` (delete + create) is the way to change it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from cropchips.errors import BrokerError
from cropchips.queue.kafka import DEFAULT_RETENTION_MS, KafkaSettings, topic_configs
from cropchips.queue.admin._client import PartitionOffsets, _partition_counts, open_admin, partition_offsets
from cropchips.queue.admin._format import _plural

log = logging.getLogger(__name__)

#: Seconds to wait for a deleted topic to disappear / a created one to appear.
TOPIC_CHANGE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TopicSpec:
    """A topic the pipeline needs and the partition count it should have."""

    name: str
    """Topic name."""
    partitions: int
    """Partitions it is created with."""
    role: str = ""
    """``tasks``, ``results`` or ``dlq``."""


def pipeline_topics(tasks: str, results: str, dlq: str, tasks_partitions: int) -> list[TopicSpec]:
    """The three topics of the pipeline: results and dead letters keep one partition (one order)."""
    return [TopicSpec(tasks, tasks_partitions, "tasks"), TopicSpec(results, 1, "results"), TopicSpec(dlq, 1, "dlq")]


@dataclass(frozen=True)
class TopicState:
    """A topic as found on the broker after ``create_topics``."""

    name: str
    """Topic name."""
    partitions: int
    """Partitions it has now."""
    wanted: int
    """Partitions it should have."""
    created: bool
    """True when this call created it, False when it existed already."""

    @property
    def mismatch(self) -> bool:
        return self.partitions != self.wanted


@dataclass(frozen=True)
class TopicInfo:
    """A topic's partition count and, when counted, its records per partition."""

    name: str
    """Topic name."""
    partitions: int
    """Number of partitions."""
    records: dict[int, int] | None = None
    """Partition -> records in it (high watermark minus log start); None when not counted."""
    role: str = ""
    """``tasks``, ``results``, ``dlq`` for the pipeline's topics, else empty."""

    @property
    def total(self) -> int | None:
        return None if self.records is None else sum(self.records.values())


def _wait_for(predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BrokerError(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(0.1)


def _create(admin: KafkaAdminClient, name: str, partitions: int, timeout: float,
            retention_ms: int = DEFAULT_RETENTION_MS) -> bool:
    """Create ``name`` with ``retention_ms``; False if it exists already. Waits until its partitions have leaders."""
    try:
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1,
                                      topic_configs=topic_configs(retention_ms))])
    except TopicAlreadyExistsError:
        return False
    try:
        admin.wait_for_topics([name], timeout_ms=int(timeout * 1000))
    except KafkaError as exc:
        raise BrokerError(f"topic {name} was created but is not usable after {timeout:.0f} s: {exc}") from exc
    log.info("created topic %s with %d partition(s)", name, partitions)
    return True


def create_topics(settings: KafkaSettings, specs: Sequence[TopicSpec], *, wait: float = 60.0,
                  retention_ms: int = DEFAULT_RETENTION_MS) -> list[TopicState]:
    """Create the topics that are missing (idempotent); report every topic's partition count.

    An existing topic is never changed. If its partition count differs from the wanted one
    that is logged: some brokers (Tansu) cannot add partitions, ``reset_topic`` recreates it.
    """
    admin = open_admin(settings, wait)
    try:
        existing = _partition_counts(admin, None)
        created = {spec.name: _create(admin, spec.name, spec.partitions, TOPIC_CHANGE_TIMEOUT_S, retention_ms)
                   for spec in specs if spec.name not in existing}
        counts = _partition_counts(admin, [s.name for s in specs])
    except KafkaError as exc:
        raise BrokerError(f"creating topics on {settings.bootstrap_servers} failed: {exc}") from exc
    finally:
        admin.close()
    states = []
    for spec in specs:
        state = TopicState(spec.name, counts.get(spec.name, 0), spec.partitions, created.get(spec.name, False))
        if state.mismatch:
            log.warning("topic %s has %d partition(s), not %d; recreate it (admin.py topics reset) to change that",
                        spec.name, state.partitions, spec.partitions)
        states.append(state)
    return states


def list_topics(settings: KafkaSettings, specs: Sequence[TopicSpec] = (), *, count: bool = True,
                wait: float = 60.0) -> list[TopicInfo]:
    """Every topic with its partition count; the pipeline's topics (``specs``) with their
    records per partition when ``count`` (high watermark minus log start)."""
    admin = open_admin(settings, wait)
    try:
        counts = _partition_counts(admin, None)
    except KafkaError as exc:
        raise BrokerError(f"listing topics on {settings.bootstrap_servers} failed: {exc}") from exc
    finally:
        admin.close()
    roles = {s.name: s.role for s in specs}
    offsets: dict[TopicPartition, PartitionOffsets] = {}
    ours = [name for name in roles if name in counts]
    if count and ours:
        offsets = partition_offsets(settings, ours, wait=wait)
    infos = []
    order = {name: i for i, name in enumerate(roles)}
    for name in sorted(counts, key=lambda n: (order.get(n, len(order)), n)):
        records = None
        if name in ours and count:
            records = {tp.partition: o.records for tp, o in offsets.items() if tp.topic == name}
        infos.append(TopicInfo(name, counts[name], records, roles.get(name, "")))
    return infos


@dataclass(frozen=True)
class ResetReport:
    """What ``reset_topic`` did."""

    topic: str
    """The topic reset."""
    existed: bool
    """False when there was nothing to delete."""
    deleted_records: int | None
    """Records the old topic held (None if it did not exist or could not be counted)."""
    old_partitions: int
    """Partitions of the old topic (0 if it did not exist)."""
    partitions: int
    """Partitions of the new topic."""
    group_offsets_reset: list[int] = field(default_factory=list)
    """Partitions whose committed offset of ``group_id`` survived the deletion and was set back to 0."""


def reset_topic(settings: KafkaSettings, topic: str, partitions: int, *, group_id: str | None = None,
                wait: float = 60.0, timeout: float = TOPIC_CHANGE_TIMEOUT_S,
                retention_ms: int = DEFAULT_RETENTION_MS) -> ResetReport:
    """Delete ``topic`` and create it again, empty, with ``partitions`` partitions.

    Waits until the deletion is visible in the metadata before creating (brokers delete
    asynchronously; a create too early fails with "already exists" and is retried). Apache
    Kafka, Redpanda and Tansu drop a deleted topic's committed offsets; if ``group_id``
    still has offsets on the new topic they are set back to 0, so that workers do not skip
    the first tasks of the new topic (that needs the group to have no live member).
    """
    admin = open_admin(settings, wait)
    try:
        old = _partition_counts(admin, [topic]).get(topic, 0)
        deleted_records = None
        if old:
            try:
                deleted_records = sum(o.records for o in partition_offsets(settings, [topic], wait=wait).values())
            except BrokerError as exc:
                log.warning("could not count the records of %s before deleting it: %s", topic, exc)
            admin.delete_topics([topic], timeout_ms=int(timeout * 1000))
            log.info("deleted topic %s (%d partitions, %s records)", topic, old,
                     "?" if deleted_records is None else deleted_records)
            _wait_for(lambda: topic not in admin.list_topics(), f"the deletion of {topic} is visible", timeout)
        else:
            log.info("topic %s did not exist: creating it", topic)
        deadline = time.monotonic() + timeout
        while not _create(admin, topic, partitions, timeout, retention_ms):
            # Apache Kafka may still be removing the old log: "already exists" for a moment.
            if time.monotonic() > deadline:
                raise BrokerError(f"topic {topic} still exists {timeout:.0f} s after its deletion; "
                                  "another client may have recreated it (stop the master and workers)")
            time.sleep(0.5)
        now = _partition_counts(admin, [topic]).get(topic, 0)
        if now != partitions:
            raise BrokerError(f"topic {topic} came back with {now} partitions instead of {partitions}: another "
                              "client touched it and the broker auto-created it; stop master and workers, reset again")
        stale: list[int] = []
        if group_id:
            stale = _clear_stale_offsets(admin, group_id, topic, partitions)
        return ResetReport(topic, bool(old), deleted_records, old, now, stale)
    except KafkaError as exc:
        raise BrokerError(f"resetting topic {topic} on {settings.bootstrap_servers} failed: {exc}") from exc
    finally:
        admin.close()


def _clear_stale_offsets(admin: KafkaAdminClient, group_id: str, topic: str, partitions: int) -> list[int]:
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    committed = admin.list_group_offsets({group_id: tps}).get(group_id, {})
    stale = sorted(tp.partition for tp, om in committed.items() if om is not None and om.offset > 0)
    if stale:
        log.warning("group %s kept committed offsets on the deleted %s (partitions %s): setting them to 0",
                    group_id, topic, stale)
        try:
            admin.alter_group_offsets(group_id, {TopicPartition(topic, p): OffsetAndMetadata(0, "", -1)
                                                 for p in stale})
        except KafkaError as exc:
            raise BrokerError(f"group {group_id} still has committed offsets on the new {topic} and they could "
                              f"not be reset ({exc}); stop every worker and run the reset again") from exc
    return stale


def format_created(states: Sequence[TopicState]) -> str:
    lines = []
    width = max((len(s.name) for s in states), default=0)
    for s in states:
        note = f"  (wanted {s.wanted}: recreate it with `admin.py topics reset` to change)" if s.mismatch else ""
        verb = "created" if s.created else "exists"
        lines.append(f"{verb:8} {s.name:{width}}  {_plural(s.partitions, 'partition')}{note}")
    return "\n".join(lines)


def format_topic_list(infos: Sequence[TopicInfo]) -> str:
    if not infos:
        return "no topics"
    width = max(len(i.name) for i in infos)
    lines = [f"{'TOPIC':{width}}  PARTITIONS  RECORDS  ROLE      PER PARTITION"]
    for i in infos:
        total = "-" if i.total is None else str(i.total)
        per = "" if i.records is None else " ".join(f"{p}:{n}" for p, n in sorted(i.records.items()))
        lines.append(f"{i.name:{width}}  {i.partitions:>10}  {total:>7}  {i.role or '-':8}  {per}".rstrip())
    return "\n".join(lines)
