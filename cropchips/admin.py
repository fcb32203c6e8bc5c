"""Topic, consumer-group, results and dead-letter administration for any Kafka-protocol broker.

The seed ran ``docker exec redpanda rpk ...`` for these jobs; this module does them with
the Kafka protocol, so they work the same against Redpanda, Apache Kafka and the embedded
Tansu broker. Broker differences handled here (measured, see the README):

* "Latest offset" look-ups (ListOffsets -1, ``end_offsets()``, ``seek_to_end()``) are wrong
  on Tansu: they return the start of the last batch. End offsets are therefore taken from
  the high watermark that every fetch response carries (``consumer.highwater(tp)``).
* kafka-python 3.0.12's ``describe_groups`` raises ``ValueError: 15 is not a valid
  ACLOperation`` on Tansu (it sets all 32 authorized-operation bits); we never use those
  bits, so :class:`_AdminClient` drops them. Tansu reports members without client id, host
  or assignment; what a broker does not say is shown as unknown, never guessed.
* CreatePartitions is unsupported on Tansu: a topic with the wrong partition count is
  reported, and ``reset_topic`` (delete + create) is the way to change it.

Nothing here prints: functions return dataclasses and ``format_*`` helpers render them;
the ``admin.py`` script prints.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from .errors import BrokerError, CropChipsError, MessageError
from .kafka_io import DEFAULT_RETENTION_MS, KafkaSettings, admin_client, make_consumer, topic_configs
from .messages import Result, decode

log = logging.getLogger(__name__)

#: Seconds to wait for a deleted topic to disappear / a created one to appear.
TOPIC_CHANGE_TIMEOUT_S = 30.0
#: Seconds to spend reading a topic (or fetching its high watermarks) before giving up.
READ_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- clients


def open_admin(settings: KafkaSettings, wait: float) -> KafkaAdminClient:
    """An admin client (see :func:`cropchips.kafka_io.admin_client`)."""
    return admin_client(settings, wait)


# --------------------------------------------------------------------------- topics


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


def _partition_counts(admin: KafkaAdminClient, names: Sequence[str] | None) -> dict[str, int]:
    """Topic -> partition count for the topics that exist (all topics when ``names`` is None)."""
    described = admin.describe_topics(list(names) if names is not None else None)
    return {t["name"]: len(t.get("partitions") or []) for t in described
            if t.get("error_code", 0) == 0 and not t.get("is_internal")}


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


@dataclass(frozen=True)
class PartitionOffsets:
    """Where a partition's log starts and ends."""

    start: int
    """Log start offset (earliest)."""
    end: int
    """High watermark: the offset the next record will get."""

    @property
    def records(self) -> int:
        return self.end - self.start


def partition_offsets(settings: KafkaSettings, topics: Iterable[str], *, wait: float = 60.0,
                      timeout: float = READ_TIMEOUT_S) -> dict[TopicPartition, PartitionOffsets]:
    """Start and end offsets of every partition of ``topics``, correct on every broker.

    The end is the high watermark of a fetch response (``consumer.highwater``), not a
    "latest" ListOffsets look-up, which some brokers (Tansu) answer wrongly. Getting one
    fetch response per partition reads at most a batch of each; the records are dropped.
    """
    consumer = make_consumer(settings, group_id=None, wait=wait, fetch_max_wait_ms=50)
    try:
        tps = []
        for topic in topics:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise BrokerError(f"topic {topic} does not exist on {settings.bootstrap_servers}; "
                                  "create it with `admin.py topics create`")
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return {}
        consumer.assign(tps)
        starts = consumer.beginning_offsets(tps)  # "earliest" look-ups are right everywhere
        consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        ends: dict[TopicPartition, int] = {}
        while len(ends) < len(tps):
            if time.monotonic() > deadline:
                missing = sorted(f"{tp.topic}/{tp.partition}" for tp in tps if tp not in ends)
                raise BrokerError(f"no fetch response for {missing} within {timeout:.0f} s")
            consumer.poll(timeout_ms=100)
            for tp in tps:
                if tp not in ends and consumer.highwater(tp) is not None:
                    ends[tp] = consumer.highwater(tp)
                    consumer.pause(tp)  # its end is known: fetch nothing more from it
        return {tp: PartitionOffsets(int(starts.get(tp) or 0), ends[tp]) for tp in tps}
    finally:
        consumer.close()


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


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Member:
    """A member of a consumer group, as far as the broker tells."""

    member_id: str
    """Broker-assigned id (Kafka clients use ``<client id>-<uuid>``)."""
    client_id: str | None
    """Client id (``cropchips-worker-N``); None when the broker did not report it."""
    host: str | None
    """Client host as the broker sees it; None when not reported."""
    partitions: list[int] | None
    """Partitions of the topic assigned to it; None when the broker did not report the assignment."""


