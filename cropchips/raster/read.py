"""Reading a cell's scenes: GDAL settings for remote COGs, scene file checks, windowed band reads.

Which bands a scene has, which is its quality band and what its values mean is the scene's
:class:`~cropchips.sources.base.Source`'s to say: the stack readers take it as an argument.

Scene files come from the network (a task names them), so each is opened as a GeoTIFF only and
checked before anything is read from it (:func:`open_scene`), and a task's arrays are sized
before they are allocated (:func:`task_memory_bytes`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.env import set_gdal_config
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from cropchips.raster.composite import has_data
from cropchips.errors import InputDataError, RetryableError
from cropchips.retry import READS, retry
from cropchips.queue.messages import Scene
from cropchips.sources.base import Source
from cropchips.raster.grid import TargetGrid
from cropchips.raster.tile_cache import FetchError, RemoteFileError, TileCache, with_shared_openers

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A part of a grid: (row, col, height, width) in the grid's pixels.
GridWindow = tuple[int, int, int, int]

#: GDAL configuration for reading Cloud-Optimized GeoTIFFs over HTTP. Every option says why.
GDAL_OPTIONS: dict[str, str] = {
    # Opening a remote file would otherwise list its "directory" (an extra, slow S3 LIST request).
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # Only .tif/.tiff are ever opened; other extensions never trigger speculative requests.
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    # Adjacent tiles of one window are fetched in one range request instead of several.
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    # HTTP/2 multiplexing lets the range requests of one file share a connection.
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_VERSION": "2",
    # Keep fetched blocks in memory so that headers and tiles are not fetched twice per task.
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(64 * 1024 * 1024),
    # /vsicurl/'s own cache of downloaded regions (GDAL's default is 16 MB, less than one task
    # streams): 256 MB lets neighbouring cells of a worker reuse shared 1024 px tiles and headers
    # (measured: 62% fewer requests with 512 MB in bench/).
    "CPL_VSIL_CURL_CACHE_SIZE": str(256 * 1024 * 1024),
    # GDAL retries 429/5xx answers itself, with this delay doubling each time.
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    # A stalled connection fails instead of hanging the worker (and its Kafka session) forever.
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_CONNECTTIMEOUT": "15",
    # Earth Search's buckets are public: never look for (or require) AWS credentials.
    "AWS_NO_SIGN_REQUEST": "YES",
    # A VRT band of subClass VRTRawRasterBand reads any local file as pixels (/etc/passwd as "B02").
    # Scene files are opened with the GTiff driver only (open_scene), so no VRT is ever parsed; this
    # is the second lock, honoured by GDAL >= 3.12 (the 3.10 that rasterio 1.4 ships ignores it).
    "GDAL_VRT_ENABLE_RAWRASTERBAND": "NO",
    # No option here stops GDAL (curl) from following HTTP redirects to other hosts: GDAL 3.10 has
    # none. README "Scene files and hrefs: what a worker will open" says what an operator does.
}

#: Attempts per band read before the error is final (GDAL's own HTTP retries come on top).
READ_ATTEMPTS = 3

#: Largest block (tile or strip) a scene file may have, in pixels. GDAL decodes and caches whole
#: blocks, so the block size bounds what one read allocates whatever the window: a 384-byte sparse
#: GeoTIFF with one 32768 x 32768 tile made a 700 x 700 read allocate 2.1 GiB. 4096 x 4096 (32 MiB
#: as uint16) is 16 times the 1024 px tiles of Earth Search's COGs, and holds a 10980 px wide strip.
MAX_BLOCK_PIXELS = 4096 * 4096

#: Largest width or height of a scene file: a Sentinel-2 tile is 10980 px at 10 m.
MAX_IMAGE_SIDE = 100_000

#: Pixel types a Sentinel-2 L2A band file may have (reflectance: uint16, SCL: uint8).
SCENE_DTYPES: tuple[str, ...] = ("uint8", "uint16")

#: Bytes a task holds per grid pixel and per scene read, at its peak (the median composite): the
#: stack (10 bands x 2 bytes + 1 SCL byte), its clear mask (1), composite()'s copy of the usable
#: scenes' bands (20) with their clear mask (1), and the median's per-band sort buffer and its
#: working space (4), plus one byte of margin. ``--temporal stack`` and ``least-cloudy`` hold less.
#: Measured with tracemalloc (26 bytes a scene beyond the stack); a test holds a real task to it.
TASK_BYTES_PER_SCENE_PIXEL = 21 + 1 + 20 + 1 + 4 + 1

#: Bytes a task holds per grid pixel whatever the scene count, at the same peak: the composite
#: image (20), the median's counts and middle indices (3 x 8 int64) and its per-band temporaries
#: (about 16), the clear-observation and coverage maps (4 + 1); measured ~60, rounded up.
TASK_BYTES_PER_PIXEL = 64


def grid_origin(href: str, band: str = "B02", datasets: OpenDatasets | FreshFiles | None = None
                ) -> tuple[float, float]:
    """Upper-left corner of a file's pixel grid, from its own header (never the item's metadata); opened
    as :func:`read_band` opens it: with :class:`OpenDatasets`, the file stays open for the task's read
    of that band (one open for both)."""
    def read() -> tuple[float, float]:
        with rasterio.Env(**GDAL_OPTIONS), _surfacing(_tiles_of(datasets)), _opened(href, datasets) as src:
            return src.transform.c, src.transform.f

    return with_read_retries(lambda: with_shared_openers(read), band, href)


def open_scene(href: str, tiles: TileCache | None = None) -> rasterio.DatasetReader:
    """Open a scene band file as a GeoTIFF (nothing else) and check that it is safe to read.

    Left to itself GDAL picks the driver from the content: a VRT named ``B02.tif`` would be read
    as a VRT and make the worker open any file or URL it names. Only the GTiff driver is allowed
    (rasterio passes ``driver`` to GDALOpenEx as its allowed drivers), so anything else is refused
    at once, as is a GeoTIFF that :func:`check_scene_file` rejects. Both refusals are final
    (InputDataError): the same file fails the same way on every retry.

    With ``tiles``, an ``http(s)://`` file is read through that host-wide cache instead of GDAL's
    ``/vsicurl/`` (:mod:`cropchips.raster.tile_cache`); other hrefs are opened as always.
    """
    opener = tiles.opener(href) if tiles is not None and is_remote(href, http_only=True) else None
    try:
        src = rasterio.open(href, driver="GTiff", opener=opener)
    except RasterioIOError as exc:
        if "not recognized as" in str(exc).lower():
            raise NotAGeoTIFF(f"scene file {href} is not a GeoTIFF ({exc}); scene bands are opened as "
                              "GeoTIFF/COG only, so a VRT or any other format is refused: point the "
                              "task's asset at the band's .tif") from exc
        raise
    try:
        check_scene_file(src, href)
        if opener is not None:
            tiles.learn_layout(href, src)
    except BaseException:
        src.close()
        raise
    return src


def check_scene_file(src: rasterio.DatasetReader, href: str) -> None:
    """Raise InputDataError naming ``href`` unless the open file looks like a Sentinel-2 band:
    a GeoTIFF with at least one band of uint8/uint16, at most :data:`MAX_IMAGE_SIDE` px a side,
    in blocks of at most :data:`MAX_BLOCK_PIXELS` (checked before any pixel is read)."""
    problems = []
    if src.driver != "GTiff":
        problems.append(f"it was opened by GDAL's {src.driver} driver, not GTiff")
    if src.count < 1:
        problems.append("it has no band")
    odd = sorted(set(src.dtypes) - set(SCENE_DTYPES))
    if odd:
        problems.append(f"its pixel type is {', '.join(odd)}, not {' or '.join(SCENE_DTYPES)}")
    if not (1 <= src.width <= MAX_IMAGE_SIDE and 1 <= src.height <= MAX_IMAGE_SIDE):
        problems.append(f"it is {src.width} x {src.height} px, over {MAX_IMAGE_SIDE} px a side")
    if src.count >= 1:
        rows, cols = max(src.block_shapes, key=lambda shape: shape[0] * shape[1])
        if rows * cols > MAX_BLOCK_PIXELS:
            problems.append(f"its blocks (tiles or strips) are {cols} x {rows} px, over the "
                            f"{MAX_BLOCK_PIXELS:,} px a block allowed (4096 x 4096)")
    if problems:
        raise InputDataError(f"scene file {href} is refused: {'; '.join(problems)}. A Sentinel-2 band is a "
                             "uint16 (SCL: uint8) GeoTIFF tiled in small blocks (Earth Search COGs: 1024 px); "
                             "check the task's asset href")


@dataclass
class SceneStack:
    """Bands and quality band of several scenes on one grid."""

    scenes: list[Scene]
    """Scenes in the order of the first axis."""
    data: np.ndarray
    """(scenes, bands, rows, cols) uint16, bands in the order asked for, 0 = nodata."""
    quality: np.ndarray
    """(scenes, rows, cols) the quality band, of the source's ``quality_dtype`` (Sentinel-2: SCL, uint8, 0 = nodata)."""


