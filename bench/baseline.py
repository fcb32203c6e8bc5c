"""The "original sequential implementation": what a user writes first, for comparison with the pipeline.

One process, one cell after another: ``stackstac.stack`` of the 10 bands and SCL over the cell plus a
half-chip margin with stackstac's defaults (float64, NaN fill, rescale to reflectance), ``.compute()``
with dask's default scheduler, an SCL-masked median over time, the field mask rasterized with geocube,
then up to ``--chips-per-cell`` chips centred on the largest fields written as GeoTIFFs with rioxarray.

It reads the same COGs through the same HTTP server as the workers (hrefs in ``--items``).

    python -m bench.baseline --items items-http.json --gpkg fields.gpkg --start-x -5.8 --start-y 37.2 \\
        --grid-step 0.05 --x-cells 4 --y-cells 2 --out /tmp/baseline

Prints one JSON line: cells, chips, seconds (total and per stage), peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

BAND_KEYS = ["blue", "green", "red", "nir", "rededge1", "rededge2", "rededge3", "nir08", "swir16", "swir22"]
CLEAR = [4, 5, 6]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True, help="STAC FeatureCollection JSON")
    parser.add_argument("--gpkg", required=True)
    parser.add_argument("--layer", default=None)
    parser.add_argument("--start-x", type=float, required=True)
    parser.add_argument("--start-y", type=float, required=True)
    parser.add_argument("--grid-step", type=float, required=True)
    parser.add_argument("--x-cells", type=int, required=True)
    parser.add_argument("--y-cells", type=int, required=True)
    parser.add_argument("--max-cells", type=int, default=0, help="process only the first N cells (0: all)")
    parser.add_argument("--chip-size", type=int, default=256)
    parser.add_argument("--chips-per-cell", type=int, default=5)
    parser.add_argument("--out", required=True, help="output folder (images/, masks/)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    # Imports count: a user's script pays them too (reported apart).
    import geopandas as gpd
    import rioxarray  # noqa: F401
    import shapely
    import stackstac
    from geocube.api.core import make_geocube
    from pyproj import Transformer

    from cropchips.fields.classes import load_class_map

    imports_s = time.perf_counter() - started
    items = json.loads(Path(args.items).read_text())["features"]
    epsg = int(items[0]["properties"]["proj:epsg"])
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    classes = load_class_map()
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    margin = (args.chip_size // 2 + 1) * 10.0
    stages = {"stack": 0.0, "compute": 0.0, "median": 0.0, "fields": 0.0, "rasterize": 0.0, "write": 0.0}
    chips = 0
    cells = 0
    cell_list = [(row, col) for row in range(args.y_cells) for col in range(args.x_cells)]
    if args.max_cells:
        cell_list = cell_list[:args.max_cells]
    for row, col in cell_list:
        x0 = args.start_x + col * args.grid_step
        y0 = args.start_y + row * args.grid_step
        cell = (x0, y0, x0 + args.grid_step, y0 + args.grid_step)
        minx, miny, maxx, maxy = to_utm.transform_bounds(*cell, densify_pts=21)
        bounds = (minx - margin, miny - margin, maxx + margin, maxy + margin)

        t = time.perf_counter()
        stack = stackstac.stack(items, assets=BAND_KEYS + ["scl"], epsg=epsg, resolution=10, bounds=bounds)
        stages["stack"] += time.perf_counter() - t
        t = time.perf_counter()
        data = stack.compute()
        stages["compute"] += time.perf_counter() - t

        t = time.perf_counter()
        clear = data.sel(band="scl").isin(CLEAR)
        image = data.sel(band=BAND_KEYS).where(clear).median("time")
        image = image.rio.write_crs(f"EPSG:{epsg}")
        stages["median"] += time.perf_counter() - t

        t = time.perf_counter()
        fields = gpd.read_file(args.gpkg, layer=args.layer, bbox=gpd.GeoSeries([shapely.box(*cell)], crs="EPSG:4326"))
        fields["class_id"] = classes.classify(fields["EC_hcat_c"], fields["EC_hcat_n"]).astype("int32")
        fields = fields.to_crs(epsg=epsg)
        stages["fields"] += time.perf_counter() - t

        t = time.perf_counter()
        template = image.isel(band=0, drop=True)
        mask = make_geocube(vector_data=fields[["class_id", "geometry"]], measurements=["class_id"], like=template,
                            fill=0)["class_id"]
        stages["rasterize"] += time.perf_counter() - t

        t = time.perf_counter()
        # Chips centred on the largest fields whose representative point lies in the cell.
        points = fields.geometry.representative_point()
        lonlat = points.to_crs("EPSG:4326")
        inside = ((lonlat.x >= cell[0]) & (lonlat.x < cell[2]) & (lonlat.y >= cell[1]) & (lonlat.y < cell[3])).to_numpy()
        order = np.argsort(-fields.geometry.area.to_numpy()[inside])
        xs, ys = image.x.to_numpy(), image.y.to_numpy()
        seen = set()
        n = 0
        for i in order:
            if n >= args.chips_per_cell:
                break
            p = points[inside].iloc[i]
            c0 = int(np.argmin(np.abs(xs - p.x))) - args.chip_size // 2
            r0 = int(np.argmin(np.abs(ys - p.y))) - args.chip_size // 2
            if r0 < 0 or c0 < 0 or r0 + args.chip_size > len(ys) or c0 + args.chip_size > len(xs) or (r0, c0) in seen:
                continue
            seen.add((r0, c0))
            window = {"y": slice(r0, r0 + args.chip_size), "x": slice(c0, c0 + args.chip_size)}
            name = f"r{row:03d}-c{col:03d}-chip{n:02d}"
            image.isel(**window).rio.to_raster(out / "images" / f"{name}.tif")
            mask.isel(**window).rio.to_raster(out / "masks" / f"{name}.tif")
            n += 1
        chips += n
        cells += 1
        stages["write"] += time.perf_counter() - t
        del data, image, mask, stack

    total = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"cells": cells, "chips": chips, "seconds": round(total, 3), "imports_s": round(imports_s, 3),
                      "stages": {k: round(v, 3) for k, v in stages.items()},
                      "seconds_per_chip": round((total - imports_s) / chips, 4) if chips else None,
                      "peak_rss_mb": round(peak_kb / 1024, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
