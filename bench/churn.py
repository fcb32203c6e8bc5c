"""Churn: a job whose workers are SIGKILLed and restarted while it runs, against the same job without kills.

    python -m bench.churn                          # 4 workers, kill + restart one every 15 s
    python -m bench.churn --workers 3 --tasks 300 --kill-every-s 10 --out /tmp/churn.json

Each worker is a separate process running the real Kafka loop (:class:`cropchips.queue.consumer.Worker`)
on the real broker (embedded Tansu), as in ``bench.fleet``; the task processor is the same stand-in that
sleeps ``--task-s`` (so the figures are the group protocol's, not GDAL's). Every ``--kill-every-s`` the
next worker in turn gets SIGKILL mid-task and a new process with the same number (and so, with static
membership, the same ``group.instance.id``) starts ``--restart-s`` later: the start-up of a real
``worker.py`` (imports, broker connection), measured at about 2.5 s on this machine.

Reported per case (dynamic or static membership, range or cooperative-sticky assignment): tasks/s with
and without kills and their ratio, the longest stretch during which no task finished, tasks lost (never
done) and tasks done twice (a task killed after its work but before its commit is done again: at least
once, as the README says).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import _publish_main, _read_tasks, _worker_main
from cropchips.demo.broker import EmbeddedBroker

#: (static membership, assignor) of each case, in the order they run.
CASES = ((False, "range"), (True, "range"), (True, "cooperative-sticky"))


def _delayed_worker(delay_s: float, *args: Any) -> None:
    time.sleep(delay_s)  # what a real worker.py spends on imports and connecting before it joins
    _worker_main(*args)


def one_job(broker: EmbeddedBroker | argparse.Namespace, tag: str, args: argparse.Namespace, *, static: bool, assignor: str,
            kill_every_s: float) -> dict[str, Any]:
    """One job on fresh topics; ``kill_every_s`` 0 for the fault-free run."""
    ctx = mp.get_context("fork")
    logdir = Path(tempfile.mkdtemp(prefix=f"churn-{tag}-"))
    names = {"tasks": f"{tag}-tasks", "results": f"{tag}-results", "dlq": f"{tag}-dlq", "group": f"{tag}-workers"}
    wargs = argparse.Namespace(tasks=args.tasks, partitions=args.partitions, task_s=args.task_s,
                               session_ms=args.session_ms, static=static, assignor=assignor)
    bootstrap = broker.bootstrap_servers
    pub = ctx.Process(target=_publish_main, args=(bootstrap, names, wargs, f"run-{tag}"))
    pub.start()
    pub.join(timeout=300)
    if pub.exitcode != 0:
        raise SystemExit(f"publishing failed (exit code {pub.exitcode})")
    procs: dict[int, mp.Process] = {}
    for i in range(args.workers):
        procs[i] = ctx.Process(target=_worker_main, args=(i, bootstrap, names, wargs, str(logdir)))
        procs[i].start()
    kills: list[float] = []
    done: set[str] = set()
    t0 = time.time()
    next_kill = t0 + args.warmup_s if kill_every_s else float("inf")
    victim = 0
    deadline = t0 + args.timeout_s
    while time.time() < deadline:
        done = {task for i in range(args.workers) for task, _, _ in _read_tasks(logdir / f"w{i:03d}.tasks")}
        if len(done) >= args.tasks:
            break
        if time.time() >= next_kill:
            p = procs[victim]
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=10)
            kills.append(time.time())
            procs[victim] = ctx.Process(target=_delayed_worker,
                                        args=(args.restart_s, victim, bootstrap, names, wargs, str(logdir)))
            procs[victim].start()
            victim = (victim + 1) % args.workers
            next_kill += kill_every_s
        time.sleep(0.2)
    for p in procs.values():
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGTERM)
    for p in procs.values():
        p.join(timeout=60)
        if p.exitcode is None:
            p.kill()
            p.join(timeout=5)
    rows = [row for i in range(args.workers) for row in _read_tasks(logdir / f"w{i:03d}.tasks")]
    counts: dict[str, int] = {}
    for task, _, _ in rows:
        counts[task] = counts.get(task, 0) + 1
    ends = sorted(end for _, _, end in rows)
    first_start = min(start for _, start, _ in rows) if rows else t0
    wall = (ends[-1] - first_start) if ends else None
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return {"static": static, "assignor": assignor, "kill_every_s": kill_every_s, "kills": len(kills),
            "tasks": args.tasks, "done": len(counts), "lost": args.tasks - len(counts),
            "done_twice": sum(1 for c in counts.values() if c > 1),
            "wall_s": round(wall, 2) if wall else None,
            "tasks_per_s": round(len(counts) / wall, 3) if wall else None,
            "longest_no_finish_s": round(max(gaps, default=0.0), 2),
            "median_between_finishes_s": round(statistics.median(gaps), 3) if gaps else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--tasks", type=int, default=480)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--task-s", type=float, default=0.5, help="seconds the stand-in processor sleeps per task")
    p.add_argument("--kill-every-s", type=float, default=15.0)
    p.add_argument("--warmup-s", type=float, default=15.0,
                   help="seconds from the workers' start to the first kill (the group takes ~8 s to form on Tansu)")
    p.add_argument("--restart-s", type=float, default=2.5, help="start-up of a restarted worker before it joins")
    p.add_argument("--session-ms", type=int, default=10000)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--cases", default=",".join(f"{'static' if s else 'dynamic'}:{a}" for s, a in CASES),
                   help="comma-separated MEMBERSHIP:ASSIGNOR (static or dynamic; range or cooperative-sticky)")
    p.add_argument("--bootstrap-servers", default=None,
                   help="run against this broker (Redpanda, Kafka) instead of an embedded Tansu")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    cases = [(c.split(":")[0] == "static", c.split(":")[1]) for c in args.cases.split(",") if c]
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "params": {k: v for k, v in vars(args).items() if k != "out"}, "cases": []}
    with (EmbeddedBroker() if not args.bootstrap_servers
          else contextlib.nullcontext(argparse.Namespace(bootstrap_servers=args.bootstrap_servers))) as broker:
        for n, (static, assignor) in enumerate(cases):
            base = one_job(broker, f"churn{os.getpid()}-{n}a", args, static=static, assignor=assignor, kill_every_s=0)
            churn = one_job(broker, f"churn{os.getpid()}-{n}b", args, static=static, assignor=assignor,
                            kill_every_s=args.kill_every_s)
            ratio = (churn["tasks_per_s"] / base["tasks_per_s"]) if base["tasks_per_s"] and churn["tasks_per_s"] else None
            row = {"case": f"{'static' if static else 'dynamic'} {assignor}", "fault_free": base, "churn": churn,
                   "throughput_kept": round(ratio, 3) if ratio else None}
            report["cases"].append(row)
            if args.out:  # after each case, so that an interrupted run keeps what it measured
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
            print(f"[churn] {row['case']}: {base['tasks_per_s']} tasks/s without kills, {churn['tasks_per_s']} with "
                  f"{churn['kills']} kills = {row['throughput_kept']}; lost {churn['lost']}, done twice "
                  f"{churn['done_twice']}, longest stretch without a finished task {churn['longest_no_finish_s']} s",
                  flush=True)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
