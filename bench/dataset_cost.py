"""What the dataset outputs cost: COG vs plain GeoTIFF chips, the index and the STAC catalog.

    python -m bench.dataset_cost            # ~1-2 min; prints a table, writes bench/dataset_cost.json
    python -m bench.dataset_cost --chips 20000 --reps 3

1. Chip format: the throughput area's tasks (bench/areas.py, the 1024 px tiled COGs read from
   the local disk, so that reading is cheap and the write share is not diluted by HTTP waits)
   processed by one ``TaskProcessor`` with ``format: gtiff`` and ``format: cog`` in the tasks' spec,
   alternating, ``--reps`` times each. Reported: median seconds per task of the write stage and
   of the whole task, bytes per chip on disk; the COG's extra cost is the write stages'
   difference relative to a GeoTIFF task's total.
2. Index and catalog: the run's chip records, replicated into ``--chips`` records over a larger
   area (shifted copies with their own names), then ``build_index`` + ``write_index`` (the
   GeoParquet index with the overlap guard) and ``build_catalog`` + ``write_catalog`` timed.
   The share of a run is given against the worker time those chips take at the pipeline's own
   chips/s (``bench/results.json``, 1 worker), the denominator a user sees.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from cropchips.dataset.index import SplitPolicy, build_index, write_index
from cropchips.sources.hrefs import HrefPolicy
from cropchips.plan.plan import make_plan
from cropchips.processing import ProcessingOptions, TaskProcessor

from .areas import CACHE, AreaSpec, area_options, build_area

HERE = Path(__file__).parent


def chip_formats(reps: int, workdir: Path) -> dict:
    area = build_area(AreaSpec())
    tasks = make_plan(area_options(area, area.items, force=True)).tasks
    out: dict = {}
    records: list[dict] = []
    for rep in range(reps):
        for fmt in ("gtiff", "cog"):
            folder = workdir / f"{fmt}-{rep}"
            processor = TaskProcessor(ProcessingOptions(
                output_dir=folder, gpkg=str(area.gpkg), hrefs=HrefPolicy(local_dirs=(area.root.resolve(),))),
                "bench@local")
            # The chip format is the run's spec, which each task carries.
            results = [processor.process(replace(t, spec=replace(t.spec, format=fmt))) for t in tasks]
            row = out.setdefault(fmt, {"write_s": [], "total_s": [], "bytes_per_chip": [], "chips": 0})
            row["write_s"] += [r.seconds["write"] for r in results]
            row["total_s"] += [r.seconds["total"] for r in results]
            chips = [c for r in results for c in r.chips]
            size = sum((folder / c.image).stat().st_size + (folder / c.mask).stat().st_size for c in chips)
            row["bytes_per_chip"].append(size / max(1, len(chips)))
            row["chips"] = len(chips)
            if fmt == "gtiff" and not records:
                records = [{**json.loads((folder / "metadata" / f"{c.name}.json").read_text())} for c in chips]
            shutil.rmtree(folder)
    summary = {fmt: {"median_write_s_per_task": round(statistics.median(v["write_s"]), 4),
                     "median_total_s_per_task": round(statistics.median(v["total_s"]), 4),
                     "bytes_per_chip": round(statistics.median(v["bytes_per_chip"])),
                     "chips_per_run": v["chips"], "tasks": len(tasks), "reps": reps} for fmt, v in out.items()}
    g, c = summary["gtiff"], summary["cog"]
    # The write stage is where the formats differ; it is timed inside each task, so other load on
    # the machine disturbs it far less than the whole task's time.
    summary["cog_extra_s_per_task"] = round(c["median_write_s_per_task"] - g["median_write_s_per_task"], 4)
    summary["cog_extra_share"] = round(summary["cog_extra_s_per_task"] / g["median_total_s_per_task"], 4)
    summary["cog_size_ratio"] = round(c["bytes_per_chip"] / g["bytes_per_chip"], 3)
    return {"formats": summary, "records": records}


def replicate(records: list[dict], count: int) -> list[dict]:
    """``count`` records: copies of ``records`` shifted by whole 20 km steps east and north, renamed."""
    out = []
    k = 0
    while len(out) < count:
        dx, dy = 20_000.0 * (k % 50), 20_000.0 * (k // 50)
        for r in records:
            if len(out) == count:
                break
            left, bottom, right, top = r["bounds"]
            name = f"{r['name']}-x{k}"
            out.append({**r, "name": name, "image": f"images/{name}.tif", "mask": f"masks/{name}.tif",
                        "bounds": [left + dx, bottom + dy, right + dx, top + dy]})
        k += 1
    return out


def index_and_catalog(records: list[dict], count: int, reps: int, workdir: Path) -> dict:
    many = replicate(records, count)
    timings: dict[str, list[float]] = {"index_build_s": [], "index_write_s": [], "catalog_build_s": [],
                                       "catalog_write_s": []}
    have_catalog = True
    try:
        from cropchips.dataset.catalog import build_catalog, write_catalog
    except ImportError:
        have_catalog = False
    for _ in range(reps):
        folder = Path(tempfile.mkdtemp(dir=workdir))
        t = time.perf_counter()
        frame, _ = build_index(many, SplitPolicy())
        timings["index_build_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        write_index(folder, frame)
        timings["index_write_s"].append(time.perf_counter() - t)
        if have_catalog:
            t = time.perf_counter()
            docs = build_catalog(many, dict(zip(frame["name"], frame["split"])))
            timings["catalog_build_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            write_catalog(folder, docs)
            timings["catalog_write_s"].append(time.perf_counter() - t)
        shutil.rmtree(folder)
    return {"chips": count, "reps": reps,
            **{k: round(statistics.median(v), 3) for k, v in timings.items() if v}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataset_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="runs per chip format and index size")
    parser.add_argument("--chips", type=int, default=10_000, help="chips in the index/catalog timing")
    parser.add_argument("--output", type=Path, default=HERE / "dataset_cost.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        formats = chip_formats(args.reps, work)
        dataset = index_and_catalog(formats.pop("records"), args.chips, args.reps, work)
    try:
        chips_per_s = json.loads((HERE / "results.json").read_text())["summary"]["chips_per_s_median"]["1"]
    except (OSError, KeyError, ValueError):
        chips_per_s = None
    if chips_per_s:
        run_s = args.chips / chips_per_s
        dataset["worker_s_for_these_chips_at_1_worker"] = round(run_s, 1)
        dataset["index_share_of_run"] = round((dataset["index_build_s"] + dataset["index_write_s"]) / run_s, 5)
        if "catalog_build_s" in dataset:
            dataset["catalog_share_of_run"] = round(
                (dataset["catalog_build_s"] + dataset["catalog_write_s"]) / run_s, 5)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "formats": formats["formats"], "dataset": dataset}
    args.output.write_text(json.dumps(report, indent=1))
    f = formats["formats"]
    print(f"chip format ({f['gtiff']['tasks']} tasks x {args.reps} reps, {f['gtiff']['chips_per_run']} chips/run, "
          "local COGs):")
    print(f"{'format':>7} {'write s/task':>12} {'total s/task':>12} {'KB/chip':>8}")
    for fmt in ("gtiff", "cog"):
        r = f[fmt]
        print(f"{fmt:>7} {r['median_write_s_per_task']:>12.3f} {r['median_total_s_per_task']:>12.3f} "
              f"{r['bytes_per_chip'] / 1024:>8.1f}")
    print(f"COG: write stage {f['cog_extra_s_per_task']:+.3f} s per task ({f['cog_extra_share']:+.1%} of a "
          "GeoTIFF task), "
          f"size x{f['cog_size_ratio']}")
    print(f"\nindex and catalog of {dataset['chips']} chips (median of {args.reps}):")
    for key in ("index_build_s", "index_write_s", "catalog_build_s", "catalog_write_s"):
        if key in dataset:
            print(f"  {key:<16} {dataset[key]:>8.3f} s")
    if "index_share_of_run" in dataset:
        print(f"  share of the {dataset['worker_s_for_these_chips_at_1_worker']:.0f} s these chips take one worker: "
              f"index {dataset['index_share_of_run']:.2%}"
              + (f", catalog {dataset['catalog_share_of_run']:.2%}" if "catalog_share_of_run" in dataset else ""))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
