"""Plain-Python storage metrics: counters and latency histograms, rendered as Prometheus text.

One :class:`StorageMetrics` is shared by a backend, its caches and the prefetcher; the daemon
exports it with :meth:`StorageMetrics.render` (Prometheus text exposition format 0.0.4).
Everything here is thread-safe and dependency-free.
"""

from __future__ import annotations

import bisect
import collections
import email.utils
import threading
from collections.abc import Iterable

#: latency buckets in seconds (upper bounds, +Inf implied)
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Counter:
    """A monotonically increasing number."""

    __slots__ = ("name", "help", "_value", "_lock")

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self._value = 0
        self._lock = threading.Lock()

    def inc(self, amount: int = 1) -> None:
        with self._lock:
            self._value += amount

    @property
    def value(self) -> int:
        return self._value

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter", f"{self.name} {self._value}"]


class Gauge(Counter):
    """A number that goes up and down."""

    __slots__ = ()

    def set(self, value: int) -> None:
        with self._lock:
            self._value = value

    def dec(self, amount: int = 1) -> None:
        self.inc(-amount)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self._value}"]


class Histogram:
    """Observations counted into fixed buckets (seconds for latencies)."""

    __slots__ = ("name", "help", "buckets", "_counts", "_sum", "_count", "_lock")

    def __init__(self, name: str, help: str, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.help = help
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        slot = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[slot] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            running = 0
            for bound, n in zip(self.buckets, self._counts):
                running += n
                lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
            lines.append(f'{self.name}_bucket{{le="+Inf"}} {self._count}')
            lines.append(f"{self.name}_sum {self._sum}")
            lines.append(f"{self.name}_count {self._count}")
        return lines


#: upstream nydusd's request-size classes (``request_size_index``): <1K, 1K~, 4K~, 16K~, 64K~, 128K~, 512K~, 1M~
SIZE_CLASSES = 8
#: upstream's backend latency classes in milliseconds: <=1, <=20, <=50, <=100, <=500, <=1000, <=2000, >2000
LATENCY_MILLIS_BOUNDS = (1, 20, 50, 100, 500, 1000, 2000)


def size_class(size: int) -> int:
    """Upstream nydusd's ``request_size_index``: the size class of a ``size``-byte request."""
    kib = size >> 10
    for i, bound in enumerate((1, 4, 16, 64, 128, 512, 1024)):
        if kib < bound:
            return i
    return 7


def latency_class(millis: int) -> int:
    """Upstream nydusd's ``latency_millis_range_index``."""
    return bisect.bisect_left(LATENCY_MILLIS_BOUNDS, millis)


class BackendDist:
    """Backend reads by size class and latency class, as upstream nydusd's ``BackendMetrics``
    counts them (``read_cumulative_latency_millis_dist``, ``read_count_block_size_dist``,
    ``read_latency_sizes_dist``); every read ends here, failed ones too."""

    __slots__ = ("latency_millis_total", "latency_millis_dist", "count_by_size", "latency_by_size", "_lock")

    def __init__(self) -> None:
        self.latency_millis_total = 0
        self.latency_millis_dist = [0] * SIZE_CLASSES
        self.count_by_size = [0] * SIZE_CLASSES
        self.latency_by_size = [[0] * (len(LATENCY_MILLIS_BOUNDS) + 1) for _ in range(SIZE_CLASSES)]
        self._lock = threading.Lock()

    def observe(self, size: int, seconds: float) -> None:
        millis = int(seconds * 1000)
        s = size_class(size)
        with self._lock:
            self.latency_millis_total += millis
            self.latency_millis_dist[s] += millis
            self.count_by_size[s] += 1
            self.latency_by_size[s][latency_class(millis)] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"read_cumulative_latency_millis_total": self.latency_millis_total,
                    "read_cumulative_latency_millis_dist": list(self.latency_millis_dist),
                    "read_count_block_size_dist": list(self.count_by_size),
                    "read_latency_sizes_dist": [list(r) for r in self.latency_by_size]}


