"""What writing a chip's files costs per compression setting (the spec's ``compression`` and ``compression_level``)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

#: (compression, level) pairs measured, the default first (level 0: the spec's default, deflate 1 and zstd 9;
#: ``deflate:6`` is GDAL's usual, the default up to commit ``f9b2a56``).
SETTINGS = (("deflate", 0), ("deflate", 6), ("zstd", 0), ("zstd", 1), ("lzw", 0), ("none", 0))


def bench_writes(area, chip_size: int = 256, reps: int = 20) -> dict[str, Any]:
    """CPU and bytes of :func:`cropchips.raster.write.write_chip` (the image of every band and the class mask)
    for a chip of real pixels from the area's first scene, at each of :data:`SETTINGS`, one thread."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from cropchips.raster.write import write_chip
    from cropchips.sources.sentinel2 import BANDS

    scene = sorted(p for p in (area.root).rglob("B02.tif"))[0].parent
    bands = []
    for band in BANDS:
        with rasterio.open(scene / f"{band}.tif") as src:
            factor = max(1, round(abs(src.transform.a) / 10.0))
            native = src.read(1, window=Window(300 // factor, 300 // factor, chip_size // factor, chip_size // factor))
        bands.append(np.repeat(np.repeat(native, factor, 0), factor, 1)[:chip_size, :chip_size])
    image = np.stack(bands).astype("uint16")
    mask = (image[0] // 300 % 9).astype("uint8")  # a class mask with fields' texture
    out: dict[str, Any] = {"chip": f"{chip_size} px, {len(BANDS)} bands + mask", "by_compression": {}}
    with tempfile.TemporaryDirectory(prefix="cropchips-writes-") as tmp:
        for compression, level in SETTINGS:
            folder = Path(tmp) / f"{compression}-{level}"
            c0 = time.process_time()
            for i in range(reps):
                write_chip(folder, f"chip{i:03d}", image, mask, crs="EPSG:32630",
                           transform=rasterio.Affine(10, 0, 500000, 0, -10, 4200000),
                           compression=compression, level=level)
            cpu = (time.process_time() - c0) / reps
            size = sum(os.path.getsize(p) for p in folder.rglob("chip000.tif"))
            out["by_compression"][f"{compression}" + (f":{level}" if level else "")] = {
                "cpu_ms_per_chip": round(cpu * 1000, 1), "kb_per_chip": round(size / 1024)}
    return out