def resampling_for(categorical: bool, src_res: float, dst_res: float) -> Resampling:
    """Nearest for a categorical band (classes must not be averaged: a quality band) and for
    same-resolution bands (an exact copy); bilinear to upsample 20 m reflectance to 10 m."""
    if categorical or math.isclose(src_res, dst_res, rel_tol=1e-6):
        return Resampling.nearest
    return Resampling.bilinear


class OpenDatasets:
    """Band files kept open across reads and tasks of one process, the least recently used closed first.

    A file that stays open keeps its parsed header and, in GDAL's block cache, its decoded tiles.
    A neighbouring cell's task that needs the same 1024 px tiles (one covers about 2 x 2 cells at
    10 m, 4 x 4 at 20 m) then neither fetches nor decodes them again; GDAL's ``/vsicurl/`` cache
    does not help there, because the tile reads of a window go through its multi-range path,
    which bypasses that cache. The block cache is process-wide, so creating this sets its size
    (``GDAL_CACHEMAX``): that bounds the memory, and the least recently used tiles go first.

    Thread-safe: a file in use by one thread is read by another through a handle of its own.
    """

    def __init__(self, block_cache_bytes: int, max_open: int = 256, *, tiles: TileCache | None = None):
        if block_cache_bytes <= 0 or max_open <= 0:
            raise ValueError("block_cache_bytes and max_open must be > 0")
        self.tiles = tiles
        self.max_open = max_open
        self.block_cache_bytes = block_cache_bytes
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[rasterio.DatasetReader, threading.Lock]] = OrderedDict()
        set_gdal_config("GDAL_CACHEMAX", int(block_cache_bytes))

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    @contextmanager
    def dataset(self, href: str) -> Iterator[rasterio.DatasetReader]:
        """The open dataset of ``href`` (opened on first use), for this thread alone while in use.
        A read that fails closes it, so that a retry starts from a fresh handle."""
        with self._lock:
            entry = self._open.get(href)
            if entry is not None:
                self._open.move_to_end(href)
        if entry is None:
            src = open_scene(href, self.tiles)
            with self._lock:
                entry = self._open.get(href)
                if entry is None:
                    entry = self._open[href] = (src, threading.Lock())
                    self._evict()
                else:  # another thread opened it meanwhile
                    src.close()
        src, in_use = entry
        if not in_use.acquire(blocking=False):
            with open_scene(href, self.tiles) as own:
                yield own
            return
        try:
            yield src
        except BaseException:
            with self._lock:
                if self._open.get(href) is entry:
                    del self._open[href]
            src.close()
            raise
        finally:
            in_use.release()

    def _evict(self) -> None:
        """Close the least recently used files beyond ``max_open`` (files in use are skipped)."""
        for href in list(self._open):
            if len(self._open) <= self.max_open:
                return
            self._close_if_idle(href)

    def close(self) -> None:
        """Close every file not in use."""
        def close_all() -> None:
            with self._lock:
                for href in list(self._open):
                    self._close_if_idle(href)

        with_shared_openers(close_all)

    def _close_if_idle(self, href: str) -> None:
        """Close and forget ``href`` unless a reader holds it (caller holds ``_lock``)."""
        src, in_use = self._open[href]
        if in_use.acquire(blocking=False):
            try:
                del self._open[href]
                src.close()
            finally:
                in_use.release()