@dataclass(frozen=True)
class PartitionLag:
    """A group's position in one partition."""

    partition: int
    """Partition number."""
    committed: int | None
    """Next offset the group will read; None if it never committed here."""
    end: int
    """High watermark (records published so far)."""
    lag: int
    """Records not yet committed (from the log start when nothing was committed)."""


@dataclass(frozen=True)
class GroupReport:
    """``group describe``: members and, per partition of the topic, committed offset, end and lag."""

    group_id: str
    """The consumer group."""
    topic: str
    """The topic the lag is computed for."""
    state: str | None
    """Stable, Empty, PreparingRebalance, ...; None when unknown."""
    members: list[Member] | None
    """Members; None when the broker or client could not describe them."""
    members_note: str
    """Why members or parts of them are unknown (empty when all is known)."""
    partitions: list[PartitionLag]
    """One row per partition of ``topic``."""

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["total_lag"] = self.total_lag
        return body


_MEMBER_ID = re.compile(r"^(?P<client>.+)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _assigned(assignment: Any, topic: str) -> list[int] | None:
    """Partitions of ``topic`` in a decoded ConsumerProtocolAssignment (dict or object), None if not decodable."""
    if isinstance(assignment, Mapping):
        rows = assignment.get("assigned_partitions")
    else:
        rows = getattr(assignment, "assigned_partitions", None)
    if rows is None:
        return None
    out: list[int] = []
    for row in rows:
        name, parts = (row.get("topic"), row.get("partitions")) if isinstance(row, Mapping) else (row[0], row[1])
        if name == topic:
            out += list(parts)
    return sorted(out)


def _members(admin: KafkaAdminClient, group_id: str, topic: str) -> tuple[str | None, list[Member] | None, str]:
    try:
        described = admin.describe_groups([group_id])[group_id]
    except (KafkaError, ValueError, KeyError) as exc:
        return None, None, f"the broker's group description could not be read ({exc.__class__.__name__}: {exc})"
    if described.get("error"):
        return None, None, f"the broker refused to describe the group: {described['error']}"
    members, unknown = [], []
    for raw in described.get("members") or []:
        member_id = raw.get("member_id") or ""
        client_id = raw.get("client_id") or None
        if client_id is None:
            match = _MEMBER_ID.match(member_id)  # Kafka clients get "<client id>-<uuid>"
            client_id = match.group("client") if match else None
            unknown.append("client ids" + (" (taken from the member ids)" if match else ""))
        host = raw.get("client_host") or None
        if host is None:
            unknown.append("hosts")
        partitions = _assigned(raw.get("member_assignment"), topic)
        if partitions is None:
            unknown.append("partition assignments")
        members.append(Member(member_id, client_id, host, partitions))
    kinds = list(dict.fromkeys(unknown))
    listed = ", ".join(kinds[:-1]) + (" or " if len(kinds) > 1 else "") + (kinds[-1] if kinds else "")
    note = f"the broker did not report {listed}" if kinds else ""
    return described.get("group_state") or None, members, note


def describe_group(settings: KafkaSettings, group_id: str, topic: str, *, wait: float = 60.0) -> GroupReport:
    """Members of ``group_id`` and its committed offset, end offset and lag per partition of ``topic``."""
    admin = open_admin(settings, wait)
    try:
        state, members, note = _members(admin, group_id, topic)
        count = _partition_counts(admin, [topic]).get(topic)
        if not count:
            raise BrokerError(f"topic {topic} does not exist on {settings.bootstrap_servers}; "
                              "create it with `admin.py topics create`")
        tps = [TopicPartition(topic, p) for p in range(count)]
        committed = admin.list_group_offsets({group_id: tps}).get(group_id, {})
    except KafkaError as exc:
        raise BrokerError(f"describing group {group_id} on {settings.bootstrap_servers} failed: {exc}") from exc
    finally:
        admin.close()
    offsets = partition_offsets(settings, [topic], wait=wait)
    rows = []
    for tp in tps:
        om = committed.get(tp)
        done = om.offset if om is not None and om.offset is not None and om.offset >= 0 else None
        o = offsets[tp]
        rows.append(PartitionLag(tp.partition, done, o.end, max(0, o.end - (o.start if done is None else done))))
    return GroupReport(group_id, topic, state, members, note, rows)


# --------------------------------------------------------------------------- reading topics


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


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


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
            from .errors import ConfigError

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
    from .kafka_io import make_producer
    from .messages import Task, encode

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


# --------------------------------------------------------------------------- doctor

DOCTOR_CHECKS = ("broker", "topics", "output", "gpkg")


@dataclass(frozen=True)
class Check:
    """One line of ``doctor``."""

    name: str
    """What was checked."""
    ok: bool | None
    """True: passed, False: failed, None: skipped."""
    detail: str
    """What was found."""
    fix: str = ""
    """How to fix a failure."""

    @property
    def label(self) -> str:
        return {True: "OK", False: "FAIL", None: "SKIP"}[self.ok]


@dataclass(frozen=True)
class DoctorOptions:
    """What ``doctor`` checks."""

    kafka: KafkaSettings
    """The broker."""
    topics: Sequence[TopicSpec]
    """The pipeline's topics."""
    output_dir: str
    """The workers' output folder."""
    gpkg: str
    """The EuroCrops GeoPackage (path or GDAL URL such as ``zip://...``)."""
    layer: str | None = None
    """Its layer (None: the first with EuroCrops columns)."""
    expect_mount: bool = False
    """The output folder must be a mount point (the NFS share)."""
    skip: frozenset[str] = frozenset()
    """Checks not to run: ``broker`` (implies ``topics``), ``topics``, ``output``, ``gpkg``."""
    broker_wait: float = 60.0
    """Seconds to wait for the broker."""


def parse_skip(text: str | None) -> frozenset[str]:
    """``"gpkg, output"`` -> {"gpkg", "output"}; unknown names are an error."""
    names = frozenset(s.strip().lower() for s in (text or "").split(",") if s.strip())
    unknown = names - set(DOCTOR_CHECKS)
    if unknown:
        from .errors import ConfigError

        raise ConfigError(f"--skip {text!r}: unknown check(s) {sorted(unknown)}; "
                          f"choose from {', '.join(DOCTOR_CHECKS)}")
    return names


def doctor(options: DoctorOptions) -> list[Check]:
    """Run every check not skipped; never raises for a failed check (it becomes a FAIL line)."""
    checks: list[Check] = []
    skip = options.skip
    if "broker" in skip:
        checks.append(Check("broker", None, "skipped (--skip broker)"))
        checks.append(Check("topics", None, "skipped (--skip broker)"))
    else:
        checks += _check_broker_and_topics(options)
    if "output" in skip:
        checks.append(Check("output-dir", None, "skipped (--skip output)"))
    else:
        checks += _check_output(options.output_dir, options.expect_mount)
    if "gpkg" in skip:
        checks.append(Check("gpkg", None, "skipped (--skip gpkg)"))
    else:
        checks.append(_check_gpkg(options.gpkg, options.layer))
    for check in checks:
        log.debug("doctor %s %s: %s", check.label, check.name, check.detail)
    return checks


def _check_broker_and_topics(options: DoctorOptions) -> list[Check]:
    servers = options.kafka.bootstrap_servers
    try:
        admin = open_admin(options.kafka, options.broker_wait)
    except CropChipsError as exc:
        cause = exc.__cause__.__class__.__name__ if exc.__cause__ else exc.__class__.__name__
        return [Check("broker", False, f"not reachable at {servers} within {options.broker_wait:g} s ({cause})",
                      "check --bootstrap-servers / CROPCHIPS_BOOTSTRAP_SERVERS, that the broker runs (`docker compose "
                      "ps` on the master), the firewall (`sudo ufw allow 9092/tcp`) and, for TLS/SASL, the security "
                      "options; raise --broker-wait if it is still starting"),
                Check("topics", None, "skipped (broker not reachable)")]
    try:
        try:
            counts = _partition_counts(admin, None)
        except KafkaError as exc:
            return [Check("broker", False, f"reachable at {servers} but metadata requests fail: {exc}",
                          "check the broker's health and the client's permissions (ACLs)")]
        try:
            nodes = f" ({_plural(len(admin.describe_cluster().get('brokers') or []), 'broker')})"
        except KafkaError:  # DescribeCluster is Kafka 2.8+: the count is a nicety
            nodes = ""
    finally:
        admin.close()
    checks = [Check("broker", True, f"reachable at {servers}{nodes}")]
    if "topics" in options.skip:
        return checks + [Check("topics", None, "skipped (--skip topics)")]
    create = "run `admin.py topics create` (master.py and worker.py also create missing topics)"
    for spec in options.topics:
        name = f"topic {spec.name}"
        have = counts.get(spec.name)
        if have is None:
            checks.append(Check(name, False, "missing", create))
        elif spec.role == "tasks":
            ok = have >= 1
            checks.append(Check(name, ok, f"{_plural(have, 'partition')}: at most {have} workers busy at once",
                                "" if ok else "recreate it: `admin.py topics reset --yes`"))
        elif spec.role == "results" and have != 1:
            checks.append(Check(name, False, f"{have} partitions; it must have 1 (the monitor relies on one order)",
                                f"recreate it with 1 partition (it holds the results: save them first), "
                                f"e.g. `rpk topic delete {spec.name}` then `admin.py topics create`"))
        else:
            checks.append(Check(name, True, _plural(have, "partition")))
    return checks


def _check_output(output_dir: str, expect_mount: bool) -> list[Check]:
    if "://" in output_dir and not output_dir.startswith("file://"):
        return _check_object_store(output_dir)
    path = Path(output_dir)
    mount_fix = "mount the share: `sudo ./mount_worker_nfs.sh --master-ip <master> --persist`, or pass --output-dir"
    if not path.exists():
        return [Check("output-dir", False, f"{path} does not exist",
                      mount_fix if expect_mount else f"create it (`mkdir -p {path}`) or pass --output-dir")]
    if not path.is_dir():
        return [Check("output-dir", False, f"{path} is not a folder", "pass --output-dir with a folder")]
    checks = [Check("output-dir", True, f"{path} exists")]
    if expect_mount:
        mounted = os.path.ismount(path)
        checks.append(Check("output-mount", mounted, f"{path} is {'' if mounted else 'not '}a mount point",
                            "" if mounted else mount_fix + " (check with `mountpoint " + str(path) + "`)"))
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cropchips-doctor-", delete=True) as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        checks.append(Check("output-writable", True, f"wrote and deleted a file in {path}"))
    except OSError as exc:
        checks.append(Check("output-writable", False, f"cannot write in {path}: {exc.strerror or exc}",
                            f"give the worker's user write access (`ls -ld {path}`; chown/chmod), and on NFS check the "
                            "export is rw and root_squash/anonuid match (setup_master_nfs.sh)"))
    return checks


def _check_object_store(url: str) -> list[Check]:
    from .errors import ConfigError
    from .storage import open_storage

    fix = ("check the bucket name, AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, "
           "and AWS_ENDPOINT_URL for an S3-compatible server")
    try:
        storage = open_storage(url)
        storage.prepare()
        probe = f".cropchips-doctor-{os.getpid()}"
        storage.write_bytes(probe, b"ok")
        ok = storage.read_bytes(probe) == b"ok"
        storage.delete(probe)
    except ConfigError as exc:
        return [Check("output-dir", False, str(exc), fix)]
    except Exception as exc:  # noqa: BLE001 - any store error is the answer here
        return [Check("output-dir", False, f"{url}: {type(exc).__name__}: {exc}", fix)]
    return [Check("output-dir", ok, f"wrote, read back and deleted an object in {url}", "" if ok else fix)]


def _check_gpkg(gpkg: str, layer: str | None) -> Check:
    from .errors import InputDataError
    from .fields import open_layer  # imports geopandas: only when this check runs

    try:
        info = open_layer(gpkg, layer)
    except InputDataError as exc:
        return Check("gpkg", False, str(exc),
                     "pass --gpkg (or CROPCHIPS_GPKG) with a readable EuroCrops GeoPackage; on workers it is the "
                     "NFS copy, so check the mount (`mountpoint /mnt/mimmo`) and the file's permissions")
    count = f"{info.feature_count} features" if info.feature_count >= 0 else "features: unknown"
    return Check("gpkg", True,
                 f"{gpkg} layer {info.layer!r}: {', '.join(info.columns)}, {count}, {info.crs.to_string()}")


# --------------------------------------------------------------------------- formatting


def format_created(states: Sequence[TopicState]) -> str:
    lines = []
    width = max((len(s.name) for s in states), default=0)
    for s in states:
        note = f"  (wanted {s.wanted}: recreate it with `admin.py topics reset` to change)" if s.mismatch else ""
        verb = "created" if s.created else "exists"
        lines.append(f"{verb:8} {s.name:{width}}  {_plural(s.partitions, 'partition')}{note}")
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


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


def format_group(report: GroupReport) -> str:
    lines = [f"GROUP      {report.group_id}", f"STATE      {report.state or 'unknown'}"]
    if report.members is None:
        lines.append(f"MEMBERS    unknown: {report.members_note}")
    else:
        note = f"  ({report.members_note})" if report.members_note else ""
        lines.append(f"MEMBERS    {len(report.members)}{note}")
        if report.members:
            lines.append(f"  {'CLIENT-ID':24} {'HOST':18} {'PARTITIONS':12} MEMBER-ID")
            for m in report.members:
                parts = "?" if m.partitions is None else (",".join(map(str, m.partitions)) or "-")
                lines.append(f"  {m.client_id or '?':24} {m.host or '?':18} {parts:12} {m.member_id}")
    lines.append(f"TOPIC      {report.topic}")
    lines.append(f"  {'PARTITION':>9} {'COMMITTED':>10} {'END':>8} {'LAG':>8}")
    for p in report.partitions:
        committed = "-" if p.committed is None else str(p.committed)
        lines.append(f"  {p.partition:>9} {committed:>10} {p.end:>8} {p.lag:>8}")
    lines.append(f"TOTAL LAG  {report.total_lag}")
    return "\n".join(lines)


def format_result(line: ResultLine) -> str:
    error = "" if not line.error else f"  error={_one_line(line.error, 200)}"
    reused = " (reused)" if line.reused else ""
    return (f"{line.time}  {line.task_id}  {line.status:9}  worker={line.worker}  chips={line.chips}{reused}"
            f"{error}")


def format_dead_letter(letter: DeadLetter) -> str:
    return (f"{letter.time}  key={letter.key or '-'}  worker={letter.worker or '-'}  source={letter.source or '-'}\n"
            f"    error: {_one_line(letter.error or '-', 500)}\n"
            f"    value: {letter.preview} ({letter.size} bytes)")


def format_check(check: Check) -> str:
    line = f"{check.label:4}  {check.name:28}  {check.detail}"
    if check.ok is False and check.fix:
        line += f"\n      fix: {check.fix}"
    return line


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."
