"""Which scene hrefs a worker may open: allowed URL prefixes, and local files only under given folders.

A task comes from the network; without this check a crafted task could make a worker
read any file it can see (``/etc/shadow`` as "B02") or fetch from any host.

URLs are parsed and compared part by part, never as strings: scheme, host and port must
match a prefix exactly (``https://cogs.example.com`` does not allow
``https://cogs.example.com.evil.net/`` nor ``https://cogs.example.com@evil.net/``) and the
path must lie under the prefix's path on a ``/`` boundary. What cannot be compared safely
(user info, backslashes, control characters, ``..`` segments, percent-encoded ``/`` or
``.``) is refused outright. GDAL follows HTTP redirects, which no check of the href can
see: README "Scene files and hrefs" says what an operator does about that.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from cropchips.errors import ConfigError, MessageError

#: Earth Search's public Sentinel-2 buckets (sentinel-2-l2a and sentinel-2-c1-l2a), over HTTPS and S3.
DEFAULT_ALLOWED_PREFIXES: tuple[str, ...] = (
    "https://sentinel-cogs.s3.us-west-2.amazonaws.com/",
    "https://e84-earth-search-sentinel-data.s3.us-west-2.amazonaws.com/",
    "s3://sentinel-cogs/",
    "s3://e84-earth-search-sentinel-data/",
)

#: Schemes an allowed prefix may have, with their default ports (s3:// has none: its "host" is the bucket).
SCHEMES: dict[str, int | None] = {"https": 443, "http": 80, "s3": None}

# Control characters (C0, DEL, C1) and any Unicode whitespace: never part of a real scene URL, and
# clients and servers disagree on how to treat them (curl strips some, servers split on others).
_UNSAFE_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f\s]")
# Percent-encoded '/', '\', '.', and control characters: a server that decodes them would see another
# path than the one compared here (``a%2f..%2fb``), so they are refused rather than interpreted.
_UNSAFE_ESCAPES = re.compile(r"%(2f|5c|2e|[01][0-9a-f]|7f)", re.IGNORECASE)


@dataclass(frozen=True)
class _UrlPrefix:
    """One allowed prefix, parsed and normalised."""

    scheme: str
    host: str
    port: int | None
    path: str
    """No trailing ``/``: ``""`` allows every path of the host."""

    def allows(self, scheme: str, host: str, port: int | None, path: str) -> bool:
        if (scheme, host, port) != (self.scheme, self.host, self.port):
            return False
        return not self.path or path == self.path or path.startswith(self.path + "/")


@dataclass(frozen=True)
class HrefPolicy:
    """Allowed remote URL prefixes and local folders."""

    prefixes: tuple[str, ...] = DEFAULT_ALLOWED_PREFIXES
    """An href must lie under one of these: same scheme, host and port, and a path below the prefix's
    path on a ``/`` boundary (``https://h/a`` allows ``https://h/a/x.tif``, not ``https://h/ab/x.tif``)."""
    local_dirs: tuple[Path, ...] = ()
    """Local files are allowed only inside these folders (none: no local files)."""
    _parsed: tuple[_UrlPrefix, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        parsed = []
        for prefix in self.prefixes:
            try:
                scheme, host, port, path = _normalise(prefix)
            except MessageError as exc:
                raise ConfigError(f"allowed href prefix {prefix!r} is not usable: {exc}; give it as "
                                  "https://host/path/ or s3://bucket/path/ (workers' --allowed-hrefs)") from None
            if urlsplit(prefix).query:
                raise ConfigError(f"allowed href prefix {prefix!r} must not have a query ('?...') "
                                  "(workers' --allowed-hrefs)")
            parsed.append(_UrlPrefix(scheme, host, port, path.rstrip("/")))
        object.__setattr__(self, "_parsed", tuple(parsed))

    @classmethod
    def from_options(cls, prefixes: Iterable[str] | str | None, local_dirs: Iterable[str] | str | None) -> "HrefPolicy":
        def split(value: Iterable[str] | str | None) -> list[str]:
            if value is None:
                return []
            items = value.split(",") if isinstance(value, str) else list(value)
            return [v.strip() for v in items if v.strip()]

        chosen = tuple(split(prefixes)) if prefixes is not None else DEFAULT_ALLOWED_PREFIXES
        return cls(prefixes=chosen, local_dirs=tuple(Path(d).resolve() for d in split(local_dirs)))

    def check(self, href: str) -> str:
        """Return the path or URL to open for ``href``, or raise MessageError saying why not.

        A URL comes back normalised (lower-case scheme and host, no default port, no ``.``
        segments): what is opened is exactly what was compared.
        """
        if not isinstance(href, str) or not href:
            raise MessageError("empty href")
        if re.search(r"[\x00-\x1f\x7f]", href):
            raise MessageError(f"href {href!r} contains control characters")
        parts = urlsplit(href)
        if parts.scheme in ("", "file"):
            if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
                raise MessageError(f"href {href!r} names a file on another host ({parts.netloc!r})")
            return self._check_local(parts.path if parts.scheme == "file" else href)
        scheme, host, port, path = _normalise(href)
        for prefix in self._parsed:
            if prefix.allows(scheme, host, port, path):
                return _unsplit(scheme, host, port, path, parts)
        raise MessageError(f"href {href!r} is not allowed: it must lie under one of {list(self.prefixes)} "
                           "(same scheme, host and port; workers' --allowed-hrefs)")

    def _check_local(self, path: str) -> str:
        if not self.local_dirs:
            raise MessageError(f"local file href {path!r} is not allowed; start workers with --local-scenes-dir "
                               "to read scenes from a local folder")
        resolved = Path(os.path.realpath(path))  # follows symlinks: a link cannot lead outside
        # GDAL reads /vsicurl/, /vsizip/, ... paths as virtual file systems, not as local files.
        if resolved.parts[1:2] and resolved.parts[1].startswith("vsi"):
            raise MessageError(f"local file href {path!r} is a GDAL virtual file system path, which is not allowed")
        for root in self.local_dirs:
            if resolved == root or root in resolved.parents:
                return str(resolved)
        raise MessageError(f"local file {path!r} is outside the allowed folders {[str(d) for d in self.local_dirs]}")


def _normalise(url: str) -> tuple[str, str, int | None, str]:
    """``(scheme, host, port, path)`` of a URL, normalised for comparison; MessageError for anything
    that could be read two ways (by this check and by curl or the server)."""
    if _UNSAFE_CHARS.search(url):
        raise MessageError(f"href {url!r} contains whitespace or control characters")
    if "\\" in url:
        raise MessageError(f"href {url!r} contains a backslash")
    if not url.isascii():
        raise MessageError(f"href {url!r} contains non-ASCII characters; percent-encode them")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise MessageError(f"href {url!r} must be https://, http:// or s3:// (or a local file)")
    if "@" in parts.netloc:
        raise MessageError(f"href {url!r} has user info ('user@'), which is not allowed")
    host = (parts.hostname or "").lower()
    if not host or not re.fullmatch(r"[a-z0-9._-]+|\[[0-9a-f:.]+\]", host if ":" not in host else f"[{host}]"):
        raise MessageError(f"href {url!r} has no valid host")
    try:
        port = parts.port
    except ValueError:
        raise MessageError(f"href {url!r} has an invalid port") from None
    if port is not None and SCHEMES[scheme] is None:
        raise MessageError(f"href {url!r}: an s3:// bucket has no port")
    if port == SCHEMES[scheme]:
        port = None
    if parts.fragment:
        raise MessageError(f"href {url!r} has a fragment ('#'), which is not allowed")
    if _UNSAFE_ESCAPES.search(parts.path):
        raise MessageError(f"href {url!r} has a percent-encoded '/', '\\', '.' or control character in its path")
    segments = parts.path.split("/")
    if any(unquote(s) == ".." for s in segments):
        raise MessageError(f"href {url!r} contains '..'")
    # '.' segments mean nothing (curl drops them itself); removing them compares what is fetched.
    path = "/".join(s for i, s in enumerate(segments) if s != "." or i == 0)
    return scheme, host, port, path


def _unsplit(scheme: str, host: str, port: int | None, path: str, parts: SplitResult) -> str:
    """The normalised URL that was checked (its query kept: signed URLs need theirs)."""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    return f"{scheme}://{netloc}{path}" + (f"?{parts.query}" if parts.query else "")
