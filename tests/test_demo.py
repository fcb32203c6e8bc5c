"""The README's first command: `make demo` runs `python -m cropchips.demo`, the whole pipeline on one machine."""

from __future__ import annotations

import json
import subprocess
import sys

import geopandas as gpd
import pystac
from conftest import REPO


def test_demo_runs_the_whole_pipeline_and_leaves_a_dataset(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cropchips.demo", "--output", str(tmp_path / "demo"),
                           "--chip-size", "64"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    # The master's and the monitor's own lines come first; the demo's summary is the last JSON object.
    start = done.stdout.rfind("\n{\n") + 1
    summary, end = json.JSONDecoder().raw_decode(done.stdout[start:])
    assert "catalog.json (STAC)" in done.stdout[start + end:]
    assert summary["statuses"]["failed"] == 0 and summary["statuses"]["ok"] >= 1 and summary["chips"] > 0
    dataset = tmp_path / "demo" / "dataset"
    images = sorted(p.stem for p in (dataset / "images").glob("*.tif"))
    assert len(images) == summary["chips"]
    index = gpd.read_parquet(dataset / "index.parquet")
    # Every chip is indexed but those dropped for overlapping a chip of another split.
    dropped = sum(summary["dataset"]["dropped_for_overlap"].values())
    assert set(index["name"]) <= set(images) and len(index) + dropped == len(images) == summary["chips"]
    assert summary["dataset"]["chips"] == len(index)
    assert len(set(index["split"])) >= 2, "the demo's split blocks should give it more than one split"
    catalog = pystac.Catalog.from_file(str(dataset / "catalog.json"))
    assert sorted(item.id for item in catalog.get_items(recursive=True)) == sorted(index["name"])
    assert "<svg" in (dataset / "report.html").read_text()