class FreshFiles:
    """Like :class:`OpenDatasets` with no cache of open files: each read opens its file and closes it
    after, through ``tiles`` (the host-wide tile cache) for remote files."""

    def __init__(self, tiles: TileCache | None):
        self.tiles = tiles

    @contextmanager
    def dataset(self, href: str) -> Iterator[rasterio.DatasetReader]:
        with open_scene(href, self.tiles) as src:
            yield src

    def close(self) -> None:
        pass


def is_remote(href: str, *, http_only: bool = False) -> bool:
    """Is ``href`` read over a network: any URL scheme but ``file://`` (which decides how its read errors
    are retried, :func:`with_read_retries`), or with ``http_only``, ``http(s)://`` alone (what the
    tile cache serves, when a worker has one; ``s3://`` and the rest go through GDAL)?"""
    if http_only:
        return href.startswith(("http://", "https://"))
    return "://" in href and not href.startswith("file://")


def _surfacing(tiles: TileCache | None) -> AbstractContextManager[None]:
    """Where a read through ``tiles`` fails, raise the cache's own error (a 404, a cut connection)
    rather than GDAL's bare "Resource temporarily unavailable"."""
    return tiles.surfacing_errors() if tiles is not None else nullcontext()


def _tiles_of(datasets: OpenDatasets | FreshFiles | None) -> TileCache | None:
    return None if datasets is None else datasets.tiles


def _opened(href: str, datasets: OpenDatasets | FreshFiles | None) -> AbstractContextManager[rasterio.DatasetReader]:
    """``href`` kept open in (or opened fresh through) ``datasets``; without, opened for this read alone."""
    return open_scene(href) if datasets is None else datasets.dataset(href)


