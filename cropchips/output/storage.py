"""Where a dataset's files live: a local (or NFS) folder, or an object store such as S3.

Every file of the dataset is *published* whole: a writer produces it in a local temporary file,
then the storage makes it visible under its final name in one step. On a folder that step is a
rename beside the target (atomic, also on NFS), followed by an fsync of the folder so that the
rename survives a crash; on an object store it is a single upload, which the store makes visible
only once complete. Readers therefore never see a partial file, and a killed writer leaves at
most a local temporary behind (removed by the next worker on the host).

A folder's paths stay inside it: a relative path with ``..``, an absolute one, or one that goes
through a symbolic link is refused on every read, write and delete (the folder may be shared
over NFS with other users, who could plant a link that sends chips anywhere on this machine).

Three conditional operations serve as locks and leases: ``create_exclusive`` (create only if
absent), ``read_version`` and ``delete_if_version`` (delete only if unchanged since read).

Object stores are reached through fsspec (``s3://`` needs ``s3fs``; ``gs://``, ``az://`` and the
rest need their fsspec package). Credentials and endpoints come from each library's usual
settings: for S3, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` or
``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for S3-compatible servers
(MinIO, Ceph, moto).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from cropchips.errors import ConfigError
from cropchips.retry import STORAGE, Backoff, retry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Temporary names carry the writer's host and pid (.tmp~HOST~PID~RANDOM~NAME), so a restarted
# worker can tell the leftovers of dead processes on its host from files being written.
TMP_PREFIX = ".tmp~"
#: NFS write errors worth another try (a server failover or a stale handle is often brief).
TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.ENOSPC}
WRITE_ATTEMPTS = 3
UPLOAD_ATTEMPTS = 4
HASH_CHUNK = 4 * 2**20

# POSIX flags (getattr: importing this module must not fail where they are missing).
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# O_NOFOLLOW: a link at that name fails with ELOOP instead of being followed out of the folder.
_DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
# O_NONBLOCK: a FIFO planted at a file's name must not hang the reader (no effect on regular files).
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
# Linux names an open directory as /proc/self/fd/N: a producer writing there writes into exactly
# the directory that was checked, even if someone swaps a link in for it meanwhile.
_FD_DIR = Path("/proc/self/fd")


class UnsafePathError(ConfigError, PermissionError):
    """A path that would leave the output folder (``..``, absolute, or through a symbolic link)."""


def split_relative(rel: str) -> list[str]:
    """The components of a POSIX path relative to a storage root; UnsafePathError for anything
    that could leave the root (absolute, ``..``, ``.``, empty components, NUL)."""
    parts = rel.split("/")
    if not rel or "\0" in rel or any(part in ("", ".", "..") for part in parts):
        raise UnsafePathError(f"{rel!r} is not a path inside the output folder: give a relative POSIX path "
                              "without '..', '.' or empty components (e.g. images/NAME.tif)")
    return parts


def temporary_name(name: str) -> str:
    """A unique temporary file name for ``name`` (host, pid and a random part; see TMP_PREFIX)."""
    return f"{TMP_PREFIX}{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}~{name}"


def temporary_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same directory: the rename is atomic, also on NFS)."""
    return path.parent / temporary_name(path.name)


def file_version(info: os.stat_result) -> str:
    """A token that changes whenever the file is replaced: a rename brings a new inode, a rewrite
    in place a new mtime or size."""
    return f"{info.st_ino}-{info.st_mtime_ns}-{info.st_size}"


def fsync_dir(dir_fd: int) -> None:
    """Make a rename, link or unlink in this directory durable; on a file system that cannot
    sync a directory (some FUSE mounts say EINVAL) the entry is as durable as it gets there."""
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
        log.debug("fsync of a directory is not supported here (%s)", exc)


def _fd_path(dir_fd: int, folder: Path) -> Path:
    """A path naming the open directory itself where the system offers one, else its name."""
    return _FD_DIR / str(dir_fd) if _FD_DIR.is_dir() else folder


