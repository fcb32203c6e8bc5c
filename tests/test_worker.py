"""The worker on a real broker: statuses, dead letters, long tasks, and one task per result."""

from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import shared_data
from cropchips.sources.hrefs import HrefPolicy
from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.queue.messages import Cell, Result, Task, decode, encode
from cropchips.processing import TaskProcessor, utc_now
from cropchips.queue.consumer import Worker, WorkerOptions
from cropchips.spec import DatasetSpec
from helpers import SpecProcessor, send_records


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    gpkg = f"zip://{shared_data('eurocrops', 'SI_2021.zip')}"
    local = HrefPolicy(local_dirs=(shared_data("sentinel2").resolve(),))
    return SpecProcessor("t@test", output_dir=tmp_path_factory.mktemp("out"), gpkg=gpkg, resolution=100.0,
                         chip_size=16, hrefs=local)


def task_for(cell, scenes, run_id="run-w"):
    return Task(run_id=run_id, task_id=Task.make_id(cell, scenes), cell=cell, scenes=tuple(scenes), spec=DatasetSpec())


def test_cell_without_scenes_is_no_scenes(processor):
    cell = Cell(id="c-empty", row=0, col=0, bbox=(15.6, 45.95, 15.65, 46.0))
    result = processor.process(task_for(cell, []))
    assert result.status == "no_scenes" and "no sentinel-2-l2a scene covers the cell" in result.error and not result.chips


def test_cell_without_fields_is_no_fields(processor, real_scene):
    # The real scene lies in the Western Sahara desert: the Slovenian parcels are nowhere near.
    cell = Cell(id="c-desert", row=0, col=0, bbox=(-11.6, 24.6, -11.5, 24.7))
    result = processor.process(task_for(cell, [real_scene]))
    assert result.status == "no_fields" and "no field polygon" in result.error


def test_unreadable_scene_fails_with_a_readable_error(processor, real_scene, tmp_path):
    from dataclasses import replace
    options = replace(processor.options, hrefs=HrefPolicy(local_dirs=(tmp_path.resolve(), shared_data("sentinel2").resolve())))
    broken = replace(real_scene, assets={**real_scene.assets, "B02": str(tmp_path / "missing.tif")})
    cell = Cell(id="c-broken", row=0, col=0, bbox=(15.6, 45.95, 15.65, 46.0))
    result = TaskProcessor(options, "t@test").process(processor.task(task_for(cell, [broken])))
    assert result.status == "failed" and "cannot open B02" in result.error and "missing.tif" in result.error


@pytest.mark.parametrize("href, needle", [
    ("/etc/passwd", "outside the allowed folders"),
    ("file:///etc/passwd", "outside the allowed folders"),
    ("https://evil.example.com/B02.tif", "is not allowed"),
    ("http://sentinel-cogs.s3.us-west-2.amazonaws.com/x/B02.tif", "is not allowed"),  # https only
    ("https://sentinel-cogs.s3.us-west-2.amazonaws.com/../../x/B02.tif", "contains '..'"),
])
def test_forbidden_hrefs_fail_before_any_read(processor, real_scene, href, needle):
    from dataclasses import replace
    bad = replace(real_scene, assets={**real_scene.assets, "SCL": href})
    cell = Cell(id="c-evil", row=0, col=0, bbox=(15.6, 45.95, 15.65, 46.0))
    result = processor.process(task_for(cell, [bad]))
    assert result.status == "failed" and needle in result.error


def test_symlink_in_the_local_scenes_dir_cannot_lead_outside(tmp_path):
    allowed = tmp_path / "scenes"
    allowed.mkdir()
    (allowed / "B02.tif").symlink_to("/etc/hostname")
    policy = HrefPolicy(local_dirs=(allowed.resolve(),))
    from cropchips.errors import MessageError
    with pytest.raises(MessageError, match="outside"):
        policy.check(str(allowed / "B02.tif"))
    assert policy.check(str(allowed / "real.tif")) == str((allowed / "real.tif").resolve())
    assert HrefPolicy().check("s3://sentinel-cogs/sentinel-s2-l2a-cogs/x/B02.tif").startswith("s3://")


