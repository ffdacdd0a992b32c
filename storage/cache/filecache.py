"""``FileCacheManager``: chunks cached uncompressed on local disk, fetched lazily and once.

Per blob, in ``work_dir``:

* ``<blob_id>.blob.data`` — uncompressed chunk data at each chunk's ``uncompressed_offset``
  (a sparse file of the blob's uncompressed size);
* ``<blob_id>.chunk_map`` — an :class:`~storage.cache.state.IndexedChunkMap`;
* ``<blob_id>.blob.meta`` — the blob's chunk-info table (when known).

A chunk is marked ready only after its data is written and ``fdatasync``-ed, so a crash never
leaves a ready bit over a torn write; a restarted process reuses every ready chunk. A corrupt
chunk map discards that blob's cache (counted in ``cache_corrupt_resets``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence

from storage.backend.base import BlobBackend, BlobReader
from storage.cache.base import BlobCache, BlobCacheManager, CacheConfig, merge_runs
from storage.cache.state import ChunkState, IndexedChunkMap
from storage.device import BlobInfo, BlobIoDesc, ChunkInfo
from storage.errors import CacheError, StorageError
from storage.metrics import StorageMetrics

log = logging.getLogger(__name__)

DATA_SUFFIX = ".blob.data"
CHUNK_MAP_SUFFIX = ".chunk_map"
META_SUFFIX = ".blob.meta"
SUFFIXES = (DATA_SUFFIX, CHUNK_MAP_SUFFIX, META_SUFFIX, ".blob.digest", ".blob.toc", ".image.boot")


class FileBlobCache(BlobCache):
    """The file cache of one blob."""

    def __init__(self, work_dir: str, blob: BlobInfo, reader: BlobReader, config: CacheConfig,
                 metrics: StorageMetrics) -> None:
        super().__init__(blob, reader, config, metrics)
        self.work_dir = work_dir
        self.path = os.path.join(work_dir, blob.blob_id + DATA_SUFFIX)
        self.map_path = os.path.join(work_dir, blob.blob_id + CHUNK_MAP_SUFFIX)
        if not os.path.exists(self.path) and os.path.exists(self.map_path):
            os.unlink(self.map_path)  # a map without its data describes nothing
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if blob.uncompressed_size and os.fstat(self._fd).st_size < blob.uncompressed_size:
                os.ftruncate(self._fd, blob.uncompressed_size)
            self.chunk_map = IndexedChunkMap(self.map_path, blob.chunk_count)
        except BaseException:
            os.close(self._fd)
            raise
        self._chunk_table: list[ChunkInfo] | None = None
        self.last_access = time.monotonic()

    def set_chunk_table(self, chunks: Sequence[ChunkInfo]) -> None:
        """The blob's full chunk list by index (enables read amplification, whole-blob prefetch)."""
        self._chunk_table = sorted(chunks, key=lambda c: c.index)

    # -- fetch ------------------------------------------------------------------------------------
    def _amplify(self, run: list[ChunkInfo], owned: list[ChunkInfo]) -> None:
        table = self._chunk_table
        if not self.config.amplify_io or table is None:
            return
        start = run[0].compressed_offset
        while True:
            last = run[-1]
            end = last.compressed_offset + last.compressed_size
            if end - start >= self.config.amplify_io or last.index + 1 >= len(table):
                return
            nxt = table[last.index + 1]
            if nxt.compressed_offset != end or nxt.compressed_offset + nxt.compressed_size - start > max(
                    self.config.amplify_io, self.config.merging_size):
                return
            if self.chunk_map.try_mark_pending(nxt.index) is not ChunkState.OWNED:
                return
            run.append(nxt)
            owned.append(nxt)

    def ensure_ready(self, chunks: Sequence[ChunkInfo]) -> int:
        """Fetch the chunks not yet cached (merged, once across threads); returns bytes fetched."""
        self.last_access = time.monotonic()
        needed = {c.index: c for c in chunks}
        fetched = 0
        first = True
        while needed:
            owned: list[ChunkInfo] = []
            inflight: list[ChunkInfo] = []
            for c in needed.values():
                state = self.chunk_map.try_mark_pending(c.index)
                if state is ChunkState.OWNED:
                    owned.append(c)
                elif state is ChunkState.INFLIGHT:
                    inflight.append(c)
                elif first:
                    self.metrics.cache_hits.inc()
            first = False
            if owned:
                fetched += self._fetch_owned(owned)
            for c in inflight:
                self.chunk_map.wait_pending(c.index)
            needed = {c.index: c for c in inflight if not self.chunk_map.is_ready(c.index)}
        return fetched

    def _fetch_owned(self, owned: list[ChunkInfo]) -> int:
        """Fetch chunks this thread owns; every owned chunk is released on every path."""
        error: StorageError | None = None
        fetched = 0
        pending = {c.index for c in owned}
        try:
            for run in merge_runs(owned, self.config.merging_size):
                extra: list[ChunkInfo] = []
                self._amplify(run, extra)
                pending.update(c.index for c in extra)
                try:
                    good, bad = self.fetch_run(run)
                except StorageError as exc:
                    error = error or exc
                    continue
                fetched += run[-1].compressed_offset + run[-1].compressed_size - run[0].compressed_offset
                self.metrics.cache_misses.inc(len(run))
                for c in run:
                    if c.index in good:
                        os.pwrite(self._fd, good[c.index], c.uncompressed_offset)
                if good and self.config.sync_data:
                    os.fdatasync(self._fd)
                self.chunk_map.set_ready_and_clear_pending(good)
                pending.difference_update(good)
                if bad:
                    self.chunk_map.clear_pending(bad)
                    pending.difference_update(bad)
                    wanted = [i for i in bad if any(o.index == i for o in owned)]
                    if wanted and error is None:
                        error = bad[wanted[0]]
        finally:
            if pending:
                self.chunk_map.clear_pending(pending)
        if error is not None:
            raise error
        return fetched

    # -- reads ------------------------------------------------------------------------------------
    def read_descs(self, descs: Sequence[BlobIoDesc]) -> bytes:
        self.ensure_ready([d.chunk for d in descs])  # type: ignore[misc]
        out = bytearray()
        pos = -1
        length = 0
        for d in descs:
            off = d.chunk.uncompressed_offset + d.offset  # type: ignore[union-attr]
            if off == pos + length and length:
                length += d.size
                continue
            if length:
                out += self._pread(pos, length)
            pos, length = off, d.size
        if length:
            out += self._pread(pos, length)
        return bytes(out)

    def _pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise CacheError(f"{self.path}: short read {len(data)} of {size} at {offset}")
        return data

    def prefetch_chunks(self, chunks: Sequence[ChunkInfo]) -> int:
        return self.ensure_ready(chunks)

    def whole_blob_chunks(self) -> list[ChunkInfo] | None:
        return self._chunk_table

    def is_complete(self) -> bool:
        return self.chunk_map.all_ready()

    def data_path(self) -> str | None:
        return self.path if self.chunk_map.all_ready() else None

    def disk_usage(self) -> int:
        return blob_disk_usage(self.work_dir, self.blob.blob_id)

    def close(self) -> None:
        self.chunk_map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def blob_disk_usage(work_dir: str, blob_id: str) -> int:
    total = 0
    for suffix in SUFFIXES:
        try:
            st = os.stat(os.path.join(work_dir, blob_id + suffix))
        except FileNotFoundError:
            continue
        total += st.st_blocks * 512
    return total


