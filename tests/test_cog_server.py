"""The local object-storage-like COG server: ranges, stats, path safety, latency, faults, GDAL reading through it."""

from __future__ import annotations

import http.client
import os
import random
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import REPO, shared_data
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from cropchips.testing.cog_server import CogServer, FaultPlan, parse_range

GDAL_ENV = dict(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", VSI_CACHE="TRUE", GDAL_HTTP_MERGE_CONSECUTIVE_RANGES="YES")
RETRIES = dict(GDAL_HTTP_MAX_RETRY="5", GDAL_HTTP_RETRY_DELAY="0.1")
NO_RETRIES = dict(GDAL_HTTP_MAX_RETRY="0")
WINDOW = Window(100, 100, 900, 700)  # 2 x 2 tiles of 512


@pytest.fixture(scope="module")
def cog(tmp_path_factory) -> Path:
    """A 2048 x 2048 uint16 deflate COG (512 tiles, overviews) with smooth-plus-noise data."""
    path = tmp_path_factory.mktemp("cog") / "source.tif"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:2048, 0:2048]
    data = ((xx * 7 + yy * 3) % 4000 + rng.integers(0, 50, (2048, 2048))).astype("uint16")
    with rasterio.open(path, "w", driver="COG", width=2048, height=2048, count=1, dtype="uint16",
                       crs="EPSG:32629", transform=Affine(10, 0, 500000, 0, -10, 4000000),
                       compress="deflate", blocksize=512) as dst:
        dst.write(data, 1)
    return path


@pytest.fixture
def root(tmp_path, cog) -> Path:
    """A served folder holding the COG under a name unique to the test.

    GDAL's /vsicurl/ caches what it fetched per URL for the whole process, and a later server may get
    the same port: a unique file name keeps every test's reads going to its own server.
    """
    served = tmp_path / "root"
    served.mkdir()
    os.link(cog, served / f"scene-{uuid.uuid4().hex[:8]}.tif")
    return served


def served_file(root: Path) -> Path:
    return next(root.glob("scene-*.tif"))


def local_window(path: Path, window: Window = WINDOW) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1, window=window)


