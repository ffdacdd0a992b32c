"""Prefetch as a stream: neighbouring files merged into one backend request, runs of one unit
fetched concurrently (bounded by ``threads_count``), high-priority runs ahead of polite ones;
read-ahead of sequential on-demand reads; CI tables loaded without a blob-size round trip."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

from storage.backend.memory import MemoryBackend
from storage.cache.base import CacheConfig
from storage.cache.filecache import FileCacheManager
from storage.device import BlobDevice
from storage.prefetch import PrefetchConfig
from storage.records import Compressor
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
    dev.demand.begin()  # polite runs are held back while a demand read is in flight
    dev.prefetch(_files(b, 8))
    dev.prefetch([b.iovec(15 * 4096, 4096)], priority="high")
    cache = mgr.get_blob_cache(b.info)
    deadline = time.monotonic() + 10
    while not cache.chunk_map.is_ready(15) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not dev.prefetcher.wait(0.2)  # the polite unit is still queued
    assert cache.chunk_map.is_ready(15)
    assert [r[1] for r in backend.requests] == [15 * 4096]
    dev.demand.end()
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


def _built_image(tmp_path, files: int = 24, size: int = 8192):
    """A real RAFS v6 image (builder): ``files`` small files laid out back to back in one blob."""
    import random

    from rafs.builder.build import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir(parents=True)
    rnd = random.Random(5)
    content = {}
    for i in range(files):
        content[f"f{i:03d}"] = rnd.randbytes(size)
        (src / f"f{i:03d}").write_bytes(content[f"f{i:03d}"])
    blobs = tmp_path / "blobs"
    blobs.mkdir(parents=True)
    res = build(str(src), bootstrap_out=str(tmp_path / "boot"), blob_dir=str(blobs),
                options=BuildOptions(chunk_size=65536, compressor=Compressor.NONE))
    return res, content, str(blobs)


def _built_blob_cache(tmp_path, backend_cls=MemoryBackend):
    """(rafs, blob, cache): the first blob of a :func:`_built_image` (with its CI table in the
    blob), behind a ``FileBlobCache`` over ``backend_cls`` holding the blob."""
    from rafs.metadata import Rafs

    res, _, blob_dir = _built_image(tmp_path)
    rafs = Rafs.open(res.bootstrap)
    blob = rafs.blobs[0]
    assert blob.ci_compressed_size > 0
    backend = backend_cls({blob.blob_id: open(os.path.join(blob_dir, blob.blob_id), "rb").read()})
    return rafs, blob, FileCacheManager(str(tmp_path / "cache"), backend).get_blob_cache(blob)


class _NoSizeBackend(MemoryBackend):
    """Refuses blob-size requests (a HEAD on registries) to prove they are not needed."""

    def _new_reader(self, blob_id):
        reader = super()._new_reader(blob_id)

        def refuse():
            raise AssertionError("blob size requested")

        reader._blob_size = refuse
        return reader


def test_ci_table_loaded_without_blob_size_request_and_preloaded(tmp_path):
    from rafs.metadata import Rafs

    res, _, blob_dir = _built_image(tmp_path)
    rafs = Rafs.open(res.bootstrap)
    blob = rafs.blobs[0]
    assert blob.ci_compressed_size > 0
    backend = _NoSizeBackend({blob.blob_id: open(os.path.join(blob_dir, blob.blob_id), "rb").read()})
    mgr = FileCacheManager(str(tmp_path / "cache"), backend)
    dev = BlobDevice(rafs.blobs, mgr)
    for t in dev.load_chunk_tables():
        t.join(10)
    assert len(backend.requests) == 1  # the CI table, before any read
    assert os.path.exists(os.path.join(str(tmp_path / "cache"), blob.blob_id + ".blob.meta"))
    dev.close()


def test_sequential_reads_trigger_read_ahead_random_ones_do_not(tmp_path):
    from rafs.metadata import Rafs

    res, content, blob_dir = _built_image(tmp_path, files=64)
    rafs = Rafs.open(res.bootstrap)
    blob = rafs.blobs[0]
    backend = MemoryBackend({blob.blob_id: open(os.path.join(blob_dir, blob.blob_id), "rb").read()})
    mgr = FileCacheManager(str(tmp_path / "cache"), backend, CacheConfig(amplify_io=0))
    window = 8 * 8192
    dev = BlobDevice(rafs.blobs, mgr, prefetch_config=PrefetchConfig(enable=False, readahead=window))
    dev.set_chunk_source(rafs.chunk_table)  # digests of the chunks read ahead
    cache = mgr.get_blob_cache(blob)

    def read(name):
        ino = rafs.lookup_path("/" + name)
        assert dev.read(ino.chunks(0, 8192)) == content[name]
        return ino.chunks(0, 8192)[0].chunk.index

    first = read("f040")
    read("f010")  # random: no read-ahead
    read("f011")  # one step to the next file: not yet a stream
    assert dev.prefetcher.wait(10)
    assert cache.chunk_map.ready_count() == 3
    idx = read("f012")  # a second step in a row: the next `window` bytes are fetched
    assert dev.prefetcher.wait(10)
    ready = [i for i in range(blob.chunk_count) if cache.chunk_map.is_ready(i)]
    assert ready == sorted({first, idx - 2, idx - 1, *range(idx, idx + 1 + window // 8192)})
    dev.close()


def test_read_ahead_window_ramps_up_and_resets_on_a_jump(tmp_path, monkeypatch):
    import storage.device as device_mod

    monkeypatch.setattr(device_mod, "READAHEAD_MIN", 2 * 4096)
    b = make_blob(128, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    mgr = FileCacheManager(str(tmp_path), backend, CacheConfig(amplify_io=0))
    dev = BlobDevice([b.info], mgr, prefetch_config=PrefetchConfig(enable=False, readahead=16 * 4096))
    cache = mgr.get_blob_cache(b.info)
    cache.set_chunk_table(b.chunks)
    ready = []

    def read(i):
        assert dev.read(b.iovec(i * 4096, 4096)) == b.plain[i * 4096 : (i + 1) * 4096]
        assert dev.prefetcher.wait(10)
        ready.append(cache.chunk_map.ready_count())

    for i in (0, 1, 2, 3, 4, 5, 100, 101):
        read(i)
    # 0→1: one step, nothing; then windows of 2, 4, 8, 16 chunks (doubling), each topped up
    # from what is still in flight; the jump to 100 starts over (101 is one step: nothing)
    assert ready == [1, 2, 5, 8, 13, 22, 23, 24]
    dev.close()


def test_read_ahead_with_a_file_map_stays_inside_the_file(tmp_path, monkeypatch):
    import storage.device as device_mod

    monkeypatch.setattr(device_mod, "READAHEAD_MIN", 2 * 4096)
    b = make_blob(32, compressor=Compressor.NONE, compressible=False)
    files = [range(0, 6), range(6, 20), range(20, 32)]  # three files laid out back to back

    def same_file(blob_index, i, j):
        assert blob_index == b.info.blob_index
        return any(i in f and j in f for f in files) and j == i + 1

    def run(file_map):
        backend = MemoryBackend({b.blob_id: b.data})
        mgr = FileCacheManager(str(tmp_path / str(file_map is None)), backend, CacheConfig(amplify_io=0))
        dev = BlobDevice([b.info], mgr, prefetch_config=PrefetchConfig(enable=False, readahead=16 * 4096))
        dev.set_file_map(file_map)
        cache = mgr.get_blob_cache(b.info)
        cache.set_chunk_table(b.chunks)
        for i in range(6):  # read the first file, chunk by chunk
            assert dev.read(b.iovec(i * 4096, 4096)) == b.plain[i * 4096 : (i + 1) * 4096]
            assert dev.prefetcher.wait(10)
        ready = {i for i in range(32) if cache.chunk_map.is_ready(i)}
        dev.close()
        return ready

    assert max(run(None)) > 6  # by the blob alone, read-ahead runs on into the next file
    assert run(same_file) == set(files[0])  # by the file map: the file read, nothing of the next
    # a stream moving into the next file starts over there (a jump), then ramps up within it
    backend = MemoryBackend({b.blob_id: b.data})
    mgr = FileCacheManager(str(tmp_path / "cross"), backend, CacheConfig(amplify_io=0))
    dev = BlobDevice([b.info], mgr, prefetch_config=PrefetchConfig(enable=False, readahead=16 * 4096))
    dev.set_file_map(same_file)
    cache = mgr.get_blob_cache(b.info)
    cache.set_chunk_table(b.chunks)
    for i in (4, 5, 6, 7):
        dev.read(b.iovec(i * 4096, 4096))
        assert dev.prefetcher.wait(10)
    assert {i for i in range(32) if cache.chunk_map.is_ready(i)} == {4, 5, 6, 7}  # 6→7: one step only
    dev.read(b.iovec(8 * 4096, 4096))
    assert dev.prefetcher.wait(10)
    assert {i for i in range(32) if cache.chunk_map.is_ready(i)} == {4, 5, 6, 7, 8, 9, 10}
    dev.close()


def test_chunk_tables_preloaded_on_the_first_read_only(tmp_path):
    from rafs.metadata import Rafs

    a, _, dir_a = _built_image(tmp_path / "a")
    b, content_b, dir_b = _built_image(tmp_path / "b", files=4)
    ra, rb = Rafs.open(a.bootstrap), Rafs.open(b.bootstrap)
    blob_a, blob_b = ra.blobs[0], rb.blobs[0]
    blob_b = dataclasses.replace(blob_b, blob_index=1)
    backend = MemoryBackend({blob_a.blob_id: open(os.path.join(dir_a, blob_a.blob_id), "rb").read(),
                             blob_b.blob_id: open(os.path.join(dir_b, blob_b.blob_id), "rb").read()})
    cache_dir = str(tmp_path / "cache")
    dev = BlobDevice([blob_a, blob_b], FileCacheManager(cache_dir, backend))
    dev.preload_on_first_read = True
    assert backend.requests == []  # nothing before a read
    ino = ra.lookup_path("/f000")
    dev.read(ino.chunks(0, 100))
    meta_b = os.path.join(cache_dir, blob_b.blob_id + ".blob.meta")
    deadline = time.monotonic() + 10
    while not os.path.exists(meta_b) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.exists(meta_b)  # the other blob's CI table, without reading from it
    assert {r[0] for r in backend.requests} == {blob_a.blob_id, blob_b.blob_id}
    dev.close()


def test_chunk_tables_loaded_by_the_owner_are_not_loaded_again_by_the_first_read(tmp_path):
    """The daemon starts the CI table loads when it mounts (``load_chunk_tables``): they come
    without a read, and the first read then starts no second round."""
    from rafs.metadata import Rafs

    res, content, blob_dir = _built_image(tmp_path)
    rafs = Rafs.open(res.bootstrap)
    blob = rafs.blobs[0]
    backend = MemoryBackend({blob.blob_id: open(os.path.join(blob_dir, blob.blob_id), "rb").read()})
    cache_dir = str(tmp_path / "cache")
    dev = BlobDevice(rafs.blobs, FileCacheManager(cache_dir, backend))
    dev.preload_on_first_read = True
    for t in dev.load_chunk_tables():
        t.join(10)
    assert os.path.exists(os.path.join(cache_dir, blob.blob_id + ".blob.meta"))
    assert dev.preload_on_first_read is False
    table_reads = len(backend.requests)
    assert table_reads >= 1  # the CI table, and nothing else yet
    assert dev.read(rafs.lookup_path("/f000").chunks(0, 100)) == content["f000"][:100]
    assert len(backend.requests) == table_reads + 1  # the data only
    dev.close()


def test_first_reads_of_a_blob_look_up_digests_one_by_one(tmp_path):
    """Scattered first reads (a program starting) neither build the blob's whole chunk list nor
    load every digest of the bootstrap's chunk table: amplification looks up the digests of the
    chunks it considers, and so does read-ahead once a stream is seen."""
    from rafs.metadata import Rafs

    res, content, blob_dir = _built_image(tmp_path, files=64)
    rafs = Rafs.open(res.bootstrap)
    blob = rafs.blobs[0]
    backend = MemoryBackend({blob.blob_id: open(os.path.join(blob_dir, blob.blob_id), "rb").read()})
    mgr = FileCacheManager(str(tmp_path / "cache"), backend, CacheConfig(amplify_io=3 * 8192))
    dev = BlobDevice(rafs.blobs, mgr, prefetch_config=PrefetchConfig(enable=False, readahead=8 * 8192))
    calls = {"source": 0, "lookup": 0}

    def source():
        calls["source"] += 1
        return rafs.chunk_table()

    def lookup(blob_index, index):
        calls["lookup"] += 1
        return rafs.chunk_info(blob_index, index)

    dev.set_chunk_source(source)
    dev.set_chunk_lookup(lookup)

    def read(name):
        ino = rafs.lookup_path("/" + name)
        assert dev.read(ino.chunks(0, 8192)) == content[name]

    read("f040")
    read("f010")
    read("f030")
    assert calls["source"] == 0 and calls["lookup"] > 0  # amplification asked for single digests
    cache = mgr.get_blob_cache(blob)
    assert cache.chunk_map.ready_count() > 3  # ... and used them: neighbours came with the reads
    before = cache.chunk_map.ready_count()
    read("f031")
    read("f032")  # a stream: read-ahead looks up the digests of the chunks it fetches, too
    assert dev.prefetcher.wait(10)
    ahead = rafs.lookup_path("/f036").chunks(0, 8192)[0].chunk.index
    assert cache.chunk_map.ready_count() > before and cache.chunk_map.is_ready(ahead)
    read("f033")
    assert calls["source"] == 0
    dev.close()


def test_read_ahead_takes_digests_chunk_by_chunk_not_every_digest_of_the_blob(tmp_path):
    """The first stream of a blob used to load every digest of the bootstrap's chunk table
    (0.04-0.11 s of GIL per blob on a 500 MB image, in the reader's path); read-ahead now takes
    offsets from the CI table and looks up the digests of the chunks it fetches, which are
    still checked."""
    from rafs.metadata import Rafs

    res, content, blob_dir = _built_image(tmp_path, files=64)
    rafs = Rafs.open(res.bootstrap)
    blob = rafs.blobs[0]
    data = bytearray(open(os.path.join(blob_dir, blob.blob_id), "rb").read())
    backend = MemoryBackend({blob.blob_id: bytes(data)})
    mgr = FileCacheManager(str(tmp_path / "cache"), backend, CacheConfig(amplify_io=0))
    window = 8 * 8192
    dev = BlobDevice(rafs.blobs, mgr, prefetch_config=PrefetchConfig(enable=False, readahead=window))
    passes = []

    def source():
        passes.append(1)
        return rafs.chunk_table()

    dev.set_chunk_source(source)
    dev.set_chunk_lookup(rafs.chunk_info)  # as the daemon sets it
    cache = mgr.get_blob_cache(blob)
    for name in ("f010", "f011", "f012"):  # a stream: the next `window` bytes are read ahead
        ino = rafs.lookup_path("/" + name)
        assert dev.read(ino.chunks(0, 8192)) == content[name]
    assert dev.prefetcher.wait(10)
    ahead = [i for i in range(blob.chunk_count) if cache.chunk_map.is_ready(i)]
    assert len(ahead) == 3 + window // 8192
    assert passes == []  # no pass over the whole chunk table
    # what was read ahead went through the digest check: a corrupt chunk there is not cached
    victim = rafs.lookup_path("/f014").chunks(0, 8192)[0].chunk
    data[victim.compressed_offset + victim.compressed_size // 2] ^= 0xFF
    mgr2 = FileCacheManager(str(tmp_path / "cache2"), MemoryBackend({blob.blob_id: bytes(data)}),
                            CacheConfig(amplify_io=0))
    dev2 = BlobDevice(rafs.blobs, mgr2, prefetch_config=PrefetchConfig(enable=False, readahead=window))
    dev2.set_chunk_source(source)
    dev2.set_chunk_lookup(rafs.chunk_info)
    for name in ("f010", "f011", "f012"):
        dev2.read(rafs.lookup_path("/" + name).chunks(0, 8192))
    assert dev2.prefetcher.wait(10)
    cache2 = mgr2.get_blob_cache(blob)
    assert cache2.chunk_map.is_ready(victim.index - 1) and not cache2.chunk_map.is_ready(victim.index)
    assert passes == []
    dev.close()
    dev2.close()
