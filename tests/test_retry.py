"""The one retry policy: backoff delays, attempts and deadlines, and what is never retried."""

from __future__ import annotations

import time

import pytest

from cropchips import retry
from cropchips.retry import Backoff


def test_backoff_doubles_up_to_its_cap_and_jitter_keeps_each_delay_in_its_upper_half():
    plain = Backoff(base=0.5, cap=4.0, jitter=False).delays()
    assert [next(plain) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    jittered = Backoff(base=1.0, cap=8.0).delays()
    for expected in (1.0, 2.0, 4.0, 8.0, 8.0):
        assert expected / 2 <= next(jittered) <= expected


def test_retry_stops_after_its_attempts_and_raises_the_last_error(monkeypatch, caplog):
    sleeps = []
    monkeypatch.setattr(retry, "sleep", sleeps.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(f"hiccup {len(calls)}")
        return "done"

    assert retry.retry(flaky, "writing x", transient=lambda e: isinstance(e, OSError), attempts=3) == "done"
    assert sleeps == [0.5, 1.0] and "writing x failed (OSError: hiccup 1); retry 1/2 in 0.5 s" in caplog.text

    def always():
        raise OSError("down")

    with pytest.raises(OSError, match="down"):
        retry.retry(always, "writing y", transient=lambda e: True, attempts=2)


def test_an_error_that_is_not_transient_is_raised_at_once(monkeypatch):
    monkeypatch.setattr(retry, "sleep", lambda s: pytest.fail("slept"))
    with pytest.raises(PermissionError):
        retry.retry(lambda: (_ for _ in ()).throw(PermissionError("denied")), "x",
                    transient=lambda e: not isinstance(e, PermissionError), attempts=5)


def test_a_deadline_bounds_the_total_wait():
    reports = []
    start = time.monotonic()
    with pytest.raises(ConnectionError):
        retry.retry(lambda: (_ for _ in ()).throw(ConnectionError("no broker")), "connecting",
                    transient=lambda e: True, deadline=start + 0.5, backoff=Backoff(base=0.1, cap=0.2, jitter=False),
                    on_retry=lambda exc, n, d: reports.append((n, round(d, 3))))
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 1.5  # waited until the deadline, not past it by more than an attempt
    assert reports[:2] == [(1, 0.1), (2, 0.2)] and all(d <= 0.2 for _, d in reports)
    with pytest.raises(ValueError, match="attempts, a deadline"):
        retry.retry(lambda: 1, "x", transient=lambda e: True)