class ErrorHolder:
    """The last errors worth an operator's look, in a ring bounded by count and bytes, as
    upstream nydusd's ``ErrorHolder`` keeps them (backend reads that failed for good) and
    ``GET /api/v1/daemon/events`` exports them. Entries are ``"<HTTP date> - <error>"``."""

    def __init__(self, max_errors: int = 500, max_size: int = 50 * 1024) -> None:
        self.max_errors = max_errors
        self.max_size = max_size
        self._errors: collections.deque[str] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()

    def push(self, error: str) -> None:
        entry = f"{email.utils.formatdate(usegmt=True)} - {error}"
        with self._lock:
            while self._errors and (self._size + len(entry) > self.max_size or len(self._errors) >= self.max_errors):
                self._size -= len(self._errors.popleft())
            if len(entry) > self.max_size or self.max_errors <= 0:
                return  # upstream: too large to hold
            self._errors.append(entry)
            self._size += len(entry)

    def export(self) -> dict:
        with self._lock:
            return {"max_errors": self.max_errors, "total_errors": len(self._errors), "max_size": self.max_size,
                    "total_size": self._size, "errors": list(self._errors)}


#: the process's error events (one daemon a process, as upstream's global)
EVENTS = ErrorHolder()


class StorageMetrics:
    """Every storage metric, by attribute. Names follow ``nydus_storage_*``."""

    def __init__(self, prefix: str = "nydus_storage") -> None:
        p = prefix
        self.backend_read_bytes = Counter(f"{p}_backend_read_bytes_total", "Bytes read from the backend.")
        self.backend_read_count = Counter(f"{p}_backend_read_requests_total", "Backend read requests (successful).")
        self.backend_read_errors = Counter(f"{p}_backend_read_errors_total", "Backend reads that failed after retries.")
        self.backend_retries = Counter(f"{p}_backend_retries_total", "Backend read attempts retried.")
        self.backend_latency = Histogram(f"{p}_backend_read_latency_seconds", "Latency of one backend read.")
        #: upstream's size/latency classes of backend reads (JSON of ``/api/v1/metrics/backend``)
        self.backend_dist = BackendDist()
        self.cache_hits = Counter(f"{p}_cache_hits_total", "Chunk reads served from the cache.")
        self.cache_misses = Counter(f"{p}_cache_misses_total", "Chunks fetched from the backend.")
        self.cache_evictions = Counter(f"{p}_cache_evictions_total", "Blobs evicted from the cache.")
        self.cache_digest_mismatches = Counter(f"{p}_cache_digest_mismatches_total", "Chunks failing digest validation.")
        self.cache_corrupt_resets = Counter(f"{p}_cache_corrupt_resets_total", "Corrupt chunk maps discarded.")
        self.cache_verify_failures = Counter(
            f"{p}_cache_verify_failures_total",
            "Ready chunks whose cached data no longer matched their digest (reset and refetched).")
        self.cache_write_failures = Counter(
            f"{p}_cache_write_failures_total",
            "Chunks served from the backend without caching because the cache disk was full.")
        self.cache_usage_bytes = Gauge(f"{p}_cache_usage_bytes", "Disk bytes used by the cache.")
        self.read_latency = Histogram(f"{p}_device_read_latency_seconds", "Latency of one BlobDevice.read.")
        self.prefetch_requests = Counter(f"{p}_prefetch_requests_total", "Prefetch units completed.")
        self.prefetch_bytes = Counter(f"{p}_prefetch_bytes_total", "Bytes made ready by prefetch.")
        self.prefetch_errors = Counter(f"{p}_prefetch_errors_total", "Prefetch units that failed.")
        self.prefetch_pending = Gauge(f"{p}_prefetch_pending", "Prefetch units queued, not yet done.")

    def all(self) -> list[Counter | Histogram]:
        return [v for v in vars(self).values() if isinstance(v, (Counter, Histogram))]

    def snapshot(self) -> dict[str, float]:
        """``{metric name: value}`` (histograms give their count) for tests and the API."""
        out: dict[str, float] = {}
        for m in self.all():
            out[m.name] = m.count if isinstance(m, Histogram) else m.value
        return out

    def render(self) -> str:
        """Prometheus text exposition of every metric."""
        lines: list[str] = []
        for m in self.all():
            lines.extend(m.render())
        return "\n".join(lines) + "\n"
