"""Where a dataset's files live: a local (or NFS) folder, or an object store such as S3.

Every file of the dataset is *published* whole: a writer produces it in a local temporary file,
then the storage makes it visible under its final name in one step. On a folder that step is a
rename beside the target (atomic, also on NFS); on an object store it is a single upload, which
the store makes visible only once complete. Readers therefore never see a partial file, and a
killed writer leaves at most a local temporary behind (removed by the next worker on the host).

Object stores are reached through fsspec (``s3://`` needs ``s3fs``; ``gs://``, ``az://`` and the
rest need their fsspec package). Credentials and endpoints come from each library's usual
settings: for S3, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` or
``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for S3-compatible servers
(MinIO, Ceph, moto).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from .errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Temporary names carry the writer's host and pid (.tmp~HOST~PID~RANDOM~NAME), so a restarted
# worker can tell the leftovers of dead processes on its host from files being written.
TMP_PREFIX = ".tmp~"
#: NFS write errors worth another try (a server failover or a stale handle is often brief).
TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.ENOSPC}
WRITE_ATTEMPTS = 3
UPLOAD_ATTEMPTS = 4
#: Local folder for files on their way to an object store.
SCRATCH_DIR = Path(tempfile.gettempdir()) / "cropchips-scratch"


def temporary_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same directory: the rename is atomic, also on NFS)."""
    return path.parent / f"{TMP_PREFIX}{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}~{path.name}"


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is fsync'ed and renamed
    to ``path`` (atomic, also on NFS: same directory, same file system), on error removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def retry(call: Callable[[], T], what: str, *, attempts: int, transient: Callable[[BaseException], bool],
          delay: float = 0.5) -> T:
    """Run ``call``; retry the errors ``transient`` accepts with exponential backoff, each retry logged."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - ``transient`` decides
            if not transient(exc) or attempt == attempts:
                raise
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(exc).__name__, exc,
                        attempt, attempts - 1, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def with_retries(write: Callable[[], None], what: str, attempts: int = WRITE_ATTEMPTS, delay: float = 0.5) -> None:
    """Run ``write``, retrying transient file-system errors (NFS hiccups) with exponential backoff."""
    retry(write, f"writing {what}", attempts=attempts, delay=delay,
          transient=lambda exc: isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS)


def remove_stale_temporaries(root: Path, subdirs: Sequence[str] = (), older_than_s: float = 3600.0) -> int:
    """Delete temporary files in ``root`` and its ``subdirs`` that no live writer owns: those of
    dead processes on this host, and any older than ``older_than_s`` (left by a host that never
    came back). Only those folders are listed: the output may sit on a large NFS share."""
    removed = 0
    now = time.time()
    host = socket.gethostname()
    for folder in (Path(root), *(Path(root) / sub for sub in subdirs)):
        if not folder.is_dir():
            continue
        for entry in folder.glob(f"{TMP_PREFIX}*"):
            parts = entry.name[len(TMP_PREFIX):].split("~")
            try:
                dead_here = len(parts) >= 4 and parts[0] == host and not _pid_alive(int(parts[1]))
                if dead_here or now - entry.stat().st_mtime > older_than_s:
                    entry.unlink()
                    removed += 1
            except (FileNotFoundError, ValueError):
                pass
    if removed:
        log.info("removed %d temporary files left by stopped workers under %s", removed, root)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Storage:
    """The output location: paths are POSIX and relative to its root (``images/NAME.tif``)."""

    #: The folder or URL, as the user gave it (for messages).
    location: str
    #: True for a folder on this machine's file system (local disk or NFS).
    is_local: bool

    def publish(self, rel: str, produce: Callable[[Path], None]) -> None:
        """Call ``produce(path)`` to write a local temporary file, then make it ``rel``, whole."""
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        """The file's content; FileNotFoundError if there is none."""
        raise NotImplementedError

    def size(self, rel: str) -> int:
        """The file's size in bytes; FileNotFoundError if there is none."""
        raise NotImplementedError

    def list(self, folder: str, prefix: str = "") -> list[str]:
        """Relative paths of the files directly in ``folder`` whose names start with ``prefix``, sorted."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        """Remove the file if it exists."""
        raise NotImplementedError

    def prepare(self, subdirs: Sequence[str] = ()) -> None:
        """Make the location ready for a writer (create it, refuse links in place of ``subdirs``,
        clear dead writers' temporaries)."""
        raise NotImplementedError

    def url(self, rel: str = "") -> str:
        """The full path or URL of ``rel``."""
        raise NotImplementedError

    # Shared conveniences built on the primitives above.
    def write_bytes(self, rel: str, data: bytes) -> None:
        self.publish(rel, lambda tmp: tmp.write_bytes(data))

    def write_json(self, rel: str, body: Any) -> None:
        """A JSON document, sorted keys, one-space indents."""
        self.write_bytes(rel, json.dumps(body, sort_keys=True, indent=1).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def exists(self, rel: str) -> bool:
        try:
            self.size(rel)
        except FileNotFoundError:
            return False
        return True

    def source(self, rel: str) -> str | BinaryIO:
        """Something ``rasterio.open`` and ``pandas.read_parquet`` accept for the file."""
        return io.BytesIO(self.read_bytes(rel))

    def __str__(self) -> str:
        return self.location


class LocalStorage(Storage):
    """A folder on this machine (local disk or an NFS mount), written by temporary file + rename."""

    is_local = True

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.location = str(root)

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def publish(self, rel: str, produce: Callable[[Path], None]) -> None:
        def attempt() -> None:
            with atomic_output(self._path(rel)) as tmp:
                produce(tmp)

        with_retries(attempt, rel)

    def read_bytes(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def size(self, rel: str) -> int:
        return self._path(rel).stat().st_size

    def list(self, folder: str, prefix: str = "") -> list[str]:
        base = self._path(folder)
        if not base.is_dir():
            return []
        return sorted(f"{folder}/{e.name}" for e in os.scandir(base)
                      if e.name.startswith(prefix) and not e.name.startswith(TMP_PREFIX) and e.is_file())

    def delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def prepare(self, subdirs: Sequence[str] = ()) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in subdirs:
            # A link here could send chips anywhere on the machine: refuse it.
            if (self.root / sub).is_symlink():
                raise ConfigError(f"{self.root / sub} is a symbolic link; the output folders must be real "
                                  "directories inside --output-dir")
        remove_stale_temporaries(self.root, subdirs)

    def url(self, rel: str = "") -> str:
        return str(self._path(rel)) if rel else str(self.root)

    def source(self, rel: str) -> str | BinaryIO:
        return str(self._path(rel))


class ObjectStorage(Storage):
    """An fsspec file system (S3 and the like): each file is one upload of a finished local file."""

    is_local = False

    def __init__(self, url: str, fs: Any, root: str):
        self.location = url
        self.fs = fs
        self.root = root.rstrip("/")

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def publish(self, rel: str, produce: Callable[[Path], None]) -> None:
        SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(SCRATCH_DIR / rel.replace("/", "~"))
        try:
            produce(tmp)
            self._retry(lambda: self.fs.put_file(str(tmp), self._key(rel)), f"upload of {rel}")
        finally:
            tmp.unlink(missing_ok=True)
        self.fs.invalidate_cache(self._key(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(self._key(rel)), f"download of {rel}")

    def size(self, rel: str) -> int:
        self.fs.invalidate_cache(self._key(rel))
        info = self._retry(lambda: self.fs.info(self._key(rel)), f"lookup of {rel}")
        if info.get("type") == "directory":
            raise FileNotFoundError(self._key(rel))
        return int(info["size"])

    def list(self, folder: str, prefix: str = "") -> list[str]:
        base = self._key(folder)
        self.fs.invalidate_cache(base)

        def listing() -> list[str]:
            try:  # s3fs and gcsfs ask the store for keys with the prefix only
                return list(self.fs.find(base, prefix=prefix))
            except TypeError:
                return list(self.fs.find(base))

        try:
            keys = self._retry(listing, f"listing of {folder}")
        except FileNotFoundError:
            return []
        names = (k[len(base) + 1:] for k in keys if k.startswith(base + "/"))
        return sorted(f"{folder}/{n}" for n in names if n.startswith(prefix) and "/" not in n)

    def delete(self, rel: str) -> None:
        try:
            self._retry(lambda: self.fs.rm_file(self._key(rel)), f"removal of {rel}")
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._key(rel))

    def prepare(self, subdirs: Sequence[str] = ()) -> None:
        # Nothing half-written can be in the store; clear this host's dead uploads' scratch files.
        if SCRATCH_DIR.is_dir():
            remove_stale_temporaries(SCRATCH_DIR)
        try:
            self.fs.ls(self.root)
        except FileNotFoundError:
            bucket = self.root.split("/", 1)[0]
            if not self.fs.exists(bucket):
                raise ConfigError(f"{self.location}: the bucket {bucket!r} does not exist or these credentials "
                                  "cannot see it; create it first (e.g. `aws s3 mb s3://BUCKET`)") from None
        except PermissionError as exc:
            raise ConfigError(f"{self.location}: access denied ({exc}); check AWS_PROFILE or "
                              "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None

    def url(self, rel: str = "") -> str:
        protocol = self.location.split("://", 1)[0]
        return f"{protocol}://{self._key(rel)}"

    @staticmethod
    def _retry(call: Callable[[], T], what: str) -> T:
        """Retry object-store errors other than "not found" and "denied" (throttling, resets, 5xx)."""
        return retry(call, what, attempts=UPLOAD_ATTEMPTS,
                     transient=lambda exc: not isinstance(exc, (FileNotFoundError, PermissionError)))


def open_storage(location: str | Path | Storage) -> Storage:
    """The storage for a folder path or an fsspec URL (``s3://bucket/prefix``)."""
    if isinstance(location, Storage):
        return location
    text = str(location)
    if "://" not in text or text.startswith("file://"):
        return LocalStorage(Path(text.removeprefix("file://")))
    import fsspec

    protocol = text.split("://", 1)[0]
    try:
        fs, root = fsspec.core.url_to_fs(text)
    except ImportError as exc:
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(protocol, "")
        hint = f"pip install {package}" if package else "install the fsspec package for it"
        raise ConfigError(f"--output-dir {text}: no file system for {protocol}:// ({exc}); {hint}") from None
    except ValueError as exc:
        raise ConfigError(f"--output-dir {text}: no file system for {protocol}:// ({exc}); give a folder path, "
                          "s3://bucket/prefix or another fsspec URL") from None
    if not root.strip("/"):
        raise ConfigError(f"--output-dir {text}: give a bucket (and optionally a prefix), e.g. s3://bucket/chips")
    return ObjectStorage(text, fs, root)
