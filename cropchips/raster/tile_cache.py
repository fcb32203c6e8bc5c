"""A host-wide cache of the bytes workers fetch from remote scene files (COG headers and tiles), on local disk.

Neighbouring cells share Sentinel-2 tiles (a 1024 px tile at 10 m covers about 2 x 2 cells of 0.05 degrees),
and the worker processes of a host take neighbouring cells: without a shared cache each process fetches the
same tiles again (the bench measured 1.57 times the bytes the chips need with 2 workers, 2.94 with 4). With
one cache folder per host, the first process that needs a byte range fetches it and the others read it
from disk.

How it reads: GDAL opens an ``http(s)://`` scene through rasterio's Python-file plugin (``opener=``,
:meth:`TileCache.opener`). GDAL's small header reads are served from 64 KiB blocks
(:data:`HEADER_BLOCK`); its tile reads arrive as one call per window with every tile's byte range
(``get_byte_ranges``), fetched in parallel, one range request per tile. Each block or tile range is an
entry of the cache, keyed by the file's URL, its validator (ETag, else size) and the range.

Safe with concurrent workers and ``kill -9``: an entry is written to a temporary file and renamed into
place, so no reader ever sees half an entry; an ``flock`` on the entry's lock file makes the other
processes (and threads) that want the same range wait for the first fetch instead of fetching it too
(the kernel drops the lock of a killed process). The lock files are a fixed set of
:data:`LOCK_STRIPES` in ``locks/``, an entry's chosen by its key, made once and never removed: a lock
file per entry doubled the files of the folder and the files created per fetch, and removing one
that another process was about to lock let two processes fetch the same range. Bounded: when the
entries pass ``max_bytes`` the least recently used (by mtime, which a hit refreshes) are removed down
to 90 %; leftovers of killed writers are removed after :data:`STALE_S`. The cache is best effort: a
full or read-only disk costs a warning and the worker fetches as if there were no cache.

Hostile servers: a response must be the range asked (206 with the right ``Content-Range``, or 200 for a
range from byte 0), bodies are read up to the bytes asked for and no further, redirects are not
followed, and a file whose size or ETag changes between two requests is refused for this attempt
(the read is retried from a fresh open).
"""

from __future__ import annotations

import bisect
import contextvars
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import urllib3
import rasterio
from rasterio import _vsiopener
from rasterio.abc import MultiByteRangeResourceContainer
from rasterio.errors import RasterioError, RasterioIOError

