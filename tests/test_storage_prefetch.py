"""Prefetch as a stream: neighbouring files merged into one backend request, runs of one unit
fetched concurrently (bounded by ``threads_count``), high-priority runs ahead of polite ones."""

from __future__ import annotations

import threading
import time

from storage.backend.memory import MemoryBackend
from storage.cache.filecache import FileCacheManager
from storage.device import BlobDevice, Compressor
from storage.prefetch import PrefetchConfig
from tests.storage_blobs import make_blob


def _files(blob, n: int, size: int = 4096) -> list:
    """One iovec per small file, laid out back to back (as the builder does)."""
    return [blob.iovec(i * size, size) for i in range(n)]


def test_prefetch_merges_neighbouring_files_into_one_request(tmp_path):
    b = make_blob(32, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([b.info], mgr, prefetch_config=PrefetchConfig(merging_size=16 * 4096))
    dev.prefetch(_files(b, 32))  # 32 files of one chunk each
    assert dev.prefetcher.wait(10)
    assert sorted(backend.requests) == [(b.blob_id, 0, 16 * 4096), (b.blob_id, 16 * 4096, 16 * 4096)]
    assert mgr.metrics.prefetch_requests.value == 1  # one unit for the blob
    assert mgr.get_blob_cache(b.info).chunk_map.all_ready()
    n = len(backend.requests)
    assert dev.read(b.iovec(0, 32 * 4096)) == b.plain
    assert len(backend.requests) == n
    dev.close()


def test_prefetch_out_of_order_files_are_fetched_in_blob_order(tmp_path):
    b = make_blob(8, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    dev = BlobDevice([b.info], FileCacheManager(str(tmp_path), backend),
                     prefetch_config=PrefetchConfig(merging_size=1 << 20, threads_count=1))
    dev.prefetch(list(reversed(_files(b, 8))) + _files(b, 2))  # duplicates and reverse order
    assert dev.prefetcher.wait(10)
    assert backend.requests == [(b.blob_id, 0, 8 * 4096)]
    dev.close()


def test_prefetch_runs_in_parallel_bounded_by_threads_count(tmp_path):
    threads = 3
    b = make_blob(5 * threads, compressor=Compressor.NONE, compressible=False)
    barrier = threading.Barrier(threads)  # breaks (an error) unless `threads` requests meet
    lock = threading.Lock()
    inflight = [0, 0]  # now, max

    def fault(blob_id, off, size):
        with lock:
            inflight[0] += 1
            inflight[1] = max(inflight[1], inflight[0])
        try:
            barrier.wait(timeout=10)
        finally:
            with lock:
                inflight[0] -= 1
        return None

    backend = MemoryBackend({b.blob_id: b.data}, fault=fault, retry_limit=0)
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([b.info], mgr, prefetch_config=PrefetchConfig(merging_size=4096, threads_count=threads))
    dev.prefetch([b.iovec(0, len(b.plain))])
    assert dev.prefetcher.wait(30)
    assert mgr.metrics.prefetch_errors.value == 0 and not barrier.broken
    assert inflight[1] == threads  # several in flight, never more than threads_count
    assert mgr.get_blob_cache(b.info).chunk_map.all_ready()
    dev.close()


def test_high_priority_runs_go_before_queued_polite_runs(tmp_path):
    b = make_blob(16, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([b.info], mgr, prefetch_config=PrefetchConfig(merging_size=4096, threads_count=1))
    dev._demand += 1  # polite runs are held back while a demand read is in flight
    dev.prefetch(_files(b, 8))
    dev.prefetch([b.iovec(15 * 4096, 4096)], priority="high")
    cache = mgr.get_blob_cache(b.info)
    deadline = time.monotonic() + 10
    while not cache.chunk_map.is_ready(15) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not dev.prefetcher.wait(0.2)  # the polite unit is still queued
    assert cache.chunk_map.is_ready(15)
    assert [r[1] for r in backend.requests] == [15 * 4096]
    dev._demand -= 1
    assert dev.prefetcher.wait(10)
    assert cache.chunk_map.ready_count() == 9
    dev.close()


def test_cancel_drops_queued_runs_and_wait_returns(tmp_path):
    b = make_blob(64, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data}, delay=0.01)
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([b.info], mgr, prefetch_config=PrefetchConfig(merging_size=4096, threads_count=2))
    dev.prefetch([b.iovec(0, len(b.plain))])
    dev.close()
    assert dev.prefetcher.wait(5)
    done = mgr.get_blob_cache(b.info).chunk_map.ready_count()
    assert done < 64
    assert mgr.metrics.prefetch_pending.value == 0
