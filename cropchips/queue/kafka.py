"""Kafka plumbing: connection settings, waiting for the broker, topics, producers and consumers.

Works against any Kafka-protocol broker (Redpanda, Apache Kafka, the embedded Tansu).
Known broker differences are handled here, in one place (see docs in the README):

* Touching an unknown topic may auto-create it with the wrong partition count, so
  topics are created explicitly before any producer or consumer uses them, and
  consumers never auto-create.
* Some brokers answer "latest offset" look-ups wrongly; nothing here relies on them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from cropchips.errors import BrokerError, ConfigError
from cropchips.retry import BROKER, retry

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach the broker."""

    bootstrap_servers: str
    """Comma-separated host:port list."""
    client_id: str = "cropchips"
    """Client id shown in broker logs."""
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """Further kafka-python client settings (security, timeouts); may hold a secret, so never shown."""

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    def client_config(self) -> dict[str, Any]:
        return {"bootstrap_servers": self.servers, "client_id": self.client_id, **self.extra}


#: ``retention.ms`` of the topics the pipeline creates: -1 keeps every record until it is deleted
#: (Redpanda and Kafka otherwise drop tasks still queued after 7 days).
DEFAULT_RETENTION_MS = -1

#: Errors that fail the same way however often they are retried: a record over the size limit, a
#: topic the client may not use, a bad configuration. Everything else from kafka-python that says
#: ``retriable``, and every connection failure, is worth another try.
_FINAL_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(kafka_errors, name) for name in (
        "MessageSizeTooLargeError", "RecordTooLargeError", "RecordBatchTooLargeError", "InvalidTopicError",
        "TopicAuthorizationFailedError", "ClusterAuthorizationFailedError", "GroupAuthorizationFailedError",
        "TransactionalIdAuthorizationFailedError", "SaslAuthenticationFailedError", "AuthenticationFailedError",
        "IllegalArgumentError", "KafkaConfigurationError", "UnsupportedVersionError", "InvalidRecordError",
        "CorruptRecordError", "UnsupportedForMessageFormatError", "InvalidRequiredAcksError",
    ) if hasattr(kafka_errors, name))
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(kafka_errors, name) for name in (
        "KafkaTimeoutError", "BrokerNotAvailableError", "KafkaConnectionError", "NodeNotReadyError",
        "RequestTimedOutError", "NotEnoughReplicasError", "NotEnoughReplicasAfterAppendError",
    ) if hasattr(kafka_errors, name))


def is_retriable(exc: BaseException) -> bool:
    """True when a failed Kafka call may succeed if tried again (broker down, leader moving,
    timeout); False for errors that never will (record too large, not authorised)."""
    if isinstance(exc, _FINAL_ERRORS):
        return False
    if isinstance(exc, _TRANSIENT_ERRORS) or isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return bool(getattr(exc, "retriable", False))


def topic_configs(retention_ms: int = DEFAULT_RETENTION_MS) -> dict[str, str]:
    """Topic settings the pipeline sets when it creates a topic."""
    if retention_ms < -1 or retention_ms == 0:
        raise ValueError(f"retention must be -1 (keep forever) or a positive number of ms, got {retention_ms}")
    return {"retention.ms": str(retention_ms)}


def connect(factory: Callable[..., T], settings: KafkaSettings, wait: float) -> T:
    """Call ``factory(bootstrap_timeout_ms=...)`` until the broker answers, with logged backoff
    (:data:`~cropchips.retry.BROKER`).

    Gives up after ``wait`` seconds with a BrokerError that says what to check.
    """
    deadline = time.monotonic() + wait

    def attempt() -> T:
        # Each attempt is bounded so the total stays near ``wait`` (kafka-python's own default is 30 s).
        return factory(bootstrap_timeout_ms=int(1000 * min(10.0, max(1.0, deadline - time.monotonic()))))

    def transient(exc: BaseException) -> bool:
        return isinstance(exc, (KafkaError, OSError)) and not isinstance(exc, kafka_errors.KafkaConfigurationError)

    def report(exc: BaseException, attempt_number: int, delay: float) -> None:
        log.warning("broker %s not reachable (%s); retrying in %.1f s", settings.bootstrap_servers,
                    exc.__class__.__name__, delay)

    try:
        return retry(attempt, f"connecting to {settings.bootstrap_servers}", transient=transient, deadline=deadline,
                     backoff=BROKER, on_retry=report)
    except kafka_errors.KafkaConfigurationError as exc:
        raise ConfigError(f"invalid Kafka client settings: {exc}") from None  # no wait fixes that
    except (KafkaError, OSError) as exc:
        raise BrokerError(
            f"cannot reach the Kafka broker at {settings.bootstrap_servers} ({exc.__class__.__name__}); "
            "check --bootstrap-servers, that the broker runs, and the firewall (port 9092)") from exc


