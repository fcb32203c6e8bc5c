"""A worker joining mid-run: how long the others pause, and whether any task runs twice.

    python -m bench.join                # 2 workers busy, a third joins; 3 rounds
    python -m bench.join --rounds 1 --tasks 40 --task-s 0.5
    python -m bench.join --mend both    # each round also without the join mend, alternating

``pause_s`` is the longest gap between a busy worker's tasks from the join on, ``join_pause_s`` the
same up to the first worker's exit (a burst worker leaving at the end is a rebalance too, not the
join's). ``--mend off`` runs the workers without the mends of kafka-python in
:mod:`cropchips.queue.kafka` (``collect_finished_joins``, ``hand_out_parked_records``): the library
as it is, to measure what they change.

The workers are the real Kafka loop (:class:`cropchips.queue.consumer.Worker`) on the real broker
(embedded Tansu), in threads of this process; only their task processor is a stand-in that
sleeps ``--task-s`` seconds, so the figures are the loop's and the broker's, not GDAL's.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import threading
import time
from typing import Any

from cropchips.demo.broker import EmbeddedBroker
from cropchips.queue import kafka as kafka_plumbing
from cropchips.queue.kafka import KafkaSettings, ensure_topics, make_producer
from cropchips.spec import DatasetSpec
from cropchips.queue.messages import Cell, Result, Task, encode
from cropchips.processing import utc_now
from cropchips.queue.consumer import Worker, WorkerOptions


class Sleeper:
    """A task processor that sleeps; records (task id, start, end) per call."""

    def __init__(self, name: str, seconds: float, log: list):
        self.worker_id = name
        self.seconds = seconds
        self.log = log

    def process(self, task: Task) -> Result:
        start = time.monotonic()
        time.sleep(self.seconds)
        self.log.append((self.worker_id, task.task_id, start, time.monotonic()))
        return Result(run_id=task.run_id, task_id=task.task_id, cell_id=task.cell.id, worker_id=self.worker_id,
                      status="no_fields", finished_at=utc_now())


_MENDS = ("collect_finished_joins", "hand_out_parked_records")


@contextlib.contextmanager
def _kafka_mends(on: bool):
    """The workers' consumers with (the product's default) or without the kafka-python mends."""
    if on:
        yield
        return
    kept = {name: getattr(kafka_plumbing, name) for name in _MENDS}
    for name in _MENDS:
        setattr(kafka_plumbing, name, lambda consumer: False)
    try:
        yield
    finally:
        for name, mend in kept.items():
            setattr(kafka_plumbing, name, mend)


def one_round(broker: EmbeddedBroker, n: int, tasks: int, task_s: float, static: bool, assignor: str,
              session_timeout_ms: int = 10000, mend: bool = True) -> dict[str, Any]:
    with _kafka_mends(mend):
        row = _one_round(broker, n, tasks, task_s, static, assignor, session_timeout_ms)
    row["mend"] = mend
    return row


def _one_round(broker: EmbeddedBroker, n: int, tasks: int, task_s: float, static: bool, assignor: str,
               session_timeout_ms: int) -> dict[str, Any]:
    kafka = KafkaSettings(broker.bootstrap_servers)
    names = {"tasks": f"join-tasks-{n}", "results": f"join-results-{n}", "dlq": f"join-dlq-{n}", "group": f"join-{n}"}
    ensure_topics(kafka, {names["tasks"]: 10, names["results"]: 1, names["dlq"]: 1})
    producer = make_producer(kafka)
    for i in range(tasks):
        cell = Cell(id=f"c{i:04d}", row=i // 100, col=i % 100, bbox=(0.0, 0.0, 0.1, 0.1))
        producer.send(names["tasks"], key=cell.id.encode(),
                      value=encode(Task(run_id="run-join", task_id=f"t{i:04d}", cell=cell, scenes=(), spec=DatasetSpec()))).get(timeout=10)
    producer.close()
    log: list = []

    def worker(name: str) -> Worker:
        options = WorkerOptions(kafka=kafka, tasks_topic=names["tasks"], results_topic=names["results"],
                                dlq_topic=names["dlq"], group_id=names["group"], burst=True, burst_idle_s=8.0,
                                session_timeout_ms=session_timeout_ms, group_instance_id=f"bench-{name}" if static else None,
                                assignor=assignor)
        return Worker(options, Sleeper(name, task_s, log))

    exits: list[float] = []

    def run(w: Worker) -> None:
        try:
            w.run()
        finally:
            exits.append(time.monotonic())

    first = [worker("w1"), worker("w2")]
    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in first]
    for t in threads:
        t.start()
    while len(log) < 6:  # both busy, a few tasks in
        time.sleep(0.05)
    joined_at = time.monotonic()
    late = worker("w3")
    threads.append(threading.Thread(target=run, args=(late,), daemon=True))
    threads[-1].start()
    for t in threads:
        t.join(timeout=600)
    runs: dict[str, int] = {}
    for _, task_id, _, _ in log:
        runs[task_id] = runs.get(task_id, 0) + 1
    first_exit = min(exits, default=float("inf"))
    pauses, join_pauses = {}, {}
    for name in ("w1", "w2"):
        mine = sorted((s, e) for w, _, s, e in log if w == name)
        # The longest gap between one task's end and the next start, from the join on (and up to
        # the first worker's exit: the rebalance that exit makes is not the join's).
        gaps = [(b[0] - a[1], b[0]) for a, b in zip(mine, mine[1:]) if b[0] >= joined_at]
        pauses[name] = round(max((g for g, _ in gaps), default=0.0), 2)
        join_pauses[name] = round(max((g for g, start in gaps if start <= first_exit), default=0.0), 2)
    newcomer = [s for w, _, s, _ in log if w == "w3"]
    return {"static": static, "assignor": assignor, "session_timeout_ms": session_timeout_ms, "pause_s": pauses,
            "join_pause_s": join_pauses,
            "newcomer_first_task_s": round(min(newcomer) - joined_at, 2) if newcomer else None,
            "tasks_run_twice": sum(1 for c in runs.values() if c > 1), "tasks_never_run": tasks - len(runs),
            "handed_over": sum(w.summary.handed_over for w in first + [late]),
            "commits_retried": sum(w.summary.commits_retried for w in first + [late]),
            "commits_refused": sum(w.summary.commit_failures for w in first + [late])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.join", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=60)
    p.add_argument("--task-s", type=float, default=0.5)
    p.add_argument("--session-timeout-ms", type=int, default=10000,
                   help="the workers' session timeout (Tansu's rebalance takes about half of it)")
    p.add_argument("--cases", default="dynamic-range,static-range,dynamic-cooperative-sticky,static-cooperative-sticky",
                   help="membership-assignor pairs to run, comma separated")
    p.add_argument("--mend", choices=("on", "off", "both"), default="on",
                   help="the workers with the kafka-python mends (on, as in production), without them (off), or "
                        "each round both ways, alternating (both)")
    p.add_argument("--out", default=None, help="write the JSON report here too")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"rounds": []}
    cases = []
    for case in (c.strip() for c in args.cases.split(",") if c.strip()):
        membership, _, assignor = case.partition("-")
        if membership not in ("dynamic", "static") or assignor not in ("range", "cooperative-sticky"):
            p.error(f"--cases: {case!r} is not dynamic|static-range|cooperative-sticky")
        cases.append((membership == "static", assignor))
    mends = {"on": (True,), "off": (False,), "both": (True, False)}[args.mend]
    with EmbeddedBroker() as broker:
        n = 0
        for static, assignor in cases:
            for _ in range(args.rounds):
                for mend in mends:
                    row = one_round(broker, n, args.tasks, args.task_s, static, assignor, args.session_timeout_ms,
                                    mend)
                    report["rounds"].append(row)
                    # A round can take minutes: each is on stderr as it ends, in case the run is cut short.
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    n += 1
    for (static, assignor), mend in itertools.product(cases, mends):
        rows = [r for r in report["rounds"]
                if r["static"] == static and r["assignor"] == assignor and r["mend"] == mend]
        report[f"{'static' if static else 'dynamic'} {assignor}{'' if mend else ' (no mend)'}"] = {
            "rounds": len(rows),
            "median_pause_s": statistics.median(max(r["pause_s"].values()) for r in rows),
            "median_join_pause_s": statistics.median(max(r["join_pause_s"].values()) for r in rows),
            "max_join_pause_s": max(max(r["join_pause_s"].values()) for r in rows),
            "rounds_with_tasks_never_run": sum(1 for r in rows if r["tasks_never_run"]),
            "tasks_run_twice": sum(r["tasks_run_twice"] for r in rows),
            "tasks_never_run": sum(r["tasks_never_run"] for r in rows),
            "median_newcomer_first_task_s": statistics.median(r["newcomer_first_task_s"] or 0.0 for r in rows)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
