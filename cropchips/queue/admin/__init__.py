"""Topic, consumer-group, results and dead-letter administration for any Kafka-protocol broker.

The seed ran ``docker exec redpanda rpk ...`` for these jobs; this package does them with
the Kafka protocol, so they work the same against Redpanda, Apache Kafka and the embedded
Tansu broker. One module a job: ``topics``, ``groups``, ``inspect`` (results tail, dead-letter
listing), ``replay`` (dead-letter replay) and ``checks`` (``doctor``); the broker differences
each handles are in its docstring.

Nothing here prints: functions return dataclasses and ``format_*`` helpers render them;
the ``admin.py`` script prints.
"""

from cropchips.queue.admin._client import READ_TIMEOUT_S, PartitionOffsets, open_admin, partition_offsets
from cropchips.queue.admin.checks import _check_output  # noqa: F401 - tests/test_storage.py imports it from here
from cropchips.queue.admin.checks import DOCTOR_CHECKS, Check, DoctorOptions, doctor, format_check, parse_skip
from cropchips.queue.admin.groups import GroupReport, Member, PartitionLag, describe_group, format_group
from cropchips.queue.admin.inspect import DeadLetter, ResultLine, dead_letters, format_dead_letter, format_result, read_all, tail_results
from cropchips.queue.admin.replay import Replay, format_replay, parse_offsets, replay_dead_letters
from cropchips.queue.admin.topics import (
    TOPIC_CHANGE_TIMEOUT_S,
    ResetReport,
    TopicInfo,
    TopicSpec,
    TopicState,
    create_topics,
    format_created,
    format_topic_list,
    list_topics,
    pipeline_topics,
    reset_topic,
)

__all__ = [
    "DOCTOR_CHECKS", "READ_TIMEOUT_S", "TOPIC_CHANGE_TIMEOUT_S",
    "Check", "DeadLetter", "DoctorOptions", "GroupReport", "Member", "PartitionLag", "PartitionOffsets",
    "Replay", "ResetReport", "ResultLine", "TopicInfo", "TopicSpec", "TopicState",
    "create_topics", "dead_letters", "describe_group", "doctor", "format_check", "format_created",
    "format_dead_letter", "format_group", "format_replay", "format_result", "format_topic_list", "list_topics",
    "open_admin", "parse_offsets", "parse_skip", "partition_offsets", "pipeline_topics", "read_all",
    "replay_dead_letters", "reset_topic", "tail_results",
]
