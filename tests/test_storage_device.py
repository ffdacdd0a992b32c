"""BlobDevice prefetch (priority, bandwidth, cancel), metrics export, torn writes."""

from __future__ import annotations

import os
import threading
import time

from storage.backend.memory import MemoryBackend
from storage.cache.filecache import FileCacheManager
from storage.device import BlobDevice
from storage.metrics import Histogram, StorageMetrics
from storage.prefetch import PrefetchConfig, Throttle
from storage.records import Compressor
from tests.storage_blobs import make_blob


def test_prefetch_config_defaults():
    assert PrefetchConfig() == PrefetchConfig(enable=True, threads_count=2, merging_size=1 << 20, bandwidth_rate=0,
                                              readahead=4 << 20, settle=1.5, start_delay=3.0,
                                              burst_cap=2.0, burst_fraction=0.1, demand_share=4)


def test_prefetch_iovecs_and_whole_blob(tmp_path):
    a = make_blob(16, seed=1)
    b = make_blob(16, seed=2, blob_index=1)
    backend = MemoryBackend({a.blob_id: a.data, b.blob_id: b.data})
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([a.info, b.info], mgr)
    dev.prefetch([a.iovec(0, 8 * 4096)])
    assert not dev.prefetch_blob(1)  # no chunk table known
    mgr.get_blob_cache(b.info).set_chunk_table(b.chunks)
    assert dev.prefetch_blob(1)
    assert dev.prefetcher.wait(10)
    assert mgr.get_blob_cache(a.info).chunk_map.ready_count() == 8
    assert dev.blob_data_path(1) and open(dev.blob_data_path(1), "rb").read() == b.plain
    n = len(backend.requests)
    assert dev.read(a.iovec(0, 8 * 4096)) == a.plain[: 8 * 4096]
    assert len(backend.requests) == n
    m = mgr.metrics
    assert m.prefetch_requests.value == 2 and m.prefetch_bytes.value == len(b.data) + a.chunks[8].compressed_offset
    dev.close()


def test_prefetch_bandwidth_limit(tmp_path):
    b = make_blob(8, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    dev = BlobDevice([b.info], FileCacheManager(str(tmp_path), backend),
                     prefetch_config=PrefetchConfig(merging_size=4096, bandwidth_rate=8 * 4096 * 4))
    start = time.monotonic()
    dev.prefetch([b.iovec(0, 8 * 4096)])
    assert dev.prefetcher.wait(10)
    assert time.monotonic() - start >= 0.15  # 8 × 4 KiB at 128 KiB/s ≈ 0.25 s (first is free)
    dev.close()


def test_prefetch_yields_to_demand_reads_and_cancels(tmp_path):
    b = make_blob(64, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data}, delay=0.02)
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([b.info], mgr, prefetch_config=PrefetchConfig(merging_size=4096, threads_count=2,
                                                                   settle=0, start_delay=0))
    dev.demand.begin()  # an on-demand read in flight: prefetch must wait
    dev.prefetch([b.iovec(0, 64 * 4096)])
    time.sleep(0.1)
    assert backend.requests == []
    dev.prefetch([b.iovec(63 * 4096, 4096)], priority="high")  # does not wait for demand reads
    deadline = time.monotonic() + 5
    while not mgr.get_blob_cache(b.info).chunk_map.is_ready(63) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mgr.get_blob_cache(b.info).chunk_map.is_ready(63)
    dev.demand.end()
    time.sleep(0.1)
    dev.close()  # cancel mid-way
    done = mgr.get_blob_cache(b.info).chunk_map.ready_count()
    assert 0 < done < 64
    time.sleep(0.1)
    assert mgr.get_blob_cache(b.info).chunk_map.ready_count() == done


def test_throttle_unlimited_is_free():
    t = Throttle(0)
    start = time.monotonic()
    for _ in range(1000):
        t.acquire(1 << 20, threading.Event())
    assert time.monotonic() - start < 0.5


def test_metrics_render_prometheus_text():
    m = StorageMetrics()
    m.backend_read_bytes.inc(5)
    m.backend_latency.observe(0.003)
    text = m.render()
    assert "# TYPE nydus_storage_backend_read_bytes_total counter\nnydus_storage_backend_read_bytes_total 5" in text
    assert 'nydus_storage_backend_read_latency_seconds_bucket{le="0.005"} 1' in text
    assert 'nydus_storage_backend_read_latency_seconds_bucket{le="0.0025"} 0' in text
    assert "nydus_storage_backend_read_latency_seconds_count 1" in text
    assert m.snapshot()["nydus_storage_backend_read_bytes_total"] == 5
    h = Histogram("x", "y", buckets=(1, 2))
    h.observe(5)
    assert h.render()[-3:] == ['x_bucket{le="+Inf"} 1', "x_sum 5.0", "x_count 1"]