def test_output_folder_that_is_a_symlink_is_refused(processor, tmp_path):
    from dataclasses import replace
    from cropchips.errors import ConfigError
    (tmp_path / "images").symlink_to("/tmp")
    with pytest.raises(ConfigError, match="symbolic link"):
        TaskProcessor(replace(processor.options, output_dir=tmp_path), "t@test")


class ScriptedProcessor:
    """Stands in for the raster work (not for Kafka): records calls, can be slow."""

    def __init__(self, seconds=0.0):
        self.seconds = seconds
        self.worker_id = f"scripted-{id(self)}"
        self.calls: list[str] = []
        self.threads: list[threading.Thread] = []  # the thread each call ran on (kept: idents are reused)
        self.lock = threading.Lock()

    def process(self, task: Task) -> Result:
        with self.lock:
            self.calls.append(task.task_id)
            self.threads.append(threading.current_thread())
        time.sleep(self.seconds)
        return Result(run_id=task.run_id, task_id=task.task_id, cell_id=task.cell.id, worker_id=self.worker_id,
                      status="no_fields", error="scripted", finished_at=utc_now())


def worker_options(broker, topics, **over):
    base = dict(kafka=KafkaSettings(broker.bootstrap_servers), tasks_topic=topics["tasks"],
                results_topic=topics["results"], dlq_topic=topics["dlq"], group_id=topics["group"], burst=True,
                burst_idle_s=4.0, session_timeout_ms=3000)
    base.update(over)
    return WorkerOptions(**base)


def publish(broker, topic, values, partitions=None):
    """Send each (key, value) in the order given, to ``partitions[i]`` if given (else by the key's hash)."""
    send_records(broker.bootstrap_servers, topic, [value for _, value in values], keys=[key for key, _ in values],
                 partitions=partitions)


def valid_task(i, run_id="run-w"):
    cell = Cell(id=f"cell-{i}", row=0, col=i, bbox=(0.0 + i, 0.0, 0.5 + i, 0.5))
    return task_for(cell, [], run_id)


def test_poison_messages_are_dead_lettered_and_valid_tasks_complete(broker, topics):
    good = [valid_task(i) for i in range(3)]
    traversal = json.loads(encode(valid_task(9)))
    traversal["cell"]["id"] = "../../etc/passwd"
    wrong_version = json.loads(encode(valid_task(8)))
    wrong_version["schema_version"] = 7
    messages = [(b"g0", encode(good[0])), (b"bad", b"{not json"), (b"g1", encode(good[1])),
                (b"v", json.dumps(wrong_version).encode()), (b"t", json.dumps(traversal).encode()),
                (b"g2", encode(good[2]))]
    publish(broker, topics["tasks"], messages)
    processor = ScriptedProcessor()
    worker = Worker(worker_options(broker, topics), processor)
    summary = worker.run()
    assert sorted(processor.calls) == sorted(t.task_id for t in good)  # poison never reaches the processor
    # A result is sent at once: the worker waits for it before the next task (a 5 ms linger each was 5 ms idle).
    assert worker.producer.config["linger_ms"] == 0
    # One task thread for all of them (what pyproj and GDAL keep per thread is built once), not the poller's.
    assert len(set(processor.threads)) == 1 and processor.threads[0] is not threading.current_thread()
    assert summary.dead_lettered == 3 and summary.statuses["no_fields"] == 3
    kafka = KafkaSettings(broker.bootstrap_servers)
    dead = read_topic(kafka, topics["dlq"])
    reasons = sorted(dict(r.headers)["error"].decode() for r in dead)
    assert len(dead) == 3
    assert any("not valid JSON" in r for r in reasons)
    assert any("unsupported schema_version 7" in r for r in reasons)
    assert any("not a safe identifier" in r for r in reasons)
    results = [decode(r.value) for r in read_topic(kafka, topics["results"])]
    assert sorted(r.status for r in results) == ["failed"] * 3 + ["no_fields"] * 3
    # Every offset was committed: a second worker of the group finds nothing to do.
    again = ScriptedProcessor()
    Worker(worker_options(broker, topics), again).run()
    assert again.calls == []