from cropchips.errors import InputDataError, RetryableError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Header reads (GDAL reads a COG's header a few bytes at a time) are fetched and cached in aligned
#: blocks of this size: Earth Search's COG headers (tile offsets and counts included) fit in one.
HEADER_BLOCK = 64 * 1024

#: Largest single range fetched (a tile of a 4096 x 4096 block, uncompressed uint16, is 32 MiB).
MAX_RANGE_BYTES = 64 * 2**20

#: Files with more tiles than this are cached by the ranges GDAL asks for, not tile by tile.
MAX_LAYOUT_TILES = 65536

#: Remote files whose size, ETag and tile layout a process keeps in memory (the least recently used go).
MAX_KNOWN_FILES = 4096

#: Seconds after which a temporary file or lock file left by a killed writer is removed.
STALE_S = 600.0

#: Seconds a file's size and ETag, once learned, are trusted without asking the server again.
META_TTL_S = 3600.0

#: Layout version of the cache folder (entries of another layout are never read).
LAYOUT = "v1"

#: Lock files in the folder's ``locks/`` (an entry's is picked by its key; two entries that share one
#: only make one fetch wait for the other's).
LOCK_STRIPES = 1024

#: The folder of the lock files, beside the entries' folders (named by two hex digits).
LOCKS_DIR = "locks"

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class FetchError(RetryableError):
    """A range request failed on the network or the server (5xx, timeouts): retried by the read."""


class RemoteFileError(InputDataError):
    """The server's answer can never give the bytes (404, no range support, a redirect): final."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FileMeta:
    """What a remote file's first answer said of it."""

    size: int
    etag: str

    @property
    def validator(self) -> str:
        return self.etag or f"size={self.size}"


class HttpRanges:
    """Range requests over one pool of keep-alive connections (thread-safe), with the retries GDAL's
    ``/vsicurl/`` has (429 and 5xx, with backoff) and the same timeouts."""

    def __init__(self, *, threads: int = 8, attempts: int = 4, backoff_s: float = 0.5,
                 connect_timeout_s: float = 15.0, read_timeout_s: float = 60.0):
        retries = urllib3.Retry(total=attempts, connect=attempts, read=attempts, status=attempts, redirect=0,
                                backoff_factor=backoff_s, status_forcelist=(429, 500, 502, 503, 504),
                                allowed_methods=frozenset({"GET"}), raise_on_status=False, raise_on_redirect=False,
                                respect_retry_after_header=True)
        # A connection for each caller: the ``threads`` read threads and as many fetch threads of the cache.
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=max(1, 2 * threads), block=False, retries=retries,
                                        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s))

    def get(self, url: str, offset: int, size: int) -> tuple[bytes, FileMeta]:
        """Bytes ``offset .. offset + size - 1`` of ``url`` (fewer only at the end of the file) and
        what the answer said of the file."""
        if size <= 0 or size > MAX_RANGE_BYTES or offset < 0:
            raise RemoteFileError(f"range {offset}+{size} of {url} is out of bounds (a tile is at most "
                                  f"{MAX_RANGE_BYTES // 2**20} MiB)")
        try:
            response = self.pool.request("GET", url, headers={"Range": f"bytes={offset}-{offset + size - 1}"},
                                         preload_content=False, redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError(f"GET {url} bytes {offset}+{size} failed: {exc}") from exc
        try:
            return self._body(response, url, offset, size)
        finally:
            response.release_conn()

    @staticmethod
    def _body(response: urllib3.BaseHTTPResponse, url: str, offset: int, size: int) -> tuple[bytes, FileMeta]:
        status = response.status
        etag = (response.headers.get("ETag") or "")[:200]
        if status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset or m.group(3) == "*":
                raise RemoteFileError(f"{url} answered bytes {offset}+{size} with Content-Range "
                                      f"{response.headers.get('Content-Range')!r}", status)
            total = int(m.group(3))
            want = min(size, int(m.group(2)) - offset + 1, max(total - offset, 0))
        elif status == 200:
            if offset != 0:
                raise RemoteFileError(f"{url} ignores HTTP range requests (it answered 200 to a range): "
                                      "scene files must be served by a server that supports them", status)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else -1
            if total < 0:
                raise RemoteFileError(f"{url} answered a range with a whole body of unknown length", status)
            want = min(size, total)
        elif status == 404 or status == 410:
            raise RemoteFileError(f"{url}: HTTP response code: 404 (the scene file is not there)", 404)
        elif status == 416:
            raise RemoteFileError(f"{url}: bytes {offset}+{size} lie beyond the end of the file (HTTP 416)", status)
        elif 300 <= status < 400:
            raise RemoteFileError(f"{url} redirects to {response.headers.get('Location')!r}, which is not followed: "
                                  "name the file's final URL in the scene's asset", status)
        elif status in (429,) or status >= 500:
            raise FetchError(f"GET {url} bytes {offset}+{size}: HTTP {status} after retries")
        else:
            raise RemoteFileError(f"{url}: HTTP response code: {status}", status)
        try:
            data = response.read(want)
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError(f"GET {url} bytes {offset}+{size}: connection cut ({exc})") from exc
        if len(data) != want:
            raise FetchError(f"GET {url} bytes {offset}+{size}: {len(data)} of {want} bytes arrived")
        return data, FileMeta(size=total, etag=etag)


class TileCache:
    """The folder of cached ranges (see the module's docstring); one instance per process, shared by its threads."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int, *, http: HttpRanges | None = None,
                 threads: int = 8):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.root = Path(root) / LAYOUT
        self.max_bytes = int(max_bytes)
        self.http = http or HttpRanges(threads=threads)
        self.threads = max(1, threads)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._evicting = threading.Lock()
        self._dirs: set[Path] = set()  # entry folders known to exist
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="tile")
        # Per remote file, the most recently used MAX_KNOWN_FILES only (a long run opens ~30 files a cell).
        self._meta: OrderedDict[str, tuple[FileMeta, float]] = OrderedDict()
        self._layouts: OrderedDict[str, list[int]] = OrderedDict()
        self._added_since_scan = 0
        self._disabled_reason: str | None = None
        self.fetched_bytes = 0
        self.hit_bytes = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._total = self._scan_total()
        except OSError as exc:
            self._disable(f"cannot use {self.root}: {exc}")
            self._total = 0

    # --- what GDAL sees ------------------------------------------------------------------------------

    @contextmanager
    def surfacing_errors(self) -> Iterator[None]:
        """Turn GDAL's bare error after a failed callback into the error the callback met; see :meth:`check`."""
        self._local.error = None
        try:
            yield
        except RasterioIOError as exc:
            error, self._local.error = getattr(self._local, "error", None), None
            if error is not None:
                raise error from exc
            raise
        self.check()

    def check(self) -> None:
        """Raise the error a read callback of this thread met since :meth:`surfacing_errors` began, if
        any: GDAL may have gone on with the zeros it was given, so what it returned is not to be used."""
        error, self._local.error = getattr(self._local, "error", None), None
        if error is not None:
            raise error

    def _failed(self, exc: BaseException) -> None:
        """Keep the error a GDAL callback met in this thread (GDAL itself reports only that it failed)."""
        if isinstance(exc, (FetchError, RemoteFileError)):
            self._local.error = exc
        else:
            self._local.error = FetchError(f"reading through the tile cache failed: {exc!r}")

    def opener(self, href: str) -> MultiByteRangeResourceContainer:
        """The ``opener=`` for ``rasterio.open(href, ...)``: serves ``href`` alone (GDAL's probes for
        side-car files such as ``.aux.xml`` or ``.msk`` find nothing, so nothing is fetched for them)."""
        return _Opener(self, href)

    # --- meta and ranges -----------------------------------------------------------------------------

    def meta(self, url: str) -> FileMeta:
        """The file's size and validator: from memory, from the folder (another process asked), else
        from the answer to its first header block, which is cached on the way."""
        with self._lock:
            known = self._meta.get(url)
        if known is not None and time.monotonic() - known[1] < META_TTL_S:
            return known[0]
        key = hashlib.sha256(f"{url}\nmeta".encode()).hexdigest()
        meta = self._get_meta(key)
        if meta is None:
            with self._entry_lock(key):
                meta = self._get_meta(key)
                if meta is None:
                    data, meta = self.http.get(url, 0, HEADER_BLOCK)
                    if meta.size <= 0:
                        raise RemoteFileError(f"{url} is empty", None)
                    with self._lock:
                        self.fetched_bytes += len(data)
                    self._put(self._key(url, meta, 0, min(HEADER_BLOCK, meta.size)), data)
                    self._put(key, json.dumps({"size": meta.size, "etag": meta.etag}).encode())
        self._remember(url, meta)
        return meta

    def _get_meta(self, key: str) -> FileMeta | None:
        path = self._path(key)
        try:
            if time.time() - path.stat().st_mtime > META_TTL_S:
                return None
            raw = json.loads(path.read_bytes()[:1024])
            meta = FileMeta(size=int(raw["size"]), etag=str(raw["etag"])[:200])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta if meta.size > 0 else None

    @staticmethod
    def _key(url: str, meta: FileMeta, offset: int, size: int) -> str:
        return hashlib.sha256(f"{url}\n{meta.validator}\n{offset}\n{size}".encode()).hexdigest()

    def _remember(self, url: str, meta: FileMeta) -> None:
        with self._lock:
            self._meta[url] = (meta, time.monotonic())
            _trim(self._meta)

    def forget(self, url: str) -> None:
        with self._lock:
            self._meta.pop(url, None)

    def read_range(self, url: str, meta: FileMeta, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (fewer at the end of the file), from the cache or fetched once per host."""
        size = max(0, min(size, meta.size - offset))
        if size == 0:
            return b""
        key = self._key(url, meta, offset, size)
        data = self._get(key, size)
        if data is not None:
            return data
        with self._entry_lock(key):
            data = self._get(key, size)  # fetched by another process while this one waited
            if data is not None:
                return data
            data, answer = self.http.get(url, offset, size)
            if answer.size != meta.size or (meta.etag and answer.etag and answer.etag != meta.etag):
                self.forget(url)
                raise FetchError(f"{url} changed while it was read (size {meta.size} -> {answer.size}, ETag "
                                 f"{meta.etag!r} -> {answer.etag!r}); reading it again from a fresh open")
            if len(data) != size:
                raise FetchError(f"{url}: {len(data)} of {size} bytes at {offset} arrived")
            with self._lock:
                self.fetched_bytes += len(data)
            self._put(key, data)
            return data

    def learn_layout(self, url: str, src: rasterio.DatasetReader) -> None:
        """Remember where each tile of ``src`` (opened from ``url``) starts in the file.

        GDAL merges the tiles of a window that lie next to each other in the file into one range, so
        two windows that share a tile ask for different ranges; split at tile starts, every range is
        one tile, and a tile is one entry whichever window asked for it."""
        with self._lock:
            if url in self._layouts:
                return
        starts: set[int] = set()
        try:
            rows, cols = src.block_shapes[0]
            nx, ny = -(-src.width // cols), -(-src.height // rows)
            if nx * ny <= MAX_LAYOUT_TILES:
                for bidx in range(1, src.count + 1):
                    for y in range(ny):
                        for x in range(nx):
                            offset = src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=bidx)
                            if offset and str(offset).isdigit():
                                starts.add(int(offset))
        except (ValueError, TypeError, RasterioError) as exc:  # no layout: ranges are cached as GDAL asks
            log.debug("tile cache: no tile layout for %s: %s", url, exc)
            starts.clear()
        with self._lock:
            self._layouts[url] = sorted(starts)
            _trim(self._layouts)

    def _split(self, url: str, offset: int, size: int) -> list[tuple[int, int]]:
        """``offset, size`` cut at the starts of the file's tiles (as it is when the layout is unknown)."""
        with self._lock:
            starts = self._layouts.get(url)
            if starts is not None:
                self._layouts.move_to_end(url)
        if not starts:
            return [(offset, size)]
        cuts = [offset]
        i = bisect.bisect_right(starts, offset)
        while i < len(starts) and starts[i] < offset + size:
            cuts.append(starts[i])
            i += 1
        cuts.append(offset + size)
        return [(a, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]

    def read_ranges(self, url: str, meta: FileMeta, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ranges, each cut into its tiles; the missing tiles fetched in parallel (one request each)."""
        pieces = [self._split(url, o, s) for o, s in ranges]
        flat = [p for ps in pieces for p in ps]
        if len(flat) <= 1 or self.threads == 1:
            data = [self.read_range(url, meta, o, s) for o, s in flat]
        else:  # the first tile in this thread, the others on the cache's pool (kept across calls)
            rest = [self._pool.submit(self.read_range, url, meta, o, s) for o, s in flat[1:]]
            data = [self.read_range(url, meta, *flat[0])] + [f.result() for f in rest]
        out, i = [], 0
        for ps in pieces:
            out.append(b"".join(data[i:i + len(ps)]))
            i += len(ps)
        return out

    # --- the folder ----------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def _get(self, key: str, size: int) -> bytes | None:
        if self._disabled_reason:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read(size + 1)
            if len(data) != size:  # not written by this code: never trusted
                path.unlink(missing_ok=True)
                return None
            os.utime(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("tile cache: cannot read %s: %s", path, exc)
            return None
        with self._lock:
            self.hit_bytes += size
        return data

    def _put(self, key: str, data: bytes) -> None:
        if self._disabled_reason:
            return
        path = self._path(key)
        self._ensure_dir(path.parent)
        tmp = path.with_name(f"{key}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
                self._disable(f"cannot write to {self.root}: {exc}")
            else:
                log.warning("tile cache: cannot write %s: %s", path, exc)
            return
        with self._lock:
            self._added_since_scan += len(data)
            over = self._total + self._added_since_scan > self.max_bytes or self._added_since_scan > self.max_bytes / 16
        if over:
            self.evict()

    def _ensure_dir(self, folder: Path) -> None:
        if folder not in self._dirs:
            try:
                folder.mkdir(exist_ok=True)
                self._dirs.add(folder)
            except OSError:
                pass  # the write that follows fails and says why

    @contextmanager
    def _entry_lock(self, key: str) -> Iterator[None]:
        """Exclusive across the processes of this host while one of them fetches ``key``."""
        if self._disabled_reason:
            yield
            return
        lock_path = self.root / LOCKS_DIR / f"{int(key[:8], 16) % LOCK_STRIPES:04d}.lock"
        try:
            self._ensure_dir(lock_path.parent)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.debug("tile cache: no lock for %s (%s); fetching unlocked", key, exc)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def evict(self) -> None:
        """Remove least recently used entries down to 90 % of ``max_bytes``, and stale leftovers.

        One eviction at a time on the host (two at once would each remove down to the target from the
        same entries): a thread waits for another of its process; a process that finds another one
        evicting skips its turn."""
        self._evicting.acquire()
        try:
            fd = os.open(self.root / "eviction.flock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._evicting.release()
            log.warning("tile cache: cannot lock %s for eviction: %s", self.root, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self._evicting.release()
            return
        try:
            self._evict()
        finally:
            os.close(fd)
            self._evicting.release()

    def _evict(self) -> None:
        entries = []
        now = time.time()
        try:
            for sub in self._entry_folders():
                for entry in os.scandir(sub.path):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    if ".tmp." in entry.name or entry.name.endswith(".lock"):  # (.lock: an older version's)
                        if now - st.st_mtime > STALE_S:
                            _unlink(entry.path)
                        continue
                    entries.append((st.st_mtime, st.st_size, entry.path))
        except OSError as exc:
            log.warning("tile cache: cannot scan %s: %s", self.root, exc)
            return
        total = sum(size for _, size, _ in entries)
        entries.sort()
        target = 0.9 * self.max_bytes
        removed = 0
        for _, size, path in entries:
            if total <= target:
                break
            if _unlink(path):
                total -= size
                removed += 1
        if removed:
            log.debug("tile cache: removed %d least recently used entries; %d bytes left", removed, total)
        with self._lock:
            self._total = total
            self._added_since_scan = 0

    def _scan_total(self) -> int:
        total = 0
        for sub in self._entry_folders():
            for entry in os.scandir(sub.path):
                if ".tmp." not in entry.name and not entry.name.endswith(".lock"):
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        pass
        return total

    def _entry_folders(self) -> Iterator[os.DirEntry]:
        """The folders that hold the entries (not ``locks/``, whose files stay)."""
        return (sub for sub in os.scandir(self.root) if sub.is_dir() and sub.name != LOCKS_DIR)

    def size_on_disk(self) -> int:
        """Bytes of the entries now in the folder (a scan)."""
        try:
            return self._scan_total()
        except OSError:
            return 0

    def _disable(self, reason: str) -> None:
        if self._disabled_reason is None:
            log.warning("tile cache off for this worker: %s; scene bytes are fetched without it", reason)
        self._disabled_reason = reason


# rasterio (1.4) keeps the registry of Python openers, and the files they opened, in ContextVars, and a
# new thread starts with an empty context: a file opened through an opener in one thread and read or
# closed in another (a worker's read pool keeps files open across tasks) fails there, or crashes GDAL.
# Every use of such a file therefore runs in a copy of one shared context, whose registries are the
# same dicts in every thread.
_SHARED = contextvars.Context()
_SHARED_LOCK = threading.Lock()
_THREAD = threading.local()
for _var in (getattr(_vsiopener, "_OPENER_REGISTRY", None), getattr(_vsiopener, "_OPEN_FILE_EXIT_STACKS", None)):
    if _var is not None:
        _SHARED.run(_var.set, {})


def with_shared_openers(fn: Callable[[], T]) -> T:
    """Run ``fn`` where files opened through :meth:`TileCache.opener` in any thread can be used."""
    if getattr(_THREAD, "inside", False):
        return fn()
    ctx = getattr(_THREAD, "ctx", None)
    if ctx is None:
        with _SHARED_LOCK:
            ctx = _THREAD.ctx = _SHARED.run(contextvars.copy_context)

    def inside() -> T:
        _THREAD.inside = True
        try:
            return fn()
        finally:
            _THREAD.inside = False

    return ctx.run(inside)


def _trim(known: OrderedDict) -> None:
    """Forget the least recently used files beyond :data:`MAX_KNOWN_FILES` (caller holds the lock)."""
    while len(known) > MAX_KNOWN_FILES:
        known.popitem(last=False)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.debug("tile cache: cannot remove %s: %s", path, exc)
        return False


class _Opener(MultiByteRangeResourceContainer):
    """rasterio's view of one remote file (any other path GDAL asks for does not exist)."""

    def __init__(self, cache: TileCache, href: str):
        self.cache = cache
        self.href = href

    def _mine(self, path: str) -> bool:
        return str(path) == self.href

    def open(self, path: str, mode: str = "rb", **kwargs: object) -> _RemoteFile:
        if not self._mine(path):
            raise FileNotFoundError(path)
        if "w" in mode or "a" in mode or "+" in mode:
            raise PermissionError(f"{path} is opened read-only")
        try:
            return _RemoteFile(self.cache, self.href)
        except BaseException as exc:
            self.cache._failed(exc)
            raise

    def isfile(self, path: str) -> bool:
        return self._mine(path)

    def isdir(self, path: str) -> bool:
        return False

    def ls(self, path: str) -> list[str]:
        return []

    def mtime(self, path: str) -> int:
        return 0

    def size(self, path: str) -> int:
        if not self._mine(path):
            raise FileNotFoundError(path)
        try:
            return self.cache.meta(self.href).size
        except BaseException as exc:
            self.cache._failed(exc)
            raise

    def rm(self, path: str) -> None:
        raise PermissionError(f"{path} is read-only")


class _RemoteFile:
    """A read-only, seekable file over the cache; ``get_byte_ranges`` is GDAL's multi-range read."""

    def __init__(self, cache: TileCache, href: str):
        self.cache = cache
        self.href = href
        self.meta = cache.meta(href)
        self.pos = 0
        self.closed = False
        self._blocks: dict[int, bytes] = {}

    def __enter__(self) -> _RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        self._blocks.clear()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self.pos + offset
        elif whence == os.SEEK_END:
            pos = self.meta.size + offset
        else:
            raise ValueError(f"whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self.pos = pos
        return pos

    # rasterio (1.4) does not clear a Python exception raised in its read callbacks: it stays set and
    # surfaces later as a SystemError in unrelated code. So a failed read returns no bytes (or zeros of
    # the sizes asked) and records its error, and :meth:`TileCache.check` raises it once GDAL is done,
    # inside the dataset's context so that the handle (and any block GDAL decoded from those bytes)
    # is dropped.

    def read(self, size: int = -1) -> bytes:
        try:
            return self._read(size)
        except Exception as exc:
            self.cache._failed(exc)
            return b""

    def _read(self, size: int) -> bytes:
        end = self.meta.size if size is None or size < 0 else min(self.pos + size, self.meta.size)
        if end <= self.pos:
            return b""
        if end - self.pos > HEADER_BLOCK:  # a large read (a strip, a whole small file): one range
            data = self.cache.read_range(self.href, self.meta, self.pos, end - self.pos)
        else:
            parts = []
            for block in range(self.pos // HEADER_BLOCK, (end - 1) // HEADER_BLOCK + 1):
                chunk = self._block(block)
                lo = max(self.pos - block * HEADER_BLOCK, 0)
                hi = min(end - block * HEADER_BLOCK, len(chunk))
                parts.append(chunk[lo:hi])
            data = b"".join(parts)
        self.pos += len(data)
        return data

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            block = self._blocks[index] = self.cache.read_range(self.href, self.meta, index * HEADER_BLOCK,
                                                                 HEADER_BLOCK)
        return block

    def get_byte_ranges(self, offsets: Sequence[int], sizes: Sequence[int]) -> list[bytes]:
        try:
            return self.cache.read_ranges(self.href, self.meta, list(zip(offsets, sizes)))
        except Exception as exc:
            self.cache._failed(exc)
            return [bytes(max(0, int(n))) for n in sizes]
