"""The whole pipeline on one machine: embedded broker, generated sample area, master, two workers, monitor.

Run with ``cropchips demo``, ``python -m cropchips.demo`` or ``make demo``. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cropchips.cli.run import EXIT_ERROR, EXIT_OK, run, setup_logging
from cropchips.demo.broker import EmbeddedBroker
from cropchips.errors import CropChipsError
from cropchips.queue.kafka import KafkaSettings, ensure_topics
from cropchips.plan.plan import new_run_id
from cropchips.demo.sample import generate_sample

log = logging.getLogger(__name__)

#: The sample area: 4 x 3 cells of 0.02 degrees (about 1.8 x 2.2 km each) near Seville.
DEMO_X_CELLS, DEMO_Y_CELLS = 4, 3
#: Split blocks of one cell (the production default, 10 km, would put the whole area in two blocks):
#: twelve blocks give train 10 cells, val 1 and test 1.
DEMO_SPLIT_BLOCK_M = 2000
#: Chips of 128 px (1.28 km) fit inside the demo's cells, which the default 256 px (2.56 km) would not.
DEMO_CHIP_SIZE = 128
#: Every label layer, so that the demo shows them all.
DEMO_LABELS = "classes,instances,boundaries"
#: The time-series variant (``--timeseries``): monthly median bins of five dates.
DEMO_PERIOD = "P1M"
DEMO_TIMESERIES_DATES = 5


def command(python: str, name: str) -> list[str]:
    """How the demo starts one role: the installed package's own command (never a script by path)."""
    return [python, "-m", "cropchips", name]


def run_demo(output: Path, *, workers: int = 2, chip_size: int = DEMO_CHIP_SIZE, timeseries: bool = False,
             python: str = sys.executable, timeout_s: float = 600.0) -> dict:
    """Run the pipeline end to end; return the monitor's final summary. ``timeseries``: monthly bins
    (a T x bands image per chip) instead of one median image."""
    output = output.resolve()
    sample = generate_sample(output / "sample", x_cells=DEMO_X_CELLS, y_cells=DEMO_Y_CELLS,
                             dates=DEMO_TIMESERIES_DATES if timeseries else 3)
    dataset = output / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    log.info("sample area generated under %s", sample.root)
    with EmbeddedBroker(log_file=output / "broker.log") as broker:
        kafka = KafkaSettings(broker.bootstrap_servers)
        ensure_topics(kafka, {"satellite-tasks": 10, "satellite-results": 1, "satellite-tasks-dlq": 1})
        common = ["--bootstrap-servers", broker.bootstrap_servers]
        run_id = new_run_id()
        master = subprocess.run(
            [*command(python, "master"), "--gpkg", str(sample.gpkg), "--layer", sample.layer,
             "--start-x", str(sample.start_x), "--start-y", str(sample.start_y), "--grid-step", str(sample.grid_step),
             "--x-cells", str(sample.x_cells), "--y-cells", str(sample.y_cells), "--stac-items", str(sample.items),
             "--collection", sample.collection, "--datetime", sample.datetime, "--max-cloud", "60",
             "--run-id", run_id, "--split-block-size", str(DEMO_SPLIT_BLOCK_M), "--chip-size", str(chip_size),
             "--labels", DEMO_LABELS, *(["--temporal-period", DEMO_PERIOD] if timeseries else []), *common],
            check=False)
        if master.returncode != 0:
            raise CropChipsError(f"master.py exited with {master.returncode}")
        procs = [subprocess.Popen(
            [*command(python, "worker"), str(n), "--gpkg", str(sample.gpkg),
             "--output-dir", str(dataset), "--local-scenes-dir", str(sample.root), "--burst", "--burst-idle", "5",
             *common])
            for n in range(1, workers + 1)]
        try:
            monitor = subprocess.run(
                [*command(python, "monitor"), "--exit-when-done", "--json", "--run-id", run_id,
                 "--output-dir", str(dataset), "--report",
                 "--timeout", str(timeout_s), *common], stdout=subprocess.PIPE, text=True, check=False)
        finally:
            deadline = time.monotonic() + 60
            for proc in procs:
                try:
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    proc.wait(timeout=30)
    if not monitor.stdout.strip():
        raise CropChipsError(f"monitor.py exited with {monitor.returncode} and no summary")
    summary = json.loads(monitor.stdout.strip().splitlines()[-1])
    summary["output_dir"] = str(dataset)
    summary["monitor_exit_code"] = monitor.returncode
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cropchips demo", description=__doc__)
    parser.add_argument("--output", default="demo-output", help="folder for the sample data and the dataset")
    parser.add_argument("--workers", type=int, default=2, help="worker processes to start")
    parser.add_argument("--chip-size", type=int, default=DEMO_CHIP_SIZE,
                        help=f"chip size in pixels (default {DEMO_CHIP_SIZE}: the demo's cells are 1.8 km wide)")
    parser.add_argument("--timeseries", action="store_true",
                        help=f"make a fixed-shape time series ({DEMO_PERIOD} median bins) instead of one image")
    args = parser.parse_args(argv)
    setup_logging("INFO")

    def body() -> int:
        summary = run_demo(Path(args.output), workers=args.workers, chip_size=args.chip_size,
                           timeseries=args.timeseries)
        print(json.dumps(summary, indent=2, sort_keys=True))
        out = summary["output_dir"]
        print(f"\nDataset written to {out}/images and {out}/masks, indexed in {out}/index.parquet and "
              f"{out}/catalog.json (STAC); open {out}/report.html in a browser")
        return EXIT_OK if summary["monitor_exit_code"] == 0 else EXIT_ERROR

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
