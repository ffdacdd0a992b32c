"""The backend interface: ``BlobBackend.reader(blob_id) -> BlobReader``.

A driver implements ``_read_once(offset, size)`` and ``_blob_size()`` only. ``read`` holds
the retry loop (exponential backoff on :class:`TransientBackendError`), the exact-size check
(a short body is retried as :class:`TruncatedRead`) and the metrics, written once here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from storage.errors import BackendError, BlobRangeError, ConfigError, TransientBackendError, TruncatedRead
from storage.metrics import EVENTS, StorageMetrics

log = logging.getLogger(__name__)

#: default number of retries after the first attempt (upstream ``retry_limit``)
DEFAULT_RETRY_LIMIT = 2
#: first backoff delay in seconds; doubled per retry, capped at ``MAX_BACKOFF``
BASE_BACKOFF = 0.05
MAX_BACKOFF = 2.0


class _Speculation(threading.local):
    pause: "Callable[[], None] | None" = None


#: per thread: set by the prefetcher while its worker fetches speculative data. Drivers that
#: stream a body call :func:`yield_to_demand` between pieces, so a speculative transfer stops
#: reading — and TCP flow control stops it taking link bandwidth — while demand reads wait.
speculation = _Speculation()


@contextlib.contextmanager
def shared_fetch() -> Iterator[None]:
    """Fetches inside are never paused, even on a prefetch thread: what they load (a blob's CI
    table, a ZRAN blob.meta) is loaded once, under a lock demand reads wait on too. Paused, such
    a fetch held those readers while no chunk waiter let it go (``MAX_PAUSE`` per body piece)."""
    saved = speculation.pause
    speculation.pause = None
    try:
        yield
    finally:
        speculation.pause = saved


def yield_to_demand() -> None:
    """Block while the current thread's speculative work must yield (no-op for demand reads)."""
    pause = speculation.pause
    if pause is not None:
        pause()


class BlobReader(ABC):
    """Reads byte ranges of one blob. Thread-safe."""

    def __init__(self, blob_id: str, *, retry_limit: int = DEFAULT_RETRY_LIMIT,
                 metrics: StorageMetrics | None = None) -> None:
        self.blob_id = blob_id
        self.retry_limit = retry_limit
        self.metrics = metrics if metrics is not None else StorageMetrics()
        self._size: int | None = None
        self._size_lock = threading.Lock()
        self._local = threading.local()  #: per thread: ``source`` of the last read, ``reread_after``

    @property
    def last_source(self) -> str:
        """Which source answered this thread's last read ("" for single-source drivers)."""
        return getattr(self._local, "source", "")

    @property
    def reread_after(self) -> str | None:
        """Inside :meth:`reread`: the source that gave the wrong data (a driver with several
        sources starts after it); None otherwise."""
        return getattr(self._local, "reread_after", None)

    def reread(self, offset: int, size: int) -> bytes:
        """Read a range again because the data of this thread's last read of it was wrong (digest
        mismatch): from the next source (mirror, then origin) after the one that answered, where
        the driver has several; from the same one otherwise."""
        self._local.reread_after = self.last_source
        try:
            return self.read(offset, size)
        finally:
            self._local.reread_after = None

    @abstractmethod
    def _read_once(self, offset: int, size: int) -> bytes:
        """One attempt at ``size`` bytes at ``offset``; may return fewer bytes (retried)."""

    @abstractmethod
    def _blob_size(self) -> int:
        """The blob's size in bytes (one attempt)."""

    def blob_size(self) -> int:
        """The blob's size in bytes (retried, cached)."""
        with self._size_lock:
            if self._size is None:
                self._size = self._retry(self._blob_size, "size")
            return self._size

    def read(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset``, retried; raises a :class:`BackendError`."""
        if offset < 0 or size < 0:
            raise BlobRangeError(f"blob {self.blob_id}: bad range offset={offset} size={size}")
        if size == 0:
            return b""

        def attempt() -> bytes:
            data = self._read_once(offset, size)
            if len(data) != size:
                raise TruncatedRead(
                    f"blob {self.blob_id}: got {len(data)} of {size} bytes at offset {offset}"
                )
            return data

        start = time.monotonic()
        try:
            data = self._retry(attempt, f"read {offset}+{size}")
        except BaseException:
            self.metrics.backend_dist.observe(size, time.monotonic() - start)
            raise
        elapsed = time.monotonic() - start
        self.metrics.backend_latency.observe(elapsed)
        self.metrics.backend_dist.observe(size, elapsed)
        self.metrics.backend_read_bytes.inc(size)
        self.metrics.backend_read_count.inc()
        return data

    def _retry(self, fn, what: str):
        attempt = 0
        while True:
            try:
                return fn()
            except TransientBackendError as exc:
                if attempt >= self.retry_limit:
                    self.metrics.backend_read_errors.inc()
                    EVENTS.push(f"blob {self.blob_id}: {what}: {type(exc).__name__}: {exc}")
                    log.warning("blob %s: %s failed after %d attempts: %s", self.blob_id, what, attempt + 1, exc)
                    raise
                delay = min(MAX_BACKOFF, BASE_BACKOFF * (2 ** attempt))
                log.info("blob %s: %s failed (%s), retry %d in %.2fs", self.blob_id, what, exc, attempt + 1, delay)
                self.metrics.backend_retries.inc()
                attempt += 1
                time.sleep(delay)
            except BackendError as exc:
                self.metrics.backend_read_errors.inc()
                EVENTS.push(f"blob {self.blob_id}: {what}: {type(exc).__name__}: {exc}")
                raise


class BlobBackend(ABC):
    """A source of blobs. ``reader`` returns one (shared) :class:`BlobReader` per blob id."""

    def __init__(self, *, retry_limit: int = DEFAULT_RETRY_LIMIT, metrics: StorageMetrics | None = None) -> None:
        self.retry_limit = retry_limit
        self.metrics = metrics if metrics is not None else StorageMetrics()
        self._readers: dict[str, BlobReader] = {}
        self._lock = threading.Lock()

    def reader(self, blob_id: str) -> BlobReader:
        with self._lock:
            r = self._readers.get(blob_id)
            if r is None:
                r = self._readers[blob_id] = self._new_reader(blob_id)
            return r

    @abstractmethod
    def _new_reader(self, blob_id: str) -> BlobReader:
        """Create the driver's reader for ``blob_id``."""

    def warm(self) -> None:
        """Make the first read cheaper by opening ahead of it what it would open (connections,
        auth tokens). Best effort and optional: the default does nothing; a failure raises the
        driver's error and changes nothing a read relies on."""

    def update_auth(self, auth: str) -> None:
        """Use new credentials from the next request on (upstream's ``registry_auth`` hot reload):
        ``auth`` is docker's base64 ``user:password``, ``""`` drops them (anonymous).
        Backends without registry credentials raise :class:`ConfigError`."""
        raise ConfigError(f"the {self.kind} backend takes no registry credentials (registry_auth)")

    def update_proxy(self, url: str) -> None:
        """Send the next requests through the HTTP(S) proxy ``url`` (``""``: directly); upstream's
        ``proxy_url`` hot reload. Backends that make no HTTP requests raise :class:`ConfigError`."""
        raise ConfigError(f"the {self.kind} backend makes no HTTP requests (proxy_url)")

    @property
    def kind(self) -> str:
        return type(self).__name__.removesuffix("Backend").lower() or "blob"

    def close(self) -> None:
        """Release connections and files."""

    def __enter__(self) -> "BlobBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
