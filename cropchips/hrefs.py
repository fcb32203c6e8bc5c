"""Which scene hrefs a worker may open: allowed URL prefixes, and local files only under given folders.

A task comes from the network; without this check a crafted task could make a worker
read any file it can see (``/etc/shadow`` as "B02") or fetch from any host.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError, MessageError

#: Earth Search's public Sentinel-2 buckets (sentinel-2-l2a and sentinel-2-c1-l2a), over HTTPS and S3.
DEFAULT_ALLOWED_PREFIXES: tuple[str, ...] = (
    "https://sentinel-cogs.s3.us-west-2.amazonaws.com/",
    "https://e84-earth-search-sentinel-data.s3.us-west-2.amazonaws.com/",
    "s3://sentinel-cogs/",
    "s3://e84-earth-search-sentinel-data/",
)


@dataclass(frozen=True)
class HrefPolicy:
    """Allowed remote URL prefixes and local folders."""

    prefixes: tuple[str, ...] = DEFAULT_ALLOWED_PREFIXES
    """An href must start with one of these (scheme and host included)."""
    local_dirs: tuple[Path, ...] = ()
    """Local files are allowed only inside these folders (none: no local files)."""

    @classmethod
    def from_options(cls, prefixes: Iterable[str] | str | None, local_dirs: Iterable[str] | str | None) -> "HrefPolicy":
        def split(value: Iterable[str] | str | None) -> list[str]:
            if value is None:
                return []
            items = value.split(",") if isinstance(value, str) else list(value)
            return [v.strip() for v in items if v.strip()]

        chosen = tuple(split(prefixes)) if prefixes is not None else DEFAULT_ALLOWED_PREFIXES
        for prefix in chosen:
            parts = urlsplit(prefix)
            if parts.scheme not in ("http", "https", "s3") or not parts.netloc:
                raise ConfigError(f"allowed href prefix {prefix!r} must be http(s):// or s3:// with a host")
        return cls(prefixes=chosen, local_dirs=tuple(Path(d).resolve() for d in split(local_dirs)))

    def check(self, href: str) -> str:
        """Return the path or URL to open for ``href``, or raise MessageError saying why not."""
        if not isinstance(href, str) or not href:
            raise MessageError("empty href")
        parts = urlsplit(href)
        if parts.scheme in ("", "file"):
            return self._check_local(parts.path if parts.scheme == "file" else href)
        if ".." in parts.path.split("/"):
            raise MessageError(f"href {href!r} contains '..'")
        if any(href.startswith(prefix) for prefix in self.prefixes):
            return href
        raise MessageError(f"href {href!r} is not allowed: it must start with one of {list(self.prefixes)} "
                           "(workers' --allowed-hrefs)")

    def _check_local(self, path: str) -> str:
        if not self.local_dirs:
            raise MessageError(f"local file href {path!r} is not allowed; start workers with --local-scenes-dir "
                               "to read scenes from a local folder")
        resolved = Path(os.path.realpath(path))  # follows symlinks: a link cannot lead outside
        for root in self.local_dirs:
            if resolved == root or root in resolved.parents:
                return str(resolved)
        raise MessageError(f"local file {path!r} is outside the allowed folders {[str(d) for d in self.local_dirs]}")