def read_band(href: str, band: str, grid: TargetGrid, datasets: OpenDatasets | FreshFiles | None = None, *,
              categorical: bool = False, within: GridWindow | None = None) -> np.ndarray:
    """One band of one scene onto ``grid`` (any CRS and resolution in, ``grid`` out), 0 outside the file;
    with ``within`` (row, col, height, width in grid pixels), that part of the grid only, holding the
    pixels a read of the whole grid holds there.

    Only the tiles the grid's window needs are read. Transient I/O errors are retried. With
    ``datasets`` the file stays open afterwards (see :class:`OpenDatasets`); without, it is closed.
    A ``categorical`` band (a quality band of classes) is resampled by nearest neighbour.
    """
    def read() -> np.ndarray:
        tiles = _tiles_of(datasets)
        with rasterio.Env(**GDAL_OPTIONS), _surfacing(tiles):
            with _opened(href, datasets) as src:
                out = read_onto_grid(src, grid, categorical=categorical, within=within)
                if tiles is not None:
                    tiles.check()  # inside: a handle that read failed bytes is closed and dropped
                return out

    return with_read_retries(lambda: with_shared_openers(read), band, href)


def read_onto_grid(src: rasterio.DatasetReader, grid: TargetGrid, *, categorical: bool = False,
                   within: GridWindow | None = None) -> np.ndarray:
    """Band 1 of an open dataset onto ``grid``: uint16/uint8 as stored, 0 where there is no data; with
    ``within`` (row, col, height, width), only that part of ``grid``, with the pixels the whole would hold.

    When the grid lies on the file's own pixel lattice (same CRS, north-up, the file's pixel an
    integer multiple of the grid's: always the case for scenes in the cell's UTM zone, since
    :func:`cell_grid` snaps to the scene origin), the file's native pixels are read and resampled
    in numpy (:func:`_nearest_on_lattice`, :func:`_bilinear_x2`), which costs a fraction of the
    warper's CPU and gives the same pixels. Anything else (another UTM zone) goes through a
    ``WarpedVRT``. Each lattice pixel is computed from its own neighbourhood of native pixels, so a part
    of the grid is read on its own; the warper's (approximate) transformation depends on the extent of
    what it warps, so off the lattice the whole grid is warped and the part cut out of it.
    """
    resampling = resampling_for(categorical, abs(src.transform.a), grid.resolution)
    part = grid if within is None else grid.window(*within)
    lattice = _lattice_offsets(src, part)
    if lattice is not None:
        factor, col, row = lattice
        if resampling == Resampling.nearest:
            return _nearest_on_lattice(src, part, factor, col, row)
        if factor == 2:
            return _bilinear_x2(src, part, col, row)
    with WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                   resampling=resampling, src_nodata=_nodata(src), nodata=0) as vrt:
        out = vrt.read(1)
    if within is None:
        return out
    row, col, height, width = within
    return np.ascontiguousarray(out[row:row + height, col:col + width])


def _nodata(src: rasterio.DatasetReader) -> float:
    """The file's nodata value; 0 when it declares none (0 is Sentinel-2 L2A's nodata)."""
    return src.nodata if src.nodata is not None else 0


def _lattice_offsets(src: rasterio.DatasetReader, grid: TargetGrid) -> tuple[int, int, int] | None:
    """``(factor, col, row)`` when ``grid`` lies on the file's pixel lattice, else None.

    ``factor`` is the file's pixel size over the grid's (an integer: 1 for 10 m bands, 2 for 20 m
    bands on a 10 m grid); ``col``/``row`` are the grid's upper-left corner in grid pixels from the
    file's upper-left corner (negative or beyond the file is allowed: those pixels are nodata).
    """
    if src.crs is None or src.crs.to_epsg() != grid.epsg:
        return None
    t, res = src.transform, grid.resolution
    if t.b != 0 or t.d != 0 or t.a <= 0 or not math.isclose(-t.e, t.a, rel_tol=1e-9):
        return None
    factor = t.a / res
    col = (grid.transform.c - t.c) / res
    row = (t.f - grid.transform.f) / res
    if not all(abs(v - round(v)) < 1e-6 for v in (factor, col, row)) or round(factor) < 1:
        return None
    return round(factor), round(col), round(row)


