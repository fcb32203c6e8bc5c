"""A fleet of worker processes on one machine: group join, throughput, idle share, the pause when
some workers leave mid-run, and whether any task is lost or done twice.

    python -m bench.fleet --workers 100 --tasks 10000 --partitions 120 --task-s 0.02 --leave 10
    python -m bench.fleet --workers 3 --tasks 30 --partitions 6 --leave 1 --out /tmp/fleet.json

Each worker is a separate process (forked) running the real Kafka loop
(:class:`cropchips.queue.consumer.Worker`: real polls, result publishing with acks=all, commits,
rebalance listener, SIGTERM handling) against the real broker (embedded Tansu). Only the task
processor is a stand-in that sleeps ``--task-s``. The tasks are built like the master's (one per
grid cell, each carrying a :class:`~cropchips.spec.DatasetSpec`) and published with the master's
own :func:`cropchips.queue.publish.publish` (grid partitioning). When ``--leave-at`` of the tasks
are done, ``--leave`` workers get SIGTERM: they finish their task, commit and leave the group.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cropchips.demo.broker import EmbeddedBroker
from cropchips.plan.grid import Grid
from cropchips.plan.plan import MasterOptions, Plan
from cropchips.processing import utc_now
from cropchips.queue.consumer import Worker, WorkerOptions
from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.queue.messages import Cell, Result, Task, decode
from cropchips.queue.publish import publish
from cropchips.spec import DatasetSpec

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- child processes

class Sleeper:
    """The stand-in task processor: sleeps, and appends ``task_id start end`` (epoch s) to a file."""

    def __init__(self, worker_id: str, seconds: float, path: Path):
        self.worker_id = worker_id
        self.seconds = seconds
        self.out = open(path, "a", buffering=1)

    def process(self, task: Task) -> Result:
        start = time.time()
        time.sleep(self.seconds)
        end = time.time()
        self.out.write(f"{task.task_id} {start:.4f} {end:.4f}\n")
        return Result(run_id=task.run_id, task_id=task.task_id, cell_id=task.cell.id, worker_id=self.worker_id,
                      status="ok", seconds={"total": round(end - start, 4)}, finished_at=utc_now())


def _worker_main(index: int, bootstrap: str, names: dict[str, str], args: argparse.Namespace, logdir: str) -> None:
    """Body of one worker process."""
    name = f"w{index:03d}"
    log_path = Path(logdir) / f"{name}.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(created).4f %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("cropchips").setLevel(logging.INFO)
    code = 0
    try:
        options = WorkerOptions(kafka=KafkaSettings(bootstrap), tasks_topic=names["tasks"],
                                results_topic=names["results"], dlq_topic=names["dlq"], group_id=names["group"],
                                tasks_partitions=args.partitions, session_timeout_ms=args.session_ms,
                                group_instance_id=f"fleet-{name}" if args.static else None,
                                assignor=args.assignor, shutdown_grace_s=30.0)
        worker = Worker(options, Sleeper(name, args.task_s, Path(logdir) / f"{name}.tasks"))
        worker.install_signal_handlers()
        worker.run()
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _publish_main(bootstrap: str, names: dict[str, str], args: argparse.Namespace, run_id: str) -> None:
    """The master's side: one task per grid cell, published with the master's ``publish``."""
    logging.basicConfig(level=logging.WARNING)
    side = math.ceil(math.sqrt(args.tasks))
    rows = math.ceil(args.tasks / side)
    grid = Grid(start_x=-4.0, start_y=40.0, step=0.05, x_cells=side, y_cells=rows)
    spec = DatasetSpec()
    tasks = []
    for i in range(args.tasks):
        row, col = divmod(i, side)
        x, y = grid.start_x + col * grid.step, grid.start_y + row * grid.step
        cell = Cell(id=f"r{row:04d}c{col:04d}", row=row, col=col, bbox=(x, y, x + grid.step, y + grid.step))
        tasks.append(Task(run_id=run_id, task_id=f"t{i:06d}", cell=cell, scenes=(), spec=spec))
    plan = Plan(run_id=run_id, tasks=tasks, cells_total=args.tasks, dropped=Counter(), scenes=0, spec=spec,
                grid=grid, counts=np.zeros((rows, side), dtype=np.int64))
    options = MasterOptions(gpkg="bench-fleet.gpkg", spec=spec, kafka=KafkaSettings(bootstrap),
                            tasks_topic=names["tasks"], results_topic=names["results"], dlq_topic=names["dlq"],
                            tasks_partitions=args.partitions, run_id=run_id)
    publish(plan, options)
    os._exit(0)


# ---------------------------------------------------------------------------- /proc sampling

def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])  # kB
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1])
    except OSError:
        pass
    return out


def _proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# ---------------------------------------------------------------------------- analysis helpers

def _read_tasks(path: Path) -> list[tuple[str, float, float]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                rows.append((parts[0], float(parts[1]), float(parts[2])))
    return rows


_EVENT = re.compile(r"^(\d+\.\d+) \w+ [\w.]+ partitions (assigned|revoked|lost[^:]*): \[([\d, ]*)\]")
_SUMMARY = re.compile(r"(\d+) commits retried after a rebalance, (\d+) commits refused, (\d+) finished during a "
                      r"rebalance, (\d+) abandoned")


def _read_events(path: Path) -> tuple[list[tuple[float, str, set[int]]], dict[str, int]]:
    events, summary = [], {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            m = _EVENT.match(line)
            if m:
                parts = {int(p) for p in m.group(3).replace(" ", "").split(",") if p}
                events.append((float(m.group(1)), m.group(2).split()[0], parts))
            s = _SUMMARY.search(line)
            if s:
                summary = dict(zip(("commits_retried", "commits_refused", "handed_over", "abandoned"),
                                   map(int, s.groups())))
    return events, summary


def _overlap(spans: list[tuple[float, float]], a: float, b: float) -> float:
    return sum(max(0.0, min(e, b) - max(s, a)) for s, e in spans)


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


# ---------------------------------------------------------------------------- one run

def run_fleet(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    logdir = Path(tempfile.mkdtemp(prefix="fleet-"))
    run_id = f"run-fleet-{int(time.time())}"
    names = {"tasks": "fleet-tasks", "results": "fleet-results", "dlq": "fleet-dlq", "group": "fleet-workers"}
    limits: list[str] = []
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        broker_cpu0 = _proc_cpu(broker.process.pid) or 0.0
        # --- publish, like the master, from its own process (the parent holds no Kafka client while forking)
        t_pub = time.time()
        pub = ctx.Process(target=_publish_main, args=(bootstrap, names, args, run_id))
        pub.start()
        pub.join(timeout=300)
        if pub.exitcode != 0:
            raise SystemExit(f"publishing failed (exit code {pub.exitcode})")
        publish_s = time.time() - t_pub
        # --- the fleet
        busy0 = _machine_busy()
        t0 = time.time()
        procs = []
        for i in range(args.workers):
            p = ctx.Process(target=_worker_main, args=(i, bootstrap, names, args, str(logdir)), daemon=False)
            p.start()
            procs.append(p)
        forked_s = time.time() - t0
        try:  # the harness only watches: keep it timely among 100 busy workers (needs root; else as is)
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        except OSError:
            pass  # the leave may then come later than --leave-at; "leave.tasks_done_at_leave" says when
        name_of = {p.pid: f"w{i:03d}" for i, p in enumerate(procs)}
        leavers = procs[len(procs) - args.leave:] if args.leave else []
        leaver_names = {name_of[p.pid] for p in leavers}
        hwm: dict[int, int] = {}
        rss_now: dict[int, int] = {}
        pss_best: tuple[int, dict[int, int]] = (0, {})
        cpu_last: dict[int, float] = {}
        broker_rss_kb = 0
        offsets: dict[str, int] = {}
        done_ids: set[str] = set()
        t_leave: float | None = None
        deadline = t0 + args.timeout_s
        next_sample = 0.0
        while time.time() < deadline:
            for i in range(args.workers):
                path = logdir / f"w{i:03d}.tasks"
                if not path.exists():
                    continue
                with open(path) as fh:
                    fh.seek(offsets.get(path.name, 0))
                    chunk = fh.read()
                cut = chunk.rfind("\n") + 1
                offsets[path.name] = offsets.get(path.name, 0) + cut
                done_ids.update(line.split()[0] for line in chunk[:cut].splitlines() if line)
            now = time.time()
            if now >= next_sample:
                next_sample = now + 2.0  # /proc of every worker: cheap, but the parent shares the cores
                sample_pss = {}
                for p in procs:
                    st = _proc_status(p.pid)
                    if "VmHWM" in st:
                        hwm[p.pid] = max(hwm.get(p.pid, 0), st["VmHWM"])
                        rss_now[p.pid] = st["VmRSS"]
                    if "Pss" in st:
                        sample_pss[p.pid] = st["Pss"]
                    c = _proc_cpu(p.pid)
                    if c is not None:
                        cpu_last[p.pid] = c
                if sum(sample_pss.values()) > pss_best[0]:
                    pss_best = (sum(sample_pss.values()), sample_pss)
                broker_rss_kb = max(broker_rss_kb, _proc_status(broker.process.pid).get("VmHWM", 0))
            if t_leave is None and leavers and len(done_ids) >= args.leave_at * args.tasks:
                t_leave = time.time()
                for p in leavers:
                    os.kill(p.pid, signal.SIGTERM)
            if len(done_ids) >= args.tasks:
                break
            if all(p.exitcode is not None for p in procs):
                limits.append("every worker exited before all tasks were done")
                break
            time.sleep(0.5)
        if len(done_ids) < args.tasks:
            limits.append(f"only {len(done_ids)} of {args.tasks} tasks done within --timeout-s {args.timeout_s}")
        # Let any late duplicate show up, then stop everyone (SIGTERM) and reap.
        time.sleep(args.settle_s)
        for p in procs:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        stop_deadline = time.time() + 60
        for p in procs:
            p.join(timeout=max(0.1, stop_deadline - time.time()))
        killed = 0
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join(timeout=5)
                killed += 1
        if killed:
            limits.append(f"{killed} workers did not stop within 60 s of SIGTERM and were killed")
        broker_cpu = (_proc_cpu(broker.process.pid) or 0.0) - broker_cpu0
        busy1 = _machine_busy()
        # --- correctness from the results topic
        records = read_topic(KafkaSettings(bootstrap), names["results"], idle_s=2.0, timeout_s=120.0)
        ok: Counter = Counter()
        any_result: set[str] = set()
        for rec in records:
            try:
                msg = decode(rec.value)
            except Exception:  # noqa: BLE001
                continue
            if isinstance(msg, Result) and msg.run_id == run_id:
                any_result.add(msg.task_id)
                if msg.status == "ok":
                    ok[msg.task_id] += 1
        dlq = read_topic(KafkaSettings(bootstrap), names["dlq"], idle_s=1.0, timeout_s=30.0)
    published = {f"t{i:06d}" for i in range(args.tasks)}

    # --- timings from the workers' own files
    runs: dict[str, list[tuple[str, float, float]]] = {}
    events: dict[str, list[tuple[float, str, set[int]]]] = {}
    summaries: dict[str, dict[str, int]] = {}
    for i in range(args.workers):
        name = f"w{i:03d}"
        runs[name] = sorted(_read_tasks(logdir / f"{name}.tasks"), key=lambda r: r[1])
        events[name], summaries[name] = _read_events(logdir / f"{name}.log")
    all_runs = sorted((s, e, w, t) for w, rs in runs.items() for t, s, e in rs)
    starts = [s for s, _, _, _ in all_runs]
    first_start, last_end = starts[0], max(e for _, e, _, _ in all_runs)
    executions = Counter(t for _, _, _, t in all_runs)

    # Group join: first instant at which every worker holds a partition (or all are held) ...
    state: dict[str, set[int]] = {w: set() for w in runs}
    all_assigned_at = None
    need_each = args.partitions >= args.workers
    for t, w, kind, parts in sorted(((t, w, k, p) for w, ev in events.items() for t, k, p in ev), key=lambda e: e[0]):
        # Eager assignors revoke and assign whole assignments, cooperative ones only what moves: add/remove fits both.
        if kind == "assigned":
            state[w] |= parts
        else:
            state[w] -= parts
        union = set().union(*state.values())
        if len(union) == args.partitions and (not need_each or all(state.values())):
            all_assigned_at = t
            break
    # ... and the first task of every worker that ever ran one has started.
    firsts = {w: rs[0][1] for w, rs in runs.items() if rs}
    idle_workers = [w for w, rs in runs.items() if not rs]
    first_task_all_at = max(firsts.values())
    join_done = max(first_task_all_at, all_assigned_at or first_task_all_at)

    # Steady part: from the join to the leave (or to 90% of the tasks without a leave).
    steady_end = t_leave if t_leave is not None else starts[int(0.9 * (len(starts) - 1))]
    if steady_end <= join_done:
        limits.append("the leave came before the group had settled: steady rate taken from the first task start")
        steady_start = first_start
    else:
        steady_start = join_done
    n_steady = sum(1 for s in starts if steady_start <= s < steady_end)
    steady_rate = n_steady / max(1e-9, steady_end - steady_start)
    spans = [(s, e) for s, e, _, _ in all_runs]
    wall = last_end - t0
    busy = sum(e - s for s, e in spans)
    idle_share = 1 - busy / (args.workers * wall)
    idle_share_steady = 1 - _overlap(spans, steady_start, steady_end) / (args.workers * (steady_end - steady_start))
    gaps = [b[1] - a[2] for rs in runs.values() for a, b in zip(rs, rs[1:])]

    leave: dict[str, Any] = {"workers": args.leave}
    if t_leave is not None:
        after = sorted([t_leave] + [s for s in starts if s >= t_leave])
        no_start = max((b - a for a, b in zip(after, after[1:])), default=0.0)
        stayers = [w for w in runs if w not in leaver_names]
        pauses = []
        for w in stayers:
            rs = runs[w]
            g = [b[1] - a[2] for a, b in zip(rs, rs[1:]) if b[1] >= t_leave]
            if g:
                pauses.append(max(g))
        reassigned = [t for w in stayers for t, k, _ in events[w] if k == "assigned" and t >= t_leave]
        window = min(10.0, max(1e-9, last_end - t_leave))
        n_after = sum(1 for s in starts if t_leave <= s < t_leave + window)
        leaver_last = [rs[-1][2] for w, rs in runs.items() if w in leaver_names and rs]
        leave.update({
            "at_s": _r(t_leave - t0, 2),
            "tasks_done_at_leave": sum(1 for _, e, _, _ in all_runs if e <= t_leave),
            "leavers_last_task_end_s": _r(max(leaver_last) - t_leave if leaver_last else 0.0, 2),
            "no_task_start_s": _r(no_start, 2),
            "stayer_pause_median_s": _r(statistics.median(pauses) if pauses else 0.0, 2),
            "stayer_pause_max_s": _r(max(pauses, default=0.0), 2),
            "reassigned_after_s": _r(max(reassigned) - t_leave if reassigned else 0.0, 2),
            "rebalances_seen": len({round(t, 0) for t in reassigned}),
            "window_s": _r(window, 2),
            "tasks_per_s_in_window": _r(n_after / window, 1),
            "dip_share": _r(1 - (n_after / window) / steady_rate if steady_rate else 0.0, 3),
        })

    rss_mib = sorted(v / 1024 for v in hwm.values())
    pss_mib = sum(pss_best[1].values()) / 1024
    worker_cpu = sum(cpu_last.values())
    busy_j, total_j = busy1[0] - busy0[0], busy1[1] - busy0[1]
    counters = Counter()
    for s in summaries.values():
        counters.update(s)
    report = {
        "params": {"workers": args.workers, "tasks": args.tasks, "partitions": args.partitions, "task_s": args.task_s,
                   "leave": args.leave, "leave_at": args.leave_at, "assignor": args.assignor, "static": args.static,
                   "session_timeout_ms": args.session_ms},
        "machine": {"cores": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "cpu_busy_share": _r(busy_j / total_j if total_j else 0.0, 3)},
        "publish_s": _r(publish_s, 2),
        "fork_all_s": _r(forked_s, 2),
        "join": {"all_partitions_assigned_s": _r((all_assigned_at or float("nan")) - t0, 2) if all_assigned_at else None,
                 "every_worker_first_task_s": _r(first_task_all_at - t0, 2),
                 "join_s": _r(join_done - t0, 2),
                 "first_task_s": _r(first_start - t0, 2),
                 "workers_without_a_task": len(idle_workers)},
        "throughput": {"steady_tasks_per_s": _r(steady_rate, 1), "steady_window_s": _r(steady_end - steady_start, 2),
                       "overall_tasks_per_s": _r(len(all_runs) / (last_end - first_start), 1),
                       "ideal_tasks_per_s": _r(args.workers / args.task_s, 1),
                       "wall_s": _r(wall, 2), "loop_gap_median_ms": _r(1000 * statistics.median(gaps) if gaps else 0.0, 1),
                       "loop_gap_p90_ms": _r(1000 * float(np.percentile(gaps, 90)) if gaps else 0.0, 1),
                       "tasks_per_worker_min": min(len(r) for r in runs.values()),
                       "tasks_per_worker_max": max(len(r) for r in runs.values())},
        "idle_share": _r(idle_share, 3),
        "idle_share_steady": _r(idle_share_steady, 3),
        "leave": leave,
        "correctness": {"published": len(published), "results_ok_distinct": len(ok),
                        "lost": len(published - any_result), "doubled": sum(1 for c in ok.values() if c > 1),
                        "not_ok": len(any_result - set(ok)), "executed_twice": sum(1 for c in executions.values() if c > 1),
                        "dead_letters": len(dlq), "worker_exit_codes": dict(Counter(str(p.exitcode) for p in procs)),
                        **{k: counters.get(k, 0) for k in ("commits_retried", "commits_refused", "handed_over", "abandoned")}},
        "memory": {"worker_peak_rss_mib_sum": _r(sum(rss_mib), 1),
                   "worker_peak_rss_mib_median": _r(statistics.median(rss_mib) if rss_mib else 0.0, 1),
                   "worker_peak_rss_mib_max": _r(max(rss_mib, default=0.0), 1),
                   "worker_pss_mib_sum": _r(pss_mib, 1),
                   "broker_peak_rss_mib": _r(broker_rss_kb / 1024, 1)},
        "cpu": {"broker_cpu_s": _r(broker_cpu, 2), "broker_cpu_ms_per_task": _r(1000 * broker_cpu / args.tasks, 2),
                "workers_cpu_s": _r(worker_cpu, 1), "workers_cpu_ms_per_task": _r(1000 * worker_cpu / args.tasks, 2)},
        "limits": limits,
    }
    if not args.keep_logs:
        for f in logdir.iterdir():
            f.unlink()
        logdir.rmdir()
    else:
        report["logs"] = str(logdir)
    return report


def table(r: dict[str, Any]) -> str:
    p, j, t, lv, c, m, cpu = (r["params"], r["join"], r["throughput"], r["leave"], r["correctness"], r["memory"], r["cpu"])
    rows = [
        ("size", f"{p['workers']} workers, {p['tasks']} tasks, {p['partitions']} partitions, {p['task_s']} s/task, "
                 f"{p['leave']} leave; {r['machine']['cores']} cores"),
        ("group join", f"{j['join_s']} s (all partitions assigned {j['all_partitions_assigned_s']} s, every worker's "
                       f"first task {j['every_worker_first_task_s']} s)"),
        ("tasks/s", f"steady {t['steady_tasks_per_s']} over {t['steady_window_s']} s, overall {t['overall_tasks_per_s']} "
                    f"(ideal {t['ideal_tasks_per_s']}); loop gap median {t['loop_gap_median_ms']} ms"),
        ("idle share", f"{r['idle_share']} (steady part {r['idle_share_steady']}); tasks/worker "
                       f"{t['tasks_per_worker_min']}-{t['tasks_per_worker_max']}"),
        ("leave", f"no task started for {lv.get('no_task_start_s')} s; stayers paused median "
                  f"{lv.get('stayer_pause_median_s')} / max {lv.get('stayer_pause_max_s')} s; reassigned after "
                  f"{lv.get('reassigned_after_s')} s; dip {lv.get('dip_share')}"),
        ("correctness", f"lost {c['lost']}, doubled {c['doubled']} (executed twice {c['executed_twice']}, "
                        f"dead letters {c['dead_letters']}, exits {c['worker_exit_codes']})"),
        ("memory", f"worker peak RSS sum {m['worker_peak_rss_mib_sum']} MiB (median {m['worker_peak_rss_mib_median']}, "
                   f"PSS sum {m['worker_pss_mib_sum']}); broker {m['broker_peak_rss_mib']} MiB"),
        ("cpu", f"broker {cpu['broker_cpu_s']} s ({cpu['broker_cpu_ms_per_task']} ms/task), workers "
                f"{cpu['workers_cpu_s']} s ({cpu['workers_cpu_ms_per_task']} ms/task); machine busy "
                f"{r['machine']['cpu_busy_share']}"),
    ]
    lines = [f"{k:12s} {v}" for k, v in rows]
    lines += [f"limits       {x}" for x in r["limits"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--task-s", type=float, default=0.02, help="seconds the stand-in processor sleeps per task")
    ap.add_argument("--leave", type=int, default=1, help="workers stopped with SIGTERM mid-run")
    ap.add_argument("--leave-at", type=float, default=0.5, help="share of the tasks done when they are stopped")
    ap.add_argument("--assignor", default="range", choices=("range", "cooperative-sticky"))
    ap.add_argument("--static", action="store_true", help="static membership (group_instance_id per worker)")
    ap.add_argument("--session-ms", type=int, default=10000)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="give up on the run after this long")
    ap.add_argument("--settle-s", type=float, default=2.0, help="wait after the last task before stopping all")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs already in --out, under other_runs (this run becomes the top level)")
    args = ap.parse_args(argv)
    if not 0 <= args.leave < args.workers:
        ap.error("--leave must be below --workers")
    report = run_fleet(args)
    print(table(report))
    if args.out:
        out = Path(args.out)
        if args.merge and out.exists():
            old = json.loads(out.read_text())
            report["other_runs"] = old.pop("other_runs", []) + [old]
        out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
