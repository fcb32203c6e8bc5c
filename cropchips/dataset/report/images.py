"""Quicklook pixels: read a chip's true colour, stretch it, overlay its classes, encode PNG."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import rasterio

from cropchips.sources.sentinel2 import BANDS
from cropchips.dataset.report.labels import label_colour

#: White pixels between the true-colour and the overlay halves of a quicklook.
QUICKLOOK_GAP = 4
#: Opacity of the class colours drawn over the true-colour image.
OVERLAY_ALPHA = 0.45
#: Percentiles of the per-band linear stretch.
STRETCH_PERCENTILES = (2.0, 98.0)
RGB_BANDS = ("B04", "B03", "B02")


def encode_png(pixels: np.ndarray, level: int = 6) -> bytes:
    """A PNG of ``pixels`` (rows, cols, 3) RGB or (rows, cols) grey, uint8: numpy and zlib only."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"encode_png needs (rows, cols[, 3]) uint8, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    raw = np.zeros((height, 1 + pixels[0].size), dtype=np.uint8)  # filter byte 0 (none) per row
    raw[:, 1:] = pixels.reshape(height, -1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
            + chunk(b"IEND", b""))


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def stretch_rgb(bands: np.ndarray, percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """(3, rows, cols) DNs -> (rows, cols, 3) uint8, each band stretched linearly between its
    percentiles over the valid pixels; pixels that are 0 (nodata) in any band are black."""
    valid = np.all(bands > 0, axis=0)
    out = np.zeros(bands.shape[1:] + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    for i in range(3):
        values = bands[i][valid].astype("float64")
        low, high = np.percentile(values, percentiles)
        if high <= low:
            high = low + 1.0
        scaled = np.clip((bands[i].astype("float64") - low) / (high - low), 0.0, 1.0)
        out[..., i] = np.round(scaled * 255).astype(np.uint8)
    out[~valid] = 0
    return out


def overlay_classes(rgb: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The label colours of ``mask`` blended over ``rgb`` with ``alpha``: the classes 1..8 in their
    colours, 255 (ignore: no class or no image data) in its grey; 0 (no field) is left clear."""
    colours = np.array([_hex_rgb(label_colour(k)) for k in range(256)], dtype="float64")
    labelled = (mask > 0)[..., None]
    blended = (1.0 - alpha) * rgb.astype("float64") + alpha * colours[mask]
    return np.where(labelled, np.round(blended), rgb).astype(np.uint8)


def _rgb_indexes(descriptions: Sequence[str | None], count: int) -> list[int]:
    """1-based band indexes of B04, B03, B02: by band description, else the standard band order."""
    names = [d or "" for d in descriptions]
    if all(name in names for name in RGB_BANDS):
        return [names.index(name) + 1 for name in RGB_BANDS]
    return [BANDS.index(name) + 1 for name in RGB_BANDS] if count >= len(BANDS) else [1, 1, 1]


def read_rgb(image_path: str | Path | BinaryIO) -> np.ndarray:
    """B04, B03, B02 of an image chip as (3, rows, cols) DNs; for a time series (``DATE B02`` band
    descriptions), the date with the most valid pixels, the latest on a tie."""
    with rasterio.open(image_path) as src:
        descriptions = list(src.descriptions)
        dates = sorted({d.split()[0] for d in descriptions if d and len(d.split()) == 2})
        if dates:
            best, best_valid = None, -1
            for date in reversed(dates):  # latest first: it wins ties
                indexes = [descriptions.index(f"{date} {b}") + 1 for b in RGB_BANDS
                           if f"{date} {b}" in descriptions]
                if len(indexes) != 3:
                    continue
                bands = src.read(indexes)
                valid = int(np.all(bands > 0, axis=0).sum())
                if valid > best_valid:
                    best, best_valid = bands, valid
            if best is not None:
                return best
        return src.read(_rgb_indexes(descriptions, src.count))


def quicklook(image_path: str | Path | BinaryIO, mask_path: str | Path | BinaryIO) -> np.ndarray:
    """True colour | true colour with the class overlay, side by side: (rows, 2 cols + gap, 3) uint8."""
    rgb = stretch_rgb(read_rgb(image_path))
    with rasterio.open(mask_path) as src:
        mask = src.read(1)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{mask_path} is {mask.shape}, its image {rgb.shape[:2]}")
    rows, cols = mask.shape
    out = np.full((rows, 2 * cols + QUICKLOOK_GAP, 3), 255, dtype=np.uint8)
    out[:, :cols] = rgb
    out[:, cols + QUICKLOOK_GAP:] = overlay_classes(rgb, mask)
    return out


def _subsample(pixels: np.ndarray, max_side: int) -> np.ndarray:
    step = max(1, math.ceil(max(pixels.shape[0], pixels.shape[1] / 2) / max_side))
    if step == 1:
        return pixels
    cols = (pixels.shape[1] - QUICKLOOK_GAP) // 2
    left, right = pixels[::step, :cols:step], pixels[::step, cols + QUICKLOOK_GAP::step]
    gap = np.full((left.shape[0], QUICKLOOK_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([left, gap, right], axis=1)
