"""Smoke test of the benchmark harness (bench/run.py) at a tiny size: it runs end to end and reports sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_bench_harness_runs_at_tiny_size(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache"),
         "--workers", "1", "--reps", "1", "--x-cells", "2", "--y-cells", "1", "--grid-step", "0.02",
         "--dates", "2", "--fields-per-cell", "8", "--chip-size", "64", "--chips-per-cell", "2",
         "--latency-ms", "5", "--parcels", "5000", "--master-reps", "1", "--memory-step", "0",
         "--baseline-cells", "1"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "targets:" in done.stdout
    report = json.loads(out.read_text())

    run = report["throughput"]["1"][0]
    assert run["chips"] > 0 and run["statuses"] == {"ok": run["tasks"]}
    assert run["chips_per_s"] > 0
    http = run["http"]
    assert http["requests"] > 0 and http["bytes"] > 0 and 0 < http["header_bytes"] < http["bytes"]
    assert http["requests_per_chip"] > 0 and http["bytes_per_chip"] > 0
    assert http["read_amplification"] >= 1.0
    assert http["read_amplification_per_task"] > 0 and http["needed_tile_bytes_global"] > 0
    assert set(run["stages_median_s"]) == {"fields", "read", "composite", "rasterize", "write", "total"}
    assert run["stages_median_s"]["total"] >= run["stages_median_s"]["read"] > 0
    assert 0 <= run["kafka"]["overhead_share"] < 1 and run["kafka"]["first_task_dispatch_s"]
    assert run["worker_peak_rss_mib"] and all(50 < x < 4096 for x in run["worker_peak_rss_mib"])
    assert run["worker_exit_codes"] == [0]
    # Decoding the chips' tiles once is part of what the worker did: it cannot cost more than the worker's CPU.
    assert 0 < run["decode_floor_cpu_s_per_chip"] < run["cpu"]["worker_cpu_s_per_chip"]
    # What the kernel did for the workers: a share of their CPU, and the fresh pages they were handed.
    assert 0 <= run["cpu"]["worker_kernel_share"] < 1 and run["cpu"]["worker_page_faults_per_chip"] > 0
    # Without the worker's cold first task (2 tasks, one worker): the first task's CPU is part of the
    # worker's CPU over the run, and what came after it is the rest (sampled, so within a few ticks).
    cpu = run["cpu"]
    (first,) = cpu["first_task_worker_cpu_s"]
    assert 0 < first < cpu["workers_s"] + 0.05
    assert cpu["worker_cpu_s_per_chip_after_first_task"] > 0

    assert report["baseline"]["chips"] > 0 and report["baseline"]["seconds_per_chip"] > 0
    assert report["baseline"]["http"]["requests"] > 0
    master = report["master"]
    assert master["parcels"] == master["features_read_bare"] == 5000
    assert master["make_plan_s"] > 0 and master["bare_read_s"] > 0 and master["ratio"] > 0

    summary = report["summary"]
    assert set(summary["verdicts"]) == {"read_amplification", "worker_cpu_s_per_chip", "speedup_vs_baseline",
                                        "scaling_4_vs_1", "master_vs_bare_read", "worker_peak_memory_mib",
                                        "kafka_overhead_share"}
    assert summary["values"]["read_amplification"] >= 1.0
    assert summary["values"]["worker_cpu_s_per_chip"] == run["cpu"]["worker_cpu_s_per_chip"] > 0
    assert summary["diagnostics"]["worker_cpu_s_per_chip_after_first_task"] == cpu["worker_cpu_s_per_chip_after_first_task"]
    assert "once each worker has ended its first task" in done.stdout
    writes = report["what_if"]["writes"]["by_compression"]
    assert list(writes) == ["deflate", "deflate:6", "zstd", "zstd:1", "lzw", "none"]
    assert all(w["cpu_ms_per_chip"] > 0 and w["kb_per_chip"] > 0 for w in writes.values())
    assert writes["none"]["kb_per_chip"] > max(w["kb_per_chip"] for k, w in writes.items() if k != "none")
    floor = summary["diagnostics"]["cpu_floor_s_per_chip"]
    assert abs(floor - (run["decode_floor_cpu_s_per_chip"] + writes["deflate"]["cpu_ms_per_chip"] / 1000)) < 1e-3
    assert "worker CPU floor" in done.stdout
    assert summary["verdicts"]["scaling_4_vs_1"] == "n/a"  # only one worker count was run
    assert report["params"]["workdir"]  # where the runs wrote their files


def test_fleet_bench_runs_at_tiny_size(tmp_path):
    """bench.fleet with 3 worker processes, 30 tasks, 6 partitions and 1 worker leaving mid-run:
    nothing lost, nothing done twice, every figure present and finite."""
    import math

    out = tmp_path / "fleet.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--workers", "3", "--tasks", "30", "--partitions", "6",
         "--task-s", "0.1", "--leave", "1", "--settle-s", "1", "--timeout-s", "60", "--out", str(out)],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "correctness" in done.stdout
    report = json.loads(out.read_text())
    assert report["correctness"]["lost"] == 0 and report["correctness"]["doubled"] == 0
    assert report["correctness"]["results_ok_distinct"] == 30
    assert report["correctness"]["worker_exit_codes"] == {"0": 3}
    assert report["limits"] == []

    def figures(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from figures(v, f"{path}.{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            yield path, node

    values = dict(figures({k: report[k] for k in ("join", "throughput", "leave", "memory", "cpu", "machine")}))
    for key in (".join.join_s", ".join.all_partitions_assigned_s", ".throughput.steady_tasks_per_s",
                ".leave.no_task_start_s", ".leave.stayer_pause_max_s", ".leave.reassigned_after_s",
                ".memory.worker_peak_rss_mib_sum", ".memory.worker_peak_rss_mib_max", ".cpu.broker_cpu_s",
                ".machine.cores"):
        assert key in values, key
    assert all(math.isfinite(v) for v in values.values()), values
    assert math.isfinite(report["idle_share"]) and 0 <= report["idle_share"] <= 1
    assert report["join"]["join_s"] > 0 and report["throughput"]["steady_tasks_per_s"] > 0
    assert report["memory"]["worker_peak_rss_mib_max"] > 10


def test_churn_bench_runs_at_tiny_size(tmp_path):
    """bench.churn with 2 worker processes, one SIGKILLed and restarted mid-job: nothing lost, figures present."""
    out = tmp_path / "churn.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.churn", "--workers", "2", "--tasks", "120", "--partitions", "4",
         "--task-s", "0.2", "--kill-every-s", "60", "--warmup-s", "12", "--restart-s", "0.5",
         "--cases", "static:range", "--timeout-s", "120", "--out", str(out)],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (case,) = json.loads(out.read_text())["cases"]
    assert case["case"] == "static range"
    assert case["fault_free"]["kills"] == 0 and case["churn"]["kills"] >= 1
    for run in (case["fault_free"], case["churn"]):
        assert run["lost"] == 0 and run["done"] == 120 and run["tasks_per_s"] > 0
    assert 0 < case["throughput_kept"] <= 1.5


def test_a_one_worker_what_if_is_held_against_the_default_runs_made_beside_it():
    from bench._report import summarise

    report = json.loads((REPO / "bench" / "results.json").read_text())
    wi = report["what_if"]
    for name in [n for n in wi if n.endswith("_default")]:
        del wi[name]
    # A report without default runs beside the what-if (before 2026-12-02): the throughput runs stand in.
    old = summarise(report)["what_if"]["zstd_level_1"]
    assert old["chips_per_s_default"] == sorted(r["chips_per_s"] for r in report["throughput"]["1"])[1]

    beside = []
    for run, (speed, cpu, write) in zip(wi["zstd_level_1"], [(11.0, 0.07, 0.5), (13.0, 0.05, 0.3), (12.0, 0.06, 0.4)]):
        twin = json.loads(json.dumps(run))
        twin["chips_per_s"], twin["cpu"]["worker_cpu_s_per_chip"], twin["stages_median_s"]["write"] = speed, cpu, write
        beside.append(twin)
    wi["zstd_level_1_default"] = wi["whole_cell_default"] = wi["deflate_level_6_default"] = beside
    got = summarise(report)["what_if"]
    for name in ("zstd_level_1", "whole_cell", "deflate_level_6"):
        assert got[name]["chips_per_s_default"] == 12.0 and got[name]["worker_cpu_s_per_chip_default"] == 0.06
    assert got["zstd_level_1"]["write_s_per_task_default"] == 0.4
    # The what-if's own figures are its runs', whatever ran beside them.
    assert got["zstd_level_1"]["chips_per_s"] == old["chips_per_s"]


def test_the_cpu_a_chip_of_every_identical_one_worker_run_is_reported_beside_the_row():
    from bench._report import summarise

    report = json.loads((REPO / "bench" / "results.json").read_text())
    wi = report["what_if"]
    for run, cpu in zip(report["throughput"]["1"], (0.09, 0.11, 0.10)):
        run["cpu"]["worker_cpu_s_per_chip"] = cpu
    for name in [n for n in wi if n.endswith("_default")]:
        del wi[name]
    wi["zstd_level_1_default"] = [json.loads(json.dumps(report["throughput"]["1"][0])) for _ in range(2)]
    for run, cpu in zip(wi["zstd_level_1_default"], (0.07, 0.08)):
        run["cpu"]["worker_cpu_s_per_chip"] = cpu
    wi["zstd_level_1"][0]["cpu"]["worker_cpu_s_per_chip"] = 0.01  # not the default setting: left out
    got = summarise(report)["diagnostics"]["worker_cpu_s_per_chip_default_runs"]
    assert got == {"runs": 5, "median": 0.09, "min": 0.07, "max": 0.11}


def test_the_runs_go_to_ram_when_it_has_room_and_to_the_temporary_folder_otherwise(tmp_path, monkeypatch):
    import bench._suite as suite

    monkeypatch.setattr(suite, "RUN_FOLDER_MIN_FREE", 1)
    assert suite.run_folder_parent(str(tmp_path)) == str(tmp_path)
    assert suite.run_folder_parent(str(tmp_path / "missing")) is None
    monkeypatch.setattr(suite, "RUN_FOLDER_MIN_FREE", 2**62)  # more than any disk has free
    assert suite.run_folder_parent(str(tmp_path)) is None
