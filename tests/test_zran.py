"""ZRAN (targz-ref) random access: the gzip checkpoint scanner and decoder (storage/zran.py) on
upstream's gzip vectors, and the cache reading ZRAN chunks from an unchanged gzip blob."""

from __future__ import annotations

import gzip
import hashlib
import random
import threading
import time
import zlib

import pytest

from storage.backend.memory import MemoryBackend
from storage.cache.base import CacheConfig
from storage.cache.filecache import FileCacheManager
from storage.cache.nocache import NoCacheManager
from storage.device import BlobDevice
from storage.errors import ChunkDigestMismatch, StorageError
from storage.meta.blob_meta import BlobMeta, load_blob_meta_file, write_blob_meta_file
from storage.prefetch import PrefetchConfig
from storage.meta.chunk_info import BlobChunk, CiFlags
from storage.records import BlobFeatures, BlobInfo, BlobIoDesc, ChunkFlags, ChunkInfo, Compressor, Digester
from storage.zran import (Checkpoint, SkippedChunk, ZranError, ZranReader, ZranStream, inflate_at, plan_contexts, scan_gzip,
                          trim_window)

ZRAN_DIR = "dragonflyoss-nydus/tests/texture/zran"
VECTORS = ["zran-single-stream.tar.gz", "zran-two-streams.tar.gz", "bgzip.tar.gz", "zran-zero-file.tar.gz"]


def _pieces(data: bytes, size: int = 7919):
    return (data[i : i + size] for i in range(0, len(data), size))


def _unaligned_gzip(plain: bytes, members: int = 2) -> bytes:
    """Several gzip members, each with many deflate blocks ending mid-byte (``Z_BLOCK`` flushes)."""
    out = []
    step = len(plain) // members + 1
    for m in range(members):
        part = plain[m * step : (m + 1) * step]
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        for i in range(0, len(part), 5000):
            out += [c.compress(part[i : i + 5000]), c.flush(zlib.Z_BLOCK)]
        out.append(c.flush())
    return b"".join(out)


def _synthetic() -> bytes:
    rng = random.Random(7)
    return _unaligned_gzip(bytes(rng.choice(b"abcdefgh ij\n") for _ in range(300_000)), members=3)


@pytest.fixture(params=VECTORS + ["synthetic"])
def gz(request, vectors_dir) -> bytes:
    if request.param == "synthetic":
        return _synthetic()
    return (vectors_dir / ZRAN_DIR / request.param).read_bytes()


def test_random_access_from_every_checkpoint(gz):
    full = gzip.decompress(gz)
    seen = []
    points = list(scan_gzip(_pieces(gz), spacing=0, on_data=seen.append))
    assert b"".join(seen) == full
    assert points and points[0].out_offset == 0
    rng = random.Random(1)
    for i, p in enumerate(points):
        assert len(p.window) <= 32768 and (p.bits or p.prev_byte == 0)
        end = points[i + 1].out_offset if i + 1 < len(points) else len(full)
        got = inflate_at(gz[p.in_offset :], bits=p.bits, prev_byte=p.prev_byte, window=p.window,
                         out_len=end - p.out_offset)
        assert got == full[p.out_offset : end]
        n = rng.randint(0, len(full) - p.out_offset)  # often across later blocks and members
        got = inflate_at(gz[p.in_offset :], bits=p.bits, prev_byte=p.prev_byte, window=p.window, out_len=n)
        assert got == full[p.out_offset : p.out_offset + n]


def test_a_stream_fed_in_pieces_inflates_like_one_call(gz):
    """Input cut anywhere (inside member trailers and headers too), output asked for in pieces."""
    full = gzip.decompress(gz)
    points = list(scan_gzip([gz], spacing=0))
    rng = random.Random(2)
    for p in points[:: max(1, len(points) // 12)]:
        s = ZranStream(in_offset=p.in_offset, bits=p.bits, prev_byte=p.prev_byte, window=p.window)
        want = len(full) - p.out_offset
        got = []
        while s.out_pos < want:
            if s.in_pos < len(gz) and rng.random() < 0.6:
                s.feed(gz[s.in_pos : s.in_pos + rng.choice([1, 7, 300, 5000])])
            ask = min(want - s.out_pos, rng.choice([0, 1, 999, 40_000]))
            piece = s.inflate(ask)
            assert len(piece) <= ask
            got.append(piece)
            if ask and not piece and s.in_pos >= len(gz):
                break
        assert b"".join(got) == full[p.out_offset :]
        s.close()


def test_unaligned_and_member_checkpoints_are_exercised(vectors_dir):
    points = list(scan_gzip([_synthetic()], spacing=0))
    assert sum(1 for p in points if p.bits) > 50  # inflatePrime really used
    assert sum(1 for p in points if not p.window) == 3  # one fresh start per member
    two = (vectors_dir / ZRAN_DIR / "zran-two-streams.tar.gz").read_bytes()
    assert sum(1 for p in scan_gzip([two], spacing=0) if not p.window) == 2


def test_spacing_limits_checkpoints():
    gz = _synthetic()
    dense = list(scan_gzip([gz], spacing=0))
    sparse = list(scan_gzip([gz], spacing=100_000))
    assert len(sparse) < len(dense) / 10
    assert all(b.out_offset - a.out_offset >= 100_000 for a, b in zip(sparse, sparse[1:]))



def test_trimmed_windows_inflate_like_the_real_ones(gz):
    """Every checkpoint's trimmed window gives the same output as its real one, to the stream's end."""
    full = gzip.decompress(gz)
    points = list(scan_gzip([gz], spacing=0))
    for p in points:
        t = trim_window(gz[p.in_offset :], p)
        assert len(t) == len(p.window)
        assert all(a in (0, b) for a, b in zip(t, p.window))  # bytes are kept or zeroed, never changed
        got = inflate_at(gz[p.in_offset :], bits=p.bits, prev_byte=p.prev_byte, window=t,
                         out_len=len(full) - p.out_offset)
        assert got == full[p.out_offset :]


def _text_gzip() -> bytes:
    """Text with long-range repeats (word soup), deflate blocks ending mid-byte."""
    rng = random.Random(11)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 12))) for _ in range(3000)]
    return _unaligned_gzip(b" ".join(rng.choice(words) for _ in range(60_000)), members=1)


