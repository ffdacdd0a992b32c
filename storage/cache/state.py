"""Chunk readiness: which chunks of a blob are in the cache, and which are being fetched.

**The ChunkMap contract** (every driver; the cache relies on it):

* ``check_ready_and_mark_pending(i) -> bool`` — ``True``: chunk ``i`` is ready, nothing to do.
  ``False``: the caller now *owns* the fetch of chunk ``i`` and **must** later call either
  ``set_ready_and_clear_pending([i])`` (data written to the cache) or ``clear_pending([i])``
  (fetch failed). If another thread owns ``i``, the call blocks until that owner releases it,
  then re-checks (so a chunk being fetched is fetched once; waiters see the result).
* ``try_mark_pending(i) -> ChunkState`` — the non-blocking form: ``READY``, ``OWNED`` (same
  obligation as above) or ``INFLIGHT`` (another owner: ``wait_pending(i)`` then ask again).
* ``set_ready_and_clear_pending`` may only be called **after** the chunk's data is written
  (and ``fdatasync``-ed when the cache reuses ready chunks without checking them): a ready bit
  never points at a write that has not been made. After a crash it may point at one the disk
  lost; the file cache checks every ready chunk against its digest before reusing it.

Drivers: :class:`IndexedChunkMap` (a persisted bitmap by chunk index, the default),
:class:`NoopChunkMap` (nothing is ever ready; no-cache mode).

``<blob_id>.chunk_map`` layout: a 4096-byte :class:`~storage.meta.chunk_map.ChunkMapHeader`
{magic, version, magic2, all_ready}, then one bit per chunk, most significant bit first. A file of the wrong size or with
a bad magic is corrupt (:class:`~storage.errors.CacheError`); an all-zero header (crash while
creating) gets a fresh header.
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Iterable
from typing import Protocol

from storage.atomic import atomic_write
from storage.errors import CacheError, MetaFormatError
from storage.meta.chunk_map import (  # noqa: F401 - re-exported for callers of this module
    CHUNK_MAP_ALL_READY,
    CHUNK_MAP_HEADER_SIZE,
    CHUNK_MAP_MAGIC,
    CHUNK_MAP_MAGIC2,
    CHUNK_MAP_VERSION,
    ChunkMapHeader,
)

class ChunkState(enum.Enum):
    READY = "ready"
    OWNED = "owned"  #: the caller owns the fetch (must set ready or clear pending)
    INFLIGHT = "inflight"  #: another thread owns the fetch


class ChunkMap(Protocol):
    chunk_count: int

    def is_ready(self, index: int) -> bool: ...
    def check_ready_and_mark_pending(self, index: int) -> bool: ...
    def try_mark_pending(self, index: int) -> ChunkState: ...
    def wait_pending(self, index: int, timeout: float | None = None) -> None: ...
    def set_ready_and_clear_pending(self, indices: Iterable[int]) -> None: ...
    def reset(self, indices: Iterable[int]) -> list[int]: ...
    def clear_pending(self, indices: Iterable[int]) -> None: ...
    def all_ready(self) -> bool: ...
    def ready_count(self) -> int: ...
    def close(self) -> None: ...


class _PendingMap:
    """In-flight tracking shared by the drivers (upstream ``BlobStateMap``)."""

    def __init__(self, chunk_count: int) -> None:
        self.chunk_count = chunk_count
        self._lock = threading.Lock()
        self._pending: dict[int, threading.Event] = {}

    def _is_ready(self, index: int) -> bool:
        raise NotImplementedError

    def _set_ready(self, indices: list[int]) -> None:
        raise NotImplementedError

    growable = False

    def _check(self, index: int) -> None:
        if self.growable and index >= 0:
            return
        if not 0 <= index < self.chunk_count:
            raise CacheError(f"chunk index {index} out of range (chunk_count {self.chunk_count})")

    def is_ready(self, index: int) -> bool:
        self._check(index)
        return self._is_ready(index)

    def try_mark_pending(self, index: int) -> ChunkState:
        self._check(index)
        with self._lock:
            if self._is_ready(index):
                return ChunkState.READY
            if index in self._pending:
                return ChunkState.INFLIGHT
            self._pending[index] = threading.Event()
            return ChunkState.OWNED

    def wait_pending(self, index: int, timeout: float | None = None) -> None:
        with self._lock:
            ev = self._pending.get(index)
        if ev is not None:
            ev.wait(timeout)

    def check_ready_and_mark_pending(self, index: int) -> bool:
        while True:
            state = self.try_mark_pending(index)
            if state is ChunkState.READY:
                return True
            if state is ChunkState.OWNED:
                return False
            self.wait_pending(index)

    def set_ready_and_clear_pending(self, indices: Iterable[int]) -> None:
        indices = list(indices)
        with self._lock:
            self._set_ready(indices)
            events = [self._pending.pop(i, None) for i in indices]
        for ev in events:
            if ev is not None:
                ev.set()

    def clear_pending(self, indices: Iterable[int]) -> None:
        with self._lock:
            events = [self._pending.pop(i, None) for i in indices]
        for ev in events:
            if ev is not None:
                ev.set()

    def close(self) -> None:
        pass


class NoopChunkMap(_PendingMap):
    """Nothing is ever ready (no-cache mode); pending tracking still dedups concurrent fetches."""

    def _is_ready(self, index: int) -> bool:
        return False

    def _set_ready(self, indices: list[int]) -> None:
        pass

    def all_ready(self) -> bool:
        return False

    def reset(self, indices: Iterable[int]) -> list[int]:
        return []

    def ready_count(self) -> int:
        return 0


def chunk_map_size(chunk_count: int) -> int:
    return CHUNK_MAP_HEADER_SIZE + (chunk_count + 7) // 8


class IndexedChunkMap(_PendingMap):
    """A bitmap by chunk index persisted in ``path`` (see the module docstring for the layout).

    ``chunk_count=0`` means unknown (v5 images without the extended blob table): the bitmap
    then grows with the highest index marked, any size is accepted, and it is never "all ready".
    """

    def __init__(self, path: str, chunk_count: int) -> None:
        super().__init__(chunk_count)
        self.path = path
        self.growable = chunk_count == 0
        expected = chunk_map_size(chunk_count)
        fd = self._open_or_create(path, expected)
        self._fd = fd
        if self.growable:
            expected = max(expected, os.fstat(fd).st_size)
        try:
            raw = os.pread(fd, expected, 0)
            header = ChunkMapHeader.parse(raw, 0)
            header.validate()
        except MetaFormatError as exc:
            os.close(fd)
            raise CacheError(f"{path}: {exc}") from None
        self._bits = bytearray(raw[CHUNK_MAP_HEADER_SIZE:])
        self._ready = sum(bin(b).count("1") for b in self._bits)
        # bits beyond chunk_count must be zero
        tail = chunk_count % 8
        if tail and self._bits and self._bits[-1] & (0xFF >> tail):
            os.close(fd)
            raise CacheError(f"{path}: bits set beyond chunk_count {chunk_count}")
        if header.all_ready == CHUNK_MAP_ALL_READY and (self._ready != chunk_count or self.growable):
            os.close(fd)
            raise CacheError(f"{path}: all_ready set but {self._ready}/{chunk_count} chunks ready")
        self._all_ready_written = header.all_ready == CHUNK_MAP_ALL_READY

    @staticmethod
    def _fresh(chunk_count: int) -> bytes:
        return ChunkMapHeader.new().pack() + bytes((chunk_count + 7) // 8)

    def _open_or_create(self, path: str, expected: int) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 16, 0)
            if size != 0 and head.strip(b"\0"):
                if size != expected and not (self.growable and size >= expected):
                    os.close(fd)
                    raise CacheError(f"{path}: corrupt chunk map: size {size}, expected {expected}")
                return fd
            os.close(fd)  # empty or all-zero header: a crash while creating; start fresh
        atomic_write(path, self._fresh(self.chunk_count))
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def _is_ready(self, index: int) -> bool:
        byte = index >> 3
        return byte < len(self._bits) and bool(self._bits[byte] & (0x80 >> (index & 7)))

    def _set_ready(self, indices: list[int]) -> None:
        touched: set[int] = set()
        for i in indices:
            self._check(i)
            if (i >> 3) >= len(self._bits):
                self._bits.extend(bytes((i >> 3) + 1 - len(self._bits)))
            byte, mask = i >> 3, 0x80 >> (i & 7)
            if not self._bits[byte] & mask:
                self._bits[byte] |= mask
                self._ready += 1
                touched.add(byte)
        if not touched:
            return
        lo, hi = min(touched), max(touched)
        os.pwrite(self._fd, bytes(self._bits[lo : hi + 1]), CHUNK_MAP_HEADER_SIZE + lo)
        if not self.growable and self._ready == self.chunk_count and not self._all_ready_written:
            os.fdatasync(self._fd)
            os.pwrite(self._fd, ChunkMapHeader.new(all_ready=True).pack(), 0)
            self._all_ready_written = True

    def reset(self, indices: Iterable[int]) -> list[int]:
        """Clear the ready bits of ``indices`` (cached data found missing or wrong); returns the
        indices that were ready. Chunks being fetched are left to their owner."""
        cleared: list[int] = []
        with self._lock:
            for i in indices:
                if i in self._pending or not self._is_ready(i):
                    continue
                self._bits[i >> 3] &= ~(0x80 >> (i & 7)) & 0xFF
                self._ready -= 1
                cleared.append(i)
            if not cleared:
                return cleared
            if self._all_ready_written:  # the header first: never "all ready" over a cleared bit
                os.pwrite(self._fd, ChunkMapHeader.new().pack(), 0)
                self._all_ready_written = False
            lo, hi = min(cleared) >> 3, max(cleared) >> 3
            os.pwrite(self._fd, bytes(self._bits[lo : hi + 1]), CHUNK_MAP_HEADER_SIZE + lo)
            os.fdatasync(self._fd)
        return cleared

    def all_ready(self) -> bool:
        return not self.growable and self._ready == self.chunk_count

    def ready_count(self) -> int:
        return self._ready

    def ready_indices(self) -> list[int]:
        return [i for i in range(len(self._bits) * 8) if self._is_ready(i)]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
