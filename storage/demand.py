"""Demand reads first: when speculative work may use the link, and the defaults of that policy.

Kept free of the storage stack's imports: the nydusd and snapshotter configs take their defaults
for our ``fs_prefetch`` / ``[prefetch]`` extensions (``burst_cap``, ``burst_fraction``,
``demand_share``) from here, so each is written once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: polite prefetch waits this long (s) after the last demand miss ended ...
SETTLE = 1.5
#: ... and, before any demand miss, this long after the device opened
START_DELAY = 3.0
#: demand busy this long (s) without a settled gap is sustained demand ...
BURST_CAP = 2.0
#: ... once demand has read this share of the image's bytes
BURST_FRACTION = 0.1
#: polite prefetch runs that go on beside sustained demand (at most the thread count); 0 = always wait
DEMAND_SHARE = 4


class DemandGate:
    """When speculative (polite) work may use the link: tracks on-demand misses in flight.

    ``clock`` is injectable for tests. Thread-safe: ``begin``/``end`` bracket every demand read
    that may fetch; :meth:`quiet` answers whether polite prefetch may start a request now, and
    :meth:`sustained` whether demand has held the link so long, over so much of the image
    (``total_bytes``, 0 = unknown: never), that prefetch should share the link instead.
    """

    def __init__(self, settle: float, start_delay: float, clock: Callable[[], float] = time.monotonic, *,
                 burst_cap: float = BURST_CAP, burst_fraction: float = BURST_FRACTION, total_bytes: int = 0) -> None:
        self.settle, self.start_delay, self.clock = settle, start_delay, clock
        self.burst_cap, self.burst_fraction, self.total_bytes = burst_cap, burst_fraction, total_bytes
        self._lock = threading.Lock()
        self.inflight = 0
        self._opened = clock()
        self._last_end: float | None = None
        self._busy_since: float | None = None  #: start of the current unsettled demand burst
        self.read_bytes = 0  #: bytes demand reads returned, all bursts

    def begin(self) -> None:
        with self._lock:
            if not self.inflight and (self._last_end is None or self.clock() - self._last_end >= self.settle):
                self._busy_since = self.clock()  # a new burst (the last one settled)
            self.inflight += 1

    def add_bytes(self, nbytes: int) -> None:
        """Count ``nbytes`` returned by a demand read (towards ``burst_fraction``)."""
        with self._lock:
            self.read_bytes += nbytes

    def sustained(self) -> bool:
        """True while the current demand burst has lasted ``burst_cap`` seconds and demand has read
        at least ``burst_fraction`` of ``total_bytes``: a workload reading most of the image, which
        would leave polite prefetch no gap at all."""
        with self._lock:
            if self._busy_since is None or self.total_bytes <= 0:
                return False
            now = self.clock()
            if not self.inflight and self._last_end is not None and now - self._last_end >= self.settle:
                return False  # settled: quiet() lets prefetch run anyway
            return (now - self._busy_since >= self.burst_cap
                    and self.read_bytes >= self.burst_fraction * self.total_bytes)

    def end(self) -> None:
        with self._lock:
            self.inflight -= 1
            self._last_end = self.clock()

    def wait_quiet(self, cancelled: Callable[[], bool] = lambda: False, poll: float = 0.02, *,
                   or_sustained: bool = False) -> bool:
        """Block until :meth:`quiet` (True) or ``cancelled()`` (False): callers that prepare
        speculative work with CPU (e.g. walking a whole image for its prefetch list) keep it
        off the start-up burst too. ``or_sustained``: also return True once demand is
        :meth:`sustained` — a workload reading most of the image never leaves a settled gap, and
        work queued only after one would never be queued at all."""
        while not (self.quiet() or (or_sustained and self.sustained())):
            if cancelled():
                return False
            time.sleep(poll)
        return True

    def quiet(self) -> bool:
        """True when no demand read is in flight and the last burst has settled."""
        with self._lock:
            if self.inflight:
                return False
            now = self.clock()
            if self._last_end is None:
                return now - self._opened >= self.start_delay
            return now - self._last_end >= self.settle
