"""File cache, chunk map and no-cache mode over the MemoryBackend."""

from __future__ import annotations

import os
import threading

import pytest

from storage.backend.memory import MemoryBackend
from storage.cache.base import CacheConfig, merge_runs
from storage.cache import filecache
from storage.cache.filecache import (
    BLOB_FILE_SUFFIXES,
    FileCacheManager,
    blob_usage,
    cache_blob_id,
    cached_blob_ids,
    gc_cache_dir,
)
from storage.cache.nocache import NoCacheManager
from storage.cache.state import (
    CHUNK_MAP_ALL_READY,
    CHUNK_MAP_HEADER_SIZE,
    ChunkMapHeader,
    ChunkState,
    IndexedChunkMap,
    NoopChunkMap,
)
from storage.device import BlobDevice
from storage.errors import BackendError, CacheError, ChunkDigestMismatch, TransientBackendError
from storage.records import BlobIoDesc, BlobIoVec, Compressor, Digester
from tests.storage_blobs import blob_held_by_another_process, make_blob


def test_cache_config_defaults():
    c = CacheConfig()
    assert (c.validate_digest, c.merging_size, c.amplify_io, c.limit_size, c.sync_data, c.fetch_threads) == (
        True, 1 << 20, 0, 0, False, 4)


def test_chunk_map_header_size():
    assert len(ChunkMapHeader) == CHUNK_MAP_HEADER_SIZE == 4096


def test_indexed_chunk_map_persists_msb_first(tmp_path):
    path = str(tmp_path / "b.chunk_map")
    m = IndexedChunkMap(path, 10)
    assert os.path.getsize(path) == 4096 + 2
    assert not m.check_ready_and_mark_pending(0)
    m.set_ready_and_clear_pending([0])
    assert m.try_mark_pending(9) is ChunkState.OWNED
    m.set_ready_and_clear_pending([9])
    m.close()
    raw = open(path, "rb").read()
    assert raw[4096:] == bytes([0x80, 0x40])
    m2 = IndexedChunkMap(path, 10)
    assert m2.is_ready(0) and m2.is_ready(9) and not m2.is_ready(1)
    assert m2.ready_count() == 2 and not m2.all_ready()
    m2.set_ready_and_clear_pending(range(10))
    assert m2.all_ready()
    m2.close()
    assert ChunkMapHeader.parse(open(path, "rb").read()).all_ready == CHUNK_MAP_ALL_READY
    assert IndexedChunkMap(path, 10).all_ready()


def test_chunk_map_corruption_detected(tmp_path):
    path = str(tmp_path / "b.chunk_map")
    IndexedChunkMap(path, 100).close()
    with pytest.raises(CacheError, match="size"):
        IndexedChunkMap(path, 200)
    data = bytearray(open(path, "rb").read())
    data[0] ^= 0xFF
    open(path, "wb").write(data)
    with pytest.raises(CacheError, match="magic"):
        IndexedChunkMap(path, 100)
    # an all-zero file (crash while creating) starts fresh
    open(path, "wb").write(bytes(len(data)))
    assert IndexedChunkMap(path, 100).ready_count() == 0
    # all_ready set without all bits: corrupt
    hdr = ChunkMapHeader.parse(open(path, "rb").read()).replace(all_ready=CHUNK_MAP_ALL_READY)
    with open(path, "r+b") as f:
        f.write(hdr.pack())
    with pytest.raises(CacheError, match="all_ready"):
        IndexedChunkMap(path, 100)


def test_pending_contract_waits_for_owner():
    m = NoopChunkMap(4)
    assert m.try_mark_pending(1) is ChunkState.OWNED
    assert m.try_mark_pending(1) is ChunkState.INFLIGHT
    done = []

    def waiter():
        done.append(m.check_ready_and_mark_pending(1))

    t = threading.Thread(target=waiter)
    t.start()
    t.join(0.1)
    assert t.is_alive()  # blocked on the owner
    m.clear_pending([1])
    t.join(2)
    assert done == [False]  # the waiter became the owner