class _AdminClient(KafkaAdminClient):
    """KafkaAdminClient that ignores the authorized-operations bit set of a description.

    kafka-python 3.0.12 converts the bits into ``ACLOperation`` enums and raises
    ``ValueError`` on a bit it does not know (Tansu sets all 32). We never use them.
    """

    def _process_acl_operations(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj.pop("authorized_operations", None)
        return obj


def admin_client(settings: KafkaSettings, wait: float = 60.0) -> KafkaAdminClient:
    """An admin client, retrying with backoff until the broker answers or ``wait`` runs out."""
    return connect(lambda **kw: _AdminClient(**settings.client_config(), request_timeout_ms=10000, **kw),
                   settings, wait)


def ensure_topics(settings: KafkaSettings, partitions: Mapping[str, int], wait: float = 60.0,
                  retention_ms: int = DEFAULT_RETENTION_MS) -> list[str]:
    """Create the topics that do not exist yet, with ``retention_ms``; return the ones created.

    Existing topics are left alone (their partition count and settings are not changed).
    """
    configs = topic_configs(retention_ms)
    admin = admin_client(settings, wait)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, num_partitions=n, replication_factor=1, topic_configs=configs)
                   for name, n in partitions.items() if name not in existing]
        created = []
        for topic in missing:
            try:
                admin.create_topics([topic])
                created.append(topic.name)
                log.info("created topic %s with %d partitions", topic.name, topic.num_partitions)
            except TopicAlreadyExistsError:
                pass  # another process created it first: fine
        return created
    finally:
        admin.close()


def check_fast_checksums() -> bool:
    """Warn once if kafka-python computes its record checksums (CRC-32C) in pure Python.

    Every record batch is checksummed when it is written and checked when it is read; kafka-python does
    that in C only when the ``crc32c`` package is installed (it is in requirements.txt). Without it,
    publishing 5000 task messages of 11 KB took 6.1 CPU s instead of 0.9, and reading them back 6.2
    instead of 0.3 (the master, the workers and the monitor all pay it)."""
    global _WARNED_SLOW_CRC
    try:
        from kafka.record import util as record_util
        fast = getattr(record_util, "crc32c_c", None) is not None
    except ImportError:  # another kafka-python layout: nothing to say
        return True
    if not fast and not _WARNED_SLOW_CRC:
        _WARNED_SLOW_CRC = True
        log.warning("kafka-python checks record checksums in pure Python (the crc32c package is not installed): "
                    "publishing and reading tasks costs several times the CPU; run: pip install 'crc32c>=2.3,<3'")
    return fast


_WARNED_SLOW_CRC = False


def make_producer(settings: KafkaSettings, wait: float = 60.0, *, linger_ms: int = 5,
                  **overrides: Any) -> KafkaProducer:
    """A producer that waits for all in-sync replicas (acks=all) and retries sends.

    ``linger_ms``: how long a record waits for others to share its request (the master's tasks);
    0 for a client that sends one record and waits for it (a worker's result)."""
    check_fast_checksums()
    return connect(lambda **kw: KafkaProducer(
        **settings.client_config(),
        **kw,
        **overrides,
        acks="all",
        retries=5,
        linger_ms=linger_ms,
        # One request in flight keeps per-partition order even when a send is retried.
        max_in_flight_requests_per_connection=1,
    ), settings, wait)