def remote_window(url: str, window: Window = WINDOW, **env: str) -> np.ndarray:
    with rasterio.Env(**{**GDAL_ENV, **env}), rasterio.open(url) as src:
        return src.read(1, window=window)


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one urllib request; HTTP errors are answers too."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def raw_get(server: CogServer, path: str) -> tuple[int, bytes]:
    """A request with the path sent exactly as given (urllib and curl would normalise it)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- GDAL reading through the server ------------------------------------------------------------------


def test_gdal_window_read_equals_local_read_and_fetches_a_fraction(root):
    path = served_file(root)
    size = path.stat().st_size
    with CogServer(root) as server:
        remote = remote_window(server.href(path))
        stats = server.stats

    assert np.array_equal(remote, local_window(path))
    assert set(stats.files) == {path.name}
    mine = stats.file(path.name)
    assert mine.requests == stats.requests >= 2
    assert 0 < mine.bytes == stats.bytes < size / 4
    # Every GET was a range inside the file; their lengths add up to the payload bytes exactly.
    assert mine.ranges and all(0 <= start <= end < size for start, end in mine.ranges)
    assert sum(end - start + 1 for start, end in mine.ranges) == mine.bytes
    assert set(mine.statuses) <= {200, 206}  # 200: GDAL's HEAD
    assert mine.errors == mine.resets == 0


def test_gdal_reads_the_real_sentinel2_cog_in_place():
    b04 = shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A", "B04.tif")
    expected_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentinel2"
    assert b04.resolve().is_relative_to(expected_dir.resolve())
    window = Window(300, 200, 256, 256)
    with rasterio.open(b04) as src:
        expected = src.read(1, window=window)
        expected_overview = src.read(1, out_shape=(src.height // 4, src.width // 4))
    with CogServer(b04.parent) as server:
        # A query string is ignored by the server but gives GDAL's per-URL cache a URL no other test uses.
        url = f"{server.href(b04)}?test={uuid.uuid4().hex}"
        with rasterio.Env(**GDAL_ENV), rasterio.open(url) as src:
            assert np.array_equal(src.read(1, window=window), expected)
            assert np.array_equal(src.read(1, out_shape=(src.height // 4, src.width // 4)), expected_overview)
        stats = server.stats.file("B04.tif")
    assert stats.requests >= 2 and stats.ranges
    assert stats.bytes < b04.stat().st_size
    assert set(server.stats.files) == {"B04.tif"}


def test_gdal_with_the_projects_own_options(root):
    """reading.GDAL_OPTIONS ask for HTTP/2 and multiplexing; curl falls back to HTTP/1.1 here."""
    from cropchips.raster.read import GDAL_OPTIONS

    path = served_file(root)
    with CogServer(root) as server, rasterio.Env(**GDAL_OPTIONS), rasterio.open(server.href(path)) as src:
        remote = src.read(1, window=WINDOW)
    assert np.array_equal(remote, local_window(path))


def test_gdal_single_get_multirange_is_answered_with_multipart_byteranges(root):
    path = served_file(root)
    with CogServer(root) as server:
        remote = remote_window(server.href(path), GDAL_HTTP_MULTIRANGE="SINGLE_GET")
        stats = server.stats.file(path.name)
    assert np.array_equal(remote, local_window(path))
    # The two rows of tiles lie apart in the file: GDAL asked for both ranges in one request.
    assert len(stats.ranges) > stats.statuses[206]


# -- raw HTTP: ranges, headers, counting ---------------------------------------------------------------


def test_range_get_adds_one_request_and_exactly_its_bytes(root):
    path = served_file(root)
    content = path.read_bytes()
    with CogServer(root) as server:
        url = server.href(path)
        get(url, {"Range": "bytes=0-9"})
        before = server.stats
        status, headers, body = get(url, {"Range": "bytes=100-199"})
        after = server.stats

    assert status == 206 and body == content[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(content)}"
    assert headers["Content-Length"] == "100"
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"].startswith('"') and headers["Last-Modified"].endswith("GMT")
    assert after.requests - before.requests == 1
    assert after.bytes - before.bytes == 100
    assert after.file(path.name).ranges == [(0, 9), (100, 199)]


def test_no_range_gets_the_whole_file(root):
    path = served_file(root)
    with CogServer(root) as server:
        status, headers, body = get(server.href(path))
        stats = server.stats
    assert status == 200 and body == path.read_bytes()
    assert int(headers["Content-Length"]) == len(body) == stats.bytes
    assert stats.ranges == [(0, len(body) - 1)]


def test_open_ended_suffix_and_clipped_ranges(root):
    path = served_file(root)
    content = path.read_bytes()
    size = len(content)
    with CogServer(root) as server:
        url = server.href(path)
        status, headers, body = get(url, {"Range": f"bytes={size - 50}-"})
        assert (status, body, headers["Content-Range"]) == (206, content[-50:], f"bytes {size - 50}-{size - 1}/{size}")
        status, headers, body = get(url, {"Range": "bytes=-30"})
        assert (status, body, headers["Content-Range"]) == (206, content[-30:], f"bytes {size - 30}-{size - 1}/{size}")
        status, _, body = get(url, {"Range": f"bytes={size - 10}-{size + 1000}"})
        assert (status, body) == (206, content[-10:])
        # A malformed Range header is ignored (RFC 9110): the whole file.
        status, _, body = get(url, {"Range": "bytes=abc"})
        assert (status, len(body)) == (200, size)
        assert server.stats.bytes == 50 + 30 + 10 + size


def test_unsatisfiable_range_is_416(root):
    path = served_file(root)
    size = path.stat().st_size
    with CogServer(root) as server:
        for spec in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
            status, headers, _ = get(server.href(path), {"Range": spec})
            assert status == 416, spec
            assert headers["Content-Range"] == f"bytes */{size}"
        assert server.stats.ranges == []


def test_multirange_request_gets_a_correct_multipart_body(root):
    path = served_file(root)
    content = path.read_bytes()
    with CogServer(root) as server:
        status, headers, body = get(server.href(path), {"Range": "bytes=0-9,1000-1019,-5"})
        assert server.stats.ranges == [(0, 9), (1000, 1019), (len(content) - 5, len(content) - 1)]
    assert status == 206
    boundary = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", headers["Content-Type"]).group(1)
    assert int(headers["Content-Length"]) == len(body)
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    parts = body.split(f"\r\n--{boundary}".encode())[1:-1]
    got = []
    for part in parts:
        head, payload = part.split(b"\r\n\r\n", 1)
        start, end = map(int, re.search(rb"Content-Range: bytes (\d+)-(\d+)/", head).groups())
        assert payload == content[start:end + 1]
        got.append((start, end))
    assert got == [(0, 9), (1000, 1019), (len(content) - 5, len(content) - 1)]


def test_parse_range():
    assert parse_range("bytes=0-9", 100) == [(0, 9)]
    assert parse_range("bytes=90-", 100) == [(90, 99)]
    assert parse_range("bytes=-200", 100) == [(0, 99)]
    assert parse_range("bytes=100-", 100) == []
    assert parse_range("bytes=5-1", 100) is None
    assert parse_range("items=0-1", 100) is None


def test_head_has_the_length_and_no_body_and_keep_alive_works(root):
    path = served_file(root)
    with CogServer(root) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("HEAD", f"/{path.name}")
        response = conn.getresponse()
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == path.stat().st_size
        assert response.read() == b""
        sock = conn.sock
        for _ in range(3):  # the same connection answers the next requests
            conn.request("GET", f"/{path.name}", headers={"Range": "bytes=0-3"})
            response = conn.getresponse()
            assert response.read() == path.read_bytes()[:4]
            assert conn.sock is sock
        conn.close()
        stats = server.stats
    assert (stats.requests, stats.bytes) == (4, 12)


def test_paths_outside_root_are_never_served(tmp_path):
    served = tmp_path / "root"
    (served / "sub").mkdir(parents=True)
    (served / "sub" / "inside.txt").write_text("inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET")
    (served / "escape.txt").symlink_to(outside / "secret.txt")
    (served / "escape_dir").symlink_to(outside, target_is_directory=True)
    (served / "alias.txt").symlink_to(served / "sub" / "inside.txt")

    with CogServer(served) as server:
        assert raw_get(server, "/sub/inside.txt") == (200, b"inside")
        assert raw_get(server, "/alias.txt") == (200, b"inside")  # a link that stays inside root
        for path in ("/../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd",
                     "/sub/../../outside/secret.txt", "/sub/%2E%2E/%2E%2E/outside/secret.txt",
                     "//etc/passwd", "/%2fetc%2fpasswd", "/escape.txt", "/escape_dir/secret.txt",
                     "/sub/..%5c..%5coutside%5csecret.txt"):
            status, body = raw_get(server, path)
            assert status in (403, 404), path
            assert b"SECRET" not in body and b"root:" not in body, path
        assert raw_get(server, "/sub")[0] == 404  # no directory listings
        assert raw_get(server, "/missing.tif")[0] == 404
        with pytest.raises(ValueError):
            server.href(outside / "secret.txt")


# -- stats, latency, bandwidth --------------------------------------------------------------------------


def test_stats_are_exact_under_concurrent_requests_and_can_be_reset(root):
    path = served_file(root)
    with CogServer(root) as server:
        url = server.href(path)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: get(url, {"Range": f"bytes={i * 10}-{i * 10 + i}"}), range(40)))
        assert all(status == 206 for status, _, _ in results)
        stats = server.stats
        assert stats.requests == 40
        assert stats.bytes == sum(i + 1 for i in range(40))
        assert sorted(stats.ranges) == [(i * 10, i * 10 + i) for i in range(40)]
        server.reset_stats()
        assert (server.stats.requests, server.stats.bytes, server.stats.files) == (0, 0, {})


def test_latency_is_added_to_every_request(root):
    path = served_file(root)
    n, latency = 6, 0.05
    with CogServer(root, latency_s=latency) as server:
        started = time.monotonic()
        for _ in range(n):
            get(server.href(path), {"Range": "bytes=0-0"})
        elapsed = time.monotonic() - started
    assert elapsed >= n * latency


def test_bandwidth_cap_slows_payloads(root):
    path = served_file(root)
    nbytes, bps = 400_000, 2_000_000
    with CogServer(root, bandwidth_bps=bps) as server:
        started = time.monotonic()
        status, _, body = get(server.href(path), {"Range": f"bytes=0-{nbytes - 1}"})
        elapsed = time.monotonic() - started
    assert status == 206 and len(body) == nbytes
    assert elapsed >= 0.95 * nbytes / bps


# -- faults ---------------------------------------------------------------------------------------------


def test_injected_errors_are_seeded_and_counted_exactly(root):
    path = served_file(root)
    with CogServer(root, faults=FaultPlan(error_rate=0.3, seed=1)) as server:
        statuses = [get(server.href(path), {"Range": f"bytes={i}-{i + 9}"})[0] for i in range(50)]
        stats = server.stats
    seen = statuses.count(500)
    assert set(statuses) == {206, 500}
    assert 8 <= seen <= 22  # about 30 % of 50
    assert stats.errors == seen and stats.statuses[500] == seen and stats.requests == 50
    rng = random.Random(1)  # sequential requests: exactly the seed's draws
    assert statuses == [500 if rng.random() < 0.3 else 206 for _ in range(50)]


def test_only_ranges_spares_heads_full_gets_and_header_reads(root):
    path = served_file(root)
    with CogServer(root, faults=FaultPlan(error_rate=1.0, only_ranges=True)) as server:
        url = server.href(path)
        assert get(url, method="HEAD")[0] == 200
        assert get(url, {"Range": "bytes=0-16383"})[0] == 206
        assert get(url, {"Range": "bytes=16384-32767"})[0] == 500
        assert server.stats.errors == 1


@pytest.mark.parametrize("style, mid_body", [("rst", False), ("rst", True), ("close", False), ("close", True)])
def test_resets_are_seen_by_the_client_as_connection_errors(root, style, mid_body):
    path = served_file(root)
    plan = FaultPlan(reset_rate=1.0, reset_style=style, reset_mid_body=mid_body)
    with CogServer(root, faults=plan) as server:
        for _ in range(3):
            with pytest.raises((ConnectionError, http.client.HTTPException, urllib.error.URLError)):
                get(server.href(path), {"Range": "bytes=0-99999"})
        stats = server.stats
    assert stats.resets == 3 and stats.errors == 0
    assert stats.bytes == (3 * 50_000 if mid_body else 0)


def test_gdal_retries_5xx_itself(root):
    path = served_file(root)
    # seed 1 draws 0.134 first: GDAL's first request (its HEAD) is answered 500 whatever else happens.
    plan = FaultPlan(error_rate=0.2, seed=1)
    with CogServer(root, faults=plan) as server:
        remote = remote_window(server.href(path), **RETRIES)
        stats = server.stats
    assert np.array_equal(remote, local_window(path))
    assert stats.errors > 0 and stats.statuses[500] == stats.errors
    assert stats.requests > stats.errors


def test_without_retries_a_5xx_on_open_fails(root):
    path = served_file(root)
    with CogServer(root, faults=FaultPlan(error_rate=0.2, seed=1)) as server:
        with pytest.raises(RasterioIOError, match="500"):
            remote_window(server.href(path), **NO_RETRIES)
        assert server.stats.errors == 1


@pytest.mark.parametrize("style, retried, message", [
    ("rst", True, "reset by peer"),        # curl: "Recv failure: Connection reset by peer", retried by GDAL
    ("close", False, "Empty reply"),       # curl: "Empty reply from server", not retried by GDAL
])
def test_gdal_retries_tcp_resets_but_not_empty_replies(root, style, retried, message):
    path = served_file(root)
    # seed 1: GDAL's first request is reset (0.134 < 0.3), on a fresh connection.
    plan = FaultPlan(reset_rate=0.3, seed=1, reset_style=style)
    with CogServer(root, faults=plan) as server:
        if retried:
            assert np.array_equal(remote_window(server.href(path), **RETRIES), local_window(path))
        else:
            with pytest.raises(RasterioIOError, match=message):
                remote_window(server.href(path), **RETRIES)
        assert server.stats.resets >= 1
    if retried:  # and without retries the same reset fails the open
        with CogServer(root, faults=plan) as server:
            fresh = server.root / f"scene-{uuid.uuid4().hex[:8]}.tif"
            os.link(path, fresh)
            with pytest.raises(RasterioIOError, match=message):
                remote_window(server.href(fresh), **NO_RETRIES)


# -- API details and the command line -------------------------------------------------------------------


def test_url_href_and_validation(root):
    server = CogServer(root)
    with pytest.raises(RuntimeError):
        _ = server.url
    with server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url)
        assert server.href("a b/c.tif") == f"{server.url}/a%20b/c.tif"
    with pytest.raises(ValueError):
        FaultPlan(error_rate=0.7, reset_rate=0.5)
    with pytest.raises(NotADirectoryError):
        CogServer(root / "nope")


def test_command_line_serves_a_folder_until_terminated(root):
    path = served_file(root)
    proc = subprocess.Popen([sys.executable, "-m", "cropchips.testing.cog_server", str(root), "--port", "0",
                             "--latency-ms", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        status, _, body = get(f"{match.group(1)}/{path.name}", {"Range": "bytes=0-99"})
        assert (status, body) == (206, path.read_bytes()[:100])
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Served 1 requests, 100 bytes" in out
