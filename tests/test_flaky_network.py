"""A flaky object store: ~20% of COG requests fail with 500s or connection resets, every task still succeeds."""

from __future__ import annotations

import pytest

from conftest import run_script
from cropchips.testing.cog_server import CogServer, FaultPlan
from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.queue.messages import Result, decode
from helpers import WorkerProcess, final_summary, http_items, kafka_args


@pytest.mark.parametrize("tile_cache", [False, True], ids=["gdal-vsicurl", "tile-cache"])
def test_all_tasks_succeed_through_a_store_failing_a_fifth_of_requests(broker, topics, sample_area, tmp_path,
                                                                      tile_cache):
    faults = FaultPlan(error_rate=0.1, reset_rate=0.1, seed=11, only_ranges=False)
    with CogServer(sample_area.root, faults=faults, latency_s=0.005) as server:
        items = http_items(sample_area, server, tmp_path / "items-http.json")
        published = run_script(
            "master.py", "--gpkg", str(sample_area.gpkg), "--layer", sample_area.layer,
            "--start-x", str(sample_area.start_x), "--start-y", str(sample_area.start_y),
            "--grid-step", str(sample_area.grid_step), "--x-cells", str(sample_area.x_cells),
            "--y-cells", str(sample_area.y_cells), "--stac-items", str(items), "--datetime", sample_area.datetime,
            "--max-cloud", "100", "--chip-size", "64", "--run-id", "run-flaky",
            *kafka_args(broker.bootstrap_servers, topics))
        assert published.returncode == 0, published.stderr
        cache = ["--tile-cache-dir", str(tmp_path / "tiles")] if tile_cache else []
        workers = [WorkerProcess(n, sample_area, tmp_path / "out", broker.bootstrap_servers, topics,
                                 "--allowed-hrefs", f"{server.url}/", "--burst", "--burst-idle", "5", *cache)
                   for n in (1, 2)]
        for worker in workers:
            assert worker.wait(timeout=240) == 0, worker.log[-3000:]
        stats = server.stats
    code, summary = final_summary(broker.bootstrap_servers, topics, "run-flaky")
    assert code == 0, summary
    assert summary["statuses"]["ok"] == 4 and summary["statuses"]["failed"] == 0 and summary["chips"] > 0
    # The faults really happened, about a fifth of all requests...
    assert stats.errors + stats.resets >= 0.1 * stats.requests and stats.errors > 0 and stats.resets > 0
    # ...and the retries are visible in the workers' logs (GDAL's own and ours).
    logs = "".join(w.log for w in workers)
    assert "retry" in logs.lower(), logs[-3000:]
    results = [m for m in (decode(r.value) for r in read_topic(KafkaSettings(broker.bootstrap_servers),
                                                               topics["results"])) if isinstance(m, Result)]
    assert all(r.status == "ok" for r in results)
