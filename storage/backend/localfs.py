"""``LocalFsBackend``: blobs as files named by blob id in a directory, or one blob file."""

from __future__ import annotations

import os
import threading

from storage.backend.base import BlobBackend, BlobReader
from storage.errors import BackendError, BlobNotFound, BlobRangeError, ConfigError
from storage.metrics import StorageMetrics


class LocalFsBackend(BlobBackend):
    """``dir``: ``<dir>/<blob_id>``; ``blob_file``: every blob id maps to that one file."""

    def __init__(self, dir: str | None = None, blob_file: str | None = None, *, retry_limit: int = 0,
                 metrics: StorageMetrics | None = None) -> None:
        super().__init__(retry_limit=retry_limit, metrics=metrics)
        if not dir and not blob_file:
            raise ConfigError("localfs: one of 'dir' or 'blob_file' is required")
        self.dir = dir
        self.blob_file = blob_file

    def path(self, blob_id: str) -> str:
        if self.blob_file:
            return self.blob_file
        if not blob_id or "/" in blob_id or blob_id in (".", ".."):
            raise BlobNotFound(f"localfs: invalid blob id {blob_id!r}")
        return os.path.join(self.dir or "", blob_id)

    def _new_reader(self, blob_id: str) -> BlobReader:
        return _LocalFsReader(self, blob_id)

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                r.close()  # type: ignore[attr-defined]
            self._readers.clear()


class _LocalFsReader(BlobReader):
    def __init__(self, backend: LocalFsBackend, blob_id: str) -> None:
        super().__init__(blob_id, retry_limit=backend.retry_limit, metrics=backend.metrics)
        self._path = backend.path(blob_id)
        self._fd: int | None = None
        self._fd_lock = threading.Lock()

    def _open(self) -> int:
        with self._fd_lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise BlobNotFound(f"localfs: blob {self.blob_id} not found at {self._path}") from None
                except OSError as exc:
                    raise BackendError(f"localfs: open {self._path}: {exc}") from exc
            return self._fd

    def _blob_size(self) -> int:
        return os.fstat(self._open()).st_size

    def _read_once(self, offset: int, size: int) -> bytes:
        fd = self._open()
        if offset + size > self.blob_size():
            raise BlobRangeError(f"localfs: blob {self.blob_id}: range {offset}+{size} beyond size {self.blob_size()}")
        try:
            return os.pread(fd, size, offset)
        except OSError as exc:
            raise BackendError(f"localfs: read {self._path} at {offset}: {exc}") from exc

    def close(self) -> None:
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
