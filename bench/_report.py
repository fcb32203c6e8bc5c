"""The report: each number held against its target, the summary of a run's JSON and the printed table."""

from __future__ import annotations

import statistics
from typing import Any

#: The goals the numbers are held against (issue 14, "performance at scale").
TARGETS = {
    "read_amplification": ("<=", 1.15),
    "worker_cpu_s_per_chip": ("<=", 0.08),
    "speedup_vs_baseline": (">=", 20.0),
    "scaling_4_vs_1": (">=", 1.6),
    "master_vs_bare_read": ("<=", 1.5),
    "worker_peak_memory_mib": ("<=", 1024.0),
    "kafka_overhead_share": ("<", 0.02),
}


def verdict(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    op, goal = TARGETS[name]
    ok = {"<=": value <= goal, ">=": value >= goal, "<": value < goal}[op]
    if ok:
        return "met"
    if op in ("<=", "<"):
        return f"missed by {value / goal:.2f}x ({value:.3g} vs {op} {goal:g})"
    return f"missed by {goal / value:.2f}x ({value:.3g} vs {op} {goal:g})" if value > 0 else "missed"


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cpu_floor(report: dict[str, Any], runs: list[dict[str, Any]]) -> float | None:
    """Decoding the chips' tiles once plus writing the chips at the default codec (deflate), a chip:
    the least CPU any worker could spend on it (bench/_floor.py)."""
    decode = _median(r.get("decode_floor_cpu_s_per_chip") for r in runs)
    write = ((report.get("what_if") or {}).get("writes") or {}).get("by_compression", {}).get("deflate")
    if decode is None or not write:
        return None
    return decode + write["cpu_ms_per_chip"] / 1000.0


def _against_default(runs: list[dict[str, Any]], beside: list[dict[str, Any]],
                     stages: tuple[str, ...]) -> dict[str, Any]:
    """A one-worker what-if's speed, CPU and ``stages`` (median seconds a task) against the default
    setting's: the default runs made beside it (bench/_suite.py) where the report has them, else the
    throughput runs (reports before 2026-12-02)."""
    out = {}
    for suffix, rs in (("", runs), ("_default", beside)):
        out[f"chips_per_s{suffix}"] = _median(r["chips_per_s"] for r in rs)
        out[f"worker_cpu_s_per_chip{suffix}"] = _median(r["cpu"]["worker_cpu_s_per_chip"] for r in rs)
        out.update({f"{stage}_s_per_task{suffix}": _median(r["stages_median_s"][stage] for r in rs)
                    for stage in stages})
    return out


def _default_runs_cpu(report: dict[str, Any], one: list[dict[str, Any]]) -> dict[str, Any]:
    """The worker's CPU a chip over every one-worker run of the default setting in this report: the throughput
    runs and the default runs made beside the what-ifs (the same setting, minutes apart). Identical runs on
    this VM spread by ±12 % (2026-12-04: 0.075-0.096 on 16 x 4 cells), so a row of one run is a draw from it."""
    wi = report.get("what_if") or {}
    runs = [r for r in one if r.get("workers") == 1] + [
        r for name, rs in wi.items() if name.endswith("_default") and isinstance(rs, list) for r in rs]
    values = sorted(r["cpu"]["worker_cpu_s_per_chip"] for r in runs)
    if len(values) < 2:
        return {}
    return {"worker_cpu_s_per_chip_default_runs": {"runs": len(values), "median": round(statistics.median(values), 4),
                                                   "min": values[0], "max": values[-1]}}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    tp = report["throughput"]
    by_n = {n: _median(r["chips_per_s"] for r in runs) for n, runs in tp.items()}
    balanced = {n: _median(r["balanced_chips_per_s"] for r in runs) for n, runs in tp.items()}
    one = tp.get("1") or next(iter(tp.values()))
    first_n = min(tp, key=int)
    base = report.get("baseline") or {}
    memory = report.get("memory_case") or {}
    amplification = {n: _median(r["http"]["read_amplification"] for r in runs) for n, runs in tp.items()}
    values = {
        # The worst over the worker counts: each tile once per fleet, whatever the fleet.
        "read_amplification": max((v for v in amplification.values() if v is not None), default=None),
        "worker_cpu_s_per_chip": _median(r["cpu"]["worker_cpu_s_per_chip"] for r in one),
        "speedup_vs_baseline": (base["seconds_per_chip"] * by_n[first_n]
                                if base.get("seconds_per_chip") and by_n[first_n] else None),
        "scaling_4_vs_1": by_n["4"] / by_n["1"] if "4" in by_n and "1" in by_n and by_n["1"] else None,
        "master_vs_bare_read": report["master"]["ratio"] if report.get("master") else None,
        "worker_peak_memory_mib": max(memory["worker_peak_rss_mib"]) if memory.get("worker_peak_rss_mib") else None,
        "kafka_overhead_share": _median(r["kafka"]["overhead_share"] for r in one),
    }
    extra = {
        **{f"read_amplification_{n}_workers": v for n, v in amplification.items()},
        "read_amplification_per_task": _median(r["http"]["read_amplification_per_task"] for r in one),
        "scaling_4_vs_1_if_balanced": (balanced["4"] / balanced["1"]
                                       if "4" in balanced and "1" in balanced and balanced["1"] else None),
        "cpu_ceiling_chips_per_s": _median(r["cpu"]["cpu_ceiling_chips_per_s"] for r in one),
        "decode_floor_cpu_s_per_chip": _median(r.get("decode_floor_cpu_s_per_chip") for r in one),
        "cpu_floor_s_per_chip": _cpu_floor(report, one),
        "kafka_overhead_share_after_first_task": _median(r["kafka"].get("overhead_share_after_first_task") for r in one),
        # Without each worker's cold first task (bench/_pipeline.py: _after_first_task); reports before
        # 2026-12-04 do not have it.
        "worker_cpu_s_per_chip_after_first_task": _median(r["cpu"].get("worker_cpu_s_per_chip_after_first_task")
                                                          for r in one),
        "first_task_worker_cpu_s": _median(x for r in one for x in r["cpu"].get("first_task_worker_cpu_s", ())),
        **_default_runs_cpu(report, one),
    }
    what_if = {}
    wi = report.get("what_if") or {}
    if wi.get("round_robin_partitions"):
        runs = wi["round_robin_partitions"]
        n = str(runs[0]["workers"])
        rr = _median(r["chips_per_s"] for r in runs)
        what_if["round_robin_partitions"] = {
            "workers": int(n), "partitions": runs[0]["partitions"], "chips_per_s": rr, "chips_per_s_hash_keys": by_n.get(n),
            "imbalance": _median(r["imbalance"] for r in runs),
            "imbalance_hash_keys": _median(r["imbalance"] for r in tp.get(n, [])),
            "scaling_vs_1": rr / by_n["1"] if rr and by_n.get("1") else None}
    if wi.get("curl_cache_512mib"):
        runs = wi["curl_cache_512mib"]
        what_if["curl_cache_512mib"] = {
            "chips_per_s": _median(r["chips_per_s"] for r in runs), "chips_per_s_default": by_n.get("1"),
            "requests_per_chip": _median(r["http"]["requests_per_chip"] for r in runs),
            "requests_per_chip_default": _median(r["http"]["requests_per_chip"] for r in one),
            "bytes_per_chip": _median(r["http"]["bytes_per_chip"] for r in runs),
            "bytes_per_chip_default": _median(r["http"]["bytes_per_chip"] for r in one),
            "read_amplification": _median(r["http"]["read_amplification"] for r in runs)}
    if wi.get("no_tile_cache"):
        runs = wi["no_tile_cache"]
        n = str(runs[0]["workers"])
        what_if["no_tile_cache"] = {
            "workers": int(n), "chips_per_s": _median(r["chips_per_s"] for r in runs),
            "chips_per_s_with_cache": by_n.get(n),
            "read_amplification": _median(r["http"]["read_amplification"] for r in runs),
            "read_amplification_with_cache": amplification.get(n),
            "worker_cpu_s_per_chip": _median(r["cpu"]["worker_cpu_s_per_chip"] for r in runs)}
    for name in ("deflate_level_6", "zstd_level_1"):
        if wi.get(name):
            runs, beside = wi[name], wi.get(f"{name}_default") or one
            what_if[name] = {"workers": 1, **_against_default(runs, beside, stages=("write",))}
    if wi.get("whole_cell"):
        runs, beside = wi["whole_cell"], wi.get("whole_cell_default") or one
        what_if["whole_cell"] = {
            "workers": 1, **_against_default(runs, beside, stages=("read", "composite")),
            "bytes_per_chip": _median(r["http"]["bytes_per_chip"] for r in runs),
            "bytes_per_chip_default": _median(r["http"]["bytes_per_chip"] for r in beside)}
    for key in ("read_paths", "writes"):
        if wi.get(key):
            what_if[key] = wi[key]
    all_runs = [r for runs in tp.values() for r in runs] + [r for runs in wi.values() if isinstance(runs, list)
                                                             for r in runs]
    for key in ("memory_case", "zero_latency"):
        if report.get(key):
            all_runs.append(report[key])
    others = [r["cpu"]["other_processes_share"] for r in all_runs if r["cpu"].get("other_processes_share") is not None]
    return {"what_if": what_if,
            "other_processes_share_max": max(others) if others else None,
            "chips_per_s_median": {n: round(v, 4) for n, v in by_n.items() if v is not None},
            "balanced_chips_per_s_median": {n: round(v, 4) for n, v in balanced.items() if v is not None},
            "values": {k: (round(v, 4) if v is not None else None) for k, v in values.items()},
            "diagnostics": {k: (round(v, 4) if isinstance(v, (int, float)) else v) for k, v in extra.items()},
            "targets": {k: f"{op} {goal:g}" for k, (op, goal) in TARGETS.items()},
            "verdicts": {k: verdict(k, v) for k, v in values.items()}}


def print_table(report: dict[str, Any]) -> None:
    s = report["summary"]
    tp = report["throughput"]
    p = report["params"]
    print()
    print(f"cropchips benchmark  {report['date']}  {report['machine']}")
    print(f"area: {p['area']}; COG server latency {p['latency_ms']:g} ms/request; {p['reps']} run(s) per row")
    print()
    head = (f"{'workers':>7} {'chips/s':>8} {'runs':>20} {'s/chip':>7} {'tasks/worker':>12} "
            f"{'req/chip':>8} {'MB/chip':>8} {'hdr KB/chip':>11} {'ampl.':>6} {'ampl/task':>9} {'kafka ovh':>9} "
            f"{'CPU use':>7} {'other':>5} {'RSS MiB':>7}")
    print(head)
    for n, runs in tp.items():
        med = s["chips_per_s_median"].get(n) or 0.0
        r0 = runs[0]
        rss = max((x for r in runs for x in r["worker_peak_rss_mib"]), default=0)
        loads = "/".join(str(v["tasks"]) for v in sorted(r0["per_worker"].values(), key=lambda v: -v["tasks"]))
        print(f"{n:>7} {med:>8.3f} {' '.join(format(r['chips_per_s'], '.3f') for r in runs):>20} "
              f"{1 / med if med else 0:>7.3f} {loads:>12} "
              f"{_median(r['http']['requests_per_chip'] for r in runs):>8.1f} "
              f"{_median(r['http']['bytes_per_chip'] for r in runs) / 1e6:>8.2f} "
              f"{_median(r['http']['header_bytes_per_chip'] for r in runs) / 1e3:>11.0f} "
              f"{_median(r['http']['read_amplification'] for r in runs):>6.2f} "
              f"{_median(r['http']['read_amplification_per_task'] for r in runs):>9.3f} "
              f"{_median(r['kafka']['overhead_share'] for r in runs):>9.2%} "
              f"{_median(r['cpu']['utilisation'] for r in runs):>7.0%} "
              f"{_median(r['cpu']['other_processes_share'] for r in runs):>5.0%} {rss:>7.0f}")
    print()
    names = ("fields", "read", "composite", "rasterize", "write", "total")
    print("median seconds per task and stage (worker CPU s per chip; Kafka: first dispatch, finish-notice lag, gap between tasks):")
    print(f"{'workers':>7} " + " ".join(f"{x:>9}" for x in names) + f" {'CPU/chip':>9} {'dispatch':>9} {'lag':>6} {'gap':>6}")
    rows = list(tp.items())
    if report.get("zero_latency"):
        rows.append(("1 @0ms", [report["zero_latency"]]))
    if report.get("memory_case"):
        rows.append(("memory", [report["memory_case"]]))
    for n, runs in rows:
        row = [_median(r["stages_median_s"][x] for r in runs) or 0.0 for x in names]
        print(f"{n:>7} " + " ".join(f"{x:>9.3f}" for x in row)
              + f" {_median(r['cpu']['worker_cpu_s_per_chip'] for r in runs):>9.3f}"
              + f" {_median(x for r in runs for x in r['kafka']['first_task_dispatch_s']) or 0:>9.3f}"
              + f" {_median(r['kafka']['finish_notice_lag_median_s'] for r in runs) or 0:>6.3f}"
              + f" {_median(r['kafka']['between_tasks_median_s'] for r in runs) or 0:>6.3f}")
    if report.get("memory_case"):
        m = report["memory_case"]
        print(f"\nmemory case: one {p['memory_step']:g} deg cell, {p['memory_dates']} scenes, median composite: "
              f"worker peak RSS {max(m['worker_peak_rss_mib']):.0f} MiB, task {m['stages_median_s']['total']:.2f} s, "
              f"Kafka overhead {m['kafka']['overhead_share']:.1%}")
    if report.get("baseline"):
        b = report["baseline"]
        print(f"\nbaseline (stackstac, sequential, 1 process): {b['chips']} chips from {b['cells']} cells, "
              f"{b['seconds_per_chip']:.3f} s/chip, {b['http']['requests_per_chip']} req/chip, "
              f"{b['http']['bytes_per_chip'] / 1e6:.2f} MB/chip, peak RSS {b['peak_rss_mb']:.0f} MiB; "
              f"seconds: {b['stages']}")
    if report.get("master"):
        m = report["master"]
        print(f"\nmaster: {m['parcels']:,} parcels, {m['cells']} cells: make_plan {m['make_plan_s']:.2f} s vs bare "
              f"read_dataframe(columns=[]) {m['bare_read_s']:.2f} s = {m['ratio']:.2f}x; read_points parts "
              f"{m['read_points_parts_s']}")
    w = s.get("what_if") or {}
    if w:
        print("\nwhat-if (proposed changes, measured without editing the pipeline):")
    if "round_robin_partitions" in w:
        x = w["round_robin_partitions"]
        print(f"  tasks round-robin over {x['partitions']} partitions, {x['workers']} workers: {x['chips_per_s']:.3f} chips/s "
              f"(default partitioning {x['chips_per_s_hash_keys']:.3f}); imbalance {x['imbalance']} (default "
              f"{x['imbalance_hash_keys']}); {x['scaling_vs_1']:.2f}x one worker")
    if "no_tile_cache" in w:
        x = w["no_tile_cache"]
        print(f"  no --tile-cache-dir, {x['workers']} workers: {x['chips_per_s']:.3f} chips/s (with the cache "
              f"{x['chips_per_s_with_cache']:.3f}), read amplification {x['read_amplification']} (with "
              f"{x['read_amplification_with_cache']}), worker CPU {x['worker_cpu_s_per_chip']} s/chip")
    for name, what in (("deflate_level_6", "deflate, level 6 (GDAL's usual)"), ("zstd_level_1", "zstd, level 1")):
        if name in w:
            x = w[name]
            print(f"  spec compression {what}, 1 worker: {x['chips_per_s']:.3f} chips/s (the default, deflate 1: "
                  f"{x['chips_per_s_default']:.3f}), worker CPU {x['worker_cpu_s_per_chip']} s/chip "
                  f"({x['worker_cpu_s_per_chip_default']}), write {x['write_s_per_task']} s a task "
                  f"({x['write_s_per_task_default']})")
    if "whole_cell" in w:
        x = w["whole_cell"]
        print(f"  bands read and composited over the whole cell (--read-whole-cell), 1 worker: {x['chips_per_s']:.3f} "
              f"chips/s (the chips' box: {x['chips_per_s_default']:.3f}), worker CPU {x['worker_cpu_s_per_chip']} s/chip "
              f"({x['worker_cpu_s_per_chip_default']}), read {x['read_s_per_task']} s and composite "
              f"{x['composite_s_per_task']} s a task ({x['read_s_per_task_default']}, {x['composite_s_per_task_default']}), "
              f"{x['bytes_per_chip']} bytes a chip ({x['bytes_per_chip_default']})")
    if "writes" in w:
        x = w["writes"]
        print(f"  writing one chip's files ({x['chip']}), CPU ms and KB per chip by compression: " + ", ".join(
            f"{k} {v['cpu_ms_per_chip']} ms {v['kb_per_chip']} KB" for k, v in x["by_compression"].items()))
    if "read_paths" in w:
        x = w["read_paths"]
        print(f"  plain windowed RasterIO read instead of read_stack (local files, 1 thread): {x['plain_read_cpu_s_per_task']} "
              f"vs {x['warpedvrt_cpu_s_per_task']} CPU s per task; 10 m + SCL identical: "
              f"{x['plain_10m_and_scl_identical']}, 20 m identical share {x['plain_20m_share_identical']}")
    d = s["diagnostics"]
    print("\ntargets:")
    for k, v in s["values"].items():
        shown = "n/a" if v is None else (f"{v:.2%}" if k == "kafka_overhead_share" else f"{v:.3f}")
        print(f"  {k:<24} {shown:>9}  target {s['targets'][k]:<8} {s['verdicts'][k]}")
    print(f"  (read amplification against each task's own tiles: {d['read_amplification_per_task']}; "
          f"CPU ceiling of this machine: {d['cpu_ceiling_chips_per_s']} chips/s = "
          f"{d['cpu_ceiling_chips_per_s'] / s['chips_per_s_median']['1']:.2f}x one worker)"
          if d.get("cpu_ceiling_chips_per_s") and s["chips_per_s_median"].get("1") else
          f"  (read amplification against each task's own tiles: {d['read_amplification_per_task']})")
    if d.get("worker_cpu_s_per_chip_after_first_task") is not None:
        print(f"  (worker CPU a chip once each worker has ended its first task: "
              f"{d['worker_cpu_s_per_chip_after_first_task']:.3f} s, {verdict('worker_cpu_s_per_chip', d['worker_cpu_s_per_chip_after_first_task'])}; "
              + (f"the first task took {d['first_task_worker_cpu_s']:.2f} CPU s)" if d.get('first_task_worker_cpu_s') is not None else ")"))
    if d.get("worker_cpu_s_per_chip_default_runs"):
        x = d["worker_cpu_s_per_chip_default_runs"]
        print(f"  (worker CPU a chip over all {x['runs']} one-worker runs of the default setting in this report: median "
              f"{x['median']:.3f}, {x['min']:.3f}-{x['max']:.3f})")
    if d.get("kafka_overhead_share_after_first_task") is not None:
        print(f"  (Kafka's share once each worker has its first task: {d['kafka_overhead_share_after_first_task']:.2%})")
    if d.get("cpu_floor_s_per_chip") is not None:
        print(f"  (worker CPU floor: decoding the chips' tiles once, {d['decode_floor_cpu_s_per_chip']:.3f} s a chip, "
              f"+ writing a chip at deflate = {d['cpu_floor_s_per_chip']:.3f} s a chip)")
