"""A local STAC API that replays recorded Earth Search responses (for tests; stdlib only).

The recordings live in ``../shared/data/earthsearch/responses/*.json`` beside the checkout, each
``{"_request": {"method", "uri", "body"}, "_recorded": [...], "response": {...}}``. They are read in
place, never copied. The server answers:

* ``GET /v1``              -> the recorded landing page
* ``GET /v1/conformance``  -> ``{"conformsTo": [...]}`` taken from the landing page
* ``GET /v1/collections``  -> the recorded collections list
* ``POST|GET /v1/search``  -> the first page of the chosen sequence when the request carries no
  ``next`` token, else the page whose recorded request carried that same token (404 for an
  unknown token)

Absolute links to ``https://earth-search.aws.element84.com/v1`` are rewritten, in the text served,
to this server's base URL, so a client follows ``next`` links back here. A ``next`` link whose token
has no recorded page in the sequence is dropped (the recordings stop there; the real API goes on),
unless ``end_after_last=False``.

Every request is recorded (method, path, query, parsed JSON body, page served, status) in
:attr:`StacReplayServer.requests`. Faults: ``fail_first={"cli_filter.2.json": 1}`` answers the first
request(s) for that page with HTTP 502; ``always_fail={"cli_filter.1.json"}`` answers every one so.
Fault keys are a search page's file name, or ``"landing"``, ``"conformance"``, ``"collections"``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

RESPONSES = Path(__file__).resolve().parents[2] / "shared" / "data" / "earthsearch" / "responses"
RECORDED_ROOT = "https://earth-search.aws.element84.com/v1"


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any  # parsed JSON body, or None
    page: str | None = None  # the recording served (or that would have been), None when none matched
    status: int = 0


@dataclass
class _Page:
    name: str
    token: str | None  # the ``next`` token of the recorded request; None for a first page
    response: dict[str, Any] = field(repr=False)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _request_body(recording: dict[str, Any]) -> dict[str, Any]:
    body = recording.get("_request", {}).get("body")
    if isinstance(body, str):
        body = json.loads(body) if body.strip() else None
    return body if isinstance(body, dict) else {}


def _next_token(response: dict[str, Any]) -> str | None:
    for link in response.get("links", []):
        if link.get("rel") == "next":
            body = link.get("body")
            if isinstance(body, dict) and body.get("next"):
                return str(body["next"])
            query = parse_qs(urlsplit(link.get("href", "")).query)
            if query.get("next"):
                return query["next"][0]
    return None


class StacReplayServer:
    """Threaded replay server on 127.0.0.1 (free port). Use as a context manager."""

    def __init__(self, pages: Sequence[str], *, landing: str = "cli_filter.0.json",
                 collections: str = "collections.1.json", responses_dir: str | Path | None = None,
                 fail_first: Mapping[str, int] | None = None, always_fail: Iterable[str] = (),
                 fail_status: int = 502, end_after_last: bool = True) -> None:
        self.responses_dir = Path(responses_dir) if responses_dir else RESPONSES
        self.landing = _load(self.responses_dir / landing)["response"]
        self.collections = _load(self.responses_dir / collections)["response"]
        self.pages: list[_Page] = []
        for name in pages:
            recording = _load(self.responses_dir / name)
            self.pages.append(_Page(name, _request_body(recording).get("next"), recording["response"]))
        firsts = [p for p in self.pages if p.token is None]
        if len(firsts) != 1:
            raise ValueError(f"a search sequence needs exactly one first page (no 'next' in its request), got {[p.name for p in firsts]}")
        self.fail_first = dict(fail_first or {})
        self.always_fail = set(always_fail)
        self.fail_status = fail_status
        self.end_after_last = end_after_last
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._failed: dict[str, int] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        assert self._port is not None, "server not started"
        return self._port  # kept after stop(), for assertions on messages that name the URL

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The API root to give a client (``http://127.0.0.1:PORT/v1``)."""
        return f"{self.base}/v1"

    def start(self) -> Self:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self, "GET")

            def do_POST(self) -> None:
                server._handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: requests are recorded in server.requests instead

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="stac-replay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ assertions helpers

    def requests_for(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path and (method is None or r.method == method)]

    @property
    def search_requests(self) -> list[RecordedRequest]:
        return self.requests_for("/v1/search")

    # ------------------------------------------------------------------ serving

    def _rewrite(self, doc: dict[str, Any]) -> bytes:
        return json.dumps(doc).replace(RECORDED_ROOT, self.url).encode()

    def _search_page(self, token: str | None) -> _Page | None:
        for page in self.pages:
            if page.token == token:
                return page
        return None

    def _served_search(self, page: _Page) -> dict[str, Any]:
        response = page.response
        token = _next_token(response)
        if self.end_after_last and token is not None and self._search_page(token) is None:
            response = dict(response, links=[link for link in response.get("links", []) if link.get("rel") != "next"])
        return response

    def _should_fail(self, name: str) -> bool:
        with self._lock:
            if name in self.always_fail:
                return True
            done = self._failed.get(name, 0)
            if done < self.fail_first.get(name, 0):
                self._failed[name] = done + 1
                return True
            return False

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        path = parts.path.rstrip("/") or "/"
        query = parse_qs(parts.query)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = RecordedRequest(method, path, query, body)
        with self._lock:
            self.requests.append(record)

        status, doc = 404, {"code": "NotFound", "description": f"{method} {path} is not replayed"}
        name: str | None = None
        if method == "GET" and path == "/v1":
            name, status, doc = "landing", 200, self.landing
        elif method == "GET" and path == "/v1/conformance":
            name, status, doc = "conformance", 200, {"conformsTo": self.landing.get("conformsTo", [])}
        elif method == "GET" and path == "/v1/collections":
            name, status, doc = "collections", 200, self.collections
        elif path == "/v1/search":
            token = body.get("next") if isinstance(body, dict) else None
            token = token or (query.get("next") or [None])[0]
            page = self._search_page(token)
            if page is None:
                doc = {"code": "NotFound", "description": f"no recorded search page for next={token!r}"}
            else:
                name, status, doc = page.name, 200, self._served_search(page)
        if name is not None and self._should_fail(name):
            status, doc = self.fail_status, {"code": "BadGateway", "description": f"injected fault for {name}"}
        record.page, record.status = name, status

        payload = self._rewrite(doc)
        handler.send_response(status)
        handler.send_header("Content-Type", "application/geo+json" if path == "/v1/search" else "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
