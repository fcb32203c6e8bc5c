"""Writing chips: image and mask GeoTIFFs that appear complete or not at all."""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from .messages import BANDS, check_safe_id

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
MASKS_DIR = "masks"
MANIFESTS_DIR = "manifests"
METADATA_DIR = "metadata"
OUTPUT_SUBDIRS = (IMAGES_DIR, MASKS_DIR, MANIFESTS_DIR, METADATA_DIR)
# Temporary names carry the writer's host and pid (.tmp~HOST~PID~RANDOM~NAME), so a restarted
# worker can tell the leftovers of dead processes on its host from files being written.
TMP_PREFIX = ".tmp~"
#: NFS write errors worth another try (a server failover or a stale handle is often brief).
TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.ENOSPC}
WRITE_ATTEMPTS = 3


def temporary_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same directory: the rename is atomic, also on NFS)."""
    return path.parent / f"{TMP_PREFIX}{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}~{path.name}"


FORMATS = ("gtiff", "cog")


def _profile(count: int, dtype: str, size: tuple[int, int], crs: str, transform: Affine, fmt: str = "gtiff",
             categorical: bool = False) -> dict:
    height, width = size
    profile = dict(count=count, dtype=dtype, width=width, height=height, crs=crs, transform=transform, nodata=0,
                   compress="deflate", predictor=2)
    if fmt == "cog":
        # Cloud-Optimized: 128 px tiles give a 256 px chip one overview level for quick display;
        # class masks are reduced by majority, never averaged into classes that do not exist.
        block = 128 if min(height, width) >= 128 else (min(height, width) // 16) * 16
        profile.update(driver="COG", overview_resampling="mode" if categorical else "average")
        if block >= 16:
            profile.update(blocksize=block)
        return profile
    profile.update(driver="GTiff", interleave="band")
    # GeoTIFF tiles must be multiples of 16: tile when the chip allows it, else write strips.
    block = min(256, (min(height, width) // 16) * 16)
    if block >= 16:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    return profile


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


def atomic_write(path: Path, array: np.ndarray, *, crs: str, transform: Affine,
                 descriptions: tuple[str, ...] | None = None, fmt: str = "gtiff", categorical: bool = False) -> None:
    """Write ``array`` (bands, rows, cols) as a GeoTIFF at ``path`` via a temporary file and a rename.

    See :func:`atomic_output`.
    """
    profile = _profile(array.shape[0], array.dtype.name, array.shape[1:], crs, transform, fmt, categorical)
    with atomic_output(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(array)
        if descriptions:
            for i, text in enumerate(descriptions, start=1):
                dst.set_band_description(i, text)


def write_chip(output_dir: Path, name: str, image: np.ndarray, mask: np.ndarray, *, crs: str,
               transform: Affine, descriptions: tuple[str, ...] = BANDS, fmt: str = "gtiff") -> tuple[str, str]:
    """Write ``images/NAME.tif`` (uint16, one band per description: the 10 bands, or T x 10 for a
    time series) and ``masks/NAME.tif`` (uint8 classes); return their paths relative to ``output_dir``."""
    check_safe_id(name, "chip name")
    if image.dtype != np.uint16 or image.ndim != 3 or image.shape[0] != len(descriptions):
        raise ValueError(f"image must be ({len(descriptions)}, rows, cols) uint16, got {image.shape} {image.dtype}")
    if mask.dtype != np.uint8 or mask.shape != image.shape[1:]:
        raise ValueError(f"mask must be {image.shape[1:]} uint8, got {mask.shape} {mask.dtype}")
    image_rel = f"{IMAGES_DIR}/{name}.tif"
    mask_rel = f"{MASKS_DIR}/{name}.tif"
    with_retries(lambda: atomic_write(output_dir / image_rel, image, crs=crs, transform=transform,
                                      descriptions=descriptions, fmt=fmt), image_rel)
    with_retries(lambda: atomic_write(output_dir / mask_rel, mask[None], crs=crs, transform=transform,
                                      descriptions=("class",), fmt=fmt, categorical=True), mask_rel)
    return image_rel, mask_rel


def write_json(path: Path, body: dict) -> None:
    """Write a JSON document atomically (temporary file, fsync, rename)."""
    import json

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(body, sort_keys=True, indent=1))


def with_retries(write: Callable[[], None], what: str, attempts: int = WRITE_ATTEMPTS, delay: float = 0.5) -> None:
    """Run ``write``, retrying transient file-system errors (NFS hiccups) with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS or attempt == attempts:
                raise
            log.warning("writing %s failed (%s); retry %d/%d in %.1f s", what, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay *= 2


def remove_stale_temporaries(output_dir: Path, older_than_s: float = 3600.0) -> int:
    """Delete temporary files that no live writer owns: those of dead processes on this host,
    and any older than ``older_than_s`` (left by a host that never came back)."""
    removed = 0
    now = time.time()
    host = socket.gethostname()
    for sub in OUTPUT_SUBDIRS:
        folder = output_dir / sub
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
        log.info("removed %d temporary files left by stopped workers under %s", removed, output_dir)
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
