"""The host-wide tile cache (worker --tile-cache-dir): real COGs over a real HTTP server, real worker processes.

Each byte range of a remote file is fetched once per host whatever the window and whichever process asks,
the pixels are the ones GDAL reads from the file itself, the folder stays within its bound, and killed
writers, corrupt entries and hostile servers cost nothing but a refetch or a clear error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from conftest import REPO, shared_data
from cropchips.errors import InputDataError, RetryableError
from cropchips.raster.grid import TargetGrid
from cropchips.raster.read import CogReader, OpenDatasets, read_band, read_stack
from cropchips.raster.tile_cache import LOCK_STRIPES, LOCKS_DIR, STALE_S, TileCache
from cropchips.sources import source_for
from cropchips.testing.cog_server import CogServer, FaultPlan

SENTINEL2 = source_for("sentinel-2-l2a")
SCENE = "S2A_29RKH_20200219_0_L2A"


@pytest.fixture(scope="module")
def scene_dir() -> Path:
    return shared_data("sentinel2", SCENE)


@pytest.fixture()
def server(scene_dir):
    with CogServer(scene_dir.parent) as srv:
        yield srv


def url(server, band: str) -> str:
    return server.href(f"{SCENE}/{band}.tif")


def read_window(href: str, window: Window, tiles: TileCache | None) -> np.ndarray:
    from cropchips.raster.read import GDAL_OPTIONS, open_scene
    from cropchips.raster.tile_cache import with_shared_openers

    def read():
        with rasterio.Env(**GDAL_OPTIONS), open_scene(href, tiles) as src:
            return src.read(1, window=window)

    return with_shared_openers(read)


def served_ranges(server, band: str) -> Counter:
    return Counter(server.stats.file(f"{SCENE}/{band}.tif").ranges)


def test_pixels_are_the_files_own_and_a_second_cache_on_the_folder_fetches_nothing(server, scene_dir, tmp_path):
    window = Window(300, 200, 600, 500)  # 512 px blocks: four tiles
    with rasterio.open(scene_dir / "B02.tif") as src:
        expected = src.read(1, window=window)
    first = TileCache(tmp_path / "tiles", 2**30)
    assert np.array_equal(read_window(url(server, "B02"), window, first), expected)
    assert server.stats.requests > 0 and first.fetched_bytes == server.stats.bytes
    server.reset_stats()
    second = TileCache(tmp_path / "tiles", 2**30)  # another process of the host: the same folder
    assert np.array_equal(read_window(url(server, "B02"), window, second), expected)
    assert server.stats.requests == 0 and second.fetched_bytes == 0 and second.hit_bytes > 0


def test_a_tile_shared_by_two_windows_is_fetched_once_though_gdal_asks_for_other_ranges(server, scene_dir, tmp_path):
    tiles = TileCache(tmp_path / "tiles", 2**30)
    href = url(server, "B02")
    # The first window covers tiles (0, 0) and (1, 0), which GDAL asks for as one merged range; the second
    # covers tiles (1, 0) and (2, 0): another merged range, with tile (1, 0) in common.
    read_window(href, Window(100, 100, 600, 100), tiles)
    read_window(href, Window(700, 100, 600, 100), tiles)
    ranges = served_ranges(server, "B02")
    assert max(ranges.values()) == 1, ranges
    with rasterio.open(scene_dir / "B02.tif") as src:
        offsets = {int(src.get_tag_item(f"BLOCK_OFFSET_{x}_0", "TIFF", bidx=1)) for x in range(3)}
        sizes = {int(src.get_tag_item(f"BLOCK_OFFSET_{x}_0", "TIFF", bidx=1)):
                 int(src.get_tag_item(f"BLOCK_SIZE_{x}_0", "TIFF", bidx=1)) for x in range(3)}
    tile_ranges = {(o, o + sizes[o] - 1) for o in offsets}
    assert tile_ranges <= set(ranges), (tile_ranges, ranges)  # each tile its own request, once


def test_read_stack_through_the_cache_equals_the_plain_read_for_every_band(server, scene_dir, tmp_path, real_scene):
    from dataclasses import replace

    with rasterio.open(scene_dir / "B02.tif") as src:
        t = src.transform
        crs = src.crs
    grid = TargetGrid(epsg=crs.to_epsg(), transform=rasterio.Affine(t.a, 0, t.c + 250 * t.a, 0, t.e, t.f + 180 * t.e),
                      width=400, height=300)
    remote = replace(real_scene, assets={b: server.href(f"{SCENE}/{Path(h).name}") for b, h in real_scene.assets.items()})
    reader = CogReader(threads=4, cache_bytes=64 * 2**20, tiles=TileCache(tmp_path / "tiles", 2**30))
    try:
        got = read_stack([remote, remote], grid, SENTINEL2, threads=4, datasets=reader.datasets)
        again = read_stack([remote], grid, SENTINEL2, threads=4, datasets=reader.datasets)  # open files, other threads
    finally:
        reader.close()
    plain = read_stack([real_scene], grid, SENTINEL2, threads=1)
    assert np.array_equal(got.data[0], plain.data[0]) and np.array_equal(got.data[1], plain.data[0])
    assert np.array_equal(got.quality[0], plain.quality[0]) and np.array_equal(again.data[0], plain.data[0])
    assert plain.data.any()


def test_the_reads_keep_their_connections_open(scene_dir, tmp_path, real_scene):
    """The read threads and the cache's own fetch threads share one keep-alive pool: it must hold a
    connection for each of them, or every request beyond its size opens (and drops) a connection,
    a TLS handshake each against a real store."""
    from dataclasses import replace

    with rasterio.open(scene_dir / "B02.tif") as src:
        t, crs = src.transform, src.crs
    grid = TargetGrid(epsg=crs.to_epsg(), transform=rasterio.Affine(t.a, 0, t.c, 0, t.e, t.f), width=1098, height=1098)
    threads = 4
    with CogServer(scene_dir.parent, latency_s=0.02) as server:
        remote = replace(real_scene, assets={b: server.href(f"{SCENE}/{Path(h).name}")
                                             for b, h in real_scene.assets.items()})
        reader = CogReader(threads=threads, cache_bytes=2**20,
                           tiles=TileCache(tmp_path / "tiles", 2**30, threads=threads))
        try:
            read_stack([remote], grid, SENTINEL2, threads=threads, datasets=reader.datasets)
        finally:
            reader.close()
        requests, opened = server.stats.requests, server.connections_opened
    assert requests > 4 * 2 * threads  # enough requests that a short pool would show
    assert opened <= 2 * threads, f"{opened} connections for {requests} requests"


_READER = r"""
import sys, rasterio
from rasterio.windows import Window
sys.path.insert(0, {repo!r})
from cropchips.raster.read import GDAL_OPTIONS, open_scene
from cropchips.raster.tile_cache import TileCache
tiles = TileCache({cache!r}, 2**30)
print("ready", flush=True)
sys.stdin.readline()
with rasterio.Env(**GDAL_OPTIONS), open_scene({href!r}, tiles) as src:
    a = src.read(1, window=Window(0, 0, 1098, 1098))