class FileCacheManager(BlobCacheManager):
    """Creates :class:`FileBlobCache` objects in ``work_dir``; usage, GC and LRU eviction."""

    def __init__(self, work_dir: str, backend: BlobBackend, config: CacheConfig | None = None,
                 metrics: StorageMetrics | None = None) -> None:
        super().__init__(backend, config, metrics)
        self.work_dir = work_dir
        os.makedirs(work_dir, exist_ok=True)
        self._caches: dict[str, FileBlobCache] = {}
        self._refs: dict[str, int] = {}
        self._last_evict_check = 0.0

    def get_blob_cache(self, blob: BlobInfo) -> FileBlobCache:
        with self._lock:
            cache = self._caches.get(blob.blob_id)
            if cache is None:
                reader = self.backend.reader(blob.blob_id)
                try:
                    cache = FileBlobCache(self.work_dir, blob, reader, self.config, self.metrics)
                except CacheError as exc:
                    log.warning("discarding cache of blob %s: %s", blob.blob_id, exc)
                    self.metrics.cache_corrupt_resets.inc()
                    self._remove_files(blob.blob_id)
                    cache = FileBlobCache(self.work_dir, blob, reader, self.config, self.metrics)
                self._caches[blob.blob_id] = cache
            self._refs[blob.blob_id] = self._refs.get(blob.blob_id, 0) + 1
            return cache

    def release(self, blob_id: str) -> None:
        with self._lock:
            n = self._refs.get(blob_id, 0) - 1
            if n > 0:
                self._refs[blob_id] = n
                return
            self._refs.pop(blob_id, None)
        self.enforce_limit()

    def _remove_files(self, blob_id: str) -> None:
        for suffix in SUFFIXES:
            try:
                os.unlink(os.path.join(self.work_dir, blob_id + suffix))
            except FileNotFoundError:
                pass

    def _drop(self, blob_id: str) -> None:
        cache = self._caches.pop(blob_id, None)
        if cache is not None:
            cache.close()
        self._remove_files(blob_id)

    def cached_blob_ids(self) -> set[str]:
        ids = set()
        for name in os.listdir(self.work_dir):
            for suffix in SUFFIXES:
                if name.endswith(suffix):
                    ids.add(name[: -len(suffix)])
        return ids

    def usage(self) -> dict[str, int]:
        return {b: blob_disk_usage(self.work_dir, b) for b in sorted(self.cached_blob_ids())}

    def gc(self, in_use_blob_ids: Iterable[str]) -> list[str]:
        keep = set(in_use_blob_ids)
        removed = []
        with self._lock:
            for blob_id in sorted(self.cached_blob_ids()):
                if blob_id in keep or self._refs.get(blob_id):
                    continue
                self._drop(blob_id)
                removed.append(blob_id)
        return removed

    def _last_access(self, blob_id: str) -> float:
        cache = self._caches.get(blob_id)
        if cache is not None:
            return cache.last_access
        try:  # from a previous run: order by the data file's mtime, older than anything open
            st = os.stat(os.path.join(self.work_dir, blob_id + DATA_SUFFIX))
            return st.st_mtime - time.time() + time.monotonic() - 1e9
        except FileNotFoundError:
            return float("-inf")

    def enforce_limit(self) -> list[str]:
        """Evict whole blobs not in use, least recently used first, until under ``limit_size``."""
        limit = self.config.limit_size
        if not limit:
            return []
        evicted = []
        with self._lock:
            usage = self.usage()
            total = sum(usage.values())
            self.metrics.cache_usage_bytes.set(total)
            if total <= limit:
                return []
            candidates = sorted((b for b in usage if not self._refs.get(b)), key=self._last_access)
            for blob_id in candidates:
                if total <= limit:
                    break
                total -= usage[blob_id]
                self._drop(blob_id)
                evicted.append(blob_id)
                self.metrics.cache_evictions.inc()
            self.metrics.cache_usage_bytes.set(total)
        if evicted:
            log.info("cache over limit %d: evicted %s", limit, evicted)
        return evicted

    def maybe_enforce_limit(self) -> None:
        now = time.monotonic()
        if self.config.limit_size and now - self._last_evict_check > 1.0:
            self._last_evict_check = now
            self.enforce_limit()

    def close(self) -> None:
        with self._lock:
            for cache in self._caches.values():
                cache.close()
            self._caches.clear()
            self._refs.clear()
