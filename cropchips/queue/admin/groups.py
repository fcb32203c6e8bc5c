"""Describe a consumer group: members, and committed offset, end and lag per partition.

kafka-python 3.0.12's ``describe_groups`` raises ``ValueError: 15 is not a valid
ACLOperation`` on Tansu (it sets all 32 authorized-operation bits); we never use those bits,
so :class:`cropchips.queue.kafka._AdminClient` drops them. Tansu reports members without client
id, host or assignment; what a broker does not say is shown as unknown, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import KafkaError

from cropchips.errors import BrokerError
from cropchips.queue.kafka import KafkaSettings
from cropchips.queue.admin._client import _partition_counts, open_admin, partition_offsets


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
