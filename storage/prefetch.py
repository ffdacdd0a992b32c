"""Background prefetch: chunk lists (from iovecs or whole blobs) made ready by worker threads.

Prefetch runs below on-demand reads: a polite (low-priority) run is started only while the
device's :class:`~storage.demand.DemandGate` says the link is free of demand misses — none in
flight, the last one ended ``settle`` seconds ago, and (before any demand read) ``start_delay``
seconds after the device was opened, so a container's start-up burst of misses has the link to
itself. A workload that reads most of the image on demand would starve prefetch that way, so
the gate also knows *sustained* demand: misses have kept the link busy for ``burst_cap`` seconds
and demand has read ``burst_fraction`` of the image's bytes. Then up to ``demand_share`` polite
runs go on beside the demand reads (without pausing for them) instead of waiting for a gap. It
is limited by a thread budget (``threads_count``) and a bandwidth limit (``bandwidth_rate`` bytes/s, 0 =
unlimited) and is cancellable (``cancel()`` on unmount).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storage.backend.base import speculation
from storage.cache.base import BlobCache, merge_runs
from storage.demand import BURST_CAP, BURST_FRACTION, DEMAND_SHARE, SETTLE, START_DELAY
from storage.errors import StorageError
from storage.metrics import StorageMetrics
from storage.records import ChunkInfo

log = logging.getLogger(__name__)

#: how long a worker sleeps between checks while on-demand reads are busy
BUSY_POLL = 0.005
#: longest a speculative transfer stays paused in one go for demand reads (then it reads a piece)
MAX_PAUSE = 2.0


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """nydusd ``fs_prefetch``; defaults documented (a test asserts them)."""

    enable: bool = True
    threads_count: int = 2  #: worker threads (nydusd default 8; this machine is small)
    merging_size: int = 1 << 20  #: bytes per prefetch backend request
    bandwidth_rate: int = 0  #: bytes per second across workers; 0 = unlimited
    readahead: int = 4 << 20  #: max bytes sequential on-demand reads keep in flight ahead; 0 = off
    settle: float = SETTLE  #: polite prefetch waits this long after the last demand miss ended
    start_delay: float = START_DELAY  #: ... and, before any demand miss, this long after the device opened
    burst_cap: float = BURST_CAP  #: demand busy this long (s) without a settled gap is sustained demand ...
    burst_fraction: float = BURST_FRACTION  #: ... once demand has read this share of the image's bytes
    demand_share: int = DEMAND_SHARE  #: polite runs that go on beside sustained demand (at most threads_count); 0 = always wait


class Throttle:
    """A token bucket over bytes per second (0 = unlimited)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, nbytes: int, cancelled: threading.Event) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + nbytes / self.rate
        if start > now:
            cancelled.wait(start - now)


class _Unit:
    """One submitted chunk list: its runs are fetched by any worker, in layout order."""

    __slots__ = ("cache", "left", "exact", "pauses", "born")

    def __init__(self, cache: BlobCache, runs: int, exact: bool = False, pauses: bool = True) -> None:
        self.cache, self.left, self.exact = cache, runs, exact
        #: a running transfer holds while demand reads are in flight (see :meth:`Prefetcher._pause`)
        self.pauses = pauses
        self.born = time.monotonic()


