"""The CPU floor of a chip: decoding, once, every COG tile that the chips' windows touch.

No read path can spend less on decoding than this: a tile is compressed as a whole, so a chip that
touches one pixel of it pays for all of it. With the cost of writing a chip's files
(:mod:`bench._writes`) it is the floor of ``worker_cpu_s_per_chip``: what is left above it is
resampling, masking, compositing, rasterizing, cutting and the messaging.
"""

from __future__ import annotations

import time
from collections.abc import Mapping


def decode_cpu_s(tiles: Mapping[str, set[tuple[int, int]]]) -> float:
    """CPU seconds (this thread) to decode each listed (tile row, tile col) of each local COG once,
    at full resolution, with GDAL's block cache too small to keep any."""
    import rasterio
    from rasterio.windows import Window

    total = 0.0
    with rasterio.Env(GDAL_CACHEMAX=1, GDAL_NUM_THREADS=1):
        for path, wanted in sorted(tiles.items()):
            if not wanted:
                continue
            with rasterio.open(path) as src:
                by, bx = src.block_shapes[0]
                src.read(1, window=Window(0, 0, 1, 1))  # the header and the first tile's bytes in the page cache
                windows = [Window(c * bx, r * by, min(bx, src.width - c * bx), min(by, src.height - r * by))
                           for r, c in sorted(wanted)]
                for window in windows:  # the file's bytes come from the page cache: only the decode is timed
                    src.read(1, window=window)
                t0 = time.thread_time()
                for window in windows:
                    src.read(1, window=window)
                total += time.thread_time() - t0
    return total
