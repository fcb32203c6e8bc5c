"""Publishing a plan: the tasks spread over the tasks topic's partitions, then the run header.

With ``grid`` partitioning the cells go to the partitions in runs of a Hilbert curve, so that each
worker of the consumer group gets a compact region of cells that share COG tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kafka.errors import KafkaError

from cropchips.errors import BrokerError
from cropchips.plan.plan import MasterOptions, Plan, check_task_sizes, record_params
from cropchips.queue.kafka import ensure_topics, is_retriable, make_producer
from cropchips.queue.messages import Task, encode

log = logging.getLogger(__name__)


#: Values of ``--task-partitioning``.
TASK_PARTITIONINGS = ("grid", "hash")


def hilbert_index(col: int, row: int, side: int) -> int:
    """Position of cell (col, row) along the Hilbert curve that fills a ``side`` x ``side`` square
    (``side`` a power of two): cells close on the curve are close in the grid."""
    index = 0
    s = side // 2
    while s:
        rx, ry = int(col & s > 0), int(row & s > 0)
        index += s * s * ((3 * rx) ^ ry)
        if ry == 0:  # rotate the quadrant so that the curve stays continuous
            if rx == 1:
                col, row = side - 1 - col, side - 1 - row
            col, row = row, col
        s //= 2
    return index


def grid_order(tasks: Sequence[Task], partitions: int) -> list[tuple[Task, int]]:
    """The tasks in Hilbert-curve order of their cells, each with its partition index under
    ``grid`` partitioning: the curve cut into ``partitions`` runs of equal length (±1 task).

    Each partition thus holds a compact patch of neighbouring cells, in curve order, and the
    consumer group's range assignor hands each worker a run of consecutive partitions: a compact
    region. Neighbouring cells share the scenes' 1024 px tiles (one spans about 2 x 2 cells of
    0.05 deg at 10 m), which a worker then fetches and decodes once, from its tile cache, instead
    of in several processes; and the tasks spread evenly, unlike the hash of the cell ids. The
    same plan always gets the same partitions (a re-published plan queues behind its earlier copy).
    """
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    side = 1
    while side <= max((max(t.cell.col, t.cell.row) for t in tasks), default=0):
        side *= 2
    ordered = sorted(tasks, key=lambda t: (hilbert_index(t.cell.col, t.cell.row, side), t.cell.id))
    return [(task, i * partitions // len(ordered)) for i, task in enumerate(ordered)]


def publish(plan: Plan, options: MasterOptions) -> None:
    """Publish every task (acks=all), then the run header; raise BrokerError if any send failed."""
    ensure_topics(options.kafka, {options.tasks_topic: options.tasks_partitions, options.results_topic: 1,
                                  options.dlq_topic: 1}, wait=options.broker_wait_s, retention_ms=options.retention_ms)
    if options.task_partitioning not in TASK_PARTITIONINGS:
        raise ValueError(f"task_partitioning must be one of {TASK_PARTITIONINGS}, got {options.task_partitioning!r}")
    check_task_sizes(plan.tasks, options.max_task_bytes)
    # The producer's own limit is kafka-python's 1 MiB unless the tasks may be larger.
    producer = make_producer(options.kafka, wait=options.broker_wait_s,
                             max_request_size=max(1_048_576, options.max_task_bytes + 65_536))
    failures = []
    try:
        # The topic may exist with another partition count than --tasks-partitions: use its own.
        ids = sorted(producer.partitions_for(options.tasks_topic) or ()) if options.task_partitioning == "grid" else []

        placed = ([(task, ids[i]) for task, i in grid_order(plan.tasks, len(ids))] if ids
                  else [(task, None) for task in plan.tasks])
        # The key stays the cell id either way (tracing, and the hash partitioning).
        futures = []
        for task, partition in placed:
            try:
                futures.append((task, producer.send(options.tasks_topic, key=task.cell.id.encode(),
                                                    value=encode(task), partition=partition)))
            except KafkaError as exc:
                failures.append(f"{task.task_id}: {type(exc).__name__}: {exc}")
                if not is_retriable(exc):
                    break  # the same refusal would repeat for every task: stop here
        producer.flush(timeout=60)
        for task, future in futures:
            try:
                future.get(timeout=30)
            except Exception as exc:
                failures.append(f"{task.task_id}: {type(exc).__name__}: {exc}")
        if failures:
            for line in failures[:20]:
                log.error("send failed: %s", line)
            raise BrokerError(f"{len(failures)} of {len(plan.tasks)} tasks were not acknowledged by the broker; "
                              "re-run the master (task ids are stable, finished cells are skipped)")
        producer.send(options.results_topic, key=plan.run_id.encode(),
                      value=encode(plan.header(record_params(options, plan)))).get(timeout=30)
    finally:
        producer.close(timeout=10)
    log.info("published %d tasks to %s and the run header %s to %s", len(plan.tasks), options.tasks_topic,
             plan.run_id, options.results_topic)