@contextmanager
def _replace_in(dir_fd: int, name: str, folder: Path) -> Iterator[Path]:
    """Yield a temporary path in the open directory ``dir_fd``; on success the file is fsync'ed,
    renamed to ``name`` and the directory fsync'ed (so the rename survives a crash); on error the
    temporary is removed. ``folder`` is the directory's name, for systems without /proc."""
    tmp_name = temporary_name(name)
    try:
        yield _fd_path(dir_fd, folder) / tmp_name
        fd = os.open(tmp_name, _READ_FLAGS, dir_fd=dir_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # rename(2) replaces a symbolic link at ``name`` itself; it never writes through it.
        os.replace(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        fsync_dir(dir_fd)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp_name, dir_fd=dir_fd)
        raise


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is fsync'ed and renamed
    to ``path`` (atomic, also on NFS: same directory, same file system) and the directory is
    fsync'ed; on error the temporary is removed. The parent folder is used as named (links
    followed): LocalStorage is the one that keeps paths inside a root."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        with _replace_in(dir_fd, path.name, path.parent) as tmp:
            yield tmp
    finally:
        os.close(dir_fd)


def with_retries(write: Callable[[], None], what: str, attempts: int = WRITE_ATTEMPTS, delay: float = 0.5) -> None:
    """Run ``write``, retrying transient file-system errors (NFS hiccups) with exponential backoff."""
    retry(write, f"writing {what}", attempts=attempts, backoff=Backoff(base=delay, cap=8.0, jitter=False),
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


def scratch_dir() -> Path:
    """This user's private folder for files on their way to an object store.

    ``$TMPDIR/cropchips-scratch-UID``, mode 0700: in a shared /tmp another user could otherwise
    read the chips or swap a file between its writing and its upload. A folder of that name
    owned by someone else, or not a real directory, is refused; one of ours that others can
    enter is emptied and made private again (what it holds may have been planted).
    """
    path = Path(tempfile.gettempdir()) / f"cropchips-scratch-{os.getuid()}"
    for _ in range(2):
        with suppress(FileExistsError):
            path.mkdir(mode=0o700)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{path} is not a directory (a symbolic link or a file put there by someone); "
                              "remove it, or set TMPDIR to a private folder")
        if info.st_uid != os.getuid():
            raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}), so "
                              "that user could read or swap files on their way to the store; remove it (as root) "
                              "or set TMPDIR to a private folder")
        if stat.S_IMODE(info.st_mode) & 0o077 == 0:
            return path
        log.warning("%s was open to other users (mode %o); emptying it and making it private (0700)",
                    path, stat.S_IMODE(info.st_mode))
        shutil.rmtree(path)  # does not follow links inside the folder
    raise ConfigError(f"{path} could not be made private (mode 0700); remove it, or set TMPDIR to a private folder")


