"""One writer per cell at a time, and a count of the workers a task has crashed.

Two tasks for the same cell can run at once: two masters published the same area, or a
worker cut off from Kafka is still writing while the group hands its task to another. Both
write the same file names and each removes the other's "stale" chips. A **lease** gives a
cell one writer at a time: a small file ``leases/CELL.lock`` created only if absent (an
``O_EXCL``-safe link on a folder or NFS, a conditional put on an object store) that names its
holder and an expiry; the holder renews it while it works and deletes it when done. A lease
whose holder is a dead process on this host, or whose expiry has passed, is taken over.

The same folder counts **starts**: ``leases/CELL.starts.json`` says how many workers took the
task and how many of those starts never ended (the worker was killed: out of memory, a GDAL
segfault, kill -9). A task that has crashed ``max_starts`` workers is not started again but
dead-lettered, so that it cannot take down the fleet one worker at a time. The file is only
written under the lease.

Leases compare wall-clock times written by other hosts: keep the hosts' clocks in sync (NTP);
``CLOCK_SKEW_S`` is allowed for.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cropchips.errors import RetryableError
from cropchips.queue.messages import check_safe_id
from cropchips.output.storage import Storage

log = logging.getLogger(__name__)

LEASES_DIR = "leases"
#: Seconds another host's clock may be ahead of ours before its lease is thought expired too early.
CLOCK_SKEW_S = 30.0


class CellBusy(RetryableError):
    """Another live worker holds the cell's lease: try again later."""


class LeaseLost(RetryableError):
    """The lease was taken over while the task ran (it was not renewed in time): redo the task later."""


def lease_path(cell_id: str) -> str:
    return f"{LEASES_DIR}/{check_safe_id(cell_id, 'cell id')}.lock"


def starts_path(cell_id: str) -> str:
    return f"{LEASES_DIR}/{check_safe_id(cell_id, 'cell id')}.starts.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


@dataclass
class Lease:
    """A held lease; renewed in the background until released."""

    storage: Storage
    cell_id: str
    body: dict[str, Any]
    version: str
    ttl_s: float

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True, name=f"lease-{self.cell_id}")
        self._renewer.start()

    @property
    def rel(self) -> str:
        return lease_path(self.cell_id)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; check() reports a loss
                log.warning("renewing the lease of cell %s failed: %s", self.cell_id, exc)

    def _still_ours(self) -> bool:
        """Is the lease file the one we wrote last? Remembers a loss (caller holds ``_lock``)."""
        if self._lost is None:
            try:
                _, version = self.storage.read_version(self.rel)
            except FileNotFoundError:
                version = None
            if version != self.version:
                self._lost = "the lease file was replaced or removed by another worker"
                log.warning("lost the lease of cell %s: %s", self.cell_id, self._lost)
        return self._lost is None

    def renew(self) -> None:
        """Push the expiry out, if the lease is still ours."""
        with self._lock:
            if self._stop.is_set() or not self._still_ours():
                return
            body = {**self.body, "expires_at": time.time() + self.ttl_s}
            self.storage.write_bytes(self.rel, json.dumps(body).encode())
            _, self.version = self.storage.read_version(self.rel)
            self.body = body

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours (call before publishing the outputs)."""
        with self._lock:
            if not self._still_ours():
                raise LeaseLost(f"cell {self.cell_id}: {self._lost}; the task will be redone")

    def release(self) -> None:
        """Stop renewing and delete the lease file (only if it is still ours)."""
        self._stop.set()
        self._renewer.join(timeout=5)
        with self._lock:
            try:
                self.storage.delete_if_version(self.rel, self.version)
            except Exception as exc:  # noqa: BLE001 - an orphan lease expires by itself
                log.warning("could not remove the lease of cell %s (%s); it expires in %.0f s", self.cell_id, exc,
                            self.ttl_s)


class CellLeases:
    """Acquires cell leases for one worker process."""

    def __init__(self, storage: Storage, owner: str, ttl_s: float = 120.0):
        if ttl_s < 3:
            raise ValueError(f"lease ttl must be at least 3 s, got {ttl_s}")
        self.storage = storage
        self.owner = owner
        self.ttl_s = ttl_s
        self.host = socket.gethostname()

    def acquire(self, cell_id: str, task_id: str) -> Lease:
        """The cell's lease, or CellBusy if a live worker holds it."""
        rel = lease_path(cell_id)
        for _ in range(3):
            body = {"owner": self.owner, "host": self.host, "pid": os.getpid(), "token": uuid.uuid4().hex,
                    "task_id": task_id, "acquired_at": time.time(), "expires_at": time.time() + self.ttl_s}
            if self.storage.create_exclusive(rel, json.dumps(body).encode()):
                _, version = self.storage.read_version(rel)
                return Lease(self.storage, cell_id, body, version, self.ttl_s)
            try:
                raw, version = self.storage.read_version(rel)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            holder = _parse(raw)
            why = self._stale(holder)
            if why is None:
                raise CellBusy(f"cell {cell_id} is being written by {holder.get('owner', '?')} "
                               f"(task {holder.get('task_id', '?')}); waiting for it to finish")
            log.warning("taking over the lease of cell %s from %s: %s", cell_id, holder.get("owner", "?"), why)
            self.storage.delete_if_version(rel, version)
        raise CellBusy(f"cell {cell_id}: its lease keeps changing hands; trying again later")

    def _stale(self, holder: dict[str, Any]) -> str | None:
        """Why a lease may be taken over, or None while its holder may still be at work."""
        if not holder:
            return "the lease file is unreadable"
        expires = holder.get("expires_at")
        if not isinstance(expires, (int, float)) or expires + CLOCK_SKEW_S < time.time():
            return "it has expired"
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int) and not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        return None


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


@dataclass
class Starts:
    """How often a task was taken, and how many of those starts never ended."""

    task_id: str
    deliveries: int = 0
    """Times a worker took the task (every delivery that got the lease)."""
    unfinished: int = 0
    """Starts that neither finished nor were handed back: crashes."""


def read_starts(storage: Storage, cell_id: str, task_id: str) -> Starts:
    """The counts for ``task_id`` (zero for a task the file does not describe)."""
    try:
        body = _parse(storage.read_bytes(starts_path(cell_id)))
    except FileNotFoundError:
        body = {}
    if body.get("task_id") != task_id:
        return Starts(task_id)

    def count(key: str) -> int:
        value = body.get(key)
        return value if isinstance(value, int) and 0 <= value < 1_000_000 else 0

    return Starts(task_id, count("deliveries"), count("unfinished"))


def write_starts(storage: Storage, cell_id: str, starts: Starts) -> None:
    storage.write_bytes(starts_path(cell_id), json.dumps(
        {"task_id": starts.task_id, "deliveries": starts.deliveries, "unfinished": starts.unfinished}).encode())
