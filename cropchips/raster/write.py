"""Writing chips: image, mask and label-layer GeoTIFFs that appear complete or not at all."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from cropchips.fields.classes import IGNORE_LABEL
from cropchips.queue.messages import check_safe_id

from cropchips.sources.sentinel2 import BANDS
from cropchips.output.storage import Storage, open_storage

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
MASKS_DIR = "masks"
INSTANCES_DIR = "instances"
BOUNDARIES_DIR = "boundaries"
MANIFESTS_DIR = "manifests"
METADATA_DIR = "metadata"
#: Label layer -> the folder of its files (``classes`` are the masks).
LAYER_DIRS: dict[str, str] = {"classes": MASKS_DIR, "instances": INSTANCES_DIR, "boundaries": BOUNDARIES_DIR}
OUTPUT_SUBDIRS = (IMAGES_DIR, MASKS_DIR, INSTANCES_DIR, BOUNDARIES_DIR, MANIFESTS_DIR, METADATA_DIR)

#: Nodata of the image bands: 0 DN is no observation.
IMAGE_NODATA = 0
#: Label layer -> (dtype, band description, declared nodata). 0 is a real label value in every layer
#: (no field, background), so none declares it: the classes mask declares 255, the ignore index
#: (no data, or a field of no class), and the instance and boundary rasters declare none.
LAYER_FORMATS: dict[str, tuple[str, str, int | None]] = {
    "classes": ("uint8", "class", IGNORE_LABEL),
    "instances": ("uint32", "instance", None),
    "boundaries": ("uint8", "boundary", None),
}
#: Largest value of a boundary raster (0 background, 1 interior, 2 boundary).
MAX_BOUNDARY_VALUE = 2


FORMATS = ("gtiff", "cog")
#: Codecs a chip file may be written with (the spec's ``compression``), and the highest level of those
#: that have levels (``compression_level``; 0 is :data:`DEFAULT_LEVELS`, else the codec's own default).
COMPRESSIONS = ("deflate", "zstd", "lzw", "none")
COMPRESSION_LEVELS = {"deflate": 9, "zstd": 22}
#: The level a codec is written at when the spec says 0. Deflate at 1, not GDAL's 6: a 256 px chip of
#: 10 bands and its mask is 1.5 % larger (477 against 470 KB) and takes a third of the CPU to write
#: (17.9 against 46.0 ms; ``bench/results.json`` *writes*, 2026-12-03); in the bench's one worker, 4-13 % of
#: its CPU a chip (0.178 against 0.186 s beside default runs; 0.17 against 0.195 in alternating runs).
#: Zstd stays at its usual 9.
DEFAULT_LEVELS = {"deflate": 1}


def _profile(count: int, dtype: str, size: tuple[int, int], crs: str, transform: Affine, fmt: str = "gtiff",
             categorical: bool = False, nodata: int | None = IMAGE_NODATA, compression: str = "deflate",
             level: int = 0) -> dict:
    height, width = size
    profile = dict(count=count, dtype=dtype, width=width, height=height, crs=crs, transform=transform, nodata=nodata)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression != "none":
        profile.update(compress=compression, predictor=2)
        level = level or DEFAULT_LEVELS.get(compression, 0)
        if level:
            # GTiff names the level per codec; the COG driver has one LEVEL for all.
            key = "level" if fmt == "cog" else {"deflate": "zlevel", "zstd": "zstd_level"}[compression]
            profile[key] = level
    if fmt == "cog":
        # Cloud-Optimized: 128 px tiles give a 256 px chip one overview level for quick display;
        # label layers (classes, instance ids, boundary codes) are reduced by majority, never averaged
        # into values that do not exist.
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
               descriptions: tuple[str, ...] | None = None, fmt: str = "gtiff", categorical: bool = False,
               nodata: int | None = IMAGE_NODATA, compression: str = "deflate", level: int = 0) -> None:
    """Encode ``array`` (bands, rows, cols) as a GeoTIFF (or COG) at ``path``, declaring ``nodata``
    (None: no nodata value), compressed with ``compression`` at ``level`` (0: :data:`DEFAULT_LEVELS`, else the
    codec's default)."""
    profile = _profile(array.shape[0], array.dtype.name, array.shape[1:], crs, transform, fmt, categorical, nodata,
                       compression, level)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
        if descriptions:
            for i, text in enumerate(descriptions, start=1):
                dst.set_band_description(i, text)


def write_chip(output: Storage | Path | str, name: str, image: np.ndarray, mask: np.ndarray, *, crs: str,
               transform: Affine, descriptions: tuple[str, ...] = BANDS, fmt: str = "gtiff",
               compression: str = "deflate", level: int = 0) -> tuple[str, str]:
    """Write ``images/NAME.tif`` (uint16, one band per description: the 10 bands, or T x 10 for a
    time series, nodata 0) and ``masks/NAME.tif`` (uint8 classes, nodata 255), each published whole;
    return their paths relative to the output location."""
    check_safe_id(name, "chip name")
    if image.dtype != np.uint16 or image.ndim != 3 or image.shape[0] != len(descriptions):
        raise ValueError(f"image must be ({len(descriptions)}, rows, cols) uint16, got {image.shape} {image.dtype}")
    if mask.dtype != np.uint8 or mask.shape != image.shape[1:]:
        raise ValueError(f"mask must be {image.shape[1:]} uint8, got {mask.shape} {mask.dtype}")
    image_rel = f"{IMAGES_DIR}/{name}.tif"
    storage = open_storage(output)
    storage.publish(image_rel, lambda tmp: write_tiff(tmp, image, crs=crs, transform=transform,
                                                      descriptions=descriptions, fmt=fmt, compression=compression,
                                                      level=level))
    mask_rel = _write_layer(storage, name, "classes", mask, crs=crs, transform=transform, fmt=fmt,
                            compression=compression, level=level)
    return image_rel, mask_rel


def write_layers(output: Storage | Path | str, name: str, layers: Mapping[str, np.ndarray], *, crs: str,
                 transform: Affine, fmt: str = "gtiff", compression: str = "deflate", level: int = 0) -> dict[str, str]:
    """Write a chip's label layers, each published whole: ``instances/NAME.tif`` (uint32 field ids,
    band ``instance``), ``boundaries/NAME.tif`` (uint8 0/1/2, band ``boundary``) and, if given,
    ``classes`` as ``masks/NAME.tif`` (as :func:`write_chip` does). Return layer -> path relative
    to the output location. In COG mode their overviews take the most common value (mode)."""
    check_safe_id(name, "chip name")
    unknown = [layer for layer in layers if layer not in LAYER_DIRS]
    if unknown:
        raise ValueError(f"unknown label layer(s) {unknown}; write_layers writes {', '.join(LAYER_DIRS)}")
    shapes = {layer: np.shape(array) for layer, array in layers.items()}
    for layer, array in layers.items():
        dtype = LAYER_FORMATS[layer][0]
        if array.dtype != np.dtype(dtype) or array.ndim != 2:
            raise ValueError(f"layer {layer} must be a (rows, cols) {dtype} array, got {array.shape} {array.dtype}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the layers of chip {name} differ in shape: {shapes}; cut them from one window")
    boundaries = layers.get("boundaries")
    if boundaries is not None and boundaries.size and int(boundaries.max()) > MAX_BOUNDARY_VALUE:
        raise ValueError(f"layer boundaries holds {int(boundaries.max())}; its values are 0 background, "
                         "1 interior, 2 boundary (see cropchips.raster.labels.field_boundaries)")
    storage = open_storage(output)
    return {layer: _write_layer(storage, name, layer, array, crs=crs, transform=transform, fmt=fmt,
                                compression=compression, level=level)
            for layer, array in layers.items()}


def _write_layer(storage: Storage, name: str, layer: str, array: np.ndarray, *, crs: str, transform: Affine,
                 fmt: str, compression: str = "deflate", level: int = 0) -> str:
    """Publish one single-band label layer of a chip; its path relative to the output location."""
    _, description, nodata = LAYER_FORMATS[layer]
    rel = f"{LAYER_DIRS[layer]}/{name}.tif"
    storage.publish(rel, lambda tmp: write_tiff(tmp, array[None], crs=crs, transform=transform,
                                                descriptions=(description,), fmt=fmt, categorical=True,
                                                nodata=nodata, compression=compression, level=level))
    return rel
