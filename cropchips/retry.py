"""One retry policy for the infrastructure: storage writes, scene reads and the Kafka broker.

:class:`Backoff` says how long to wait between attempts (exponential, capped, with jitter so that
a fleet of workers does not retry in step); :func:`retry` runs a call until it succeeds, a failure
is not transient, or the attempts or the deadline run out, logging every retry the same way. What
counts as transient, and what a final failure becomes, stays with the caller (storage: NFS errnos;
reads: GDAL's messages; Kafka: kafka-python's retriable errors).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays of ``base``, ``2 base``, ``4 base`` ... seconds, capped at ``cap``; with ``jitter`` each is
    drawn uniformly from its upper half (so it still grows, but retries of many processes spread out)."""

    base: float = 0.5
    cap: float = 10.0
    jitter: bool = True

    def delays(self) -> Iterator[float]:
        """The delays, forever."""
        delay = self.base
        while True:
            yield random.uniform(delay / 2, delay) if self.jitter else delay
            delay = min(self.cap, delay * 2)


#: Storage writes (NFS hiccups): 0.5, 1, 2 ... s, as they were.
STORAGE = Backoff(base=0.5, cap=8.0, jitter=False)
#: Scene reads over the network (GDAL retries 5xx itself in between).
READS = Backoff(base=0.5, cap=8.0)
#: An unreachable broker at start-up, or a publish that failed on a retriable error.
BROKER = Backoff(base=0.5, cap=10.0)
#: A result or dead letter the broker did not acknowledge on a retriable error.
PUBLISH = Backoff(base=0.5, cap=15.0)
#: A task waiting out an outage of the infrastructure, partitions paused (the worker's --retry-for).
OUTAGE = Backoff(base=1.0, cap=60.0)


def sleep(seconds: float) -> None:
    """Wait between attempts (one place for tests to make the wait instant)."""
    time.sleep(seconds)


def retry(call: Callable[[], T], what: str, *, transient: Callable[[BaseException], bool],
          attempts: int | None = None, deadline: float | None = None, backoff: Backoff = STORAGE,
          on_retry: Callable[[BaseException, int, float], None] | None = None) -> T:
    """Run ``call``; retry the errors ``transient`` accepts until ``attempts`` calls were made or the
    next wait would pass ``deadline`` (``time.monotonic()``); then the last error is raised. Each retry
    is logged ("WHAT failed (ERROR); retry N/M in S s"), or reported to ``on_retry(error, n, delay)``."""
    if attempts is None and deadline is None:
        raise ValueError("give attempts, a deadline, or both")
    delays = backoff.delays()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - ``transient`` decides
            if not transient(exc) or (attempts is not None and attempt >= attempts):
                raise
            delay = next(delays)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                delay = min(delay, remaining)
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            else:
                total = f"/{attempts - 1}" if attempts is not None else ""
                log.warning("%s failed (%s: %s); retry %d%s in %.1f s", what, type(exc).__name__, exc, attempt,
                            total, delay)
            sleep(delay)