class Prefetcher:
    """Worker threads draining a queue of runs (``merging_size`` ranges of submitted chunk lists).

    A submitted unit is split into runs contiguous in the compressed blob, in blob order; every
    worker takes the next run, so up to ``threads_count`` backend requests of one unit are in
    flight at once (a blob is streamed in layout order, not one request at a time).
    """

    def __init__(self, config: PrefetchConfig, metrics: StorageMetrics,
                 busy: Callable[[], bool] = lambda: False,
                 demand_inflight: Callable[[], bool] = lambda: False,
                 sustained: Callable[[], bool] = lambda: False) -> None:
        """``busy()``: True while polite runs must not start (the device's demand gate);
        ``demand_inflight()``: True while demand reads are in flight — running speculative
        transfers then pause between body pieces (see :func:`storage.backend.base.yield_to_demand`);
        ``sustained()``: True while demand has held the link too long to wait for (then up to
        ``demand_share`` polite runs start anyway and do not pause)."""
        self.config = config
        self.metrics = metrics
        self._busy = busy
        self._demand_inflight = demand_inflight
        self._sustained = sustained
        self._shared = 0  #: polite runs started beside sustained demand, running (under _work)
        self._high: deque[tuple[_Unit, list[ChunkInfo]]] = deque()  # runs that ignore demand reads
        self._low: deque[tuple[_Unit, list[ChunkInfo]]] = deque()  # runs that wait for demand reads
        self._work = threading.Condition(threading.Lock())
        self._cancelled = threading.Event()
        self._throttle = Throttle(config.bandwidth_rate)
        self._threads: list[threading.Thread] = []
        #: upstream nydusd's prefetch accounting (``BlobcacheMetrics``): chunks submitted before
        #: merging, the summed submit-to-done time of the units, wall-clock ns of the first
        #: submit and of the last time the queue ran empty
        self.unmerged_chunks = 0
        self.cumulative_millis = 0
        self.begin_ns = 0
        self.end_ns = 0
        self._lock = threading.Lock()
        self._outstanding = 0
        self._idle = threading.Condition(self._lock)

    def submit(self, cache: BlobCache, chunks: Sequence[ChunkInfo], *, yield_to_demand: bool = True,
               readahead: bool = False, exact: bool = False) -> None:
        """Queue ``chunks`` of ``cache``; ``yield_to_demand=False`` skips waiting for demand reads.

        ``readahead=True`` (on-demand read-ahead) is queued even when prefetch is disabled.
        ``exact=True``: fetch these chunks only (the cache does not amplify into neighbours).

        A polite or read-ahead transfer, once running, pauses while demand reads are in flight;
        a high-priority prefetch (``yield_to_demand=False`` without ``readahead``: an image's
        start-up set) does not — it is what those reads are about to ask for, and pausing it
        while a reader waits on some other lock or chunk only made both wait (the pause's
        ``MAX_PAUSE`` per transfer, 4 s at the first read of a trace-optimized image).
        """
        if not (self.config.enable or readahead) or self._cancelled.is_set() or not chunks:
            return
        runs = merge_runs(chunks, self.config.merging_size)
        unit = _Unit(cache, len(runs), exact, pauses=yield_to_demand or readahead)
        with self._lock:
            self.unmerged_chunks += len(chunks)
            if not self.begin_ns:
                self.begin_ns = time.time_ns()
            self._outstanding += 1
            self.metrics.prefetch_pending.inc()
            want = min(max(1, self.config.threads_count), max(len(runs), len(self._threads)))
            while len(self._threads) < want:
                t = threading.Thread(target=self._worker, name=f"prefetch-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        with self._work:
            (self._low if yield_to_demand else self._high).extend((unit, run) for run in runs)
            self._work.notify_all()

    def _next(self) -> tuple[_Unit, list[ChunkInfo], bool] | None:
        """The next run and whether it shares the link with sustained demand: high-priority
        first; low-priority while the demand gate is quiet, or (up to ``demand_share`` at a
        time) while demand is sustained."""
        with self._work:
            while not self._cancelled.is_set():
                if self._high:
                    return *self._high.popleft(), False
                if self._low:
                    if not self._busy():
                        return *self._low.popleft(), False
                    if self._shared < self.config.demand_share and self._sustained():
                        self._shared += 1
                        return *self._low.popleft(), True
                self._work.wait(BUSY_POLL if self._low else 0.2)
            return None

    def _worker(self) -> None:
        while not self._cancelled.is_set():
            item = self._next()
            if item is None:
                break
            unit, run, shared = item
            try:
                self._run(unit.cache, run, shared or not unit.pauses, unit.exact)
            except StorageError as exc:
                self.metrics.prefetch_errors.inc()
                log.warning("prefetch of blob %s failed: %s", unit.cache.blob.blob_id, exc)
            except Exception:  # a worker must not die silently
                self.metrics.prefetch_errors.inc()
                log.exception("prefetch of blob %s crashed", unit.cache.blob.blob_id)
            finally:
                if shared:
                    with self._work:
                        self._shared -= 1
                self._run_done(unit)

    def _run_done(self, unit: _Unit) -> None:
        with self._lock:
            unit.left -= 1
            if unit.left == 0:
                self.metrics.prefetch_requests.inc()
                self.cumulative_millis += int((time.monotonic() - unit.born) * 1000)
                self._outstanding -= 1
                if not self._outstanding:
                    self.end_ns = time.time_ns()
                self.metrics.prefetch_pending.dec()
                self._idle.notify_all()

    def _run(self, cache: BlobCache, run: list[ChunkInfo], no_pause: bool = False, exact: bool = False) -> None:
        if self._cancelled.is_set():
            return
        size = run[-1].compressed_offset + run[-1].compressed_size - run[0].compressed_offset
        self._throttle.acquire(size, self._cancelled)
        if self._cancelled.is_set():
            return
        # a run sharing the link with sustained demand interleaves with it, a start-up set goes
        # out at once: no pauses
        speculation.pause = None if no_pause else (lambda: self._pause(cache))
        try:
            fetched = cache.prefetch_chunks(run, exact=True) if exact else cache.prefetch_chunks(run)
            self.metrics.prefetch_bytes.inc(fetched)
        finally:
            speculation.pause = None

    def _pause(self, cache: BlobCache) -> None:
        """Hold a running speculative transfer while demand reads are in flight — unless one of
        them waits for a chunk of this blob that this (or another) speculative fetch owns."""
        deadline = time.monotonic() + MAX_PAUSE
        waiting = cache.has_waiters
        while (self._demand_inflight() and not waiting() and not self._cancelled.is_set()
               and time.monotonic() < deadline):
            self._cancelled.wait(BUSY_POLL)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted unit is done (or cancelled); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._outstanding and not self._cancelled.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def cancel(self) -> None:
        """Stop: queued units are dropped, running ones stop at the next run boundary."""
        self._cancelled.set()
        with self._work:
            dropped = list(self._high) + list(self._low)
            self._high.clear()
            self._low.clear()
            self._work.notify_all()
        for unit, _ in dropped:
            with self._lock:
                unit.left -= 1
                if unit.left == 0:
                    self._outstanding -= 1
                    self.metrics.prefetch_pending.dec()
        with self._lock:
            self._idle.notify_all()
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=5)

    @property
    def workers(self) -> int:
        """Worker threads started so far."""
        with self._lock:
            return len(self._threads)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()
