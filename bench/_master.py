"""The master's planning of a large GeoPackage (``make_plan``) against a bare ``pyogrio.read_dataframe`` of it."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.areas import LAYER, ParcelsSpec, build_parcels


def bench_master(spec: ParcelsSpec, reps: int) -> dict[str, Any]:
    """Seconds of the master's planning (make_plan: open, read_points, count, scenes) vs a bare read."""
    import pyogrio
    import shapely
    from pyproj import Transformer

    from cropchips.fields.gpkg import bbox_in_crs, open_layer, read_points
    from cropchips.plan.plan import MasterOptions, make_plan
    from cropchips.spec import DatasetSpec

    path, gen_s = build_parcels(spec)
    dataset = DatasetSpec(start_x=spec.start_x, start_y=spec.start_y, grid_step=spec.grid_step, x_cells=spec.x_cells,
                          y_cells=spec.y_cells, layer=LAYER, max_cloud=100.0, datetime="2023-05-15/2023-06-30")
    grid = dataset.grid()
    items = _items_covering(grid.bbox, path.parent / f"{spec.key}.items.json")
    options = MasterOptions(gpkg=str(path), spec=dataset, stac_api=None, stac_items=str(items))
    pyogrio.read_dataframe(path, columns=[])  # warm the page cache for both
    plan_s, bare_s, points_s = [], [], []
    tasks = 0
    for _ in range(reps):
        t = time.perf_counter()
        frame = pyogrio.read_dataframe(path, columns=[])
        bare_s.append(time.perf_counter() - t)
        n_bare = len(frame)
        del frame
        t = time.perf_counter()
        plan = make_plan(options)
        plan_s.append(time.perf_counter() - t)
        tasks = len(plan.tasks)
        t = time.perf_counter()
        layer = open_layer(str(path), LAYER)
        lon, lat = read_points(layer, grid.bbox)
        grid.count(lon, lat)
        points_s.append(time.perf_counter() - t)

    # Where read_points spends its time (one more pass, step by step).
    layer = open_layer(str(path), LAYER)
    parts = {}
    t = time.perf_counter()
    meta, table = pyogrio.read_arrow(str(path), layer=LAYER, columns=[], bbox=bbox_in_crs(grid.bbox, layer.crs))
    parts["read_arrow_with_bbox"] = time.perf_counter() - t
    t = time.perf_counter()
    pyogrio.read_arrow(str(path), layer=LAYER, columns=[])
    parts["read_arrow_without_bbox"] = time.perf_counter() - t
    t = time.perf_counter()
    geoms = shapely.from_wkb(table.column(meta.get("geometry_name") or "geom").to_numpy(zero_copy_only=False))
    parts["from_wkb"] = time.perf_counter() - t
    t = time.perf_counter()
    points = shapely.point_on_surface(geoms)
    parts["point_on_surface"] = time.perf_counter() - t
    t = time.perf_counter()
    shapely.centroid(geoms)
    parts["centroid_instead"] = time.perf_counter() - t
    t = time.perf_counter()
    Transformer.from_crs(layer.crs, "EPSG:4326", always_xy=True).transform(shapely.get_x(points), shapely.get_y(points))
    parts["to_lonlat"] = time.perf_counter() - t
    plan_med, bare_med = statistics.median(plan_s), statistics.median(bare_s)
    return {"parcels": spec.n, "features_read_bare": n_bare, "cells": spec.x_cells * spec.y_cells, "tasks": tasks,
            "generation_s": round(gen_s, 1), "file_mib": round(path.stat().st_size / 2**20, 1),
            "make_plan_s": round(plan_med, 3), "grid_points_s": round(statistics.median(points_s), 3),
            "bare_read_s": round(bare_med, 3), "ratio": round(plan_med / bare_med, 3),
            "runs": {"make_plan_s": [round(x, 3) for x in plan_s], "bare_read_s": [round(x, 3) for x in bare_s]},
            "read_points_parts_s": {k: round(v, 3) for k, v in parts.items()}}


def _items_covering(bbox: tuple[float, float, float, float], path: Path) -> Path:
    """One Earth-Search-shaped item whose footprint covers ``bbox`` (the master needs a scene per cell)."""
    import shapely
    import shapely.geometry

    minx, miny, maxx, maxy = bbox
    epsg = 32600 + int((minx + maxx) / 2 // 6 + 31)
    keys = ["blue", "green", "red", "nir", "rededge1", "rededge2", "rededge3", "nir08", "swir16", "swir22", "scl"]
    footprint = shapely.box(minx - 0.01, miny - 0.01, maxx + 0.01, maxy + 0.01)
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "S2B_BENCH_20230601_0_L2A", "collection": "sentinel-2-l2a",
            "geometry": shapely.geometry.mapping(footprint), "bbox": list(footprint.bounds), "links": [],
            "properties": {"datetime": "2023-06-01T11:07:00Z", "eo:cloud_cover": 1.0, "proj:epsg": epsg,
                           "s2:processing_baseline": "05.09"},
            "assets": {k: {"href": f"https://sentinel-cogs.s3.us-west-2.amazonaws.com/bench/{k}.tif"} for k in keys}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    return path