def _read_padded(src: rasterio.DatasetReader, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Native pixels ``rows[0]:rows[1]``, ``cols[0]:cols[1]`` of band 1 (may reach outside the file:
    those pixels are filled with the nodata value). A plain windowed read, no resampling."""
    r0, r1 = rows
    c0, c1 = cols
    out = np.full((r1 - r0, c1 - c0), _nodata(src), dtype=src.dtypes[0])
    rr0, rr1 = max(r0, 0), min(r1, src.height)
    cc0, cc1 = max(c0, 0), min(c1, src.width)
    if rr0 < rr1 and cc0 < cc1:
        out[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = src.read(1, window=Window(cc0, rr0, cc1 - cc0, rr1 - rr0))
    return out


def _nearest_on_lattice(src: rasterio.DatasetReader, grid: TargetGrid, factor: int, col: int, row: int) -> np.ndarray:
    """Nearest neighbour on a shared lattice: each grid pixel takes the file pixel that contains its
    centre (an exact copy when ``factor`` is 1). Nodata stays nodata (0)."""
    cols = (col + np.arange(grid.width)) // factor
    rows = (row + np.arange(grid.height)) // factor
    native = _read_padded(src, (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1))
    if factor == 1:
        out = native
    else:  # grid pixel i takes native (row % factor + i) // factor: each native pixel repeated, then cut
        r, c = row % factor, col % factor
        out = np.repeat(np.repeat(native, factor, axis=0)[r:r + grid.height], factor, axis=1)[:, c:c + grid.width]
    nodata = _nodata(src)
    if nodata != 0:
        out = np.where(out == nodata, 0, out)
    return np.ascontiguousarray(out)


def _bilinear_x2(src: rasterio.DatasetReader, grid: TargetGrid, col: int, row: int) -> np.ndarray:
    """Bilinear ×2 upsampling of the file's native pixels onto the grid, ignoring nodata like GDAL's warper.

    A grid pixel's centre lies a quarter of a file pixel from the centre of the file pixel that
    contains it (its *parent*, weight 3/4 per axis) towards one neighbour (weight 1/4): the four
    weights are 9, 3, 3 and 1 sixteenths. As in the warper, a pixel whose parent is nodata (or
    outside the file) is nodata, and nodata neighbours are left out with the other weights
    renormalised, so no value is ever blended with the nodata 0. The sums are exact integers,
    rounded half up like the warper's conversion to integer.
    """
    # Native rows/cols with one pixel of margin around the parents of the grid's first and last pixels.
    r0, r1 = row // 2 - 1, (row + grid.height - 1) // 2 + 2
    c0, c1 = col // 2 - 1, (col + grid.width - 1) // 2 + 2
    native = _read_padded(src, (r0, r1), (c0, c1))
    valid = native != _nodata(src)
    if valid.all():
        num = _up_rows(_up_cols(native, col % 2, grid.width, np.uint32), row % 2, grid.height, np.uint32)
        num += 8  # the exact sum over 16, rounded half up
        num >>= 4
        return num.astype(native.dtype)
    values = native.copy()
    values[~valid] = 0
    num = _up_rows(_up_cols(values, col % 2, grid.width, np.uint32), row % 2, grid.height, np.uint32)
    den = _up_rows(_up_cols(valid, col % 2, grid.width, np.uint8), row % 2, grid.height, np.uint8)
    out = ((num + 8) >> 4).astype(native.dtype)  # right where all four are valid (den 16)
    # Elsewhere the valid ones' weights are renormalised. The parent alone weighs 9 of 16, the three
    # neighbours 7 together: parent valid <=> den >= 9.
    edge = (den != 16) & (den >= 9)
    weights = den[edge].astype(np.uint32)
    out[edge] = (2 * num[edge] + weights) // (2 * weights)
    out[den < 9] = 0
    return out


def _up_rows(a: np.ndarray, start: int, size: int, dtype: type) -> np.ndarray:
    """×2 along the rows, in ``dtype``: each parent row ``a[1:-1]`` gives a first child (3 x parent +
    previous row) and a second (3 x parent + next); ``start`` is the first child wanted (0 or 1),
    ``size`` how many."""
    out = np.empty((2 * (a.shape[0] - 2), a.shape[1]), dtype=dtype)
    second = out[1::2]
    np.multiply(a[1:-1], 3, out=second, dtype=dtype, casting="unsafe")  # 3 x parent, in place below
    np.add(second, a[:-2], out=out[0::2], dtype=dtype, casting="unsafe")
    np.add(second, a[2:], out=second, dtype=dtype, casting="unsafe")
    return out[start:start + size]


def _up_cols(a: np.ndarray, start: int, size: int, dtype: type) -> np.ndarray:
    """:func:`_up_rows` along the columns."""
    out = np.empty((a.shape[0], 2 * (a.shape[1] - 2)), dtype=dtype)
    second = out[:, 1::2]
    np.multiply(a[:, 1:-1], 3, out=second, dtype=dtype, casting="unsafe")
    np.add(second, a[:, :-2], out=out[:, 0::2], dtype=dtype, casting="unsafe")
    np.add(second, a[:, 2:], out=second, dtype=dtype, casting="unsafe")
    return out[:, start:start + size]


class NotAGeoTIFF(InputDataError):
    """GDAL's GeoTIFF driver does not recognise the file (or, over a network, what arrived of it)."""


def with_read_retries(read: Callable[[], T], band: str, href: str) -> T:
    """Run ``read``, retrying transient I/O errors (:data:`~cropchips.retry.READS`), each retry logged.

    A missing file (a local path that is not there, HTTP 404) is final at once (InputDataError).
    Over a network, a connection cut while GDAL reads the header makes the file look missing or
    "not recognized" too, so for a remote href those are retried like any other error: a file
    that still is not a GeoTIFF after :data:`READ_ATTEMPTS` tries is final, anything else then
    becomes RetryableError (GDAL's own HTTP retries of 5xx answers come on top).
    """
    remote = is_remote(href)

    def attempt() -> T:
        try:
            return read()
        except RemoteFileError as exc:  # the tile cache's word on the server's answer: final
            raise InputDataError(f"cannot read {band} at {href}: {exc}") from exc
        except RasterioIOError as exc:
            if _is_missing(str(exc), remote):
                raise InputDataError(f"cannot open {band} at {href}: {exc}") from exc
            raise

    def transient(exc: BaseException) -> bool:
        return isinstance(exc, (RasterioIOError, FetchError)) or (remote and isinstance(exc, NotAGeoTIFF))

    try:
        return retry(attempt, f"read of {band} from {href}", transient=transient, attempts=READ_ATTEMPTS,
                     backoff=READS)
    except RasterioIOError as exc:  # still failing after every attempt (a NotAGeoTIFF passes through as it is)
        if remote and _looks_malformed(str(exc)):
            raise InputDataError(f"cannot read {band} at {href} ({READ_ATTEMPTS} tries): {exc}") from exc
        raise RetryableError(f"reading {band} from {href} failed {READ_ATTEMPTS} times: {exc}") from exc


def _is_missing(message: str, remote: bool = False) -> bool:
    low = message.lower()
    if remote:  # only the server's own word is final; "does not exist" may be a cut connection
        return "http response code: 404" in low or "http error code: 404" in low or "404 not found" in low
    return "no such file" in low or "404" in low or "not recognized as" in low or "does not exist" in low


def _looks_malformed(message: str) -> bool:
    """After every retry, a message about the file's content (not the connection) is final."""
    return "not recognized as" in message.lower()


def read_stack(scenes: Sequence[Scene], grid: TargetGrid, source: Source, *, bands: Sequence[str] | None = None,
               threads: int = 8, datasets: OpenDatasets | FreshFiles | None = None) -> SceneStack:
    """Read ``bands`` (default: all of the source's) and the quality band of every scene onto
    ``grid``, ``threads`` files at a time (remote reads are latency-bound, so they overlap);
    ``datasets``: see :func:`read_band`. Only the bands asked for are fetched."""
    bands = tuple(source.bands if bands is None else bands)
    data = np.zeros((len(scenes), len(bands), grid.height, grid.width), dtype="uint16")
    quality = np.zeros((len(scenes), grid.height, grid.width), dtype=source.quality_dtype)
    jobs = [(scene, band, data[i, b]) for i, scene in enumerate(scenes) for b, band in enumerate(bands)]
    jobs += [(scene, source.quality_band, quality[i]) for i, scene in enumerate(scenes)]
    _read_into(jobs, grid, source, threads=threads, datasets=datasets)
    return SceneStack(scenes=list(scenes), data=data, quality=quality)


def _read_into(jobs: Sequence[tuple[Scene, str, np.ndarray]], grid: TargetGrid, source: Source, *, threads: int,
               datasets: OpenDatasets | FreshFiles | None, within: GridWindow | None = None) -> None:
    """Read each job's band of its scene onto ``grid`` (or its part ``within``) into the job's array,
    ``threads`` files at a time."""
    def run(job: tuple[Scene, str, np.ndarray]) -> None:
        scene, band, out = job
        out[...] = read_band(scene.assets[band], band, grid, datasets, categorical=source.is_categorical(band),
                             within=within)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="read") as pool:
        for _ in pool.map(run, jobs):
            pass


