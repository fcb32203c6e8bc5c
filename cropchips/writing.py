"""Writing chips: image and mask GeoTIFFs that appear complete or not at all."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from .messages import BANDS, check_safe_id

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
MASKS_DIR = "masks"
TMP_PREFIX = ".tmp-"


def _profile(count: int, dtype: str, size: tuple[int, int], crs: str, transform: Affine) -> dict:
    height, width = size
    profile = dict(driver="GTiff", count=count, dtype=dtype, width=width, height=height, crs=crs,
                   transform=transform, nodata=0, compress="deflate", predictor=2, interleave="band")
    # GeoTIFF tiles must be multiples of 16: tile when the chip allows it, else write strips.
    block = min(256, (min(height, width) // 16) * 16)
    if block >= 16:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    return profile


def atomic_write(path: Path, array: np.ndarray, *, crs: str, transform: Affine,
                 descriptions: tuple[str, ...] | None = None) -> None:
    """Write ``array`` (bands, rows, cols) as a GeoTIFF at ``path`` via a temporary file and a rename.

    The temporary file lives in the same directory (same file system, so the rename is
    atomic, also on NFS) and is fsync'ed before the rename; on any error it is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}"
    try:
        with rasterio.open(tmp, "w", **_profile(array.shape[0], array.dtype.name, array.shape[1:], crs, transform)) as dst:
            dst.write(array)
            if descriptions:
                for i, text in enumerate(descriptions, start=1):
                    dst.set_band_description(i, text)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_chip(output_dir: Path, name: str, image: np.ndarray, mask: np.ndarray, *, crs: str,
               transform: Affine) -> tuple[str, str]:
    """Write ``images/NAME.tif`` (10 bands uint16) and ``masks/NAME.tif`` (uint8) and return
    their paths relative to ``output_dir``."""
    check_safe_id(name, "chip name")
    if image.dtype != np.uint16 or image.shape[0] != len(BANDS):
        raise ValueError(f"image must be ({len(BANDS)}, rows, cols) uint16, got {image.shape} {image.dtype}")
    if mask.dtype != np.uint8 or mask.shape != image.shape[1:]:
        raise ValueError(f"mask must be {image.shape[1:]} uint8, got {mask.shape} {mask.dtype}")
    image_rel = f"{IMAGES_DIR}/{name}.tif"
    mask_rel = f"{MASKS_DIR}/{name}.tif"
    atomic_write(output_dir / image_rel, image, crs=crs, transform=transform, descriptions=BANDS)
    atomic_write(output_dir / mask_rel, mask[None], crs=crs, transform=transform, descriptions=("class",))
    return image_rel, mask_rel


def remove_stale_temporaries(output_dir: Path, older_than_s: float = 3600.0) -> int:
    """Delete temporary files a killed worker left behind (older than ``older_than_s``)."""
    import time

    removed = 0
    now = time.time()
    for sub in (IMAGES_DIR, MASKS_DIR):
        folder = output_dir / sub
        if not folder.is_dir():
            continue
        for entry in folder.glob(f"{TMP_PREFIX}*"):
            try:
                if now - entry.stat().st_mtime > older_than_s:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
    if removed:
        log.info("removed %d stale temporary files under %s", removed, output_dir)
    return removed
