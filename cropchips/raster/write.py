"""Writing chips: image and mask GeoTIFFs that appear complete or not at all."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from cropchips.queue.messages import check_safe_id

from cropchips.sources.sentinel2 import BANDS
from cropchips.output.storage import Storage, open_storage

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
MASKS_DIR = "masks"
MANIFESTS_DIR = "manifests"
METADATA_DIR = "metadata"
OUTPUT_SUBDIRS = (IMAGES_DIR, MASKS_DIR, MANIFESTS_DIR, METADATA_DIR)


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


def write_tiff(path: Path, array: np.ndarray, *, crs: str, transform: Affine,
               descriptions: tuple[str, ...] | None = None, fmt: str = "gtiff", categorical: bool = False) -> None:
    """Encode ``array`` (bands, rows, cols) as a GeoTIFF (or COG) at ``path``."""
    profile = _profile(array.shape[0], array.dtype.name, array.shape[1:], crs, transform, fmt, categorical)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
        if descriptions:
            for i, text in enumerate(descriptions, start=1):
                dst.set_band_description(i, text)


def write_chip(output: Storage | Path | str, name: str, image: np.ndarray, mask: np.ndarray, *, crs: str,
               transform: Affine, descriptions: tuple[str, ...] = BANDS, fmt: str = "gtiff") -> tuple[str, str]:
    """Write ``images/NAME.tif`` (uint16, one band per description: the 10 bands, or T x 10 for a
    time series) and ``masks/NAME.tif`` (uint8 classes), each published whole; return their paths
    relative to the output location."""
    check_safe_id(name, "chip name")
    if image.dtype != np.uint16 or image.ndim != 3 or image.shape[0] != len(descriptions):
        raise ValueError(f"image must be ({len(descriptions)}, rows, cols) uint16, got {image.shape} {image.dtype}")
    if mask.dtype != np.uint8 or mask.shape != image.shape[1:]:
        raise ValueError(f"mask must be {image.shape[1:]} uint8, got {mask.shape} {mask.dtype}")
    image_rel = f"{IMAGES_DIR}/{name}.tif"
    mask_rel = f"{MASKS_DIR}/{name}.tif"
    storage = open_storage(output)
    storage.publish(image_rel, lambda tmp: write_tiff(tmp, image, crs=crs, transform=transform,
                                                      descriptions=descriptions, fmt=fmt))
    storage.publish(mask_rel, lambda tmp: write_tiff(tmp, mask[None], crs=crs, transform=transform,
                                                     descriptions=("class",), fmt=fmt, categorical=True))
    return image_rel, mask_rel
