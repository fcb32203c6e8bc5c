"""Hostile and oversize messages: nothing a topic holds can stop a worker or the monitor, or stall the fleet."""

from __future__ import annotations

import json
import threading

import pytest

from cropchips.errors import MessageError
from cropchips.queue.kafka import KafkaSettings, is_retriable, read_topic
from cropchips.spec import DatasetSpec
from cropchips.queue.messages import Cell, ChipRecord, Result, RunHeader, Task, compact_chip, decode, encode
from cropchips.queue.monitor import Monitor
from cropchips.processing import utc_now
from cropchips.queue.consumer import Worker, WorkerOptions
from helpers import send_records

DEEP = b"[" * 200_000 + b"]" * 200_000
HUGE_INT = b'{"type": "task", "schema_version": 3, "run_id": "r", "task_id": "t", "cell": {"id": "c", "row": ' \
    + b"9" * 5000 + b', "col": 0, "bbox": [0, 0, 1, 1]}, "scenes": []}'


def task(i, run_id="run-h"):
    cell = Cell(id=f"cell-{i}", row=0, col=i, bbox=(0.0 + i, 0.0, 0.5 + i, 0.5))
    return Task(run_id=run_id, task_id=Task.make_id(cell, []), cell=cell, scenes=(), spec=DatasetSpec())


def hostile_variants() -> dict[str, bytes]:
    """Messages that crash a naive reader: each must be a MessageError, nothing else."""
    good = json.loads(encode(task(0)))

    def variant(change):
        body = json.loads(json.dumps(good))
        change(body)
        return json.dumps(body).encode()

    return {
        "deep nesting": DEEP,
        "deep nesting in a field": b'{"type": "task", "schema_version": 3, "cell": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "5000-digit integer": HUGE_INT,
        "huge float": variant(lambda b: b["cell"].update(bbox=[0, 0, 1e400, 1])),
        "bbox of strings": variant(lambda b: b["cell"].update(bbox=["a", "b", "c", "d"])),
        "bbox a number": variant(lambda b: b["cell"].update(bbox=5)),
        "scenes an object": variant(lambda b: b.update(scenes={"x": 1})),
        "scene a string": variant(lambda b: b.update(scenes=["x"])),
        "cell a list": variant(lambda b: b.update(cell=[1, 2])),
        "id a number": variant(lambda b: b.update(task_id=12)),
        "nul bytes": b"\x00\x01\x02",
        "lone surrogate": b'{"type": "task", "schema_version": 3, "run_id": "\\ud800"}',
        "invalid utf-8": b'{"type": "\xff\xfe"}',
        "array": b"[1, 2, 3]",
        "string": b'"task"',
    }


@pytest.mark.parametrize("name", list(hostile_variants()))
def test_every_hostile_message_is_a_message_error(name):
    raw = hostile_variants()[name]
    with pytest.raises(MessageError):
        decode(raw)


def test_hostile_results_are_message_errors_too():
    good = json.loads(encode(Result(run_id="r", task_id="t", cell_id="c", worker_id="w", status="ok")))
    for change in (lambda b: b.update(seconds={"total": "slow"}), lambda b: b.update(seconds=[1]),
                   lambda b: b.update(chips_skipped={"x": "many"}), lambda b: b.update(deliveries=0),
                   lambda b: b.update(worker_id=None), lambda b: b.update(chips=[{"name": "x"}]),
                   lambda b: b.update(chips="abc"), lambda b: b.update(scenes_used=[1, 2])):
        body = json.loads(json.dumps(good))
        change(body)
        with pytest.raises(MessageError):
            decode(json.dumps(body).encode())
    chip = {"name": "n", "image": "i", "mask": "m", "crs": "EPSG:32630", "bounds": [0, 0, 1, 1],
            "class_pixels": {"abc": 1}}
    body = json.loads(json.dumps(good))
    body["chips"] = [chip]
    with pytest.raises(MessageError, match="class_pixels"):
        decode(json.dumps(body).encode())


def test_a_message_over_the_size_bound_is_refused_before_parsing():
    with pytest.raises(MessageError, match="larger than"):
        decode(b" " * (16 * 1024 * 1024 + 1))


