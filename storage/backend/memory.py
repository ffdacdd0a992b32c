"""``MemoryBackend``: blobs held in a dict, with request accounting and fault hooks (tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from storage.backend.base import BlobBackend, BlobReader
from storage.errors import BlobNotFound, BlobRangeError
from storage.metrics import StorageMetrics

#: ``fault(blob_id, offset, size)`` returns ``None`` (serve normally), bytes (serve these) or
#: raises a :class:`~storage.errors.BackendError`
FaultHook = Callable[[str, int, int], "bytes | None"]


class MemoryBackend(BlobBackend):
    """In-memory blobs. ``requests`` logs every ``_read_once`` as ``(blob_id, offset, size)``."""

    def __init__(self, blobs: Mapping[str, bytes] | None = None, *, delay: float = 0.0,
                 fault: FaultHook | None = None, retry_limit: int = 2,
                 metrics: StorageMetrics | None = None) -> None:
        super().__init__(retry_limit=retry_limit, metrics=metrics)
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self.delay = delay
        self.fault = fault
        self.requests: list[tuple[str, int, int]] = []
        self.requests_lock = threading.Lock()

    def add(self, blob_id: str, data: bytes) -> None:
        self.blobs[blob_id] = data

    def _new_reader(self, blob_id: str) -> BlobReader:
        return _MemoryReader(self, blob_id)

    def bytes_requested(self, blob_id: str | None = None) -> int:
        with self.requests_lock:
            return sum(s for b, _, s in self.requests if blob_id is None or b == blob_id)


class _MemoryReader(BlobReader):
    def __init__(self, backend: MemoryBackend, blob_id: str) -> None:
        super().__init__(blob_id, retry_limit=backend.retry_limit, metrics=backend.metrics)
        self._backend = backend

    def _data(self) -> bytes:
        try:
            return self._backend.blobs[self.blob_id]
        except KeyError:
            raise BlobNotFound(f"blob {self.blob_id} not in memory backend") from None

    def _blob_size(self) -> int:
        return len(self._data())

    def _read_once(self, offset: int, size: int) -> bytes:
        data = self._data()
        if offset + size > len(data):
            raise BlobRangeError(f"blob {self.blob_id}: range {offset}+{size} beyond size {len(data)}")
        with self._backend.requests_lock:
            self._backend.requests.append((self.blob_id, offset, size))
        if self._backend.delay:
            time.sleep(self._backend.delay)
        if self._backend.fault is not None:
            replaced = self._backend.fault(self.blob_id, offset, size)
            if replaced is not None:
                return replaced
        return data[offset : offset + size]
