"""Time series with a fixed shape: the datetime range cut into bins of an ISO 8601 period.

A spec's ``temporal_period`` (``P1M``, ``P15D``, ``P1W``, ``P1Y2M``...) cuts its ``datetime`` range
into consecutive bins of whole days from the range's first day; the last bin ends with the range
(and may be shorter). Every chip of the run has one image per bin, so every chip has the same T:
:func:`compose_bins` merges the scenes of one day (neighbouring tiles, overlapping orbits) into one
observation, then composites each bin's days with a registered compositor; a bin without a scene
is nodata. :func:`select_bins` makes the same choices from the clear and valid masks alone, and
:func:`compose_selected_bins` the image of a part of the grid from them (a worker's chips' box).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
from dateutil.relativedelta import relativedelta

from cropchips.errors import ConfigError, InputDataError
from cropchips.raster.composite import COMPOSITORS, has_data
from cropchips.sources.stac import parse_datetime_range

log = logging.getLogger(__name__)

#: At most this many bins (a daily series of a year and a bit): bounds the image and the messages.
MAX_BINS = 400

_PERIOD = re.compile(r"P(?:(\d{1,3})Y)?(?:(\d{1,3})M)?(?:(\d{1,3})W)?(?:(\d{1,4})D)?", re.ASCII)


def parse_period(text: str) -> relativedelta:
    """The length of an ISO 8601 duration of years, months, weeks and days (``P1M``, ``P10D``)."""
    match = _PERIOD.fullmatch(text.strip().upper()) if isinstance(text, str) else None
    if match is None or not any(match.groups()):
        raise ConfigError(f"temporal_period {text!r} is not an ISO 8601 duration of whole days: use e.g. P1M "
                          "(a month), P15D (15 days), P1W (a week) or P1Y")
    years, months, weeks, days = (int(g or 0) for g in match.groups())
    if years == months == weeks == days == 0:
        raise ConfigError(f"temporal_period {text!r} is zero long; use e.g. P1M")
    return relativedelta(years=years, months=months, weeks=weeks, days=days)


def time_bins(datetime_range: str, period: str) -> tuple[tuple[str, str], ...]:
    """The bins of ``period`` over ``datetime_range``: (first day, day after the last day), YYYY-MM-DD."""
    start, end = parse_datetime_range(datetime_range)
    if start is None or end is None:
        raise ConfigError(f"temporal_period needs a closed datetime range (START/END), got {datetime_range!r}")
    step = parse_period(period)
    first, stop = start.date(), end.date() + timedelta(days=1)
    bins: list[tuple[str, str]] = []
    k = 0
    while True:
        lo = first + step * k
        if lo >= stop:
            break
        hi = min(first + step * (k + 1), stop)
        bins.append((lo.isoformat(), hi.isoformat()))
        k += 1
        if len(bins) > MAX_BINS:
            raise ConfigError(f"temporal_period {period} cuts {datetime_range} into more than {MAX_BINS} bins; "
                              "use a longer period or a shorter range")
    return tuple(bins)


def bin_index(bins: tuple[tuple[str, str], ...], day: str | date) -> int:
    """The bin holding ``day`` (YYYY-MM-DD or a date), or -1 if none does."""
    text = day.isoformat() if isinstance(day, date) else str(day)[:10]
    for i, (lo, hi) in enumerate(bins):
        if lo <= text < hi:
            return i
    return -1


@dataclass(frozen=True)
class Binned:
    """A cell's stack as a fixed-shape time series: one composite per time bin (:func:`compose_bins`)."""

    image: np.ndarray
    """(bins x bands, rows, cols) uint16, bin-major (bin 0's bands, then bin 1's, ...); 0 = nodata."""
    bin_clear: np.ndarray
    """(bins, rows, cols) bool: the bin's image is a clear observation there (False in an empty bin)."""
    clear_fraction: np.ndarray
    """(rows, cols) float32: per pixel, the share of the bins with a clear observation."""
    used: tuple[int, ...]
    """Positions (into the stack given) of the scenes that contributed a pixel, ascending."""
    bins: tuple[tuple[str, str], ...]
    """The bins (first day, day after the last), as :func:`time_bins` gave them."""
    bin_used: tuple[tuple[int, ...], ...]
    """Per bin, the positions of the scenes that contributed to it, ascending (empty: an empty bin)."""

    def descriptions(self, bands: Sequence[str]) -> tuple[str, ...]:
        """Band descriptions of :attr:`image`: ``"<bin's first day> <band>"``, bin by bin."""
        return tuple(f"{lo} {band}" for lo, _ in self.bins for band in bands)

    def clear_bins(self, rows: slice, cols: slice, min_clear_fraction: float) -> int:
        """How many bins are clear over at least ``min_clear_fraction`` of the window ``rows, cols``
        (for the spec's ``min_valid_bins``)."""
        window = self.bin_clear[:, rows, cols]
        if window.shape[1] == 0 or window.shape[2] == 0:
            return 0
        return int((window.reshape(len(window), -1).mean(axis=1) >= min_clear_fraction).sum())