def test_a_result_carries_scene_ids_once_not_each_chips_provenance():
    scenes = tuple({"id": f"S2A_30STG_2023051{i % 10}_0_L2A_{i}", "datetime": "2023-05-10T11:00:00Z",
                    "collection": "sentinel-2-l2a",
                    "item_href": f"https://earth-search.aws.element84.com/v1/collections/sentinel-2-l2a/items/"
                                 f"S2A_30STG_2023051{i % 10}_0_L2A_{i}",
                    "processing_baseline": "05.09", "published_offset": -0.1, "offset_dn": 1000,
                    "applied_dn": 1000} for i in range(100))
    chips = tuple(ChipRecord(name=f"c-chip{k:02d}", image=f"images/c-chip{k:02d}.tif", mask=f"masks/c-chip{k:02d}.tif",
                             crs="EPSG:32630", bounds=(0, 0, 2560, 2560), class_pixels={"0": 100, "3": 50},
                             scenes=scenes, dataset_id="0123456789ab") for k in range(30))
    full = Result(run_id="r", task_id="t", cell_id="c", worker_id="w", status="ok", chips=chips,
                  scenes_used=tuple(s["id"] for s in scenes))
    compact = Result(run_id="r", task_id="t", cell_id="c", worker_id="w", status="ok",
                     chips=tuple(map(compact_chip, chips)), scenes_used=tuple(s["id"] for s in scenes))
    assert len(encode(full)) > 900_000  # what results were: about the brokers' 1 MiB default limit
    assert len(encode(compact)) < 30_000
    assert decode(encode(compact)).chips[3].class_pixels == {"0": 100, "3": 50}


def test_kafka_errors_are_sorted_into_retriable_and_final():
    from kafka import errors

    assert not is_retriable(errors.MessageSizeTooLargeError())
    assert not is_retriable(errors.TopicAuthorizationFailedError())
    assert is_retriable(errors.KafkaTimeoutError())
    assert is_retriable(errors.LeaderNotAvailableError())
    assert is_retriable(errors.NotLeaderForPartitionError())
    assert is_retriable(errors.KafkaConnectionError())


class Scripted:
    """Stands in for the raster work (not for Kafka): fast, and can misbehave on chosen tasks."""

    def __init__(self, misbehave=None):
        self.worker_id = f"scripted-{id(self)}"
        self.calls: list[str] = []
        self.misbehave = misbehave or {}

    def process(self, t: Task) -> Result:
        self.calls.append(t.task_id)
        action = self.misbehave.get(t.cell.id)
        if action == "raise":
            raise ZeroDivisionError("a bug that escaped process()")
        if action == "huge":
            return Result(run_id=t.run_id, task_id=t.task_id, cell_id=t.cell.id, worker_id=self.worker_id,
                          status="ok", chips=tuple(ChipRecord(name=f"x{k}", image="images/x.tif", mask="masks/x.tif",
                                                              crs="EPSG:32630", bounds=(0, 0, 1, 1),
                                                              class_pixels={str(c): 1 for c in range(100)})
                                                   for k in range(2000)), finished_at=utc_now())
        return Result(run_id=t.run_id, task_id=t.task_id, cell_id=t.cell.id, worker_id=self.worker_id,
                      status="no_fields", error="scripted", finished_at=utc_now())


def options(broker, topics, **over):
    base = dict(kafka=KafkaSettings(broker.bootstrap_servers), tasks_topic=topics["tasks"],
                results_topic=topics["results"], dlq_topic=topics["dlq"], group_id=topics["group"], burst=True,
                burst_idle_s=3.0, session_timeout_ms=3000)
    base.update(over)
    return WorkerOptions(**base)


def publish(broker, topic, values):
    send_records(broker.bootstrap_servers, topic, values, max_request_size=32 * 1024 * 1024)


def run_worker(worker: Worker, timeout: float = 120.0) -> None:
    """Run in a thread so that a worker stuck retrying fails the test instead of hanging it."""
    errors: list[BaseException] = []

    def body():
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the worker is stuck (retrying something that can never succeed?)"
    if errors:
        raise errors[0]