def test_trimming_keeps_exactly_the_window_bytes_the_stream_copies():
    gz = _text_gzip()
    full = gzip.decompress(gz)
    points = [p for p in scan_gzip([gz], spacing=20_000) if len(p.window) == 32768]
    assert len(points) >= 5
    rng = random.Random(3)
    kept_total = 0
    for p in points[:5]:
        t = trim_window(gz[p.in_offset :], p)
        kept = [i for i, b in enumerate(t) if b]
        dropped = [i for i, (a, b) in enumerate(zip(t, p.window)) if b and not a]
        kept_total += len(kept)
        assert kept and dropped
        rest = len(full) - p.out_offset

        def out(window: bytes) -> bytes:
            return inflate_at(gz[p.in_offset :], bits=p.bits, prev_byte=p.prev_byte, window=window, out_len=rest)

        for i in rng.sample(kept, 10):  # a kept byte changed: the output changes
            w = bytearray(p.window)
            w[i] ^= 0x5A
            assert out(bytes(w)) != full[p.out_offset :], f"window byte {i} was kept but nothing copies it"
        for i in rng.sample(dropped, 10):  # a dropped byte changed: the output does not
            w = bytearray(p.window)
            w[i] ^= 0x5A
            assert out(bytes(w)) == full[p.out_offset :], f"window byte {i} was zeroed but is copied"
    assert kept_total < 5 * 32768 / 2  # most of a window is never copied (the point of trimming)



def test_trimming_follows_copies_of_copies_past_32_kib():
    """Window bytes reach output far beyond 32 KiB only through copies of earlier output: those
    are kept (found in the first 32 KiB), bytes last in reach only after 32 KiB are not."""
    rng = random.Random(5)
    window = bytes(rng.randrange(128) for _ in range(32768))
    noise = bytes(rng.randrange(128, 256) for _ in range(32_000))  # matches nothing in the window
    data = b"\xff\xfe\xfd" + window[1000:1300] + noise + window[1000:1300] + window[20000:20100]
    c = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=window)
    comp = c.compress(data) + c.flush()
    p = Checkpoint(in_offset=0, out_offset=0, bits=0, prev_byte=0, window=window)
    t = trim_window(comp, p)
    kept = {i for i, b in enumerate(t) if b}
    assert kept == {i for i in range(1000, 1300) if window[i]}  # window[20000:] is out of reach by then
    assert inflate_at(comp, bits=0, prev_byte=0, window=t, out_len=len(data)) == data