def read_quality(scenes: Sequence[Scene], grid: TargetGrid, source: Source, *, threads: int = 8,
                 datasets: OpenDatasets | FreshFiles | None = None) -> np.ndarray:
    """The quality band of every scene onto ``grid``: (scenes, rows, cols) of the source's ``quality_dtype``
    (the ``quality`` of :func:`read_stack`, without the bands)."""
    quality = np.zeros((len(scenes), grid.height, grid.width), dtype=source.quality_dtype)
    _read_into([(scene, source.quality_band, quality[i]) for i, scene in enumerate(scenes)], grid, source,
               threads=threads, datasets=datasets)
    return quality


def read_bands(scenes: Sequence[Scene], grid: TargetGrid, source: Source, *, bands: Sequence[str],
               within: GridWindow | None = None, threads: int = 8,
               datasets: OpenDatasets | FreshFiles | None = None) -> np.ndarray:
    """``bands`` of every scene onto ``grid``, or onto its part ``within`` (row, col, height, width): (scenes,
    bands, rows, cols) uint16, the pixels :func:`read_stack` holds there."""
    height, width = (grid.height, grid.width) if within is None else within[2:]
    data = np.zeros((len(scenes), len(bands), height, width), dtype="uint16")
    _read_into([(scene, band, data[i, b]) for i, scene in enumerate(scenes) for b, band in enumerate(bands)],
               grid, source, threads=threads, datasets=datasets, within=within)
    return data