print("sum", int(a.astype("int64").sum()), flush=True)
"""


def _reader_process(href: str, cache: Path) -> subprocess.Popen:
    code = _READER.format(repo=str(REPO), cache=str(cache), href=href)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def test_concurrent_worker_processes_fetch_each_range_once(scene_dir, tmp_path):
    with rasterio.open(scene_dir / "B04.tif") as src:
        expected = int(src.read(1).astype("int64").sum())
    # A slow server, so that the three processes really ask for the same tiles at the same time.
    with CogServer(scene_dir.parent, latency_s=0.15) as server:
        procs = [_reader_process(url(server, "B04"), tmp_path / "tiles") for _ in range(3)]
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = [proc.communicate(timeout=120) for proc in procs]
        ranges = served_ranges(server, "B04")
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert [o[0].split()[-1] for o in outs] == [str(expected)] * 3
    assert ranges and max(ranges.values()) == 1, ranges  # nothing fetched twice, though all three wanted it all


def test_a_writer_killed_mid_fetch_leaves_nothing_half_written(scene_dir, tmp_path):
    cache = tmp_path / "tiles"
    with rasterio.open(scene_dir / "B08.tif") as src:
        expected = int(src.read(1).astype("int64").sum())
    with CogServer(scene_dir.parent, latency_s=0.05, bandwidth_bps=400_000) as server:
        proc = _reader_process(url(server, "B08"), cache)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while server.stats.bytes < 300_000 and time.monotonic() < deadline:  # well into the tiles
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # What a writer killed between write() and rename() leaves: half an entry under a temporary name.
        some = next(p for p in cache.rglob("*") if p.is_file() and p.parent.parent.name == "v1")
        (some.parent / f"{'0' * 64}.tmp.99999.dead").write_bytes(b"half")
        # Whatever the killed process had fetched is either whole or not there.
        tiles = TileCache(cache, 2**30)
        assert read_window(url(server, "B08"), Window(0, 0, 1098, 1098), tiles).astype("int64").sum() == expected
    # The lock it held died with it; stale leftovers go on the next eviction.
    leftovers = [p for p in cache.rglob("*") if p.is_file() and ".tmp." in p.name]
    assert leftovers
    old = time.time() - STALE_S - 5
    for p in leftovers:
        os.utime(p, (old, old))
    tiles.evict()
    assert not [p for p in cache.rglob("*") if p.is_file() and ".tmp." in p.name]


def test_the_lock_files_are_a_fixed_set_that_eviction_keeps(server, scene_dir, tmp_path):
    cache = tmp_path / "tiles"
    tiles = TileCache(cache, 2**30)
    read_window(url(server, "B02"), Window(0, 0, 1098, 1098), tiles)  # every tile of a 10 m band
    entries = [p for p in (cache / "v1").glob("[0-9a-f][0-9a-f]/*") if p.is_file()]
    locks = sorted((cache / "v1" / LOCKS_DIR).iterdir())
    assert len(entries) > 8
    # One lock file per stripe used, none beside the entries (a lock file each doubled the folder's files).
    assert not [p for p in entries if p.name.endswith(".lock")]
    assert 0 < len(locks) <= min(len(entries), LOCK_STRIPES)
    assert all(p.name.endswith(".lock") and 0 <= int(p.stem) < LOCK_STRIPES for p in locks)
    # Eviction never removes them (another process may be about to lock one), however old.
    old = time.time() - STALE_S - 5
    for p in locks:
        os.utime(p, (old, old))
    TileCache(cache, 1).evict()
    assert sorted((cache / "v1" / LOCKS_DIR).iterdir()) == locks
    assert not [p for p in (cache / "v1").glob("[0-9a-f][0-9a-f]/*") if p.is_file()]


def test_the_folder_stays_within_its_bound_and_keeps_what_was_used_last(server, scene_dir, tmp_path):
    bound = int(1.6 * (scene_dir / "B12.tif").stat().st_size)  # room for the last file read, not for all five
    tiles = TileCache(tmp_path / "tiles", bound)
    for band in ("B05", "B06", "B07", "B11", "B12"):  # 0.3-0.6 MB each
        read_window(url(server, band), Window(0, 0, 549, 549), tiles)
        assert tiles.size_on_disk() <= bound
    server.reset_stats()
    read_window(url(server, "B12"), Window(0, 0, 549, 549), tiles)  # the last one read is still there
    assert server.stats.bytes == 0
    read_window(url(server, "B05"), Window(0, 0, 549, 549), tiles)  # the first was evicted
    assert server.stats.bytes > 0


def test_a_corrupt_entry_is_discarded_and_fetched_again(server, scene_dir, tmp_path):
    window = Window(0, 0, 600, 600)
    with rasterio.open(scene_dir / "B03.tif") as src:
        expected = src.read(1, window=window)
    read_window(url(server, "B03"), window, TileCache(tmp_path / "tiles", 2**30))
    entries = [p for p in (tmp_path / "tiles").rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    assert entries
    for p in entries:
        p.write_bytes(p.read_bytes()[:-7])  # truncated (a disk that lost its tail)
    server.reset_stats()
    assert np.array_equal(read_window(url(server, "B03"), window, TileCache(tmp_path / "tiles", 2**30)), expected)
    assert server.stats.bytes > 0


def test_a_flaky_server_is_retried_and_a_missing_file_is_final(scene_dir, tmp_path):
    grid = TargetGrid(epsg=32629, transform=rasterio.Affine(100, 0, 199980, 0, -100, 2800020),
                      width=300, height=300)
    with rasterio.open(scene_dir / "B02.tif") as src:
        assert src.transform.c == 199980 and src.transform.f == 2800020
        expected = src.read(1, window=Window(0, 0, 300, 300))
    faults = FaultPlan(error_rate=0.3, reset_rate=0.1, seed=3, only_ranges=True)
    with CogServer(scene_dir.parent, faults=faults) as server:
        datasets = OpenDatasets(2**26, tiles=TileCache(tmp_path / "tiles", 2**30))
        got = read_band(url(server, "B02"), "B02", grid, datasets)
        assert server.stats.errors + server.stats.resets > 0
        assert np.array_equal(got, expected)
        with pytest.raises(InputDataError, match="404"):
            read_band(server.href(f"{SCENE}/B99.tif"), "B99", grid, datasets)
        datasets.close()


class _Hostile(BaseHTTPRequestHandler):
    """Serves one COG badly: ``/norange`` ignores Range headers, ``/redirect`` redirects, ``/shrinks`` is
    a file that changes size after its header was read."""

    body: bytes = b""
    calls: Counter = Counter()

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).calls[self.path] += 1
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/elsewhere/B02.tif")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.body
        rng = self.headers.get("Range", "")
        if self.path.startswith("/norange") or not rng:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        start, end = (int(x) for x in rng.split("=")[1].split("-"))
        total = len(body) if self.path.startswith("/shrinks") and start == 0 else len(body) - 1000
        end = min(end, total - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(body[start:end + 1])


@pytest.fixture()
def hostile(scene_dir):
    handler = type("Handler", (_Hostile,), {"body": (scene_dir / "B02.tif").read_bytes(), "calls": Counter()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_hostile_servers_get_clear_errors_and_no_redirect_is_followed(hostile, tmp_path):
    base, handler = hostile
    grid = TargetGrid(epsg=32629, transform=rasterio.Affine(100, 0, 199980, 0, -100, 2800020),
                      width=1000, height=1000)
    datasets = OpenDatasets(2**26, tiles=TileCache(tmp_path / "tiles", 2**30))
    with pytest.raises(InputDataError, match="redirects to .*not followed"):
        read_band(f"{base}/redirect/B02.tif", "B02", grid, datasets)
    assert handler.calls["/redirect/B02.tif"] >= 1 and handler.calls["/elsewhere/B02.tif"] == 0
    with pytest.raises(InputDataError, match="ignores HTTP range requests"):
        read_band(f"{base}/norange/B02.tif", "B02", grid, datasets)
    with pytest.raises(RetryableError, match="changed while it was read"):
        read_band(f"{base}/shrinks/B02.tif", "B02", grid, datasets)
    datasets.close()


def test_an_unwritable_folder_costs_a_warning_not_the_read(server, scene_dir, tmp_path, caplog):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    tiles = TileCache(blocked / "tiles", 2**30)
    window = Window(0, 0, 500, 500)
    with rasterio.open(scene_dir / "B02.tif") as src:
        expected = src.read(1, window=window)
    assert np.array_equal(read_window(url(server, "B02"), window, tiles), expected)
    assert "tile cache off for this worker" in caplog.text


def test_the_worker_flag_reaches_the_reader(tmp_path):
    from cropchips.cli.worker import parse_args
    from cropchips.processing import TaskProcessor

    processing, _, _ = parse_args(["1", "--output-dir", str(tmp_path / "out"), "--gpkg", "x.gpkg"],
                                  env={"CROPCHIPS_TILE_CACHE_DIR": str(tmp_path / "tiles"),
                                       "CROPCHIPS_TILE_CACHE_MB": "12"})
    assert processing.tile_cache_dir == str(tmp_path / "tiles") and processing.tile_cache_mb == 12
    reader = TaskProcessor(processing, "1@test").reader
    assert reader.tiles is not None and reader.tiles.max_bytes == 12 * 2**20
    assert (tmp_path / "tiles").is_dir()


def test_a_long_run_keeps_what_it_knows_of_files_bounded(server, scene_dir, tmp_path, monkeypatch):
    import cropchips.raster.tile_cache as tile_cache

    monkeypatch.setattr(tile_cache, "MAX_KNOWN_FILES", 2)
    tiles = TileCache(tmp_path / "tiles", 2**30)
    for band in ("B02", "B03", "B04"):
        with rasterio.open(scene_dir / f"{band}.tif") as src:
            expected = src.read(1, window=Window(0, 0, 700, 700))
        assert np.array_equal(read_window(url(server, band), Window(0, 0, 700, 700), tiles), expected)
    assert len(tiles._layouts) == 2 and len(tiles._meta) == 2
    assert url(server, "B02") not in tiles._layouts  # the least recently used went first
    with rasterio.open(scene_dir / "B02.tif") as src:  # and is learned again when it comes back
        expected = src.read(1, window=Window(100, 100, 700, 700))
    assert np.array_equal(read_window(url(server, "B02"), Window(100, 100, 700, 700), tiles), expected)