def test_no_message_kills_the_worker_and_every_offset_is_committed(broker, topics):
    good = [task(i) for i in range(3)]
    hostile = list(hostile_variants().values())
    publish(broker, topics["tasks"], [encode(good[0]), *hostile[:8], encode(good[1]), *hostile[8:], encode(good[2]),
                                      encode(task(7, "run-bug")), encode(task(8, "run-big"))])
    processor = Scripted({"cell-7": "raise", "cell-8": "huge"})
    worker = Worker(options(broker, topics, publish_retry_s=600.0), processor)
    run_worker(worker)
    # The valid tasks were processed, each once; poison never reached the processor.
    assert sorted(processor.calls) == sorted([t.task_id for t in good] + [task(7).task_id, task(8).task_id])
    kafka = KafkaSettings(broker.bootstrap_servers)
    dead = read_topic(kafka, topics["dlq"])
    reasons = [dict(r.headers)["error"].decode() for r in dead]
    assert len(dead) == len(hostile) + 2, reasons
    assert any("nested too deeply" in r for r in reasons)
    assert any("ZeroDivisionError" in r and "internal error" in r for r in reasons)
    assert any("could not be published" in r and "MessageSizeTooLargeError" in r for r in reasons)
    results = [decode(r.value) for r in read_topic(kafka, topics["results"])]
    assert sorted(r.status for r in results).count("no_fields") == 3
    assert worker.summary.dead_lettered == len(hostile) + 2
    # Every offset was committed: another worker of the group finds nothing to do.
    again = Scripted()
    run_worker(Worker(options(broker, topics), again))
    assert again.calls == []


def test_the_monitor_survives_hostile_messages_on_the_results_topic(broker, topics):
    header = RunHeader(run_id="run-mon", task_count=2, created_at="x")
    ok = Result(run_id="run-mon", task_id="a", cell_id="a", worker_id="1@h", status="ok", seconds={"total": 1.0})
    bad_pixels = json.loads(encode(ok))
    bad_pixels["chips"] = [{"name": "n", "image": "i", "mask": "m", "crs": "EPSG:32630", "bounds": [0, 0, 1, 1],
                            "class_pixels": {"zz": 1}}]
    bad_seconds = json.loads(encode(ok))
    bad_seconds["seconds"] = {"total": "slow"}
    values = [encode(header), *hostile_variants().values(), json.dumps(bad_pixels).encode(),
              json.dumps(bad_seconds).encode(), encode(task(1)), encode(ok),
              encode(Result(run_id="run-mon", task_id="b", cell_id="b", worker_id="1@h", status="no_fields"))]
    publish(broker, topics["results"], values)
    monitor = Monitor(KafkaSettings(broker.bootstrap_servers), topics["results"], run_id="run-mon")
    progress = monitor.follow(exit_when_done=True, timeout_s=60, show_progress=False)
    assert progress.complete() and progress.statuses() == {"ok": 1, "no_fields": 1}
    assert monitor.invalid == len(hostile_variants()) + 3
    summary = progress.summary(1.0)
    assert summary["tasks_done"] == 2 and summary["failures"] == {}


def test_a_dead_letter_too_large_for_the_broker_keeps_its_start(broker, topics):
    """An original message that the dead-letter producer cannot send whole is kept truncated, with its size."""
    body = json.loads(encode(task(0)))
    body["padding"] = "x" * 1_200_000  # an unknown field: invalid, and over the 1 MiB producer limit
    raw = json.dumps(body).encode()
    publish(broker, topics["tasks"], [raw, encode(task(1))])
    processor = Scripted()
    run_worker(Worker(options(broker, topics), processor))
    assert processor.calls == [task(1).task_id]
    dead = read_topic(KafkaSettings(broker.bootstrap_servers), topics["dlq"])
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers["truncated"] == str(len(raw)).encode() and raw.startswith(dead[0].value)
    assert len(dead[0].value) == 64 * 1024 and b"unknown fields" in headers["error"]
