"""Compositing several scenes into one image: cloud-masked per-pixel median, or the least cloudy scene."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: SCL classes counted as clear: 4 vegetation, 5 bare soil, 6 water.
CLEAR_CLASSES: tuple[int, ...] = (4, 5, 6)

METHODS = ("median", "least-cloudy")


def clear_mask(scl: np.ndarray, clear_classes: tuple[int, ...] = CLEAR_CLASSES) -> np.ndarray:
    """True where the scene classification says the pixel is clear."""
    return np.isin(scl, np.asarray(clear_classes, dtype=scl.dtype))


def has_data(data: np.ndarray, scl: np.ndarray) -> np.ndarray:
    """Per scene: does it hold any valid pixel at all? (All-zero scenes exist in real archives.)"""
    return (scl.reshape(len(scl), -1) != 0).any(axis=1) & (data.reshape(len(data), -1) != 0).any(axis=1)


def median_composite(data: np.ndarray, clear: np.ndarray) -> np.ndarray:
    """Per pixel and band, the median over the scenes that are clear there; 0 where none is.

    ``data`` is (scenes, bands, rows, cols) uint16 and ``clear`` (scenes, rows, cols) bool.
    Stays in integers: values not clear are pushed to the top by a sort, and the median
    of an even count is the mean of the middle two, rounded half up.
    """
    n_scenes = data.shape[0]
    out = np.zeros(data.shape[1:], dtype="uint16")
    if n_scenes == 0:
        return out
    count = clear.sum(axis=0)  # (rows, cols)
    lo_idx = np.clip((count - 1) // 2, 0, n_scenes - 1)
    hi_idx = np.clip(count // 2, 0, n_scenes - 1)
    sentinel = np.iinfo("uint16").max
    for b in range(data.shape[1]):
        # One band at a time bounds the temporary memory to (scenes, rows, cols) uint16.
        band = np.where(clear, data[:, b], sentinel)
        band.sort(axis=0)
        lo = np.take_along_axis(band, lo_idx[None], axis=0)[0].astype("uint32")
        hi = np.take_along_axis(band, hi_idx[None], axis=0)[0].astype("uint32")
        out[b] = np.where(count > 0, (lo + hi + 1) // 2, 0).astype("uint16")
    return out


@dataclass(frozen=True)
class Composite:
    """A composited image and what went into it."""

    image: np.ndarray
    """(bands, rows, cols) uint16, 0 = nodata."""
    scene_indices: tuple[int, ...]
    """Indices (into the stack) of the scenes used."""
    method: str
    """``median`` or ``least-cloudy``."""


def composite(data: np.ndarray, scl: np.ndarray, method: str = "median",
              clear_classes: tuple[int, ...] = CLEAR_CLASSES) -> Composite:
    """Composite a stack; scenes without any valid pixel never take part.

    ``least-cloudy`` picks the scene with the largest clear fraction over the whole grid
    (ties: the earlier scene) and returns its pixels as they are.
    """
    if method not in METHODS:
        raise ValueError(f"unknown composite method {method!r}; choose one of {METHODS}")
    usable = np.flatnonzero(has_data(data, scl))
    if usable.size == 0:
        return Composite(np.zeros(data.shape[1:], dtype="uint16"), (), method)
    clear = clear_mask(scl[usable], clear_classes)
    if method == "median":
        return Composite(median_composite(data[usable], clear), tuple(int(i) for i in usable), method)
    fractions = clear.reshape(len(usable), -1).mean(axis=1)
    best = int(usable[int(np.argmax(fractions))])
    return Composite(data[best].copy(), (best,), method)