def test_bad_input_raises_zran_error(vectors_dir):
    gz = (vectors_dir / ZRAN_DIR / "bgzip.tar.gz").read_bytes()
    with pytest.raises(ZranError):
        list(scan_gzip([gz[: len(gz) // 2]], spacing=0))  # truncated
    p = [p for p in scan_gzip([gz], spacing=0) if p.bits][3]
    with pytest.raises(ZranError):  # compressed data too short for the output asked
        inflate_at(gz[p.in_offset : p.in_offset + 100], bits=p.bits, prev_byte=p.prev_byte, window=p.window,
                   out_len=1 << 20)
    assert issubclass(ZranError, StorageError)


def test_upstream_zran_blob_meta_is_consistent(vectors_dir):
    meta = load_blob_meta_file(vectors_dir / ZRAN_DIR /
                               "233c72f2b6b698c07021c4da367cfe2dff4f049efbaa885ca0ff760ea297865a.blob.meta")
    ctxs = meta.zran_contexts()
    assert meta.features & BlobFeatures.ZRAN and len(ctxs) == 21
    for c in meta.chunks:
        assert c.is_zran
        x = ctxs[c.context_index]
        assert c.context_offset + c.uncompressed_size <= x.out_len  # the chunk lies inside its context
        assert x.in_offset <= c.compressed_offset + 1
        assert c.compressed_offset + c.compressed_size <= x.in_offset + x.in_len
        assert len(meta.zran_dictionary(x)) == x.dict_size


# -- the cache reading an unchanged gzip layer ------------------------------------------------------

def _zran_image(gz: bytes, chunk: int = 40_000, spacing: int = 64 << 10, ci_in_len=None):
    """A ZRAN blob.meta for ``gz`` cut into fixed ``chunk``-sized pieces of its tar stream
    (``ci_in_len``: replaces each CI entry's compressed size, to make it fall short)."""
    full = gzip.decompress(gz)
    bounds: list[tuple[int, int]] = []
    points = list(scan_gzip([gz], spacing=spacing, boundaries=bounds))
    extents = [(o, min(chunk, len(full) - o)) for o in range(0, len(full), chunk)]
    contexts, places = plan_contexts(points, bounds, extents)
    cis, infos = [], []
    for i, ((o, n), pl) in enumerate(zip(extents, places)):
        cis.append(BlobChunk(i, pl.in_offset, pl.in_len if ci_in_len is None else ci_in_len,
                             i * ((chunk + 4095) & ~4095), n,
                             int(CiFlags.COMPRESSED | CiFlags.ZRAN), pl.context_index << 32 | pl.context_offset))
        infos.append(ChunkInfo(0, i, hashlib.sha256(full[o : o + n]).digest(), int(ChunkFlags.COMPRESSED),
                               pl.in_offset, pl.in_len, cis[-1].uncompressed_offset, n))
    features = BlobFeatures.CHUNK_INFO_V2 | BlobFeatures.ZRAN | BlobFeatures.ALIGNED
    meta, _ = BlobMeta.build(cis, features=int(features), ci_compressor=Compressor.NONE, ci_offset=0,
                             zran=contexts)
    blob_id = hashlib.sha256(gz).hexdigest()
    info = BlobInfo(0, blob_id, len(cis), chunk, Compressor.GZIP, Digester.SHA256, int(features),
                    compressed_size=len(gz), uncompressed_size=cis[-1].uncompressed_offset + chunk)
    return full, meta, info, infos, extents


@pytest.mark.parametrize("name", ["bgzip.tar.gz", "zran-two-streams.tar.gz", "synthetic"])
def test_cache_reads_zran_chunks_from_the_gzip_blob(tmp_path, vectors_dir, name):
    gz = _synthetic() if name == "synthetic" else (vectors_dir / ZRAN_DIR / name).read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz, chunk=40_000 if len(gz) > 100_000 else 3000)
    cache = tmp_path / "cache"
    cache.mkdir()
    write_blob_meta_file(str(cache / f"{info.blob_id}.blob.meta"), meta)
    reloaded = load_blob_meta_file(cache / f"{info.blob_id}.blob.meta")
    assert reloaded.zran_contexts() == meta.zran_contexts()
    backend = MemoryBackend({info.blob_id: gz})
    mgr = FileCacheManager(str(cache), backend, CacheConfig())
    dev = BlobDevice([info], mgr)
    order = list(range(len(chunks)))
    random.Random(3).shuffle(order)
    for i in order:
        (o, n), c = extents[i], chunks[i]
        assert dev.read([BlobIoDesc(info, c, 0, n)]) == full[o : o + n]
    requests = len(backend.requests)
    for i in order:  # cached like any chunk: no more traffic
        (o, n), c = extents[i], chunks[i]
        assert dev.read([BlobIoDesc(info, c, 1, n - 1)]) == full[o + 1 : o + n]
    assert len(backend.requests) == requests
    # every request was a range of the gzip blob, never all of it for a big blob
    if len(gz) > 1 << 20:
        assert max(size for _, _, size in backend.requests) < len(gz) / 4
    dev.close()


# -- live inflate streams: a later miss in a context continues where the last one stopped ---------

def _cache(tmp_path, gz, meta, info, chunks, backend=None, readahead=0):
    """A file cache over ``gz`` that knows every chunk (with its digest), as a mounted image does
    (sequential read-ahead off unless given: it would fetch in the background)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    write_blob_meta_file(str(cache / f"{info.blob_id}.blob.meta"), meta)
    backend = backend or MemoryBackend({info.blob_id: gz})
    mgr = FileCacheManager(str(cache), backend, CacheConfig())
    mgr.get_blob_cache(info).set_chunk_table(chunks)
    return backend, BlobDevice([info], mgr, prefetch_config=PrefetchConfig(readahead=readahead))


def _groups(meta) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for ci in meta.chunks:
        groups.setdefault(ci.context_index, []).append(ci.index)
    return groups


def _ranges(backend, lo=0, hi=1 << 62):
    return [(off, size) for _, off, size in backend.requests if lo <= off < hi]


def _assert_disjoint_and_contiguous(ranges):
    for (a, n), (b, _) in zip(ranges, ranges[1:]):
        assert b == a + n, ranges  # each fetch starts where the one before it ended


@pytest.mark.parametrize("name,chunk,spacing", [("bgzip.tar.gz", 40_000, 512 << 10),
                                                ("zran-two-streams.tar.gz", 700, 1 << 20),
                                                ("synthetic", 5000, 1 << 20)])
def test_later_misses_in_a_context_continue_its_stream(tmp_path, vectors_dir, name, chunk, spacing):
    gz = _synthetic() if name == "synthetic" else (vectors_dir / ZRAN_DIR / name).read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz, chunk=chunk, spacing=spacing)
    k, group = max(_groups(meta).items(), key=lambda kv: len(kv[1]))
    assert len(group) >= 8
    x = meta.zran_contexts()[k]
    backend, dev = _cache(tmp_path, gz, meta, info, chunks)

    def read(i):
        (o, n), c = extents[i], chunks[i]
        assert dev.read([BlobIoDesc(info, c, 0, n)]) == full[o : o + n]

    def ci_end(i):
        return meta.chunks[i].compressed_offset + meta.chunks[i].compressed_size

    read(group[2])  # first miss: from the checkpoint to the chunk's compressed end only
    assert _ranges(backend) == [(x.in_offset, ci_end(group[2]) - x.in_offset)]
    read(group[0])  # inflated on the way: cached
    read(group[1])
    assert len(backend.requests) == 1
    for i in group[3:]:  # each further miss fetches only the bytes after the last fetch
        read(i)
    ranges = _ranges(backend)
    assert ranges[0][0] == x.in_offset and len(ranges) >= 2
    _assert_disjoint_and_contiguous(ranges)
    assert sum(n for _, n in ranges) <= x.in_len  # the context's span, once
    for i in group:  # all cached now
        read(i)
    assert len(backend.requests) == len(ranges)
    dev.close()


def _reader(gz, meta, max_streams=16, gate=None):
    """A ZranReader over ``gz`` that logs its range reads (and waits for ``gate`` on the first)."""
    log: list[tuple[int, int]] = []
    lock = threading.Lock()

    def read(off, size):
        with lock:
            log.append((off, size))
            first = len(log) == 1
        if gate is not None and first:
            assert gate.wait(30)
        return gz[off : off + size]

    return ZranReader(meta, read, max_streams=max_streams), log


def test_a_miss_behind_the_stream_reads_from_the_checkpoint_and_keeps_the_stream(vectors_dir):
    gz = (vectors_dir / ZRAN_DIR / "bgzip.tar.gz").read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz, chunk=40_000, spacing=512 << 10)
    k, group = max(_groups(meta).items(), key=lambda kv: len(kv[1]))
    x = meta.zran_contexts()[k]
    reader, log = _reader(gz, meta)

    def get(i):
        (o, n) = extents[i]
        data = reader.read_chunks([chunks[i]])[i]
        assert bytes(data) == full[o : o + n]

    get(group[5])
    pos = reader.position(k)
    assert pos == meta.chunks[group[5]].context_offset + meta.chunks[group[5]].uncompressed_size
    get(group[2])  # behind the stream, nothing cached here: a new stream from the checkpoint
    assert log[1][0] == x.in_offset and reader.position(k) == pos  # the further stream is kept
    get(group[7])  # continues the live stream: fetches only after what the first read fetched
    assert len(log) == 3 and log[2][0] == log[0][0] + log[0][1]
    # a chunk wanted only because it comes for free is left out rather than restart the context
    got = reader.read_chunks([chunks[group[3]], chunks[group[9]]], optional={group[3]})
    assert isinstance(got[group[3]], SkippedChunk) and isinstance(got[group[3]], StorageError)
    assert bytes(got[group[9]]) == full[extents[group[9]][0] : sum(extents[group[9]])]
    assert all(off != x.in_offset for off, _ in log[3:])
    reader.close()
    assert reader.live_streams() == 0


def test_streams_over_the_limit_are_closed_least_recently_used_first(vectors_dir):
    gz = (vectors_dir / ZRAN_DIR / "bgzip.tar.gz").read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz, chunk=40_000, spacing=256 << 10)
    groups = [g for _, g in sorted(_groups(meta).items()) if len(g) >= 4]
    assert len(groups) >= 4
    ctx = [meta.chunks[g[0]].context_index for g in groups]
    xs = meta.zran_contexts()
    reader, log = _reader(gz, meta, max_streams=2)
    for g in groups[:3]:
        assert bytes(reader.read_chunks([chunks[g[1]]])[g[1]]) == full[extents[g[1]][0] : sum(extents[g[1]])]
    assert reader.live_streams() == 2
    assert reader.position(ctx[0]) is None and reader.position(ctx[1]) and reader.position(ctx[2])
    n = len(log)
    i = groups[0][2]  # the closed one starts at its checkpoint again
    assert bytes(reader.read_chunks([chunks[i]])[i]) == full[extents[i][0] : sum(extents[i])]
    assert log[n][0] == xs[ctx[0]].in_offset
    assert reader.position(ctx[1]) is None  # now the least recently used
    # a context inflated to its end keeps no stream
    last = groups[3][-1]
    assert bytes(reader.read_chunks([chunks[last]])[last]) == full[extents[last][0] : sum(extents[last])]
    assert reader.position(ctx[3]) is None
    reader.close()


def test_concurrent_misses_in_a_context_wait_for_the_one_inflating(vectors_dir):
    gz = (vectors_dir / ZRAN_DIR / "bgzip.tar.gz").read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz, chunk=40_000, spacing=512 << 10)
    k, group = max(_groups(meta).items(), key=lambda kv: len(kv[1]))
    x = meta.zran_contexts()[k]
    gate = threading.Event()
    reader, log = _reader(gz, meta, gate=gate)
    got: dict[int, bytes] = {}

    def get(i):
        got[i] = bytes(reader.read_chunks([chunks[i]])[i])

    first = threading.Thread(target=get, args=(group[6],))
    first.start()
    while not log:  # the first reader is fetching (and holds the context)
        time.sleep(0.005)
    others = [threading.Thread(target=get, args=(i,)) for i in (group[3], group[8], group[1])]
    for t in others:
        t.start()
    deadline = time.monotonic() + 10
    while len(reader._contexts[k].waiting) < 4 and time.monotonic() < deadline:  # all registered
        time.sleep(0.005)
    gate.set()
    for t in [first, *others]:
        t.join(30)
    for i in (group[6], group[3], group[8], group[1]):
        assert got[i] == full[extents[i][0] : sum(extents[i])]
    # chunks behind the first reader's end were handed over; the one past it continued the stream
    assert log[0][0] == x.in_offset and len(log) == 2 and log[1][0] == sum(log[0])
    assert reader._contexts[k].waiting == {} and reader._contexts[k].handoff == {}
    reader.close()


def test_concurrent_reads_through_the_cache_are_right(tmp_path, vectors_dir):
    gz = (vectors_dir / ZRAN_DIR / "bgzip.tar.gz").read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz, chunk=20_000, spacing=512 << 10)
    backend, dev = _cache(tmp_path, gz, meta, info, chunks, readahead=4 << 20)
    order = list(range(len(chunks)))
    random.Random(11).shuffle(order)
    errors = []

    def worker(part):
        try:
            for i in part:
                (o, n), c = extents[i], chunks[i]
                assert dev.read([BlobIoDesc(info, c, 0, n)]) == full[o : o + n]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(order[t::6],)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i in range(len(chunks)):
        (o, n), c = extents[i], chunks[i]
        assert dev.read([BlobIoDesc(info, c, 0, n)]) == full[o : o + n]
    dev.close()


def test_corrupt_data_in_a_context_raises_and_drops_its_stream(tmp_path, vectors_dir):
    gz = bytearray((vectors_dir / ZRAN_DIR / "bgzip.tar.gz").read_bytes())
    full, meta, info, chunks, extents = _zran_image(bytes(gz), chunk=40_000, spacing=512 << 10)
    k, group = max(_groups(meta).items(), key=lambda kv: len(kv[1]))
    bad_at = meta.chunks[group[-1]].compressed_offset + meta.chunks[group[-1]].compressed_size // 2
    for j in range(bad_at, bad_at + 64):
        gz[j] ^= 0x5A
    backend, dev = _cache(tmp_path, bytes(gz), meta, info, chunks)
    (o, n), c = extents[group[1]], chunks[group[1]]
    assert dev.read([BlobIoDesc(info, c, 0, n)]) == full[o : o + n]  # before the damage
    (o, n), c = extents[group[-1]], chunks[group[-1]]
    with pytest.raises(StorageError):
        dev.read([BlobIoDesc(info, c, 0, n)])
    assert dev._cache(info).zran_reader().position(k) is None  # the stream is gone
    with pytest.raises(StorageError):  # again (from the checkpoint): still an error, never data
        dev.read([BlobIoDesc(info, c, 0, n)])
    (o, n), c = extents[group[2]], chunks[group[2]]
    assert dev.read([BlobIoDesc(info, c, 0, n)]) == full[o : o + n]
    dev.close()


def test_without_a_cache_reading_on_continues_the_stream(vectors_dir):
    gz = (vectors_dir / ZRAN_DIR / "bgzip.tar.gz").read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz, chunk=40_000, spacing=512 << 10)
    backend = MemoryBackend({info.blob_id: gz})
    dev = BlobDevice([info], NoCacheManager(None, backend), prefetch_config=PrefetchConfig(readahead=0))
    # the ref blob's blob.meta is not there for a no-cache device: hand it the CI table
    dev._cache(info)._separate_meta = meta
    for i in range(len(chunks)):
        (o, n), c = extents[i], chunks[i]
        assert dev.read([BlobIoDesc(info, c, 0, n)]) == full[o : o + n]
    assert backend.bytes_requested() < len(gz) * 1.1  # not a context's span per chunk
    dev.close()


def test_a_ci_entry_whose_compressed_extent_falls_short_reads_the_rest_of_the_context(tmp_path, vectors_dir):
    gz = (vectors_dir / ZRAN_DIR / "bgzip.tar.gz").read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz, chunk=40_000, spacing=512 << 10, ci_in_len=1)
    backend, dev = _cache(tmp_path, gz, meta, info, chunks)
    order = list(range(len(chunks)))
    random.Random(5).shuffle(order)
    for i in order[:12]:
        (o, n), c = extents[i], chunks[i]
        assert dev.read([BlobIoDesc(info, c, 0, n)]) == full[o : o + n]
    xs = meta.zran_contexts()
    assert any(off + size == xs[meta.chunks[order[0]].context_index].in_offset
               + xs[meta.chunks[order[0]].context_index].in_len for _, off, size in backend.requests)
    dev.close()


def test_cache_rejects_a_zran_chunk_with_a_wrong_digest(tmp_path, vectors_dir):
    gz = (vectors_dir / ZRAN_DIR / "bgzip.tar.gz").read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz)
    cache = tmp_path / "cache"
    cache.mkdir()
    write_blob_meta_file(str(cache / f"{info.blob_id}.blob.meta"), meta)
    mgr = FileCacheManager(str(cache), MemoryBackend({info.blob_id: gz}), CacheConfig())
    dev = BlobDevice([info], mgr)
    c = chunks[5]
    bad = ChunkInfo(c.blob_index, c.index, bytes(32), c.flags, c.compressed_offset, c.compressed_size,
                    c.uncompressed_offset, c.uncompressed_size)
    with pytest.raises(ChunkDigestMismatch):
        dev.read([BlobIoDesc(info, bad, 0, 10)])
    assert dev.read([BlobIoDesc(info, c, 0, 10)]) == full[extents[5][0] : extents[5][0] + 10]
    dev.close()


def test_cache_without_zran_blob_meta_fails_clearly(tmp_path, vectors_dir):
    gz = (vectors_dir / ZRAN_DIR / "zran-two-streams.tar.gz").read_bytes()
    full, meta, info, chunks, extents = _zran_image(gz, chunk=3000)
    mgr = FileCacheManager(str(tmp_path), MemoryBackend({info.blob_id: gz}), CacheConfig())
    dev = BlobDevice([info], mgr)
    with pytest.raises(StorageError, match="blob.meta"):
        dev.read([BlobIoDesc(info, chunks[0], 0, 10)])
    dev.close()


# -- nydus-image create --type targz-ref ----------------------------------------------------------

def _tar_files(gz: bytes) -> dict[str, bytes]:
    import io
    import tarfile

    out = {}
    with tarfile.open(fileobj=io.BytesIO(gz)) as tf:
        for m in tf:
            if m.isreg():
                out["/" + m.name.strip("/").removeprefix("./")] = tf.extractfile(m).read()
    return out


@pytest.mark.parametrize("name,spacing", [("bgzip.tar.gz", 64 << 10), ("bgzip.tar.gz", 1 << 20),
                                          ("zran-two-streams.tar.gz", 0), ("zran-zero-file.tar.gz", 0),
                                          ("zran-single-stream.tar.gz", 0)])
def test_targz_ref_build_reads_every_file_from_the_gzip_layer(tmp_path, vectors_dir, name, spacing):
    import os

    from rafs import metadata
    from rafs.builder import BuildOptions, build

    src = vectors_dir / ZRAN_DIR / name
    gz = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    res = build(str(src), bootstrap_out=str(out / "boot"), blob_dir=str(out), source_type="targz-ref",
                options=BuildOptions(chunk_size=0x10000, zran_spacing=spacing))
    files = _tar_files(gz)
    cache = tmp_path / "cache"
    cache.mkdir()
    if res.blob is not None:
        assert res.blob.blob_id == hashlib.sha256(gz).hexdigest() and res.blob.has(BlobFeatures.ZRAN)
        assert sorted(os.listdir(out)) == sorted(["boot", f"{res.blob.blob_id}.blob.meta"])  # no data copied
        meta = load_blob_meta_file(res.blob_meta_path)
        assert meta.header.s_features & BlobFeatures.ZRAN and meta.zran_contexts()
        os.replace(res.blob_meta_path, cache / os.path.basename(res.blob_meta_path))
    backend = MemoryBackend({res.blob.blob_id: gz} if res.blob else {})
    mgr = FileCacheManager(str(cache), backend, CacheConfig())
    seen = {}
    with metadata.Rafs.open(str(out / "boot")) as fs:
        dev = BlobDevice(fs.blobs, mgr)
        dev.set_chunk_source(fs.chunk_table)  # as nydusd does: digests of a context's other chunks
        for path, inode in fs.walk():
            attr = inode.attr()
            if path in files:
                seen[path] = dev.read(inode.chunks(0, attr.size)) if attr.size else b""
        dev.close()
    assert seen == files
    if res.blob is not None and len(gz) > 1 << 20:
        # a context's chunks are cached together: each context is fetched about once
        assert sum(s for _, _, s in backend.requests) < 1.5 * len(gz)


def test_targz_ref_refuses_a_non_gzip_layer(tmp_path, vectors_dir):
    from rafs.builder import BuildOptions, build
    from rafs.errors import BuildError

    tar = vectors_dir / "dragonflyoss-nydus/tests/texture/tar/all-entry-type.tar"
    with pytest.raises(BuildError, match="gzip"):
        build(str(tar), bootstrap_out=str(tmp_path / "boot"), blob_dir=str(tmp_path), source_type="targz-ref",
              options=BuildOptions())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["bgzip.tar.gz", "zran-two-streams.tar.gz"])
@pytest.mark.parametrize("cached", [False, True])
def test_ref_blob_layout_merge_and_read(tmp_path, vectors_dir, name, cached):
    """Upstream's OCI-ref layout: ``create --type targz-ref --blob-inline-meta --features
    blob-toc`` writes only a ref blob (blob.meta zstd at offset 0, blob.digest, image.boot, TOC);
    merge's --blob-digests/--blob-sizes/--blob-toc-digests name it in the SEPARATE blob's entry;
    storage fetches the CI table by range from it (once: later caches reuse the cached file)."""
    import os

    import zstandard

    from rafs import metadata
    from rafs.builder import BuildOptions, build
    from rafs.builder.merge import merge
    from storage.meta.toc import ENTRY_BOOTSTRAP, extract_entry, read_toc, walk_sections

    src = vectors_dir / ZRAN_DIR / name
    gz = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    ref_path = out / "ref.blob"
    res = build(str(src), bootstrap_out=None, blob_out=str(ref_path), source_type="targz-ref",
                options=BuildOptions(chunk_size=0x10000, zran_spacing=64 << 10, blob_inline_meta=True,
                                     blob_toc=True))
    ref = ref_path.read_bytes()
    assert sorted(os.listdir(out)) == ["ref.blob"]  # nothing else: no data copied, no loose blob.meta
    info = res.blob
    assert info.blob_id == hashlib.sha256(gz).hexdigest()
    assert info.has(BlobFeatures.ZRAN) and info.has(BlobFeatures.SEPARATE)
    assert info.blob_meta_digest == hashlib.sha256(ref).digest() and info.blob_meta_size == len(ref)
    assert info.ci_offset == 0 and info.ci_compressor == Compressor.ZSTD
    # reverse tar sections in upstream's order; TOC digest = sha256(entries + tar header)
    names = [s.name for s in walk_sections(lambda o, n: ref[o:o + n], len(ref))]
    assert names == ["blob.meta", "blob.digest", "image.boot", "rafs.blob.toc"]
    entries, toc_digest = read_toc(lambda o, n: ref[o:o + n], len(ref))
    assert toc_digest == info.blob_toc_digest
    assert [e.entry_name for e in entries] == ["blob.meta", "blob.meta.header", "blob.digest", "image.boot"]
    boot = extract_entry(lambda o, n: ref[o:o + n], next(e for e in entries if e.entry_name == ENTRY_BOOTSTRAP))
    layer_boot = tmp_path / "layer.boot"
    layer_boot.write_bytes(boot)
    # the windows compress: the ref blob is much smaller than the uncompressed blob.meta
    assert info.ci_compressed_size < info.ci_uncompressed_size
    assert zstandard.ZstdDecompressor().decompress(ref[:info.ci_compressed_size],
                                                  max_output_size=info.ci_uncompressed_size)

    merged = tmp_path / "merged.boot"
    merge([str(layer_boot)], str(merged), blob_digests=[info.blob_meta_digest.hex()], blob_sizes=[len(ref)],
          blob_toc_digests=[info.blob_toc_digest.hex()])
    files = _tar_files(gz)
    cache = tmp_path / "cache"
    cache.mkdir()
    ref_id = info.blob_meta_digest.hex()
    for attempt in range(2 if cached else 1):
        backend = MemoryBackend({info.blob_id: gz, ref_id: ref})
        mgr = FileCacheManager(str(cache), backend, CacheConfig())
        seen = {}
        with metadata.Rafs.open(str(merged)) as fs:
            (b,) = fs.blobs
            assert b.blob_id == info.blob_id and b.blob_meta_id == ref_id and b.blob_meta_size == len(ref)
            assert b.blob_toc_digest == info.blob_toc_digest
            dev = BlobDevice(fs.blobs, mgr)
            dev.set_chunk_source(fs.chunk_table)
            for path, inode in fs.walk():
                attr = inode.attr()
                if path in files:
                    seen[path] = dev.read(inode.chunks(0, attr.size)) if attr.size else b""
            dev.close()
        mgr.close()
        assert seen == files
        ref_reads = [r for r in backend.requests if r[0] == ref_id]
        if attempt == 0:
            # one range read of CI data + header, nothing else of the ref blob
            assert ref_reads == [(ref_id, 0, info.ci_compressed_size + 4096)]
        else:
            assert ref_reads == []  # served from the cache dir


def test_separate_blob_without_its_ref_blob_fails_clearly(tmp_path, vectors_dir):
    from rafs.builder import BuildOptions, build

    src = vectors_dir / ZRAN_DIR / "bgzip.tar.gz"
    res = build(str(src), bootstrap_out=str(tmp_path / "boot"), blob_out=str(tmp_path / "ref"),
                source_type="targz-ref", options=BuildOptions(chunk_size=0x10000, blob_inline_meta=True))
    info = res.blob
    backend = MemoryBackend({info.blob_id: src.read_bytes()})  # the ref blob is missing
    from storage.cache.nocache import NoCacheManager

    mgr = NoCacheManager(None, backend)
    chunk = ChunkInfo(0, 0, b"", int(ChunkFlags.COMPRESSED), 0, 1, 0, 1)
    with pytest.raises(StorageError, match=info.blob_meta_digest.hex()):
        mgr.get_blob_cache(info).read_descs([BlobIoDesc(info, chunk, 0, 1)])


def _dirs_only_gzip_layer() -> bytes:
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        d = tarfile.TarInfo("etc")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        tar.addfile(tarfile.TarInfo("etc/empty"))
    return gzip.compress(raw.getvalue(), mtime=0)


@pytest.mark.parametrize("name", ["bgzip.tar.gz", "dirs-only"])
def test_converter_oci_ref_layer_is_a_ref_blob_and_merges(tmp_path, vectors_dir, name):
    """``nydusify convert --oci-ref`` per layer (rafs/convert/layer.py): the gzip layer is kept as the
    data blob and a ref blob is written (a layer without file data gets neither); the merge names
    the ref blob in the SEPARATE blob entry; ``optimize`` refuses such an image clearly."""
    from rafs import metadata
    from rafs.convert.errors import ConvertError
    from rafs.convert.layer import LayerOptions, build_ref_layer, merge_layers
    from rafs.convert.optimize import rebuild
    from storage.meta.toc import read_toc

    gz = _dirs_only_gzip_layer() if name == "dirs-only" else (vectors_dir / ZRAN_DIR / name).read_bytes()
    layer_dir = tmp_path / "layer"
    layer_dir.mkdir()
    (layer_dir / "layer.gz").write_bytes(gz)
    opts = LayerOptions(oci_ref=True, zran_spacing=256 << 10)
    out = build_ref_layer(str(layer_dir / "layer.gz"), str(layer_dir), opts)
    if name == "dirs-only":  # a directory and an empty file: bootstrap alone, nothing to push
        assert out["blob_id"] is None and out["extra"] == {"oci_ref": True}
        assert sorted(p.name for p in layer_dir.iterdir()) == ["layer.boot"]
        return
    ref = (layer_dir / "ref.blob").read_bytes()
    extra = out["extra"]
    assert out["blob_id"] == hashlib.sha256(gz).hexdigest() and out["blob"] == "layer.gz"
    assert extra["ref_digest"] == "sha256:" + hashlib.sha256(ref).hexdigest() and extra["ref_size"] == len(ref)
    assert extra["toc_digest"] == "sha256:" + read_toc(lambda o, n: ref[o:o + n], len(ref))[1].hex()

    from rafs.convert.layer import LayerResult

    res = LayerResult(key="k", source_digest="sha256:" + out["blob_id"], diff_id="", bootstrap=str(layer_dir / "layer.boot"),
                      blob_id=out["blob_id"], blob_size=len(gz), blob=str(layer_dir / "layer.gz"), extra=extra)
    merged = tmp_path / "image.boot"
    assert merge_layers([res], str(merged), opts) == [out["blob_id"]]
    with metadata.Rafs.open(str(merged)) as fs:
        (b,) = fs.blobs
        assert b.has(BlobFeatures.ZRAN) and b.has(BlobFeatures.SEPARATE)
        assert b.blob_meta_id == extra["ref_digest"][7:] and b.blob_meta_size == len(ref)
        assert b.blob_toc_digest.hex() == extra["toc_digest"][7:]
    with pytest.raises(ConvertError, match="zran"):
        rebuild(str(merged), ["/"], str(tmp_path), lambda *a: b"")