def test_torn_write_in_data_file_is_never_served(tmp_path):
    """Garbage in the data file where no ready bit is set (a torn write) is refetched."""
    b = make_blob(4)
    backend = MemoryBackend({b.blob_id: b.data})
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([b.info], mgr)
    dev.read(b.iovec(0, 4096))
    dev.close()
    mgr.close()
    with open(tmp_path / f"{b.blob_id}.blob.data", "r+b") as f:
        f.seek(4096 + 100)
        f.write(os.urandom(2000))
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([b.info], mgr)
    assert dev.read(b.iovec(0, len(b.plain))) == b.plain


def test_read_ready_serves_only_what_is_cached(tmp_path):
    """read_ready: bytes when every chunk is local, None otherwise; never a backend request."""
    a = make_blob(8, seed=3)
    b = make_blob(4, seed=4, blob_index=1)
    backend = MemoryBackend({a.blob_id: a.data, b.blob_id: b.data})
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([a.info, b.info], mgr)
    assert dev.read_ready(a.iovec(0, 4096)) is None  # no cache opened yet: not even a file
    assert backend.requests == []
    assert dev.read(a.iovec(4096, 2 * 4096)) == a.plain[4096:3 * 4096]  # chunks 1, 2
    n = len(backend.requests)
    assert dev.read_ready(a.iovec(4096 + 10, 2 * 4096 - 20)) == a.plain[4096 + 10:3 * 4096 - 10]
    assert dev.read_ready(a.iovec(0, 2 * 4096)) is None  # chunk 0 is not cached
    assert dev.read_ready(a.iovec(2 * 4096, 2 * 4096)) is None  # chunk 3 is not cached
    mixed = a.iovec(4096, 4096)
    mixed.extend(b.iovec(0, 100))
    assert dev.read_ready(mixed) is None  # blob b not opened
    dev.read(b.iovec(0, 100))
    assert dev.read_ready(mixed) == a.plain[4096:2 * 4096] + b.plain[:100]
    assert len(backend.requests) == n + 1  # only the read() of blob b went to the backend
    hits = mgr.metrics.cache_hits.value
    assert dev.read_ready(a.iovec(4096, 4096)) is not None
    assert mgr.metrics.cache_hits.value == hits + 1
    dev.close()
    assert dev.read_ready(a.iovec(4096, 4096)) is None  # closed: the caller falls back to read()


def test_read_ready_waits_for_the_ci_table(tmp_path):
    """A blob whose chunk offsets come from a CI table not loaded yet is never read inline."""
    from storage.cache.filecache import FileBlobCache

    a = make_blob(4, seed=5)
    backend = MemoryBackend({a.blob_id: a.data})
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([a.info], mgr)
    dev.read(a.iovec(0, 4096))
    n = len(backend.requests)
    cache = mgr.get_blob_cache(a.info)
    assert isinstance(cache, FileBlobCache)
    cache._meta_state = "unloaded"
    cache._has_ci_table = lambda: True  # type: ignore[method-assign]
    assert cache.read_ready_descs(a.iovec(0, 4096)) is None
    assert dev.read_ready(a.iovec(0, 4096)) is None
    assert len(backend.requests) == n
    dev.close()


def test_read_complete_preads_complete_cache_files_only(tmp_path, monkeypatch):
    """read_complete: None until a blob's cache file is complete and checked; then its bytes with
    no chunk-map work and no backend request; open_new=False never opens a file."""
    import storage.device as device_mod

    monkeypatch.setattr(device_mod, "COMPLETE_RECHECK_SECONDS", 0.0)  # re-ask at every read
    a = make_blob(4, seed=5)
    b = make_blob(4, seed=6, blob_index=1)
    backend = MemoryBackend({a.blob_id: a.data, b.blob_id: b.data})
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([a.info, b.info], mgr, prefetch_config=PrefetchConfig(enable=False, readahead=0))
    assert dev.read_complete(a.iovec(0, 100)) is None  # nothing cached yet
    dev.read(a.iovec(0, 2 * 4096))
    assert dev.read_complete(a.iovec(0, 100)) is None  # half the blob: not complete
    dev.read(a.iovec(0, len(a.plain)))
    assert dev.read_complete(a.iovec(10, 100), open_new=False) is None  # not opened yet
    n = len(backend.requests)
    assert dev.read_complete(a.iovec(10, 3 * 4096)) == a.plain[10:10 + 3 * 4096]
    assert dev.read_complete(a.iovec(5, 50), open_new=False) == a.plain[5:55]  # now open
    mixed = a.iovec(4096, 4096)
    mixed.extend(b.iovec(0, 100))
    assert dev.read_complete(mixed) is None  # blob b is not complete
    assert len(backend.requests) == n
    assert list(dev.complete_files._fds) == [0]
    dev.close()
    assert dev.complete_files._fds == {}  # closing the device closes the files
    assert dev.read_complete(a.iovec(0, 100)) is None