def test_a_task_longer_than_max_poll_interval_is_not_redelivered(broker, topics):
    tasks = [valid_task(i, "run-long") for i in range(2)]
    publish(broker, topics["tasks"], [(t.cell.id.encode(), encode(t)) for t in tasks])
    slow = ScriptedProcessor(seconds=7.0)  # > max_poll_interval_ms below, > session timeout
    other = ScriptedProcessor()
    opts = worker_options(broker, topics, max_poll_interval_ms=4000, burst_idle_s=6.0)
    workers = [Worker(opts, p) for p in (slow, other)]
    # Daemons, and stopped below: a thread left polling after the session's broker is gone kept pytest from exiting.
    runs = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in runs:
        thread.start()
        time.sleep(0.5)
    for thread in runs:
        thread.join(timeout=90)
    for w in workers:  # a worker that never got a partition waits a minute longer in burst mode
        w.stop_requested.set()
    for thread in runs:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in runs)
    # Each task processed exactly once in the group: nobody was evicted, nothing redelivered.
    assert sorted(slow.calls + other.calls) == sorted(t.task_id for t in tasks)
    results = [decode(r.value) for r in read_topic(KafkaSettings(broker.bootstrap_servers), topics["results"])]
    assert sorted(r.task_id for r in results) == sorted(t.task_id for t in tasks)


def test_stop_past_the_grace_period_abandons_the_task_uncommitted(broker, topics):
    task = valid_task(0, "run-abandon")
    publish(broker, topics["tasks"], [(task.cell.id.encode(), encode(task))])
    slow = ScriptedProcessor(seconds=8.0)
    worker = Worker(worker_options(broker, topics, shutdown_grace_s=0.5), slow)
    thread = threading.Thread(target=worker.run, daemon=True)  # a failure here must not hang pytest at exit
    thread.start()
    deadline = time.monotonic() + 30
    while not slow.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop_requested.set()  # what SIGTERM does
    thread.join(timeout=30)
    assert not thread.is_alive() and worker.summary.abandoned == 1 and not worker.summary.statuses
    # Not committed: the next worker of the group gets the task again.
    again = ScriptedProcessor()
    Worker(worker_options(broker, topics), again).run()
    assert again.calls == [task.task_id]


def test_the_task_thread_is_kept_across_tasks_and_replaced_when_a_task_was_abandoned():
    from cropchips.queue.consumer import _TaskRunner

    runner, release = _TaskRunner(), threading.Event()
    first = runner.start(lambda _: threading.current_thread(), None)
    assert first.wait(5) and first.error is None
    second = runner.start(lambda _: threading.current_thread(), None)
    assert second.wait(5) and second.result is first.result  # the same thread
    stuck = runner.start(lambda _: release.wait(30), None)  # abandoned past the grace: still running
    after = runner.start(lambda _: threading.current_thread(), None)
    assert after.wait(5) and after.result is not first.result and not stuck.done  # a thread of its own
    failing = runner.start(lambda _: 1 / 0, None)
    assert failing.wait(5) and isinstance(failing.error, ZeroDivisionError)
    release.set()
    assert stuck.wait(5) and stuck.result is True


# --------------------------------------------------------------------------- partition order


def publish_to_partitions(broker, topic, placed):
    """Send each (partition, task) in the order given."""
    publish(broker, topic, [(task.cell.id.encode(), encode(task)) for _, task in placed], [p for p, _ in placed])


def spread(run_id, per_partition=3, partitions=10):
    """Tasks sent round the partitions, highest first: {partition: [task ids in offset order]}."""
    placed, by_partition = [], {p: [] for p in range(partitions)}
    for k in range(per_partition):
        for p in reversed(range(partitions)):
            task = valid_task(10 * k + p, run_id)
            placed.append((p, task))
            by_partition[p].append(task.task_id)
    return placed, by_partition