def read_clear_fractions(scenes: Sequence[Scene], grid: TargetGrid, source: Source, *,
                         clear_classes: Sequence[int] | None = None, threads: int = 8,
                         datasets: OpenDatasets | FreshFiles | None = None) -> list[float | None]:
    """Per scene, the share of ``grid`` its quality band calls clear (``clear_classes``, default the
    source's), or None where its quality band holds no data.

    Reads the quality band alone and keeps one array per thread, not one per scene: this ranks the
    scenes before their bands are read (:func:`read_scenes`). The fraction is computed as the
    ranking on a full stack computed it (the mean of the clear mask), so it is the same number.
    """
    classes = tuple(source.default_clear_classes if clear_classes is None else clear_classes)

    def fraction(scene: Scene) -> float | None:
        band = source.quality_band
        quality = read_band(scene.assets[band], band, grid, datasets, categorical=True)
        if not source.valid_mask(quality).any():
            return None
        return float(source.clear_mask(quality, classes).mean())

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="read-quality") as pool:
        return list(pool.map(fraction, scenes))


def clearest_first(fractions: Sequence[float | None]) -> list[int]:
    """Indices of the scenes with quality data, clearest first; equal fractions keep the earlier scene."""
    usable = [i for i, f in enumerate(fractions) if f is not None]
    order = np.argsort(-np.asarray([fractions[i] for i in usable], dtype="float64"), kind="stable")
    return [usable[int(j)] for j in order]


def scene_has_data(scene: Scene, grid: TargetGrid, bands: Sequence[str],
                   datasets: OpenDatasets | FreshFiles | None = None) -> bool:
    """Does any of the scene's ``bands`` hold a non-zero pixel on ``grid``? (Reads band after band,
    stopping at the first that does: usually one.)"""
    return any((read_band(scene.assets[band], band, grid, datasets) != 0).any() for band in bands)


def task_memory_bytes(n_scenes: int, grid: TargetGrid) -> int:
    """Bytes a task's arrays take at their peak when ``n_scenes`` scenes are read onto ``grid``
    (see :data:`TASK_BYTES_PER_SCENE_PIXEL` and :data:`TASK_BYTES_PER_PIXEL`)."""
    return (n_scenes * TASK_BYTES_PER_SCENE_PIXEL + TASK_BYTES_PER_PIXEL) * grid.width * grid.height


def read_scenes(scenes: Sequence[Scene], grid: TargetGrid, source: Source, *, bands: Sequence[str] | None = None,
                clear_classes: Sequence[int] | None = None, max_scenes: int = 0, threads: int = 8,
                datasets: OpenDatasets | FreshFiles | None = None,
                before_allocating: Callable[[int], None] = lambda n: None) -> tuple[list[int], SceneStack]:
    """Read the scenes a task will use: all of them, or with ``max_scenes`` the clearest over the grid.

    Returns the indices (into ``scenes``, ascending: date order) of the scenes read and their stack
    of ``bands`` (default: the source's) and quality band. With more scenes than ``max_scenes``, only
    the quality band of every scene is read first; the scenes are ranked by clear fraction
    (``clear_classes``, :func:`clearest_first`), and the bands are read for the best ``max_scenes``
    only. The choice is the one a full read would make: there a scene takes part only if its bands
    hold data too (:func:`~cropchips.raster.composite.has_data`), so a chosen scene whose bands are all 0
    gives its place to the next clearest, checked with :func:`scene_has_data`.

    ``before_allocating(n)`` is called before the bands of ``n`` scenes are read (with 1 before the
    quality pass, so that a grid too large for even one scene is refused before any read); it raises
    to refuse the task.
    """
    bands = tuple(source.bands if bands is None else bands)
    everything = list(range(len(scenes)))
    if not max_scenes or len(scenes) <= max_scenes:
        before_allocating(len(scenes))
        return everything, read_stack(scenes, grid, source, bands=bands, threads=threads, datasets=datasets)
    before_allocating(1)
    ranked = clearest_first(read_clear_fractions(scenes, grid, source, clear_classes=clear_classes,
                                                 threads=threads, datasets=datasets))
    chosen, rest = sorted(ranked[:max_scenes]), ranked[max_scenes:]
    log.info("chose %d of %d scenes by their %s clear fraction over the cell", len(chosen), len(scenes),
             source.quality_band)

    def read(indices: list[int]) -> SceneStack:
        before_allocating(len(indices))
        return read_stack([scenes[i] for i in indices], grid, source, bands=bands, threads=threads,
                          datasets=datasets)

    stack = read(chosen)
    empty = {chosen[int(p)] for p in np.flatnonzero(~has_data(stack.data, source.valid_mask(stack.quality)))}
    if not empty or not rest:
        return chosen, stack  # the empty ones (if any) are left out by the caller's has_data, as always
    del stack
    log.warning("scenes %s have %s but no band data over the cell; choosing the next clearest instead",
                [scenes[i].id for i in sorted(empty)], source.quality_band)
    kept = [i for i in chosen if i not in empty]
    for i in rest:
        if len(kept) == max_scenes:
            break
        if scene_has_data(scenes[i], grid, bands, datasets):
            kept.append(i)
    kept.sort()
    return kept, read(kept)