def make_consumer(settings: KafkaSettings, *, group_id: str | None, wait: float = 60.0,
                  **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits that never auto-creates topics."""
    check_fast_checksums()
    config: dict[str, Any] = dict(
        **settings.client_config(),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        allow_auto_create_topics=False,
        # kafka-python 3 defaults to a 45 s session (first join ~23 s); 10 s detects a
        # dead worker quickly while tolerating a stalled machine.
        session_timeout_ms=10000,
        heartbeat_interval_ms=1500,
        fetch_max_wait_ms=100,
    )
    config.update(overrides)
    consumer = connect(lambda **kw: KafkaConsumer(**config, **kw), settings, wait)
    hand_out_parked_records(consumer)
    if group_id is not None:
        collect_finished_joins(consumer)
    return consumer


def hand_out_parked_records(consumer: KafkaConsumer) -> bool:
    """Keep a consumer from starving a resumed partition whose fetched records were parked.

    kafka-python 3.0.12 parks the records it fetched for a partition that is then paused, and
    hands them out once it is resumed, but only if its in-line slot (``_next_partition_records``)
    is ``None``. A slot whose records were all taken holds an empty, drained object instead,
    and the parked partition is left out of every fetch while its records are parked: after
    ``pause(A); resume(B)`` nothing of B ever comes again. The worker pauses and resumes
    partitions around every task (:class:`~cropchips.queue.consumer._PartitionFocus`): in
    ``bench.join`` a worker so held 13 tasks of its partitions unrun until it exited. An
    empty slot is cleared before each fetch here; it has nothing to hand out. Returns False
    (and changes nothing) for a kafka-python without that code.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    original = getattr(fetcher, "fetch_records", None)
    if original is None or not hasattr(fetcher, "_next_partition_records") \
            or not hasattr(fetcher, "_paused_partition_records"):
        return False

    def fetch_records(*args: Any, **kwargs: Any) -> Any:
        slot = fetcher._next_partition_records
        if slot is not None and not slot:  # drained: every record taken or dropped
            fetcher._next_partition_records = None
        return original(*args, **kwargs)

    fetcher.fetch_records = fetch_records
    return True


class _FinishedJoin:
    """A join round that ended while no poll waited for it, shown as still under way.

    kafka-python's ``join_group_async`` awaits its own pending join task, but starts a new one
    when it finds it done: a JoinGroup/SyncGroup answered between two polls was thrown away
    with its assignment. Shown as pending, the finished task is awaited (a done future calls
    back at once) and its result taken as if the poll had waited for it.
    """

    is_done = False

    def __init__(self, future: Any):
        self._future = future

    def add_callback(self, fn: Any, *args: Any, **kwargs: Any) -> "_FinishedJoin":
        self._future.add_callback(fn, *args, **kwargs)
        return self

    def add_errback(self, fn: Any, *args: Any, **kwargs: Any) -> "_FinishedJoin":
        self._future.add_errback(fn, *args, **kwargs)
        return self

    def __await__(self) -> Any:
        return self._future.__await__()


def collect_finished_joins(consumer: KafkaConsumer) -> bool:
    """Keep a consumer from throwing away a join round that ended between two polls.

    kafka-python 3.0.12 runs a group's JoinGroup and SyncGroup on its network thread, and a poll
    that times out leaves the round running there; but the next poll, finding it done, sends
    another JoinGroup instead of taking its assignment (``BaseCoordinator.join_group_async``).
    On Tansu each extra round costs the member seconds with no partition, and in 3 of 43
    ``bench.join`` rounds at a 3 s session timeout a member that rejoined so then held its
    partitions without fetching from them until the others exited. Any worker that polls
    with timeouts shorter than a rebalance meets it. Returns False (and changes nothing) for
    a kafka-python without that code.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    original = getattr(coordinator, "join_group_async", None)
    if original is None or not hasattr(coordinator, "_join_task"):
        return False

    async def join_group_async(timeout_ms: Any = None) -> Any:
        task = coordinator._join_task
        if task is not None and not isinstance(task, _FinishedJoin) and task.is_done \
                and task.exception is None:
            # Done but still held: no poll took its assignment (a taken round is set to None).
            # A round that failed is left to kafka-python, which starts another, as it does
            # after a failure it awaited (a timeout of the round itself would otherwise read
            # as the poll's own and be awaited again and again).
            log.debug("collecting a join round of group %s that ended between polls", coordinator.group_id)
            coordinator._join_task = _FinishedJoin(task)
        return await original(timeout_ms)

    coordinator.join_group_async = join_group_async
    return True


def read_topic(settings: KafkaSettings, topic: str, *, idle_s: float = 1.0, timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic`` from the start, until nothing new arrives for ``idle_s``.

    For tests and administration; uses no consumer group and commits nothing.
    """
    from kafka import TopicPartition

    consumer = make_consumer(settings, group_id=None)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            batch = consumer.poll(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
                last = time.monotonic()
        return records
    finally:
        consumer.close()
