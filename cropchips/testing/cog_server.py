"""Serve a folder of COGs over HTTP like object storage (ranges, stats, latency, bandwidth, faults); GDAL retries 5xx and TCP resets, not empty replies."""

from __future__ import annotations

import argparse
import email.utils
import errno
import logging
import mimetypes
import random
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

#: Bytes read from disk (and written to the socket) at a time when no bandwidth cap applies.
CHUNK_SIZE = 256 * 1024

#: Seconds an idle keep-alive connection is held open before the server drops it.
IDLE_TIMEOUT_S = 60.0

_RANGE_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")

# What GDAL (3.10, /vsicurl/ through rasterio 1.4) was observed to do against this server:
# - Opening: one HEAD (file size), then one GET of bytes 0-32767 (the header and tile index of a COG).
# - Block reads: the GTiff driver merges the tiles that lie next to each other in the file into one range
#   and, by default (GDAL_HTTP_MULTIRANGE unset = PARALLEL), sends one single-range GET per merged range,
#   in parallel. GDAL_HTTP_MULTIRANGE=SINGLE_GET sends one GET with several ranges ("bytes=a-b,c-d"),
#   answered here with a correct multipart/byteranges body; SERIAL reads 16 KiB-aligned chunks.
# - Retries (GDAL_HTTP_MAX_RETRY > 0): 500/502/503/504/429 answers are retried, and so is a TCP reset
#   (curl's "Connection reset by peer"); a connection closed without any response (curl's "Empty reply
#   from server", FaultPlan(reset_style="close")) is not, and the open or read fails.
# - Even with no retries, a block range whose parallel GET fails (5xx or reset) is fetched once more by
#   the driver's fallback path; a failure of the HEAD or header GET fails the open at once.