class SceneReader(Protocol):
    """How a :class:`~cropchips.processing.TaskProcessor` reads scenes (modelled on stackstac's
    ``Reader``): inject another (an in-memory array, a recording wrapper, a remote service) with
    ``TaskProcessor(..., reader=...)``."""

    def origin(self, href: str, band: str) -> tuple[float, float]:
        """Upper-left corner of the file's pixel lattice (the cell's grid snaps to it)."""

    def read(self, scenes: Sequence[Scene], grid: TargetGrid, source: Source, *, bands: Sequence[str],
             clear_classes: Sequence[int], max_scenes: int,
             before_allocating: Callable[[int], None]) -> tuple[list[int], SceneStack]:
        """The indices of the scenes read (date order) and their stack; see :func:`read_scenes`."""

    def close(self) -> None:
        """Release what the reader keeps open across tasks."""


class CogReader:
    """The default reader: Cloud-Optimized GeoTIFFs, local or over HTTP, through GDAL, ``threads``
    files at a time, with ``cache_bytes`` of decoded tiles kept across tasks (0: none, every file
    closed after reading) and, with ``tiles``, remote files' bytes fetched through the host-wide
    tile cache (:mod:`cropchips.raster.tile_cache`)."""

    def __init__(self, *, threads: int = 8, cache_bytes: int = 0, tiles: TileCache | None = None):
        self.threads = threads
        self.tiles = tiles
        self.datasets: OpenDatasets | FreshFiles | None = (
            OpenDatasets(cache_bytes, tiles=tiles) if cache_bytes else FreshFiles(tiles) if tiles is not None else None)

    def origin(self, href: str, band: str) -> tuple[float, float]:
        return grid_origin(href, band, self.datasets)

    def read(self, scenes: Sequence[Scene], grid: TargetGrid, source: Source, *, bands: Sequence[str],
             clear_classes: Sequence[int], max_scenes: int,
             before_allocating: Callable[[int], None]) -> tuple[list[int], SceneStack]:
        return read_scenes(scenes, grid, source, bands=bands, clear_classes=clear_classes, max_scenes=max_scenes,
                           threads=self.threads, datasets=self.datasets, before_allocating=before_allocating)

    # What a task that reads only its chips' part of the grid asks (see ``TaskProcessor``): the quality
    # bands over the whole grid, the scene ranking of ``max_scenes``, the bands over the chips' box, and
    # whether a scene holds any band data over the whole grid.

    def quality(self, scenes: Sequence[Scene], grid: TargetGrid, source: Source) -> np.ndarray:
        return read_quality(scenes, grid, source, threads=self.threads, datasets=self.datasets)

    def clear_fractions(self, scenes: Sequence[Scene], grid: TargetGrid, source: Source, *,
                        clear_classes: Sequence[int]) -> list[float | None]:
        return read_clear_fractions(scenes, grid, source, clear_classes=clear_classes, threads=self.threads,
                                    datasets=self.datasets)

    def bands(self, scenes: Sequence[Scene], grid: TargetGrid, source: Source, *, bands: Sequence[str],
              within: GridWindow | None) -> np.ndarray:
        return read_bands(scenes, grid, source, bands=bands, within=within, threads=self.threads,
                          datasets=self.datasets)

    def has_data(self, scene: Scene, grid: TargetGrid, bands: Sequence[str]) -> bool:
        return scene_has_data(scene, grid, bands, self.datasets)

    def close(self) -> None:
        if self.datasets is not None:
            self.datasets.close()
