"""``NoCacheManager``: every read goes to the backend (merged per request); nothing is stored.

Concurrent readers of the same chunk are still served by one fetch at a time per chunk only
within one ``read_descs`` call; there is no cross-request sharing without a cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from storage.backend.base import BlobBackend
from storage.cache.base import BlobCache, BlobCacheManager, CacheConfig, merge_runs
from storage.metrics import StorageMetrics
from storage.records import BlobInfo, BlobIoDesc, ChunkInfo


class NoCacheBlobCache(BlobCache):
    """Reads straight from the backend; decompresses and validates like the file cache."""

    def _fetch(self, chunks: Sequence[ChunkInfo]) -> dict[int, bytes | memoryview]:
        data: dict[int, bytes | memoryview] = {}
        for run in merge_runs(chunks, self.config.merging_size):
            good, bad = self.fetch_run(run)
            if bad:
                raise next(iter(bad.values()))
            self.metrics.cache_misses.inc(len(run))
            data.update(good)
        return data

    def read_descs(self, descs: Sequence[BlobIoDesc], amplify_into: "set[int] | None" = None) -> bytes:
        data = self._fetch([d.chunk for d in descs])  # type: ignore[misc]
        return b"".join(data[d.chunk.index][d.offset : d.offset + d.size] for d in descs)  # type: ignore[union-attr]

    def prefetch_chunks(self, chunks: Sequence[ChunkInfo], amplify_into: "set[int] | None" = None,
                        exact: bool = False) -> int:
        return 0  # nothing to keep


class NoCacheManager(BlobCacheManager):
    """``work_dir`` is ignored; every blob gets a :class:`NoCacheBlobCache`."""

    def __init__(self, work_dir: str | None, backend: BlobBackend, config: CacheConfig | None = None,
                 metrics: StorageMetrics | None = None) -> None:
        super().__init__(backend, config, metrics)
        self._caches: dict[str, NoCacheBlobCache] = {}

    def get_blob_cache(self, blob: BlobInfo) -> NoCacheBlobCache:
        with self._lock:
            cache = self._caches.get(blob.blob_id)
            if cache is None:
                cache = NoCacheBlobCache(blob, self.backend.reader(blob.blob_id), self.config, self.metrics)
                cache.meta_reader = self.backend.reader
                self._caches[blob.blob_id] = cache
            return cache
