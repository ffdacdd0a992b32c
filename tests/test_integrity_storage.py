"""Adversarial storage cases: wrong bytes from the backend, a cache changed behind the daemon's
back, a truncated cache file, a full cache disk. Rule checked everywhere: a read returns the
right bytes or raises; it never returns wrong bytes."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from storage.backend.memory import MemoryBackend
from storage.cache.base import CacheConfig
from storage.cache.filecache import FileCacheManager
from storage.device import BlobDevice
from storage.records import Compressor, Digester
from storage.errors import ChunkDigestMismatch, StorageError
from tests.storage_blobs import make_blob


def _device(work_dir, blobs, backend, **cfg):
    mgr = FileCacheManager(str(work_dir), backend, CacheConfig(**cfg))
    return mgr, BlobDevice([b.info for b in blobs], mgr)


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def test_cache_config_checks_on_fetch_by_default_and_not_every_read():
    c = CacheConfig()
    assert c.validate_digest is True and c.verify_every_read is False


@pytest.mark.parametrize("digester", [Digester.BLAKE3, Digester.SHA256])
def test_one_wrong_response_is_read_again_and_served_right(tmp_path, digester):
    b = make_blob(4, compressor=Compressor.NONE, compressible=False, digester=digester)
    flips = [2]

    def fault(blob_id, off, size):
        c = b.chunks[2]
        if flips and off <= c.compressed_offset < off + size:
            flips.pop()
            bad = bytearray(b.data[off : off + size])
            bad[c.compressed_offset - off + 7] ^= 1
            return bytes(bad)
        return None

    backend = MemoryBackend({b.blob_id: b.data}, fault=fault)
    mgr, dev = _device(tmp_path / "c", [b], backend)
    assert dev.read(b.iovec(0, 4 * 4096)) == b.plain
    assert mgr.metrics.cache_digest_mismatches.value == 1
    assert mgr.get_blob_cache(b.info).chunk_map.all_ready()
    dev.close()


def test_wrong_bytes_every_time_give_an_error_and_nothing_cached(tmp_path, caplog):
    b = make_blob(3, compressor=Compressor.NONE, compressible=False)
    bad = bytearray(b.data)
    bad[b.chunks[1].compressed_offset] ^= 0xFF
    mgr, dev = _device(tmp_path / "c", [b], MemoryBackend({b.blob_id: bytes(bad)}))
    with caplog.at_level("WARNING"), pytest.raises(ChunkDigestMismatch):
        dev.read(b.iovec(4096, 10))
    lines = [r.getMessage() for r in caplog.records if "wrong data" in r.getMessage()]
    assert len(lines) == 1 and b.blob_id in lines[0] and "chunk 1" in lines[0]
    assert not mgr.get_blob_cache(b.info).chunk_map.is_ready(1)
    dev.close()


def _fill(tmp_path, b, backend):
    mgr, dev = _device(tmp_path / "c", [b], backend)
    assert dev.read(b.iovec(0, len(b.plain))) == b.plain
    dev.close()
    mgr.close()


@pytest.mark.parametrize("compressor", [Compressor.NONE, Compressor.ZSTD])
def test_cache_changed_between_runs_is_detected_and_refetched(tmp_path, compressor):
    b = make_blob(6, compressor=compressor, compressible=compressor != Compressor.NONE)
    backend = MemoryBackend({b.blob_id: b.data})
    _fill(tmp_path, b, backend)
    _flip(str(tmp_path / "c" / (b.blob_id + ".blob.data")), b.chunks[3].uncompressed_offset + 100)
    before = len(backend.requests)
    mgr, dev = _device(tmp_path / "c", [b], backend)
    # the non-blocking path never serves an unchecked chunk
    assert dev.read_ready(b.iovec(0, len(b.plain))) is None
    assert dev.read(b.iovec(0, len(b.plain))) == b.plain
    assert mgr.metrics.cache_verify_failures.value == 1
    assert len(backend.requests) == before + 1  # chunk 3 only
    # now checked: served without the backend, also on the non-blocking path
    assert dev.read_ready(b.iovec(0, len(b.plain))) == b.plain
    assert len(backend.requests) == before + 1
    dev.close()


def test_a_write_lost_in_a_crash_is_caught_and_fetched_again(tmp_path):
    """Fetched data is not synced before its ready bit (the default): a crash can leave a bit
    over a chunk whose bytes never reached the disk. The next process serves the right bytes."""
    b = make_blob(5, compressor=Compressor.ZSTD, compressible=True)
    backend = MemoryBackend({b.blob_id: b.data})
    _fill(tmp_path, b, backend)
    lost = b.chunks[2]
    with open(tmp_path / "c" / (b.blob_id + ".blob.data"), "r+b") as f:
        f.seek(lost.uncompressed_offset)
        f.write(bytes(lost.uncompressed_size))  # what a lost write leaves: a hole
    before = len(backend.requests)
    mgr, dev = _device(tmp_path / "c", [b], backend)
    assert mgr.get_blob_cache(b.info).chunk_map.all_ready()  # the bits survived the "crash"
    assert dev.read(b.iovec(0, len(b.plain))) == b.plain
    assert mgr.metrics.cache_verify_failures.value == 1
    assert len(backend.requests) == before + 1  # chunk 2 only
    dev.close()


@pytest.mark.parametrize(("cfg", "synced"), [
    ({}, False),                                           # checked on reuse: no flush per fetch
    ({"sync_data": True}, True),
    ({"validate_digest": False}, True),                    # reused unchecked: the bit must not lie
    ({"validate_digest": False, "verify_every_read": True}, False),
])
def test_fetched_data_is_synced_only_where_reuse_goes_unchecked(tmp_path, monkeypatch, cfg, synced):
    b = make_blob(3, compressor=Compressor.NONE, compressible=False)
    mgr, dev = _device(tmp_path / "c", [b], MemoryBackend({b.blob_id: b.data}), **cfg)
    cache = mgr.get_blob_cache(b.info)
    data_fd = cache._fd
    calls = []
    real = os.fdatasync

    def fdatasync(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert dev.read(b.iovec(0, len(b.plain))) == b.plain
    assert cache.syncs_data is synced
    assert (data_fd in calls) is synced
    dev.close()


def test_complete_file_is_checked_before_it_is_handed_out(tmp_path):
    b = make_blob(5, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    _fill(tmp_path, b, backend)
    _flip(str(tmp_path / "c" / (b.blob_id + ".blob.data")), b.chunks[4].uncompressed_offset)
    mgr, dev = _device(tmp_path / "c", [b], backend)
    dev.set_chunk_source(lambda: iter(b.chunks))  # the bootstrap's chunk table
    assert dev.blob_data_path(0) is None  # complete but not yet checked by this process
    assert dev.blob_data_path(0, verify=True) is None  # checked: chunk 4 is wrong, reset
    cache = mgr.get_blob_cache(b.info)
    assert not cache.chunk_map.is_ready(4) and cache.chunk_map.ready_count() == 4
    assert dev.read(b.iovec(0, len(b.plain))) == b.plain
    path = dev.blob_data_path(0, verify=True)
    assert path and open(path, "rb").read() == b.plain
    dev.close()


def test_truncated_cache_file_resets_ready_bits(tmp_path):
    b = make_blob(4, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    _fill(tmp_path, b, backend)
    os.truncate(str(tmp_path / "c" / (b.blob_id + ".blob.data")), 4096 + 10)
    mgr, dev = _device(tmp_path / "c", [b], backend)
    cache = mgr.get_blob_cache(b.info)
    assert cache.chunk_map.ready_count() == 0
    assert mgr.metrics.cache_corrupt_resets.value == 1
    assert dev.read(b.iovec(0, len(b.plain))) == b.plain
    dev.close()


def test_verify_every_read_catches_a_change_while_open(tmp_path):
    b = make_blob(3, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    mgr, dev = _device(tmp_path / "c", [b], backend, verify_every_read=True)
    assert dev.read(b.iovec(0, len(b.plain))) == b.plain
    _flip(str(tmp_path / "c" / (b.blob_id + ".blob.data")), 5)
    assert dev.read_ready(b.iovec(0, 100)) is None  # every read goes through the checking path
    assert dev.read(b.iovec(0, 100)) == b.plain[:100]
    assert mgr.metrics.cache_verify_failures.value == 1
    assert dev.blob_data_path(0) is None  # no bypass of per-read checks
    dev.close()


def test_amplification_and_whole_blob_prefetch_only_take_chunks_with_known_digests(tmp_path):
    b = make_blob(8, compressor=Compressor.NONE, compressible=False)
    bad = bytearray(b.data)
    bad[b.chunks[5].compressed_offset] ^= 1
    backend = MemoryBackend({b.blob_id: bytes(bad)})
    mgr, dev = _device(tmp_path / "c", [b], backend, amplify_io=1 << 20)
    cache = mgr.get_blob_cache(b.info)
    # a chunk table without digests (like a CI table): nothing may enter the cache unchecked
    from storage.records import ChunkInfo

    cache.set_chunk_table([ChunkInfo(c.blob_index, c.index, b"", c.flags, c.compressed_offset, c.compressed_size,
                                     c.uncompressed_offset, c.uncompressed_size) for c in b.chunks])
    assert dev.read(b.iovec(0, 10)) == b.plain[:10]
    assert cache.chunk_map.ready_count() == 1
    assert dev.prefetch_blob(0) is True and dev.prefetcher.wait(10)
    assert cache.chunk_map.ready_count() == 1
    # with the bootstrap's digests: amplification runs, and the wrong chunk 5 is refused
    dev.set_chunk_source(lambda: iter(b.chunks))
    cache.chunk_source = lambda: iter(b.chunks)
    assert dev.read(b.iovec(4096, 10)) == b.plain[4096:4106]
    assert [cache.chunk_map.is_ready(i) for i in range(8)] == [True] * 5 + [False] + [True] * 2
    with pytest.raises(ChunkDigestMismatch):
        dev.read(b.iovec(5 * 4096, 10))
    dev.close()


@contextlib.contextmanager
def _tiny_tmpfs(path, size: str):
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_cache_disk_serves_reads_uncached(tmp_path):
    b = make_blob(64, chunk_size=64 << 10, compressor=Compressor.NONE, compressible=False)  # 4 MiB
    backend = MemoryBackend({b.blob_id: b.data})
    with _tiny_tmpfs(str(tmp_path / "small"), "1m") as work:
        mgr, dev = _device(work, [b], backend, merging_size=64 << 10)
        try:
            assert dev.read(b.iovec(0, len(b.plain))) == b.plain  # 4 MiB through a 1 MiB disk
            cache = mgr.get_blob_cache(b.info)
            assert mgr.metrics.cache_write_failures.value > 0
            assert 0 < cache.chunk_map.ready_count() < 64
            # again: the cached part from disk, the rest from the backend, all right
            assert dev.read(b.iovec(0, len(b.plain))) == b.plain
        finally:
            dev.close()
            mgr.close()


def test_no_cache_mode_rereads_wrong_data_too(tmp_path):
    from storage.cache.nocache import NoCacheManager

    b = make_blob(2, compressor=Compressor.NONE, compressible=False)
    calls = []

    def fault(blob_id, off, size):
        calls.append(off)
        if len(calls) == 1:
            return bytes(size)
        return None

    mgr = NoCacheManager(None, MemoryBackend({b.blob_id: b.data}, fault=fault))
    dev = BlobDevice([b.info], mgr)
    assert dev.read(b.iovec(0, 8192)) == b.plain
    with pytest.raises(StorageError):
        mgr.backend.fault = lambda *a: b"\0" * a[2]
        dev.read(b.iovec(0, 8192))
    dev.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_cache_disk_already_full_serves_reads_uncached(tmp_path):
    b = make_blob(4, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    with _tiny_tmpfs(str(tmp_path / "small"), "256k") as work:
        fd = os.open(os.path.join(work, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while os.write(fd, bytes(4096)):
                pass
        os.close(fd)
        mgr, dev = _device(work, [b], backend)
        try:
            assert dev.read(b.iovec(0, len(b.plain))) == b.plain
            assert mgr.metrics.cache_write_failures.value >= 1
        finally:
            dev.close()
            mgr.close()


def test_complete_file_with_unknown_digests_is_not_handed_out(tmp_path):
    from storage.records import ChunkInfo

    b = make_blob(3, compressor=Compressor.NONE, compressible=False)
    backend = MemoryBackend({b.blob_id: b.data})
    _fill(tmp_path, b, backend)
    mgr, dev = _device(tmp_path / "c", [b], backend)
    cache = mgr.get_blob_cache(b.info)
    cache.set_chunk_table([ChunkInfo(c.blob_index, c.index, b"", c.flags, c.compressed_offset, c.compressed_size,
                                     c.uncompressed_offset, c.uncompressed_size) for c in b.chunks])
    assert dev.blob_data_path(0, verify=True) is None  # nothing to check against: not trusted
    assert dev.read(b.iovec(0, len(b.plain))) == b.plain  # reads bring the digests and check
    assert dev.blob_data_path(0, verify=True) is not None
    dev.close()