class Storage:
    """The output location: paths are POSIX and relative to its root (``images/NAME.tif``)."""

    #: The folder or URL, as the user gave it (for messages).
    location: str
    #: True for a folder on this machine's file system (local disk or NFS).
    is_local: bool

    @property
    def conditional_writes(self) -> bool:
        """True when create_exclusive and delete_if_version are atomic here (cell leases need them)."""
        return True

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

    def delete(self, rel: str) -> bool | None:
        """Remove the file if it exists: True if this call removed it, False if there was none, None
        where the store cannot tell (an object store's DELETE succeeds either way)."""
        raise NotImplementedError

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if no file of that name exists, atomically (a
        reader sees all of ``data`` or no file). True if this call created it, False if it
        existed. Never a false True; after a lost reply and a retry, a call that did create the
        file may say False, so put a token of the caller in ``data`` if that matters."""
        raise NotImplementedError

    def read_version(self, rel: str) -> tuple[bytes, str]:
        """The file's content and a version token that changes whenever the file is replaced;
        FileNotFoundError if there is none. (On S3 the token is the ETag, the MD5 of a simple
        upload: a replacement with identical bytes keeps it.)"""
        raise NotImplementedError

    def delete_if_version(self, rel: str, version: str) -> bool:
        """Delete ``rel`` only if it still has ``version`` (from read_version); True if deleted,
        False if it was replaced meanwhile or is gone."""
        raise NotImplementedError

    def sha256(self, rel: str) -> str:
        """Hex SHA-256 digest of the file's content; FileNotFoundError if there is none."""
        return hashlib.sha256(self.read_bytes(rel)).hexdigest()

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
    """A folder on this machine (local disk or an NFS mount), written by temporary file + rename.

    The root is used as given (it may itself be a link, e.g. to the NFS mount); below it every
    folder is opened with O_NOFOLLOW one component at a time and the file is reached through that
    open folder, so a link anywhere below the root, even one swapped in while a worker runs, is
    refused (UnsafePathError) instead of followed.
    """

    is_local = True

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.location = str(root)

    def _unsafe(self, parts: Sequence[str]) -> UnsafePathError:
        return UnsafePathError(f"{self.root.joinpath(*parts)} is a symbolic link; the output folders and files "
                               f"must be real ones inside {self.root} (remove the link)")

    @contextmanager
    def _folder(self, parts: Sequence[str], *, create: bool) -> Iterator[int]:
        """An open descriptor of the folder ``root/parts``, reached without following any link
        below the root; missing folders are made when ``create``, else FileNotFoundError."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            for depth, name in enumerate(parts, start=1):
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT),
                                                str(self.root.joinpath(*parts[:depth]))) from None
                    with suppress(FileExistsError):  # another worker may make it at the same moment
                        os.mkdir(name, 0o777, dir_fd=fd)
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(fd, name):
                        raise self._unsafe(parts[:depth]) from None
                    raise
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _open(self, rel: str) -> Iterator[BinaryIO]:
        """The regular file ``rel`` open for reading, reached without following links."""
        parts = split_relative(rel)
        with self._folder(parts[:-1], create=False) as dir_fd:
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP and _is_link(dir_fd, parts[-1]):
                    raise self._unsafe(parts) from None
                if exc.errno == errno.ENOENT:
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.root / rel)) from None
                raise
        handle = os.fdopen(fd, "rb")
        with handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePathError(f"{self.root / rel} is not a regular file; remove it")
            os.set_blocking(fd, True)
            yield handle

    def publish(self, rel: str, produce: Callable[[Path], None]) -> None:
        parts = split_relative(rel)

        def attempt() -> None:
            with self._folder(parts[:-1], create=True) as dir_fd:
                with _replace_in(dir_fd, parts[-1], self.root.joinpath(*parts[:-1])) as tmp:
                    produce(tmp)

        with_retries(attempt, rel)

    def read_bytes(self, rel: str) -> bytes:
        with self._open(rel) as handle:
            return handle.read()

    def size(self, rel: str) -> int:
        parts = split_relative(rel)
        with self._folder(parts[:-1], create=False) as dir_fd:
            try:
                info = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.root / rel)) from None
        if stat.S_ISLNK(info.st_mode):
            raise self._unsafe(parts)
        return info.st_size

    def list(self, folder: str, prefix: str = "") -> list[str]:
        parts = split_relative(folder) if folder else []
        try:
            with self._folder(parts, create=False) as dir_fd, os.scandir(dir_fd) as entries:
                names = [e.name for e in entries if e.name.startswith(prefix) and not e.name.startswith(TMP_PREFIX)
                         and e.is_file(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(f"{folder}/{name}" if folder else name for name in names)

    def delete(self, rel: str) -> bool:
        parts = split_relative(rel)
        try:
            with self._folder(parts[:-1], create=False) as dir_fd:
                os.unlink(parts[-1], dir_fd=dir_fd)  # a link at that name is removed itself, never followed
        except FileNotFoundError:
            return False
        return True

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        # The classic NFS-safe lock (open(2), O_EXCL): write a unique temporary, then link(2) it
        # to the name, which is atomic and fails with EEXIST if the name exists, also over NFS.
        parts = split_relative(rel)
        with self._folder(parts[:-1], create=True) as dir_fd:
            tmp_name = temporary_name(parts[-1])
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666,
                         dir_fd=dir_fd)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    os.link(tmp_name, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                except OSError as exc:
                    # Over NFS the reply to a LINK that succeeded can be lost and the retransmission
                    # fail: the temporary's link count says whether the name is now ours.
                    if os.stat(tmp_name, dir_fd=dir_fd, follow_symlinks=False).st_nlink != 2:
                        if isinstance(exc, FileExistsError):
                            return False
                        raise
                fsync_dir(dir_fd)
                return True
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(tmp_name, dir_fd=dir_fd)

    def read_version(self, rel: str) -> tuple[bytes, str]:
        with self._open(rel) as handle:
            while True:  # read again if the file was rewritten in place while being read
                before = os.fstat(handle.fileno())
                handle.seek(0)
                data = handle.read()
                after = os.fstat(handle.fileno())
                if file_version(before) == file_version(after):
                    return data, file_version(after)

    def delete_if_version(self, rel: str, version: str) -> bool:
        # Rename the file aside first (atomic), so that what gets checked is exactly what gets
        # deleted; if it is not the expected version, link it back, which never clobbers a newer
        # file created at the name in the meantime.
        parts = split_relative(rel)
        name = parts[-1]
        try:
            with self._folder(parts[:-1], create=False) as dir_fd:
                if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    return False  # a link or a folder is never a version anyone read
                aside = temporary_name(name)
                try:
                    os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except FileNotFoundError:
                    return False
                info = os.stat(aside, dir_fd=dir_fd, follow_symlinks=False)
                deleted = stat.S_ISREG(info.st_mode) and file_version(info) == version
                if not deleted:
                    try:
                        os.link(aside, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                    except FileExistsError:
                        # Between our rename and this link someone created the name anew: theirs
                        # stands, and the version moved aside (already superseded) goes.
                        log.warning("%s was replaced twice while being released; keeping the newest",
                                    self.root / rel)
                    except OSError:
                        log.error("could not put %s back after a version check; it is at %s",
                                  self.root / rel, self.root.joinpath(*parts[:-1], aside))
                        raise
                os.unlink(aside, dir_fd=dir_fd)
                fsync_dir(dir_fd)
                return deleted
        except FileNotFoundError:
            return False

    def sha256(self, rel: str) -> str:
        with self._open(rel) as handle:
            return _digest(handle)

    def prepare(self, subdirs: Sequence[str] = ()) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in subdirs:
            # A link here could send chips anywhere on the machine: refuse it (every write checks again).
            if (self.root / sub).is_symlink():
                raise ConfigError(f"{self.root / sub} is a symbolic link; the output folders must be real "
                                  "directories inside --output-dir")
        remove_stale_temporaries(self.root, subdirs)

    def url(self, rel: str = "") -> str:
        if not rel:
            return str(self.root)
        split_relative(rel)
        return str(self.root / rel)

    def source(self, rel: str) -> str | BinaryIO:
        # Checked now; the reader opens the name again (a link swapped in between is a race left
        # to readers, which write nothing).
        with self._open(rel):
            pass
        return str(self.root / rel)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _digest(handle: BinaryIO) -> str:
    """Hex SHA-256 of a file object, read in chunks (chips and indexes need not fit in memory)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _precondition_failed(exc: BaseException) -> bool:
    """True for an S3 412 PreconditionFailed answer, however s3fs translated it."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)  # botocore's ClientError carries the parsed answer
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
        seen = seen.__cause__
    return False


class ObjectStorage(Storage):
    """An fsspec file system (S3 and the like): each file is one upload of a finished local file."""

    is_local = False

    @property
    def conditional_writes(self) -> bool:
        return hasattr(self.fs, "_call_s3")  # s3fs: If-None-Match / If-Match requests

    def __init__(self, url: str, fs: Any, root: str):
        self.location = url
        self.fs = fs
        self.root = root.rstrip("/")

    def _key(self, rel: str) -> str:
        if not rel:
            return self.root
        split_relative(rel)  # no ``..`` either: some S3-compatible servers normalise keys
        return f"{self.root}/{rel}"

    def _s3(self, rel: str, what: str) -> tuple[str, str]:
        """Bucket and key of ``rel``, for the conditional requests only S3 (through s3fs) offers here."""
        if not hasattr(self.fs, "_call_s3"):
            raise ConfigError(f"{self.location}: {what} needs conditional writes, which are implemented for "
                              "s3:// (AWS S3 and S3-compatible servers) only; use an s3:// URL or a folder")
        bucket, key, _ = self.fs.split_path(self._key(rel))
        return bucket, key

    def publish(self, rel: str, produce: Callable[[Path], None]) -> None:
        tmp = temporary_path(scratch_dir() / rel.replace("/", "~"))
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

    def delete(self, rel: str) -> bool | None:
        try:
            self._retry(lambda: self.fs.rm_file(self._key(rel)), f"removal of {rel}")
        except FileNotFoundError:
            return False
        finally:
            self.fs.invalidate_cache(self._key(rel))
        return None

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        # A conditional PUT (If-None-Match: *): the store answers 412 if the key exists, and
        # makes the object visible only once complete (s3fs passes the condition on to the
        # completion of a multipart upload too).
        self._s3(rel, "create_exclusive")
        key = self._key(rel)
        try:
            self._retry(lambda: self.fs.pipe_file(key, data, mode="create"), f"exclusive creation of {rel}")
        except FileExistsError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):  # servers that leave out the Condition s3fs looks for
                return False
            raise
        finally:
            self.fs.invalidate_cache(key)
        return True

    def read_version(self, rel: str) -> tuple[bytes, str]:
        # One GET gives the content and the ETag of that same object version.
        bucket, key = self._s3(rel, "read_version")
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await response["Body"].read(), response["ETag"]
            finally:
                response["Body"].close()

        return self._retry(lambda: sync(self.fs.loop, get), f"download of {rel}")

    def delete_if_version(self, rel: str, version: str) -> bool:
        # DeleteObject with If-Match (AWS S3 and moto honour it: 412 if the ETag differs). The
        # ETag is checked first as well: a server that ignores If-Match on DELETE would otherwise
        # delete a replaced object; there a tiny race remains between that check and the delete.
        # For a simple upload the ETag is the content's MD5: a replacement with identical bytes
        # keeps it, which is why lease contents carry a unique token.
        bucket, key = self._s3(rel, "delete_if_version")
        self.fs.invalidate_cache(self._key(rel))
        try:
            current = self._retry(lambda: self.fs.info(self._key(rel)), f"lookup of {rel}").get("ETag")
            if current != version:
                return False
            self._retry(lambda: self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version),
                        f"conditional removal of {rel}")
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self._key(rel))
        return True

    def sha256(self, rel: str) -> str:
        def digest() -> str:
            with self.fs.open(self._key(rel), "rb") as handle:
                return _digest(handle)

        return self._retry(digest, f"download of {rel}")

    def prepare(self, subdirs: Sequence[str] = ()) -> None:
        # Nothing half-written can be in the store; clear this host's dead uploads' scratch files.
        remove_stale_temporaries(scratch_dir())
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
        """Retry object-store errors other than "not found", "denied", "exists" and a failed
        precondition (throttling, resets, 5xx; 409 ConditionalRequestConflict too)."""
        return retry(call, what, attempts=UPLOAD_ATTEMPTS, backoff=STORAGE,
                     transient=lambda exc: not isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError))
                     and not _precondition_failed(exc))


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
