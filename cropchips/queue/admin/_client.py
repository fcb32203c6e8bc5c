"""Broker look-ups shared by the admin modules: admin client, partition counts, partition offsets.

"Latest offset" look-ups (ListOffsets -1, ``end_offsets()``, ``seek_to_end()``) are wrong on
Tansu: they return the start of the last batch. End offsets are therefore taken from the high
watermark that every fetch response carries (``consumer.highwater(tp)``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kafka import KafkaAdminClient, TopicPartition

from cropchips.errors import BrokerError
from cropchips.queue.kafka import KafkaSettings, admin_client, make_consumer

#: Seconds to spend reading a topic (or fetching its high watermarks) before giving up.
READ_TIMEOUT_S = 60.0


def open_admin(settings: KafkaSettings, wait: float) -> KafkaAdminClient:
    """An admin client (see :func:`cropchips.queue.kafka.admin_client`)."""
    return admin_client(settings, wait)


def _partition_counts(admin: KafkaAdminClient, names: Sequence[str] | None) -> dict[str, int]:
    """Topic -> partition count for the topics that exist (all topics when ``names`` is None)."""
    described = admin.describe_topics(list(names) if names is not None else None)
    return {t["name"]: len(t.get("partitions") or []) for t in described
            if t.get("error_code", 0) == 0 and not t.get("is_internal")}


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
