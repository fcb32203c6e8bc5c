"""The worker's read path (``read_stack``) against a plain windowed RasterIO read of the same files (a what-if)."""

from __future__ import annotations

import os
import time
from typing import Any

from bench.areas import area_options


def bench_read_paths(area, max_tasks: int = 4) -> dict[str, Any]:
    """CPU of the worker's read (``read_stack``) against a plain windowed RasterIO read of the same local files
    onto the same grid, one thread, no HTTP. ``read_stack`` warped every band when this was written (hence the
    ``warpedvrt_*`` keys); it now resamples on the file's lattice in numpy and warps only off-lattice grids."""
    import numpy as np
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import from_bounds

    from cropchips.plan.plan import make_plan
    from cropchips.sources.sentinel2 import BANDS, SCL
    from cropchips.raster.grid import cell_grid, choose_epsg
    from cropchips.raster.read import GDAL_OPTIONS, grid_origin, read_stack
    from cropchips.sources import source_for

    tasks = make_plan(area_options(area, area.items)).tasks[:max_tasks]
    grids = []
    for task in tasks:
        epsg = choose_epsg(task.cell, task.scenes)
        grids.append(cell_grid(task.cell, epsg, grid_origin(task.scenes[0].assets["B02"]), 10.0, 129))

    def plain(task, grid) -> np.ndarray:
        out = np.zeros((len(task.scenes), len(BANDS) + 1, grid.height, grid.width), dtype="uint16")
        with rasterio.Env(**GDAL_OPTIONS):
            for i, scene in enumerate(task.scenes):
                for b, band in enumerate(BANDS + (SCL,)):
                    with rasterio.open(scene.assets[band]) as src:
                        window = from_bounds(*grid.bounds, transform=src.transform)
                        same = abs(src.transform.a - grid.resolution) < 1e-9
                        out[i, b] = src.read(1, window=window, out_shape=(grid.height, grid.width), boundless=True,
                                             fill_value=0, resampling=Resampling.nearest if same or band == SCL
                                             else Resampling.bilinear)
        return out

    def timed(fn) -> tuple[float, float, list]:
        c0, w0 = os.times(), time.perf_counter()
        arrays = [fn(task, grid) for task, grid in zip(tasks, grids)]
        c1 = os.times()
        return (c1.user + c1.system - c0.user - c0.system) / len(tasks), (time.perf_counter() - w0) / len(tasks), arrays

    def warped(task, grid) -> np.ndarray:
        stack = read_stack(task.scenes, grid, source_for(task.spec.collection), threads=1)
        return np.concatenate([stack.data, stack.quality[:, None].astype("uint16")], axis=1)

    warped(tasks[0], grids[0])  # warm the page cache
    w_cpu, w_wall, w_arrays = timed(warped)
    p_cpu, p_wall, p_arrays = timed(plain)
    ten = [b for b, band in enumerate(BANDS) if band in ("B02", "B03", "B04", "B08")] + [len(BANDS)]
    twenty = [b for b, band in enumerate(BANDS) if band not in ("B02", "B03", "B04", "B08")]
    same_10m = all(np.array_equal(a[:, ten], b[:, ten]) for a, b in zip(w_arrays, p_arrays))
    diff_20m = max(int(np.abs(a[:, twenty].astype("int32") - b[:, twenty].astype("int32")).max())
                   for a, b in zip(w_arrays, p_arrays))
    equal_20m = float(np.mean([np.mean(a[:, twenty] == b[:, twenty]) for a, b in zip(w_arrays, p_arrays)]))
    return {"tasks": len(tasks), "warpedvrt_cpu_s_per_task": round(w_cpu, 3), "warpedvrt_wall_s_per_task": round(w_wall, 3),
            "plain_read_cpu_s_per_task": round(p_cpu, 3), "plain_read_wall_s_per_task": round(p_wall, 3),
            "plain_10m_and_scl_identical": same_10m, "plain_20m_max_abs_diff_dn": diff_20m,
            "plain_20m_share_identical": round(equal_20m, 4)}