def test_a_worker_runs_its_partitions_one_after_another_lowest_first(broker, topics):
    # The master's grid partitioning makes partition order curve order: a worker that follows it
    # decodes the tiles neighbouring cells share while they are still cached.
    placed, by_partition = spread("run-order")
    publish_to_partitions(broker, topics["tasks"], placed)
    processor = ScriptedProcessor()
    summary = Worker(worker_options(broker, topics), processor).run()
    assert processor.calls == [task_id for p in sorted(by_partition) for task_id in by_partition[p]]
    assert summary.statuses["no_fields"] == 30 and summary.commit_failures == 0
    again = ScriptedProcessor()  # every offset committed
    Worker(worker_options(broker, topics), again).run()
    assert again.calls == []


@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_partitions_paused_for_the_order_lose_nothing_when_the_group_rebalances(broker, topics, assignor):
    # The first worker fetched from all ten partitions before pausing all but one; a second
    # worker joins and takes half of them (range: 5-9, whose records the first had fetched and
    # parked), the first keeps the rest, positions and all.
    placed, by_partition = spread(f"run-order-{assignor}")
    publish_to_partitions(broker, topics["tasks"], placed)
    first, second = ScriptedProcessor(seconds=0.4), ScriptedProcessor(seconds=0.4)
    opts = worker_options(broker, topics, assignor=assignor, burst_idle_s=6.0, session_timeout_ms=6000)
    workers = [Worker(opts, first), Worker(opts, second)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    threads[0].start()
    deadline = time.monotonic() + 60
    while len(first.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(t.is_alive() for t in threads)
    everything = sorted(t for ids in by_partition.values() for t in ids)
    assert sorted(first.calls + second.calls) == everything, "a task ran twice or not at all"
    assert second.calls, "the joining worker got no partition"
    owner = {t: p for p, ids in by_partition.items() for t in ids}
    for calls in (first.calls, second.calls):  # each worker: whole partitions, each in offset order
        for p in {owner[t] for t in calls}:
            assert [t for t in calls if owner[t] == p] == [t for t in by_partition[p] if t in calls]
    results = [decode(r.value) for r in read_topic(KafkaSettings(broker.bootstrap_servers), topics["results"])]
    assert sorted(r.task_id for r in results) == everything


# --------------------------------------------------------------------------- finishing while the next runs


class TimedProcessor(ScriptedProcessor):
    """Also records when each call started and ended (monotonic s)."""

    def __init__(self, seconds=0.0):
        super().__init__(seconds)
        self.spans: dict[str, tuple[float, float]] = {}

    def process(self, task: Task) -> Result:
        start = time.monotonic()
        result = super().process(task)
        self.spans[task.task_id] = (start, time.monotonic())
        return result


class SlowBrokerWorker(Worker):
    """A worker whose broker takes ``ack_s`` to acknowledge each result (or refuses ``refuse``'s)."""

    def __init__(self, options, processor, ack_s=0.0, refuse=()):
        super().__init__(options, processor)
        self.ack_s, self.refuse = ack_s, set(refuse)
        self.delivered: dict[str, tuple[float, float]] = {}

    def _deliver(self, inflight, result, retry_s=None):
        from cropchips.errors import BrokerError

        start = time.monotonic()
        if result.task_id in self.refuse:
            raise BrokerError(f"scripted: the broker does not acknowledge {result.task_id}")
        time.sleep(self.ack_s)
        super()._deliver(inflight, result, retry_s)
        self.delivered[result.task_id] = (start, time.monotonic())


def on_one_partition(broker, topics, values):
    publish(broker, topics["tasks"], [(b"k", value) for value in values], [0] * len(values))


def test_a_task_starts_while_the_previous_result_is_published_and_committed(broker, topics):
    tasks = [valid_task(i, "run-overlap") for i in range(4)]
    on_one_partition(broker, topics, [encode(t) for t in tasks])
    processor = TimedProcessor(seconds=0.6)
    worker = SlowBrokerWorker(worker_options(broker, topics), processor, ack_s=0.4)
    summary = worker.run()
    ids = [t.task_id for t in tasks]
    assert processor.calls == ids and summary.statuses["no_fields"] == 4
    for before, after in zip(ids, ids[1:]):
        # The next task was running before the previous result's (slow) acknowledgement came.
        assert processor.spans[after][0] < worker.delivered[before][1]
    results = [decode(r.value).task_id for r in read_topic(KafkaSettings(broker.bootstrap_servers), topics["results"])]
    assert results == ids  # one result each, in task order
    again = ScriptedProcessor()  # every offset committed, the last one too
    Worker(worker_options(broker, topics), again).run()
    assert again.calls == []


def test_a_dead_letter_after_a_task_is_committed_after_it(broker, topics):
    first, last = valid_task(0, "run-order-dl"), valid_task(1, "run-order-dl")
    on_one_partition(broker, topics, [encode(first), b"{not json", encode(last)])
    processor = ScriptedProcessor()
    summary = Worker(worker_options(broker, topics), processor).run()
    assert processor.calls == [first.task_id, last.task_id] and summary.dead_lettered == 1
    results = [decode(r.value) for r in read_topic(KafkaSettings(broker.bootstrap_servers), topics["results"])]
    # The ended task is finished before the poison message after it is dead-lettered and committed.
    assert [(r.task_id, r.status) for r in results] == [(first.task_id, "no_fields"), ("poison-0-1", "failed"),
                                                        (last.task_id, "no_fields")]
    again = ScriptedProcessor()
    Worker(worker_options(broker, topics), again).run()
    assert again.calls == []


def test_a_result_the_broker_never_takes_stops_the_worker_after_the_running_task_ended(broker, topics):
    from cropchips.errors import BrokerError

    tasks = [valid_task(i, "run-refused") for i in range(3)]
    on_one_partition(broker, topics, [encode(t) for t in tasks])
    processor = TimedProcessor(seconds=0.8)
    worker = SlowBrokerWorker(worker_options(broker, topics), processor, refuse={tasks[0].task_id})
    with pytest.raises(BrokerError, match="does not acknowledge"):
        worker.run()
    returned = time.monotonic()
    # The second task had started; the worker waited for it (no file cut off mid-write), not for a third.
    assert processor.calls == [tasks[0].task_id, tasks[1].task_id]
    assert processor.spans[tasks[1].task_id][1] <= returned
    # Neither was committed: the group's next worker runs both again (and the third).
    again = ScriptedProcessor()
    Worker(worker_options(broker, topics), again).run()
    assert again.calls == [t.task_id for t in tasks]


def test_a_worker_joining_while_another_runs_a_long_task_does_not_wait_for_it(broker, topics):
    # kafka-python completes a join only while a poll waits for it; a busy worker that polled
    # between waits threw each JoinGroup answer away, so the group stayed stuck until its task ended.
    placed, _ = spread("run-join", per_partition=1)
    publish_to_partitions(broker, topics["tasks"], placed)
    busy, newcomer = TimedProcessor(seconds=20.0), TimedProcessor(seconds=0.1)
    opts = worker_options(broker, topics, assignor="cooperative-sticky", burst_idle_s=3.0, session_timeout_ms=6000)
    workers = [Worker(opts, busy), Worker(opts, newcomer)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    threads[0].start()
    deadline = time.monotonic() + 60
    while not busy.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    first_start = time.monotonic()
    threads[1].start()
    while not newcomer.spans and time.monotonic() < first_start + 60:
        time.sleep(0.05)
    assert newcomer.spans, "the newcomer never ran a task"
    # The newcomer ran a task of its own while the busy worker's first task (20 s) was still running.
    assert min(start for start, _ in newcomer.spans.values()) < first_start + 18.0
    for w in workers:
        w.stop_requested.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