def bin_methods() -> tuple[str, ...]:
    """The registered compositors that make one image of a bin's days (``median``, ``least-cloudy``)."""
    return tuple(name for name, method in COMPOSITORS.items() if not method.per_scene)


def merge_day(data: np.ndarray, clear: np.ndarray,
              valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge the scenes of one day into one observation.

    ``data`` (scenes, bands, rows, cols), ``clear`` and ``valid`` (scenes, rows, cols), in stack
    order. Per pixel the first scene clear there is taken, else the first valid there (else nodata,
    0). Returns the merged (bands, rows, cols) data, its clear (any clear) and valid (any valid)
    masks, and ``pick`` (rows, cols): the scene taken per pixel, -1 where none is valid."""
    merged = np.empty(data.shape[1:], dtype=data.dtype)
    merged_clear = np.empty(clear.shape[1:], dtype=bool)
    pick = _merge_into(merged, merged_clear, list(data), clear, valid, range(len(data)))
    return merged, merged_clear, valid.any(axis=0), pick


def _merge_into(out: np.ndarray, out_clear: np.ndarray, bands: Sequence[np.ndarray | None], clear: np.ndarray,
                valid: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """:func:`merge_day` of the scenes at ``positions`` of the stack (masks ``clear`` and ``valid``) whose bands
    are ``bands`` (one per position: None for a scene that gives no pixel), written into ``out`` (bands,
    rows, cols) and ``out_clear`` (rows, cols) without copying those scenes first; returns ``pick``, the
    index into ``positions`` taken per pixel (-1: none)."""
    pick = _pick(clear, valid, positions)
    out[...] = 0
    for i, scene in enumerate(bands):
        if scene is not None:
            np.copyto(out, scene, where=pick == i)
    out_clear[...] = False
    for p in positions:
        out_clear |= clear[p]
    return pick


def compose_bins(data: np.ndarray, clear: np.ndarray, valid: np.ndarray, dates: Sequence[str],
                 bins: tuple[tuple[str, str], ...], method: str) -> Binned:
    """Composite a stack into one image per time bin, so that every chip of a run has T = len(bins).

    ``data`` is (scenes, bands, rows, cols) uint16 (0 = nodata) in date order, ``clear`` and
    ``valid`` (scenes, rows, cols) bool, ``dates`` each scene's UTC date (YYYY-MM-DD; longer ISO
    datetimes are cut to their date), ``bins`` from :func:`time_bins`, ``method`` a registered
    compositor of one image (``median`` or ``least-cloudy``).

    Scenes of one day are first merged (:func:`merge_day`); each bin is then ``method`` over its
    days; a bin without a scene is all 0 and never clear. Scenes without any valid pixel and scenes
    dated outside every bin take no part. Only days with several scenes are merged into new arrays,
    and a bin's days are copied into one array only when they are not already a slice of ``data``.
    """
    chosen = _bin_compositor(method)
    if data.ndim != 4:
        raise InputDataError(f"the stack must be (scenes, bands, rows, cols), got shape {data.shape}")
    n_scenes, n_bands = data.shape[:2]
    shape = (n_scenes, *data.shape[2:])
    if clear.shape != shape or valid.shape != shape:
        raise InputDataError(f"clear {clear.shape} and valid {valid.shape} masks must be (scenes, rows, cols) "
                             f"= {shape}, like the stack {data.shape}")
    if len(dates) != n_scenes:
        raise InputDataError(f"{len(dates)} dates for {n_scenes} scenes: give one date per scene of the stack")
    days = _bin_days(dates, bins, has_data(data, valid) if n_scenes else np.zeros(0, dtype=bool))
    rows, cols = data.shape[2:]
    image = np.zeros((len(bins) * n_bands, rows, cols), dtype="uint16")
    bin_clear = np.zeros((len(bins), rows, cols), dtype=bool)
    bin_used: list[tuple[int, ...]] = []
    for t, by_day in enumerate(days):
        if not by_day:
            bin_used.append(())
            continue
        ordered = [by_day[day] for day in sorted(by_day)]
        obs_data, obs_clear, contributors = _observations(data, clear, valid, ordered)
        made = chosen.compose(obs_data, obs_clear)
        image[t * n_bands:(t + 1) * n_bands] = made.image
        bin_clear[t] = made.clear_fraction > 0
        bin_used.append(tuple(sorted(p for d in made.used for p in contributors[d])))
        log.debug("bin %s: %d days, %d scenes, %d used", bins[t][0], len(ordered),
                  sum(len(d) for d in ordered), len(bin_used[-1]))
    used = tuple(sorted(p for ps in bin_used for p in ps))
    return Binned(image=image, bin_clear=bin_clear, clear_fraction=bin_clear.mean(axis=0, dtype="float32"),
                  used=used, bins=tuple(bins), bin_used=tuple(bin_used))


def _bin_compositor(method: str):
    chosen = COMPOSITORS.get(method)
    if chosen is None or chosen.per_scene:
        raise ConfigError(f"composite {method!r} cannot make a time bin's image; with temporal_period use "
                          f"one of {bin_methods()}")
    return chosen


def _bin_days(dates: Sequence[str], bins: tuple[tuple[str, str], ...], usable: np.ndarray) -> list[dict[str, list[int]]]:
    """Bin -> day -> the positions of its scenes, in stack order (scenes not ``usable`` or outside every bin left out)."""
    if not bins:
        raise ConfigError("no time bins: the datetime range and temporal_period give none")
    days: list[dict[str, list[int]]] = [{} for _ in bins]
    for p in range(len(dates)):
        day = str(dates[p])[:10]
        t = bin_index(bins, day)
        if t < 0:
            log.debug("scene at position %d (%s) is outside the bins %s..%s: not used", p, day, bins[0][0],
                      bins[-1][1])
        elif not usable[p]:
            log.debug("scene at position %d (%s) holds no valid pixel: not used", p, day)
        else:
            days[t].setdefault(day, []).append(p)
    return days


@dataclass(frozen=True)
class BinSelection:
    """Which days and scenes make each bin's image, decided from the masks alone (:func:`select_bins`): what
    :func:`compose_bins` would find, so that the image can be composed over a part of the grid only
    (:func:`compose_selected_bins`)."""

    bins: tuple[tuple[str, str], ...]
    days: tuple[tuple[tuple[int, ...], ...], ...]
    """Per bin, its days in date order, each the positions of its scenes in stack order."""
    selected: tuple[tuple[int, ...], ...]
    """Per bin, the days (indices into ``days[t]``) its compositor takes."""
    bin_clear: np.ndarray
    bin_used: tuple[tuple[int, ...], ...]
    used: tuple[int, ...]

    def binned(self, image: np.ndarray) -> Binned:
        """The :class:`Binned` of ``image`` (the bins' image over the grid or a part of it)."""
        return Binned(image=image, bin_clear=self.bin_clear, clear_fraction=self.bin_clear.mean(axis=0, dtype="float32"),
                      used=self.used, bins=self.bins, bin_used=self.bin_used)


def select_bins(clear: np.ndarray, valid: np.ndarray, dates: Sequence[str], bins: tuple[tuple[str, str], ...],
                method: str, usable: np.ndarray) -> BinSelection | None:
    """:func:`compose_bins`'s choices from the masks alone (``usable``: per scene, whether it takes part, as
    ``has_data`` says): the days of each bin, the days its compositor takes (its ``select``), where each bin
    is clear and which scenes gave it a pixel. None if the compositor needs the bands to choose."""
    chosen = _bin_compositor(method)
    rows, cols = clear.shape[1:]
    bin_clear = np.zeros((len(bins), rows, cols), dtype=bool)
    day_lists, selected, bin_used = [], [], []
    for t, by_day in enumerate(_bin_days(dates, bins, usable)):
        ordered = tuple(tuple(by_day[day]) for day in sorted(by_day))
        day_lists.append(ordered)
        if not ordered:
            selected.append(())
            bin_used.append(())
            continue
        obs_clear = np.empty((len(ordered), rows, cols), dtype=bool)
        contributors: list[tuple[int, ...]] = []
        for d, ps in enumerate(ordered):
            obs_clear[d] = clear[list(ps)].any(axis=0)
            if len(ps) == 1:
                contributors.append(ps)
            else:
                contributors.append(_contributors(_pick(clear, valid, ps), ps))
        picked = chosen.select(obs_clear)
        if picked is None:
            return None
        bin_clear[t] = picked.clear_fraction > 0
        selected.append(picked.used)
        bin_used.append(tuple(sorted(p for d in picked.used for p in contributors[d])))
    return BinSelection(bins=tuple(bins), days=tuple(day_lists), selected=tuple(selected), bin_clear=bin_clear,
                        bin_used=tuple(bin_used), used=tuple(sorted(p for ps in bin_used for p in ps)))


def compose_selected_bins(selection: BinSelection, data: np.ndarray, index: dict[int, int], clear: np.ndarray,
                          valid: np.ndarray, method: str) -> np.ndarray | None:
    """The bins' image over a part of the grid: ``data`` (k, bands, rows, cols) holds the bands of the scene at
    stack position ``p`` at ``index[p]`` (at least every scene of ``selection.used``), ``clear`` and ``valid``
    (scenes, rows, cols) the part's masks of every scene. The pixels :func:`compose_bins` gives there; None if
    the compositor did not take the days it selected."""
    chosen = _bin_compositor(method)
    n_bands, rows, cols = data.shape[1:]
    image = np.zeros((len(selection.bins) * n_bands, rows, cols), dtype="uint16")
    for t, (ordered, taken) in enumerate(zip(selection.days, selection.selected)):
        if not taken:
            continue
        obs_data = np.empty((len(taken), n_bands, rows, cols), dtype=data.dtype)
        obs_clear = np.empty((len(taken), rows, cols), dtype=bool)
        for j, d in enumerate(taken):
            ps = ordered[d]
            if len(ps) == 1:
                obs_data[j], obs_clear[j] = data[index[ps[0]]], clear[ps[0]]
                continue
            # A scene of the day not in ``index`` gives no pixel anywhere (it is not in ``used``).
            _merge_into(obs_data[j], obs_clear[j], [data[index[p]] if p in index else None for p in ps],
                        clear, valid, ps)
        made = chosen.compose(obs_data, obs_clear)
        if made.used != tuple(range(len(taken))):
            return None
        image[t * n_bands:(t + 1) * n_bands] = made.image
    return image


def _contributors(pick: np.ndarray, positions: Sequence[int]) -> tuple[int, ...]:
    """The positions of a merged day whose scene ``pick`` (:func:`_pick`) takes for at least one pixel."""
    return tuple(p for i, p in enumerate(positions) if (pick == i).any())


def _pick(clear: np.ndarray, valid: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """Per pixel, the index into ``positions`` of the first scene clear there, else the first valid there, else -1."""
    pick = np.full(clear.shape[1:], -1, dtype=np.int32)
    for mask in (clear, valid):
        for i, p in enumerate(positions):
            pick[(pick < 0) & mask[p]] = i
    return pick


def _observations(data: np.ndarray, clear: np.ndarray, valid: np.ndarray,
                  days: list[list[int]]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ...]]]:
    """One bin's days as a (days, bands, rows, cols) stack and (days, rows, cols) clear mask, and per
    day the positions of the scenes that gave it a pixel. A run of single-scene days that are next to
    each other in the stack is a slice of it (no copy)."""
    positions = [ps[0] for ps in days]
    if all(len(ps) == 1 for ps in days) and positions == list(range(positions[0], positions[0] + len(days))):
        window = slice(positions[0], positions[0] + len(days))
        return data[window], clear[window], [(p,) for p in positions]
    obs_data = np.empty((len(days), *data.shape[1:]), dtype=data.dtype)
    obs_clear = np.empty((len(days), *clear.shape[1:]), dtype=bool)
    contributors: list[tuple[int, ...]] = []
    for d, ps in enumerate(days):
        if len(ps) == 1:
            obs_data[d], obs_clear[d] = data[ps[0]], clear[ps[0]]
            contributors.append((ps[0],))
            continue
        pick = _merge_into(obs_data[d], obs_clear[d], [data[p] for p in ps], clear, valid, ps)
        contributors.append(_contributors(pick, ps))
    return obs_data, obs_clear, contributors