def test_merge_runs_contiguous_and_capped():
    b = make_blob(8, compressor=Compressor.NONE, compressible=False)
    runs = merge_runs([b.chunks[i] for i in (5, 0, 1, 2, 6, 4)], merging_size=3 * 4096)
    # runs in the order their first chunk was asked for (a prefetch list in access order)
    assert [[c.index for c in r] for r in runs] == [[4, 5, 6], [0, 1, 2]]
    runs = merge_runs([b.chunks[i] for i in (0, 1, 2, 4, 5, 6)], merging_size=3 * 4096)
    assert [[c.index for c in r] for r in runs] == [[0, 1, 2], [4, 5, 6]]
    runs = merge_runs([b.chunks[i] for i in (7, 3, 7, 1, 0)], merging_size=8 * 4096)
    assert [[c.index for c in r] for r in runs] == [[7], [3], [0, 1]]
    runs = merge_runs(b.chunks, merging_size=2 * 4096)
    assert [len(r) for r in runs] == [2, 2, 2, 2]


def _device(tmp_path, blobs, backend, **cfg):
    mgr = FileCacheManager(str(tmp_path / "cache"), backend, CacheConfig(**cfg))
    return mgr, BlobDevice([b.info for b in blobs], mgr)


def test_read_merges_adjacent_chunks_into_one_request(tmp_path):
    b = make_blob(16)
    backend = MemoryBackend({b.blob_id: b.data})
    mgr, dev = _device(tmp_path, [b], backend)
    assert dev.read(b.iovec(100, 5 * 4096)) == b.plain[100 : 100 + 5 * 4096]
    assert len(backend.requests) == 1  # chunks 0..5 in one range
    assert backend.requests[0] == (b.blob_id, 0, b.chunks[5].compressed_offset + b.chunks[5].compressed_size)
    # cached: no more backend traffic
    assert dev.read(b.iovec(0, 4096 * 6)) == b.plain[: 4096 * 6]
    assert len(backend.requests) == 1
    assert mgr.metrics.cache_hits.value >= 6
    dev.close()


