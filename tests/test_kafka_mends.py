"""The mends of kafka-python 3.0.12 in :mod:`cropchips.queue.kafka`, each shown on the real broker.

Each test drives the library into the state its mend is for; without the mend it fails.
"""

from __future__ import annotations

import time

from kafka import TopicPartition

from cropchips.queue.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer


def _records(consumer, seconds: float) -> list[tuple[int, int]]:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += [(r.partition, r.offset) for recs in consumer.poll(timeout_ms=100).values() for r in recs]
    return got


def test_a_resumed_partition_gets_the_records_fetched_for_it_before_it_was_paused(broker, topics):
    # kafka-python parks what it fetched for a partition that is paused, and hands it out on
    # resume only if its in-line slot is None; a drained slot (every record of A taken) kept
    # B's parked records, and B out of every fetch, for good.
    settings = KafkaSettings(broker.bootstrap_servers)
    topic = topics["tasks"] + "-two"
    ensure_topics(settings, {topic: 2})
    producer = make_producer(settings, linger_ms=0)
    producer.send(topic, value=b"a0", partition=0).get(timeout=10)
    for i in range(5):
        producer.send(topic, value=b"b%d" % i, partition=1).get(timeout=10)
    producer.close()
    consumer = make_consumer(settings, group_id=None, max_poll_records=1)
    try:
        a, b = TopicPartition(topic, 0), TopicPartition(topic, 1)
        consumer.assign([a, b])
        consumer.seek_to_beginning(a, b)
        consumer.pause(a)
        first: list = []
        deadline = time.monotonic() + 30
        while not first:  # one record a poll: stop at the first
            assert time.monotonic() < deadline, "nothing fetched from B"
            first = [(r.partition, r.offset) for recs in consumer.poll(timeout_ms=100).values() for r in recs]
        assert first == [(1, 0)]  # the rest of B's fetched batch waits in the fetcher
        consumer.pause(b)
        consumer.resume(a)
        assert _records(consumer, 1.5) == [(0, 0)]  # B's records parked; A taken to its end
        consumer.pause(a)
        consumer.resume(b)
        assert _records(consumer, 3.0) == [(1, 1), (1, 2), (1, 3), (1, 4)]
    finally:
        consumer.close()


def test_a_join_round_that_ends_between_two_polls_gives_its_assignment(broker, topics):
    # kafka-python 3.0.12 runs JoinGroup/SyncGroup on its network thread; a poll that times
    # out leaves the round running there, and the next poll, finding it done, sent a new
    # JoinGroup instead of taking the assignment (a member then sat seconds with nothing, and
    # on Tansu sometimes held its partitions without ever fetching from them).
    consumer = make_consumer(KafkaSettings(broker.bootstrap_servers), group_id=topics["group"],
                             session_timeout_ms=6000, heartbeat_interval_ms=1000)
    try:
        consumer.subscribe([topics["tasks"]])
        rounds: list = [None]
        coordinator = consumer._coordinator
        deadline = time.monotonic() + 30
        while True:
            # Zero-timeout polls until one has sent a JoinGroup, then none while the round runs.
            while coordinator._join_task is None or coordinator._join_task is rounds[-1]:
                assert consumer.poll(timeout_ms=0) == {}
                assert time.monotonic() < deadline, "no join round started"
                time.sleep(0.05)
            rounds.append(coordinator._join_task)
            while not rounds[-1].is_done:
                assert time.monotonic() < deadline, "the join round never ended"
                time.sleep(0.05)
            if rounds[-1].exception is None:
                break
            # The broker's first answer asks for the member id it gives (KIP-394): a new round.
            assert type(rounds[-1].exception).__name__ == "MemberIdRequiredError", rounds[-1].exception
        assert consumer.assignment() == set()  # nobody has taken the round's result yet
        consumer.poll(timeout_ms=0)  # no wait at all: only the finished round can assign
        assert {tp.partition for tp in consumer.assignment()} == set(range(10))
        assert coordinator._join_task is None and not coordinator.need_rejoin()
    finally:
        consumer.close()
