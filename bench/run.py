"""The benchmark harness: ``python -m bench.run [--quick] [--out bench/results.json]``.

Measures, on generated data with Earth-Search-like COGs (1024 x 1024 tiles) served over HTTP with a
per-request latency (``cropchips.testing.cog_server.CogServer``) and a real Kafka-protocol broker
(``cropchips.demo.broker.EmbeddedBroker``):

1. throughput (chips/s, median of ``--reps`` runs) of 1, 2 and 4 ``worker.py`` processes;
2. per chip: HTTP requests, bytes fetched, header bytes and read amplification (bytes fetched / bytes
   of the COG tiles the chips' windows intersect, from each file's TileOffsets/TileByteCounts);
3. per task: seconds per stage, Kafka overhead (dispatch latency, share of wall time outside task
   processing) and worker peak memory (ru_maxrss from wait4), plus a 0.05 degree cell with 10 scenes;
4. the master's gridding of a large GeoPackage against a bare ``pyogrio.read_dataframe`` of it;
5. the pipeline against a plain sequential stackstac script (``bench/baseline.py``).

See bench/README.md for what each number means and the measured results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as ``python bench/run.py``
    sys.path.insert(0, str(REPO))

from bench._report import print_table, summarise
from bench._suite import log, measure
from bench.areas import CACHE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one run per worker count, 100k parcels, 2 baseline cells, no zero-latency run (< 3 min)")
    p.add_argument("--out", default=str(REPO / "bench" / "results.json"), help="JSON report path")
    p.add_argument("--latency-ms", type=float, default=40.0, help="per-request latency of the COG server")
    p.add_argument("--workers", default="1,2,4", help="worker counts, comma separated")
    p.add_argument("--reps", type=int, default=None, help="runs per worker count (default 3, --quick 1)")
    p.add_argument("--x-cells", type=int, default=4)
    p.add_argument("--y-cells", type=int, default=2)
    p.add_argument("--grid-step", type=float, default=0.05, help="cell size in degrees")
    p.add_argument("--dates", type=int, default=3, help="scenes in the throughput area")
    p.add_argument("--fields-per-cell", type=int, default=12)
    p.add_argument("--chip-size", type=int, default=256)
    p.add_argument("--chips-per-cell", type=int, default=5)
    p.add_argument("--parcels", type=int, default=None,
                   help="parcels in the master's GeoPackage (default 1M, --quick 100k; 0: skip)")
    p.add_argument("--master-reps", type=int, default=3)
    p.add_argument("--memory-step", type=float, default=0.05, help="cell size of the memory case (degrees; 0: skip)")
    p.add_argument("--memory-dates", type=int, default=10, help="scenes in the memory case")
    p.add_argument("--baseline-cells", type=int, default=None,
                   help="cells the baseline processes (default all, --quick 2; 0: skip)")
    p.add_argument("--zero-latency-run", action=argparse.BooleanOptionalAction, default=None,
                   help="one more 1-worker run with no server latency (default: on, off with --quick)")
    p.add_argument("--what-if", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure proposed changes without editing the pipeline: tasks spread round-robin over "
                        "the partitions (4 workers), a 512 MiB GDAL /vsicurl/ cache (1 worker), plain windowed reads "
                        "instead of WarpedVRT (default: on, off with --quick)")
    p.add_argument("--cache", default=str(CACHE), help="where generated inputs are kept")
    p.add_argument("--workdir", default=None,
                   help="folder for the runs' outputs and tile caches (default: /dev/shm when it is writable with 2 GiB "
                        "free, else the system's temporary folder; see bench/README.md)")
    p.add_argument("--show", metavar="JSON", default=None, help="print the table of a saved report and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        saved["summary"] = summarise(saved)
        print_table(saved)
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    started = time.perf_counter()
    report = measure(args)
    report["summary"] = summarise(report)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    busy = report["summary"]["other_processes_share_max"]
    if busy is not None and busy > 0.1:
        log(f"WARNING: other processes used up to {busy:.0%} of the machine's CPU during a run: the numbers are "
            "skewed; run again on a quiet machine")
    log(f"report written to {out} ({report['elapsed_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