def test_merging_size_limits_requests(tmp_path):
    b = make_blob(8, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    _, dev = _device(tmp_path, [b], backend, merging_size=2 * 4096)
    assert dev.read(b.iovec(0, 8 * 4096)) == b.plain
    assert [s for _, _, s in backend.requests] == [8192] * 4


def test_read_amplification_with_chunk_table(tmp_path):
    b = make_blob(8, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    mgr, dev = _device(tmp_path, [b], backend, amplify_io=4 * 4096)
    mgr.get_blob_cache(b.info).set_chunk_table(b.chunks)
    assert dev.read(b.iovec(0, 10)) == b.plain[:10]
    assert backend.requests == [(b.blob_id, 0, 4 * 4096)]
    assert dev.read(b.iovec(3 * 4096, 4096)) == b.plain[3 * 4096 : 4 * 4096]
    assert len(backend.requests) == 1


def test_concurrent_readers_fetch_each_chunk_once(tmp_path):
    b = make_blob(64)
    backend = MemoryBackend({b.blob_id: b.data}, delay=0.01)
    _, dev = _device(tmp_path, [b], backend, merging_size=4 * 4096)
    errors = []

    def reader(k):
        try:
            for j in range(4):
                off = ((k * 7 + j * 13) % 60) * 4096 + 123
                assert dev.read(b.iovec(off, 3 * 4096)) == b.plain[off : off + 3 * 4096]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    fetched = []
    for _, off, size in backend.requests:
        fetched += [c.index for c in b.chunks if off <= c.compressed_offset < off + size]
    assert len(fetched) == len(set(fetched)), "a chunk was fetched twice"


def test_digest_mismatch_is_an_error_never_cached(tmp_path):
    b = make_blob(4, compressor=Compressor.NONE, compressible=False)
    bad = bytearray(b.data)
    bad[b.chunks[2].compressed_offset + 5] ^= 1
    backend = MemoryBackend({b.blob_id: bytes(bad)})
    mgr, dev = _device(tmp_path, [b], backend)
    with pytest.raises(ChunkDigestMismatch) as ei:
        dev.read(b.iovec(0, 4 * 4096))
    err = ei.value
    assert (err.blob_id, err.chunk_index, err.expected) == (b.blob_id, 2, b.chunks[2].digest)
    assert err.actual != err.expected
    cache = mgr.get_blob_cache(b.info)
    assert [cache.chunk_map.is_ready(i) for i in range(4)] == [True, True, False, True]
    # the wrong chunk was read once more (the next source; here the same one): both counted
    assert mgr.metrics.cache_digest_mismatches.value == 2
    c2 = b.chunks[2]
    assert backend.requests[-1][1:] == (c2.compressed_offset, c2.compressed_size)
    # the backend heals: the chunk is fetched again and served correctly
    backend.blobs[b.blob_id] = b.data
    assert dev.read(b.iovec(0, 4 * 4096)) == b.plain


def test_digest_validation_can_be_disabled(tmp_path):
    b = make_blob(2, compressor=Compressor.NONE, compressible=False)
    bad = bytearray(b.data)
    bad[10] ^= 1
    _, dev = _device(tmp_path, [b], MemoryBackend({b.blob_id: bytes(bad)}), validate_digest=False)
    assert dev.read(b.iovec(0, 20))[10] != b.plain[10]


def test_backend_error_releases_pending_chunks(tmp_path):
    b = make_blob(4)
    fail = {"n": 10}

    def fault(blob_id, off, size):
        if fail["n"]:
            fail["n"] -= 1
            raise TransientBackendError("injected")
        return None

    backend = MemoryBackend({b.blob_id: b.data}, fault=fault, retry_limit=1)
    mgr, dev = _device(tmp_path, [b], backend)
    with pytest.raises(BackendError):
        dev.read(b.iovec(0, 4096))
    cache = mgr.get_blob_cache(b.info)
    assert cache.chunk_map.try_mark_pending(0) is ChunkState.OWNED  # not left pending
    cache.chunk_map.clear_pending([0])
    fail["n"] = 1  # one failure, then a successful retry
    assert dev.read(b.iovec(0, 4096)) == b.plain[:4096]
    assert mgr.metrics.backend_retries.value >= 1


def test_restart_reuses_cache_and_resets_corrupt_map(tmp_path):
    b = make_blob(8, digester=Digester.SHA256, compressor=Compressor.LZ4_BLOCK)
    backend = MemoryBackend({b.blob_id: b.data})
    mgr, dev = _device(tmp_path, [b], backend)
    dev.read(b.iovec(0, 3 * 4096))
    dev.close()
    mgr.close()
    backend.requests.clear()
    mgr2, dev2 = _device(tmp_path, [b], backend)
    assert dev2.read(b.iovec(0, 3 * 4096)) == b.plain[: 3 * 4096]
    assert backend.requests == []
    dev2.close()
    mgr2.close()
    with open(tmp_path / "cache" / f"{b.blob_id}.chunk_map", "ab") as f:
        f.write(b"junk")
    mgr3, dev3 = _device(tmp_path, [b], backend)
    assert dev3.read(b.iovec(0, 3 * 4096)) == b.plain[: 3 * 4096]
    assert backend.requests and mgr3.metrics.cache_corrupt_resets.value == 1


def test_blob_data_path_when_complete(tmp_path):
    b = make_blob(4)
    _, dev = _device(tmp_path, [b], MemoryBackend({b.blob_id: b.data}))
    assert dev.blob_data_path(0) is None
    dev.read(b.iovec(0, len(b.plain)))
    path = dev.blob_data_path(0)
    assert path and open(path, "rb").read() == b.plain


def test_gc_and_lru_eviction(tmp_path):
    blobs = [make_blob(8, seed=i, compressible=False, compressor=Compressor.NONE) for i in range(3)]
    backend = MemoryBackend({b.blob_id: b.data for b in blobs})
    mgr = FileCacheManager(str(tmp_path / "c"), backend, CacheConfig(limit_size=2 * 8 * 4096 + 3 * 8192))
    for b in blobs[:2]:
        dev = BlobDevice([b.info], mgr)
        dev.read(b.iovec(0, len(b.plain)))
        dev.close()
    assert set(mgr.usage()) == {blobs[0].blob_id, blobs[1].blob_id}
    dev = BlobDevice([blobs[2].info], mgr)
    dev.read(blobs[2].iovec(0, len(blobs[2].plain)))
    mgr.enforce_limit()  # (may already have happened automatically after the fetch)
    assert set(mgr.usage()) == {blobs[1].blob_id, blobs[2].blob_id}  # oldest not-in-use blob went
    assert mgr.metrics.cache_evictions.value == 1
    assert mgr.gc([blobs[1].blob_id]) == []  # blob 2 is open, blob 1 in use by an image
    dev.close()
    assert mgr.gc([blobs[1].blob_id]) == [blobs[2].blob_id]
    assert set(mgr.usage()) == {blobs[1].blob_id}


def test_size_limit_enforced_while_reading(tmp_path):
    blobs = [make_blob(8, seed=10 + i, compressible=False, compressor=Compressor.NONE) for i in range(2)]
    backend = MemoryBackend({b.blob_id: b.data for b in blobs})
    mgr = FileCacheManager(str(tmp_path / "c"), backend, CacheConfig(limit_size=8 * 4096 + 3 * 8192))
    dev = BlobDevice([blobs[0].info], mgr)
    dev.read(blobs[0].iovec(0, len(blobs[0].plain)))
    dev.close()
    mgr._last_evict_check = 0.0
    dev = BlobDevice([blobs[1].info], mgr)
    assert dev.read(blobs[1].iovec(0, len(blobs[1].plain))) == blobs[1].plain
    assert set(mgr.usage()) == {blobs[1].blob_id}
    dev.close()


def test_multi_blob_iovec_with_holes(tmp_path):
    a = make_blob(4, seed=1, blob_index=0)
    b = make_blob(4, seed=2, blob_index=1, compressor=Compressor.LZ4_BLOCK)
    backend = MemoryBackend({a.blob_id: a.data, b.blob_id: b.data})
    for mgr in (FileCacheManager(str(tmp_path / "c"), backend), NoCacheManager(None, backend)):
        dev = BlobDevice([a.info, b.info], mgr)
        vec = BlobIoVec(a.iovec(4000, 200) + [BlobIoDesc(None, None, 0, 50)] + b.iovec(100, 5000))
        assert vec.size == 5250
        assert dev.read(vec) == a.plain[4000:4200] + bytes(50) + b.plain[100:5100]
        dev.close()


def test_nocache_reads_every_time(tmp_path):
    b = make_blob(4)
    backend = MemoryBackend({b.blob_id: b.data})
    dev = BlobDevice([b.info], NoCacheManager(None, backend))
    for _ in range(2):
        assert dev.read(b.iovec(0, 3 * 4096)) == b.plain[: 3 * 4096]
    assert len(backend.requests) == 2
    assert dev.blob_data_path(0) is None


def test_random_faults_never_yield_wrong_data(tmp_path):
    """Threads read while the backend randomly corrupts, truncates, fails: every read returns the
    right bytes or a StorageError, and no chunk is ever marked ready with wrong data."""
    import random

    from storage.errors import StorageError

    b = make_blob(64, compressor=Compressor.LZ4_BLOCK)
    rng = random.Random(11)
    lock = threading.Lock()

    def fault(blob_id, off, size):
        with lock:
            r = rng.random()
        data = b.data[off : off + size]
        if r < 0.15:
            raise TransientBackendError("reset")
        if r < 0.25:
            return data[: size // 2]
        if r < 0.4:
            bad = bytearray(data)
            bad[len(bad) // 3] ^= 0x55
            return bytes(bad)
        return None

    backend = MemoryBackend({b.blob_id: b.data}, fault=fault, retry_limit=1)
    mgr, dev = _device(tmp_path, [b], backend, merging_size=3 * 4096)
    outcomes = {"ok": 0, "err": 0}
    wrong = []

    def reader(k):
        r = random.Random(k)
        for _ in range(20):
            off = r.randrange(60) * 4096 + r.randrange(4096)
            try:
                data = dev.read(b.iovec(off, 8000))
            except StorageError:
                outcomes["err"] += 1
                continue
            outcomes["ok"] += 1
            if data != b.plain[off : off + 8000]:
                wrong.append(off)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    assert outcomes["ok"] and outcomes["err"]
    cache = mgr.get_blob_cache(b.info)
    data = open(cache.path, "rb").read()
    for c in b.chunks:
        if cache.chunk_map.is_ready(c.index):
            assert data[c.uncompressed_offset : c.uncompressed_offset + c.uncompressed_size] == \
                b.plain[c.uncompressed_offset : c.uncompressed_offset + c.uncompressed_size]


def test_unknown_chunk_count_grows_the_map(tmp_path):
    """v5 images without the extended blob table have chunk_count 0: the map grows."""
    import dataclasses

    b = make_blob(20)
    info = dataclasses.replace(b.info, chunk_count=0, uncompressed_size=0)
    backend = MemoryBackend({b.blob_id: b.data})
    mgr = FileCacheManager(str(tmp_path), backend)
    dev = BlobDevice([info], mgr)
    descs = [dataclasses.replace(d, blob=info) for d in b.iovec(17 * 4096, 3 * 4096)]
    assert dev.read(BlobIoVec(descs)) == b.plain[17 * 4096 : 20 * 4096]
    assert dev.blob_data_path(0) is None
    dev.close()
    mgr.close()
    m = IndexedChunkMap(str(tmp_path / f"{b.blob_id}.chunk_map"), 0)
    assert m.ready_indices() == [17, 18, 19] and not m.all_ready()


def test_eviction_skips_blobs_open_in_another_manager(tmp_path):
    """Two instances (or daemons) share one cache dir: a blob one of them has open is never
    evicted or GC-ed by the other (shared flock on the data file); unused blobs are."""
    blobs = [make_blob(8, seed=20 + i, compressible=False, compressor=Compressor.NONE) for i in range(3)]
    backend = MemoryBackend({b.blob_id: b.data for b in blobs})
    work = str(tmp_path / "c")
    other = FileCacheManager(work, backend)
    held = BlobDevice([blobs[0].info], other)
    held.read(blobs[0].iovec(0, len(blobs[0].plain)))  # oldest, but open in `other`
    mgr = FileCacheManager(work, backend, CacheConfig(limit_size=8 * 4096 + 3 * 8192))
    for b in blobs[1:]:
        dev = BlobDevice([b.info], mgr)
        assert dev.read(b.iovec(0, len(b.plain))) == b.plain
        dev.close()
    mgr.enforce_limit()
    assert blobs[0].blob_id in mgr.usage()  # still there: in use elsewhere
    # the held blob alone keeps the cache over the limit: every free blob goes, oldest first
    assert set(mgr.usage()) == {blobs[0].blob_id}
    assert mgr.metrics.cache_evictions.value == 2
    assert mgr.gc([]) == []  # GC also skips the held blob
    assert held.read(blobs[0].iovec(0, 4096)) == blobs[0].plain[:4096]
    held.close()
    other.close()
    assert mgr.gc([]) == [blobs[0].blob_id]
    assert mgr.usage() == {}


def test_cache_blob_id_uses_the_one_suffix_list():
    hexid = "ab" * 32
    for suffix in BLOB_FILE_SUFFIXES:
        assert cache_blob_id(hexid + suffix) == hexid
    assert cache_blob_id("b1.blob.data.chunk_map") == "b1"  # not "b1.blob.data"
    assert cache_blob_id("b1.chunk_map") == "b1"
    assert cache_blob_id("unrelated.txt") is None and cache_blob_id("short") is None


def test_gc_cache_dir_skips_a_blob_held_by_another_process(tmp_path):
    """The snapshotter's Cleanup GC (``gc_cache_dir``) honours the per-blob lock a daemon holds."""
    work = tmp_path / "c"
    work.mkdir()
    held, unused, kept = "1" * 64, "2" * 64, "3" * 64
    for blob_id in (held, unused, kept):
        for suffix in (".blob.data", ".chunk_map", ".blob.meta", ""):
            (work / (blob_id + suffix)).write_bytes(b"x" * 4096)
    (work / "notes.txt").write_text("not a cache file")
    with blob_held_by_another_process(str(work / (held + ".blob.data"))):
        assert gc_cache_dir(str(work), [kept]) == [unused]
        assert cached_blob_ids(str(work)) == {held, kept}
        assert blob_usage(str(work), held) == (4 * 4096, 4)
    assert gc_cache_dir(str(work), [kept]) == [held]
    assert sorted(os.listdir(work)) == sorted([kept + s for s in (".blob.data", ".chunk_map", ".blob.meta", "")]
                                              + ["notes.txt"])


def test_opener_racing_a_gc_gets_the_new_file(tmp_path):
    """A cache that opened a data file just before GC unlinked it reopens the new file."""
    b = make_blob(4)
    backend = MemoryBackend({b.blob_id: b.data})
    work = str(tmp_path / "c")
    mgr = FileCacheManager(work, backend)
    dev = BlobDevice([b.info], mgr)
    dev.read(b.iovec(0, 4096))
    dev.close()
    mgr.close()
    path = os.path.join(work, b.blob_id + ".blob.data")
    real_flock = filecache.fcntl.flock
    raced = []

    def flock(fd, op):  # GC runs between the opener's open() and its flock()
        if op == filecache.fcntl.LOCK_SH and not raced:
            raced.append(os.fstat(fd).st_ino)
            assert gc_cache_dir(work, []) == [b.blob_id]
        return real_flock(fd, op)

    filecache.fcntl.flock = flock
    try:
        mgr = FileCacheManager(work, backend)
        dev = BlobDevice([b.info], mgr)
        assert dev.read(b.iovec(0, 4096)) == b.plain[:4096]
    finally:
        filecache.fcntl.flock = real_flock
    assert raced and os.path.exists(path)  # without the re-check the cache would hold an unlinked file
    assert gc_cache_dir(work, []) == []  # the new file is held: not deleted
    dev.close()
    mgr.close()


def test_resolve_is_made_once_per_chunk_and_never_mixes_digests(tmp_path):
    """Every read of a ready chunk resolves it against the CI table: the answer is made once per
    chunk (the table does not change once loaded), equal to the table's entry, and a chunk that
    names another digest than the remembered one gets its own answer."""
    import dataclasses

    from tests.test_storage_prefetch import _built_blob_cache

    rafs, blob, cache = _built_blob_cache(tmp_path)
    chunk = next(c for c in rafs.chunk_table() if c.blob_index == blob.blob_index and c.digest)
    meta = cache.blob_meta()
    ci = meta.chunks[chunk.index]
    first = cache.resolve(chunk)
    assert (first.index, first.digest, first.uncompressed_offset, first.uncompressed_size,
            first.compressed_offset, first.compressed_size) == (
        chunk.index, chunk.digest, ci.uncompressed_offset, ci.uncompressed_size, ci.compressed_offset,
        ci.compressed_size)
    assert cache.resolve(chunk) is first
    assert cache.resolve(dataclasses.replace(chunk, digest=b"")) is first  # no digest: the bootstrap's
    other = cache.resolve(dataclasses.replace(chunk, digest=b"\x01" * 32))
    assert other.digest == b"\x01" * 32 and other.uncompressed_offset == first.uncompressed_offset
    assert cache.resolve(chunk) is first  # the remembered answer is not replaced