@dataclass
class FaultPlan:
    """Which share of requests fail, and how; the same seed gives the same faults for the same request order."""

    error_rate: float = 0.0
    """Share of requests answered ``error_status`` (a small XML body, like S3's InternalError)."""
    reset_rate: float = 0.0
    """Share of requests whose TCP connection is reset (RST) instead of answered."""
    seed: int = 0
    """Seed of the ``random.Random`` that draws the faults (one draw per eligible request)."""
    only_ranges: bool = False
    """Faults only on range GETs that do not start at byte 0: HEADs, full GETs and header reads always succeed."""
    error_status: int = 500
    """Status of an injected error (500 or 503 are what object storage answers)."""
    reset_mid_body: bool = False
    """Reset after sending the headers and half of the body, instead of before any response (GET only)."""
    reset_style: str = "rst"
    """``"rst"``: abort with a TCP RST (curl: "Connection reset by peer", which GDAL retries);
    ``"close"``: a plain close, FIN (curl: "Empty reply from server", which GDAL does not retry)."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.error_rate <= 1.0 and 0.0 <= self.reset_rate <= 1.0):
            raise ValueError("error_rate and reset_rate must lie in [0, 1]")
        if self.error_rate + self.reset_rate > 1.0:
            raise ValueError("error_rate + reset_rate must not exceed 1")
        if not 500 <= self.error_status <= 599:
            raise ValueError("error_status must be a 5xx status")
        if self.reset_style not in ("rst", "close"):
            raise ValueError('reset_style must be "rst" or "close"')


@dataclass
class FileStats:
    """What one file (keyed by its path under root, as requested) cost to serve."""

    requests: int = 0
    """Requests received, HEADs and failed ones included."""
    bytes: int = 0
    """Payload (body) bytes written to the socket; headers are not counted."""
    ranges: list[tuple[int, int]] = field(default_factory=list)
    """Inclusive byte ranges whose body was started, in order; a full GET is ``(0, size - 1)``."""
    errors: int = 0
    """Injected error answers."""
    resets: int = 0
    """Injected connection resets."""
    statuses: Counter[int] = field(default_factory=Counter)
    """Status codes sent (an injected reset sends none, or the status of the response it cut)."""

    def copy(self) -> FileStats:
        return FileStats(self.requests, self.bytes, list(self.ranges), self.errors, self.resets,
                         Counter(self.statuses))


@dataclass
class ServerStats:
    """A snapshot of the server's counters: per file, and totals over all files."""

    files: dict[str, FileStats] = field(default_factory=dict)

    def file(self, name: str) -> FileStats:
        """Counters of one file (path under root, ``/``-separated); zeros if it was never requested."""
        return self.files.get(name.lstrip("/"), FileStats())

    @property
    def requests(self) -> int:
        return sum(f.requests for f in self.files.values())

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    @property
    def errors(self) -> int:
        return sum(f.errors for f in self.files.values())

    @property
    def resets(self) -> int:
        return sum(f.resets for f in self.files.values())

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [r for f in self.files.values() for r in f.ranges]

    @property
    def statuses(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for f in self.files.values():
            total.update(f.statuses)
        return total


class _Recorder:
    """Thread-safe counters behind ``CogServer.stats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, FileStats] = {}

    def _get(self, name: str) -> FileStats:
        return self._files.setdefault(name, FileStats())

    def request(self, name: str) -> None:
        with self._lock:
            self._get(name).requests += 1

    def status(self, name: str, status: int) -> None:
        with self._lock:
            self._get(name).statuses[int(status)] += 1

    def range(self, name: str, start: int, end: int) -> None:
        with self._lock:
            self._get(name).ranges.append((start, end))

    def sent(self, name: str, nbytes: int) -> None:
        with self._lock:
            self._get(name).bytes += nbytes

    def error(self, name: str) -> None:
        with self._lock:
            self._get(name).errors += 1

    def reset(self, name: str) -> None:
        with self._lock:
            self._get(name).resets += 1

    def snapshot(self) -> ServerStats:
        with self._lock:
            return ServerStats({name: stats.copy() for name, stats in self._files.items()})

    def clear(self) -> None:
        with self._lock:
            self._files.clear()


class _Faults:
    """Draws the fault of each eligible request from one seeded generator, under a lock."""

    def __init__(self, plan: FaultPlan | None) -> None:
        self.plan = plan
        self._lock = threading.Lock()
        self._rng = random.Random(plan.seed if plan else 0)

    def draw(self, *, is_head: bool, range_start: int | None) -> str | None:
        """``"error"``, ``"reset"`` or None for one request."""
        plan = self.plan
        if plan is None or (plan.error_rate == 0.0 and plan.reset_rate == 0.0):
            return None
        if plan.only_ranges and (is_head or range_start is None or range_start == 0):
            return None
        with self._lock:
            u = self._rng.random()
        if u < plan.error_rate:
            return "error"
        if u < plan.error_rate + plan.reset_rate:
            return "reset"
        return None


def parse_range(header: str, size: int) -> list[tuple[int, int]] | None:
    """Byte ranges (inclusive, clipped to the file) of a ``Range`` header.

    Returns None when the header is absent or not a valid ``bytes=`` range set (it is then ignored, as
    RFC 9110 says), and an empty list when it is valid but no range is satisfiable (answered 416).
    """
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    ranges: list[tuple[int, int]] = []
    for spec in specs.split(","):
        if not spec.strip():
            continue
        match = _RANGE_SPEC.match(spec)
        if not match or (not match.group(1) and not match.group(2)):
            return None
        first, last = match.group(1), match.group(2)
        if first:
            start = int(first)
            if last and int(last) < start:
                return None
            if start >= size:
                continue  # unsatisfiable
            ranges.append((start, min(int(last), size - 1) if last else size - 1))
        else:
            suffix = int(last)
            if suffix == 0 or size == 0:
                continue  # unsatisfiable
            ranges.append((max(0, size - suffix), size - 1))
    return ranges


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of files under the server's root, one single or multipart range per request."""

    protocol_version = "HTTP/1.1"
    server_version = "CogServer/1.0"
    timeout = IDLE_TIMEOUT_S
    # Headers and body go out in separate writes: with Nagle's algorithm the body of each small answer
    # would wait ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _HTTPServer

    # -- plumbing ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
        headers = getattr(self, "headers", None)
        byte_range = headers.get("Range") if headers is not None else None
        log.debug("%s %s%s", self.address_string(), format % args,
                  f" [Range: {byte_range}]" if byte_range else "")

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # -- the request --------------------------------------------------------------------------------------
    def _serve(self, *, head: bool) -> None:
        owner = self.server.owner
        raw_path = urllib.parse.urlsplit(self.path).path
        name = urllib.parse.unquote(raw_path).lstrip("/")
        owner._recorder.request(name)
        if owner.latency_s > 0:
            time.sleep(owner.latency_s)

        target, status = owner._resolve(name)
        if target is None:
            self._send_simple(name, status, head=head)
            return
        try:
            stat = target.stat()
        except OSError:
            self._send_simple(name, HTTPStatus.NOT_FOUND, head=head)
            return
        size = stat.st_size
        header = self.headers.get("Range")
        ranges = parse_range(header, size) if header else None

        fault = owner._faults.draw(is_head=head, range_start=ranges[0][0] if ranges else None)
        if fault == "error":
            owner._recorder.error(name)
            self._send_simple(name, owner._faults.plan.error_status, head=head)  # type: ignore[union-attr]
            return
        if fault == "reset" and not (owner._faults.plan.reset_mid_body and not head):  # type: ignore[union-attr]
            owner._recorder.reset(name)
            self._reset()
            return
        cut = fault == "reset"

        etag = f'"{stat.st_mtime_ns:x}-{size:x}"'
        common = {
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
        }
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ranges == []:
            self._send_simple(name, HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, head=head,
                              extra={"Content-Range": f"bytes */{size}", **common})
            return

        if ranges is None:
            parts = [(0, size - 1)] if size else []
            status, headers = HTTPStatus.OK, {"Content-Type": ctype, "Content-Length": str(size)}
            preambles: list[bytes] = [b""] * len(parts)
            closing = b""
        elif len(ranges) == 1:
            parts = ranges
            start, end = ranges[0]
            status = HTTPStatus.PARTIAL_CONTENT
            headers = {"Content-Type": ctype, "Content-Range": f"bytes {start}-{end}/{size}",
                       "Content-Length": str(end - start + 1)}
            preambles, closing = [b""], b""
        else:
            parts = ranges
            boundary = f"cogserver{random.getrandbits(64):016x}"
            preambles = [(f"\r\n--{boundary}\r\nContent-Type: {ctype}\r\n"
                          f"Content-Range: bytes {s}-{e}/{size}\r\n\r\n").encode("ascii") for s, e in parts]
            closing = f"\r\n--{boundary}--\r\n".encode("ascii")
            length = sum(len(p) for p in preambles) + sum(e - s + 1 for s, e in parts) + len(closing)
            status = HTTPStatus.PARTIAL_CONTENT
            headers = {"Content-Type": f"multipart/byteranges; boundary={boundary}", "Content-Length": str(length)}

        owner._recorder.status(name, status)
        self.send_response(status)
        for key, value in {**headers, **common}.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return

        total = int(headers["Content-Length"])
        budget = total // 2 if cut else None  # bytes to send before an injected mid-body reset
        throttle = _Throttle(owner.bandwidth_bps)
        try:
            with target.open("rb") as f:
                for (start, end), preamble in zip(parts, preambles):
                    owner._recorder.range(name, start, end)
                    if preamble and not self._write(name, preamble, throttle, budget):
                        break
                    if budget is not None:
                        budget -= len(preamble)
                    f.seek(start)
                    remaining = end - start + 1
                    while remaining > 0:
                        chunk = f.read(min(remaining, throttle.chunk_size))
                        if not chunk:
                            raise OSError(errno.EIO, f"{target} shrank while being served")
                        if not self._write(name, chunk, throttle, budget):
                            break
                        if budget is not None:
                            budget -= len(chunk)
                        remaining -= len(chunk)
                    if remaining > 0:
                        break
                else:
                    if closing:
                        self._write(name, closing, throttle, budget)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            log.debug("%s: client went away while receiving %s: %s", self.address_string(), name, exc)
            self.close_connection = True
            return
        if budget is not None:
            owner._recorder.reset(name)
            self._reset()

    def _write(self, name: str, data: bytes, throttle: _Throttle, budget: int | None) -> bool:
        """Write ``data`` (cut to ``budget``); False once the budget of a mid-body reset is spent."""
        if budget is not None and len(data) >= budget:
            if budget:
                self._send_counted(name, memoryview(data)[:budget])
            return False
        # Under a bandwidth cap, write in small pieces so the rate is smooth within a request.
        view = memoryview(data)
        for offset in range(0, len(view), throttle.chunk_size):
            piece = view[offset:offset + throttle.chunk_size]
            throttle.wait(len(piece))
            self._send_counted(name, piece)
        return True

    def _send_counted(self, name: str, piece: memoryview) -> None:
        """Count, then write: a client that has its last byte must find it in the stats already."""
        recorder = self.server.owner._recorder
        recorder.sent(name, len(piece))
        try:
            self.wfile.write(piece)
        except OSError:
            recorder.sent(name, -len(piece))
            raise

    def _send_simple(self, name: str, status: int, *, head: bool, extra: dict[str, str] | None = None) -> None:
        """A small XML error body (like S3's), keeping the connection alive."""
        phrase = HTTPStatus(status).phrase
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{status}</Code>'
                f"<Message>{phrase}</Message></Error>\n").encode()
        self.server.owner._recorder.status(name, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _reset(self) -> None:
        """Drop the connection: a TCP RST (SO_LINGER 0) like a load balancer aborting it, or a plain close."""
        self.close_connection = True
        if self.server.owner._faults.plan.reset_style == "close":  # type: ignore[union-attr]
            return  # the server closes the socket after this request: FIN, no response
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Close our read buffer too, so that the close below really closes the descriptor now
            # (a FIN sent by the server's shutdown_request would let the client see a clean EOF first).
            self.rfile.close()
            self.connection.close()
        except OSError as exc:
            log.debug("reset of %s: %s", self.address_string(), exc)


class _Throttle:
    """Paces one response like a link of ``bps`` bytes per second: ``n`` bytes are out no sooner than n / bps."""

    def __init__(self, bps: float | None) -> None:
        self.bps = bps
        self.chunk_size = CHUNK_SIZE if not bps else max(1024, min(CHUNK_SIZE, int(bps / 50)))
        self._start = time.monotonic()
        self._sent = 0

    def wait(self, nbytes: int) -> None:
        """Sleep until ``nbytes`` more may be written."""
        if not self.bps:
            return
        self._sent += nbytes
        ahead = self._start + self._sent / self.bps - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of parallel connections (GDAL, many
    # workers): the clients then wait a full second to retry.
    request_queue_size = 128
    owner: CogServer

    def __init__(self, address: tuple[str, int], owner: CogServer) -> None:
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.connections_opened = 0
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, is_open: bool) -> None:
        with self._connections_lock:
            (self._connections.add if is_open else self._connections.discard)(conn)
            self.connections_opened += is_open

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that goes away is routine (debug); anything else is logged, never printed."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("connection from %s: %s", client_address, exc)
        else:
            log.warning("error serving %s", client_address, exc_info=True)

    def drop_connections(self) -> None:
        """Shut down idle keep-alive connections so their handler threads end."""
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class CogServer:
    """Serves the files under ``root`` over HTTP/1.1 with range requests, like S3; a context manager.

    ``latency_s`` is slept before answering each request (object storage's first-byte latency),
    ``bandwidth_bps`` caps each response's payload at that many bytes per second, and ``faults``
    answers a share of requests with 5xx errors or connection resets.
    """

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0,
                 bandwidth_bps: float | None = None, faults: FaultPlan | None = None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        if latency_s < 0 or (bandwidth_bps is not None and bandwidth_bps <= 0):
            raise ValueError("latency_s must be >= 0 and bandwidth_bps > 0")
        self.host = host
        self.port = port
        self.latency_s = latency_s
        self.bandwidth_bps = bandwidth_bps
        self._faults = _Faults(faults)
        self._recorder = _Recorder()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def faults(self) -> FaultPlan | None:
        return self._faults.plan

    @property
    def url(self) -> str:
        """``http://host:port``; a wildcard host (0.0.0.0, ::) is replaced by this machine's name."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def href(self, path: Path | str) -> str:
        """URL of a file under root (``path`` absolute, or relative to root)."""
        full = Path(path) if Path(path).is_absolute() else self.root / path
        relative = full.resolve().relative_to(self.root)  # ValueError outside root
        return f"{self.url}/{urllib.parse.quote(relative.as_posix())}"

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted since the server started (keep-alive clients reuse theirs)."""
        return self._httpd.connections_opened if self._httpd is not None else 0

    @property
    def stats(self) -> ServerStats:
        """A snapshot of the counters (per file, plus totals as properties)."""
        return self._recorder.snapshot()

    def reset_stats(self) -> None:
        self._recorder.clear()

    def start(self) -> CogServer:
        if self._httpd is not None:
            return self
        cls = _HTTPServer6 if ":" in self.host else _HTTPServer
        self._httpd = cls((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"cog-server-{self.port}", daemon=True)
        self._thread.start()
        log.debug("serving %s at %s", self.root, self.url)
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.drop_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> CogServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _resolve(self, name: str) -> tuple[Path | None, int]:
        """The file a request path names, or (None, status) for a path that is refused or absent."""
        if "\x00" in name or "\\" in name:
            return None, HTTPStatus.FORBIDDEN
        if any(part in ("..", ".") for part in name.split("/")):
            return None, HTTPStatus.FORBIDDEN
        candidate = self.root / name
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            return None, HTTPStatus.NOT_FOUND
        if not resolved.is_relative_to(self.root):
            return None, HTTPStatus.FORBIDDEN  # a symlink pointing out of root
        if not resolved.is_file():
            return None, HTTPStatus.NOT_FOUND
        return resolved, HTTPStatus.OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cropchips.testing.cog_server DIR``: serve a folder of COGs until Ctrl-C."""
    import signal

    from cropchips.cli.run import setup_logging

    parser = argparse.ArgumentParser(prog="python -m cropchips.testing.cog_server", description=__doc__)
    parser.add_argument("root", metavar="DIR", type=Path, help="folder whose files are served")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before answering each request")
    parser.add_argument("--bandwidth-mbps", type=float, default=None,
                        help="cap on each response, in megabits per second")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500")
    parser.add_argument("--reset-rate", type=float, default=0.0, help="share of connections reset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the injected faults")
    parser.add_argument("--log-level", default="INFO", help="DEBUG logs every request")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)

    faults = None
    if args.error_rate or args.reset_rate:
        faults = FaultPlan(error_rate=args.error_rate, reset_rate=args.reset_rate, seed=args.seed)
    try:
        server = CogServer(args.root, host=args.host, port=args.port, latency_s=args.latency_ms / 1000,
                           bandwidth_bps=args.bandwidth_mbps * 1e6 / 8 if args.bandwidth_mbps else None,
                           faults=faults)
        server.start()
    except (OSError, ValueError) as exc:
        parser.exit(1, f"cannot serve {args.root}: {exc}\n")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"Serving {server.root} at {server.url}/ (Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        s = server.stats
        print(f"Served {s.requests} requests, {s.bytes} bytes", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
