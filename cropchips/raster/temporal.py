"""Time series with a fixed shape: the datetime range cut into bins of an ISO 8601 period.

A spec's ``temporal_period`` (``P1M``, ``P15D``, ``P1W``, ``P1Y2M``...) cuts its ``datetime`` range
into consecutive bins of whole days from the range's first day; the last bin ends with the range
(and may be shorter). Every chip of the run has one image per bin, so every chip has the same T.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

from dateutil.relativedelta import relativedelta

from cropchips.errors import ConfigError
from cropchips.sources.stac import parse_datetime_range

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
