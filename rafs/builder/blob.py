"""Chunking and the data-blob writer (upstream section order, reverse-tar headers, TOC).

``ChunkStore`` is the image-wide chunk registry: the blob list (in blob-table order), each
blob's chunks by ci index, and the digest index used for de-duplication (within a layer,
across layers, and against a chunk dictionary).  ``BlobWriter`` writes one new blob::

    [chunk data][tar "image.blob"] [CI array + 4 KiB header][tar "blob.meta"]
    [chunk digests][tar "blob.digest"] [zstd bootstrap][tar "image.boot"] [TOC][tar "rafs.blob.toc"]

(tar headers only with inline meta or blob-toc; digests/TOC only with blob-toc; bootstrap only
with inline meta).  The blob id is the sha256 of every byte written.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import queue
import threading
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Callable

import zstandard

from storage.compress import ZSTD_LEVEL, compress
from storage.digest import digest as compute_digest
from storage.meta.blob_meta import BlobMeta
from storage.meta.chunk_info import BlobChunk
from storage.meta.toc import (
    ENTRY_BLOB_DIGEST,
    ENTRY_BLOB_META,
    ENTRY_BLOB_META_HEADER,
    ENTRY_BLOB_RAW,
    ENTRY_BOOTSTRAP,
    ENTRY_TOC,
    TocEntry,
    TocFlags,
    tar_header,
)
from storage.records import BlobFeatures, BlobInfo, ChunkFlags, ChunkInfo, Compressor, Digester
from rafs.builder.tree import ChunkRef, Inode
from rafs.errors import BuildError

#: blob id written into an inline bootstrap (upstream placeholder)
INLINE_BLOB_ID_PLACEHOLDER = "x" * 64
#: most blobs an image may reference (chunk index stores blob_index+1 in a byte)
MAX_BLOBS = 254
MAX_CHUNKS_PER_BLOB = 0xFF_FFFF
_PIPELINE_DEPTH = 6
#: a batch goes to the pool/writer at this many bytes or chunks
_BATCH_BYTES = 4 << 20
_BATCH_COUNT = 256


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(slots=True)
class BlobRecord:
    """One blob of the image being built: its table entry and its chunks by ci index."""

    info: BlobInfo
    chunks: list[ChunkInfo | None] = field(default_factory=list)  # None: not known (loaded)
    #: set for the blob this build writes (not for chunk-dict / parent blobs)
    new: bool = False


class ChunkStore:
    """Blob list + digest -> chunk index for de-duplication."""

    def __init__(self) -> None:
        self.blobs: list[BlobRecord] = []
        self.by_digest: dict[bytes, ChunkRef] = {}

    def add_blob(self, record: BlobRecord) -> int:
        for i, b in enumerate(self.blobs):
            if b.info.blob_id == record.info.blob_id and record.info.blob_id:
                return i
        if len(self.blobs) >= MAX_BLOBS:
            raise BuildError(f"an image can reference at most {MAX_BLOBS} blobs")
        index = len(self.blobs)
        record.info = replace(record.info, blob_index=index)
        record.chunks = [replace(c, blob_index=index) if c is not None else None for c in record.chunks]
        self.blobs.append(record)
        for c in record.chunks:
            if c is not None:
                self.by_digest.setdefault(c.digest, ChunkRef(index, c.index))
        return index

    def chunk(self, ref: ChunkRef) -> ChunkInfo:
        return self.blobs[ref.blob_index].chunks[ref.ci_index]


class BlobWriter:
    """Writes the chunk data of one new blob and its trailing sections.

    Chunks flow main thread (digest, dedup) -> compression pool -> one writer thread (write +
    sha256 of the blob), so reading, compressing and writing overlap; a bounded queue keeps
    memory at a few dozen chunks.
    """

    def __init__(self, fileobj: BinaryIO | None, *, blob_index: int, chunk_size: int,
                 compressor: Compressor, digester: Digester, threads: int = 2) -> None:
        self.f = fileobj
        self.blob_index = blob_index
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.digester = digester
        self.hash = hashlib.sha256()
        self.pos = 0
        self.uncompressed_offset = 0
        self.ci: list[BlobChunk] = []
        self.digests: list[bytes] = []
        self.chunk_infos: list[ChunkInfo] = []
        self._pool = (concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="nydus-compress")
                      if compressor != Compressor.NONE and threads > 0 else None)
        self._queue: queue.Queue = queue.Queue(maxsize=_PIPELINE_DEPTH)
        self._error: BaseException | None = None
        self._batch: list[tuple[bytes, bytes]] = []
        self._batch_size = 0
        self._thread: threading.Thread | None = threading.Thread(target=self._drain, name="nydus-blob-writer",
                                                                 daemon=True)
        self._thread.start()

    # -- raw output ---------------------------------------------------------------------------
    def _write(self, data: bytes | memoryview) -> None:
        if self.f is not None:
            self.f.write(data)
        self.hash.update(data)
        self.pos += len(data)

    def _section_end(self, name: str, size: int) -> bytes:
        hdr = tar_header(name, size)
        self._write(hdr)
        return hdr

    # -- chunks -------------------------------------------------------------------------------
    def add_chunk(self, data: bytes, chunk_digest: bytes) -> int:
        """Queue one new chunk; returns its ci index.  Offsets are final after ``close``."""
        if self._error is not None:
            raise BuildError(f"writing the blob failed: {self._error}") from self._error
        index = len(self.digests)
        if index >= MAX_CHUNKS_PER_BLOB:
            raise BuildError(f"blob has more than {MAX_CHUNKS_PER_BLOB} chunks")
        self.digests.append(chunk_digest)
        self._batch.append((data, chunk_digest))
        self._batch_size += len(data)
        if self._batch_size >= _BATCH_BYTES or len(self._batch) >= _BATCH_COUNT:
            self._submit_batch()
        return index

    def _submit_batch(self) -> None:
        """Hand the pending chunks to the pool and the writer as one unit (few thread handoffs)."""
        if not self._batch:
            return
        batch, self._batch, self._batch_size = self._batch, [], 0
        fut = (self._pool.submit(_compress_batch, self.compressor, [d for d, _ in batch])
               if self._pool is not None else None)
        self._queue.put((batch, fut))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            batch, fut = item
            try:
                packed = fut.result() if fut is not None else [d for d, _ in batch]
                for (data, chunk_digest), out in zip(batch, packed):
                    self._write_chunk(data, chunk_digest, out)
            except BaseException as exc:  # reported to the producer
                self._error = exc

    def _write_chunk(self, data: bytes, chunk_digest: bytes, packed: bytes) -> None:
        compressed = self.compressor != Compressor.NONE and len(packed) < len(data)
        if not compressed:
            packed = data
        index = len(self.ci)
        c = BlobChunk(index, self.pos, len(packed), self.uncompressed_offset, len(data),
                      1 if compressed else 0)
        self.ci.append(c)
        self.chunk_infos.append(ChunkInfo(self.blob_index, index, chunk_digest,
                                          int(ChunkFlags.COMPRESSED) if compressed else 0,
                                          c.compressed_offset, c.compressed_size,
                                          c.uncompressed_offset, c.uncompressed_size))
        self._write(packed)
        self.uncompressed_offset += round_up(len(data), 4096)

    def close(self) -> None:
        """Wait until every queued chunk is written (idempotent)."""
        if self._thread is not None:
            self._submit_batch()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._error is not None:
            raise BuildError(f"writing the blob failed: {self._error}") from self._error

    # -- trailing sections ----------------------------------------------------------------------
    def finish(self, *, inline_meta: bool, blob_toc: bool,
               make_bootstrap: Callable[[BlobInfo], bytes] | None = None) -> tuple[BlobInfo, bytes | None]:
        """Write blob meta, digests, (inline bootstrap), TOC.  Returns the final
        :class:`BlobInfo` (blob id = sha256 of the blob) and, with inline meta, the bootstrap
        bytes ``make_bootstrap`` produced (it gets the provisional BlobInfo)."""
        self.close()
        headers = inline_meta or blob_toc
        toc: list[TocEntry] = []
        features = BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC
        if inline_meta:
            features |= BlobFeatures.INLINED_FS_META
        if headers:
            features |= BlobFeatures.HAS_TAR_HEADER
        if blob_toc:
            features |= BlobFeatures.HAS_TOC
            if self.ci:
                features |= BlobFeatures.INLINED_CHUNK_DIGEST
        data_size = self.pos
        if headers:
            self._section_end(ENTRY_BLOB_RAW, data_size)
            if blob_toc:
                toc.append(TocEntry.for_section(ENTRY_BLOB_RAW, 0, data_size, self.uncompressed_offset,
                                                self.hash.copy().digest()))
        ci_offset = ci_compressed = ci_uncompressed = 0
        ci_compressor = Compressor.NONE
        if self.ci:
            ci_offset = self.pos
            meta, section = BlobMeta.build(self.ci, features=int(features), ci_compressor=self.compressor,
                                           ci_offset=ci_offset)
            h = meta.header
            ci_compressed, ci_uncompressed = h.s_ci_compressed_size, h.s_ci_uncompressed_size
            ci_compressor = Compressor(h.s_ci_compressor)
            self.blob_meta = meta
            self._write(section)
            if headers:
                self._section_end(ENTRY_BLOB_META, len(section))
            if blob_toc:
                toc.append(TocEntry.for_section(
                    ENTRY_BLOB_META, ci_offset, ci_compressed, ci_uncompressed,
                    hashlib.sha256(meta.ci_data).digest(), _toc_flags(ci_compressor)))
                toc.append(TocEntry.for_section(
                    ENTRY_BLOB_META_HEADER, ci_offset + ci_compressed, 4096, 4096,
                    hashlib.sha256(h.pack()).digest()))
                digests = b"".join(self.digests)
                off = self.pos
                self._write(digests)
                self._section_end(ENTRY_BLOB_DIGEST, len(digests))
                toc.append(TocEntry.for_section(ENTRY_BLOB_DIGEST, off, len(digests), len(digests),
                                                hashlib.sha256(digests).digest()))
        else:
            self.blob_meta = None
        info = BlobInfo(
            blob_index=self.blob_index, blob_id="", chunk_count=len(self.ci), chunk_size=self.chunk_size,
            compressor=self.compressor, digester=self.digester, features=int(features),
            compressed_size=self.pos, uncompressed_size=self.uncompressed_offset,
            ci_compressor=ci_compressor, ci_offset=ci_offset, ci_compressed_size=ci_compressed,
            ci_uncompressed_size=ci_uncompressed)
        boot = None
        if inline_meta:
            assert make_bootstrap is not None
            boot = make_bootstrap(replace(info, blob_id=INLINE_BLOB_ID_PLACEHOLDER))
            off = self.pos
            if blob_toc:
                packed = zstandard.ZstdCompressor(level=3).compress(boot)
                flags = TocFlags.COMPRESSION_ZSTD
                if len(packed) >= len(boot):
                    packed, flags = boot, TocFlags.COMPRESSION_NONE
                self._write(packed)
                self._section_end(ENTRY_BOOTSTRAP, len(packed))
                toc.append(TocEntry.for_section(ENTRY_BOOTSTRAP, off, len(packed), len(boot),
                                                hashlib.sha256(boot).digest(), flags))
            else:
                self._write(boot)
                self._section_end(ENTRY_BOOTSTRAP, len(boot))
        toc_size, toc_digest = 0, b""
        if blob_toc:
            raw = b"".join(e.pack() for e in toc)
            self._write(raw)
            hdr = self._section_end(ENTRY_TOC, len(raw))
            toc_size, toc_digest = len(raw) + len(hdr), hashlib.sha256(raw + hdr).digest()
        final = replace(info, blob_id=self.hash.hexdigest(), compressed_size=self.pos)
        if not inline_meta:
            final = replace(final, blob_toc_size=toc_size, blob_toc_digest=toc_digest)
        return final, boot


_local = threading.local()


def _compress(algo: Compressor, data: bytes) -> bytes:
    """:func:`storage.compress.compress` with one reusable zstd context per thread."""
    if algo == Compressor.ZSTD:
        cctx = getattr(_local, "zstd", None)
        if cctx is None:
            cctx = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return cctx.compress(data)
    return compress(algo, data)


def _compress_batch(algo: Compressor, chunks: list[bytes]) -> list[bytes]:
    return [_compress(algo, c) for c in chunks]


def _toc_flags(c: Compressor) -> TocFlags:
    return {Compressor.NONE: TocFlags.COMPRESSION_NONE, Compressor.ZSTD: TocFlags.COMPRESSION_ZSTD,
            Compressor.LZ4_BLOCK: TocFlags.COMPRESSION_LZ4_BLOCK}[c]


class Chunker:
    """Cuts regular files into chunks, de-duplicates them, and feeds new ones to the writer."""

    def __init__(self, store: ChunkStore, writer: BlobWriter | None, *, chunk_size: int,
                 digester: Digester, progress: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.writer = writer
        self.chunk_size = chunk_size
        self.digester = digester
        self.progress = progress
        self._zero_buf = b""
        self._zero_refs: dict[int, ChunkRef] = {}
        self.pending: dict[bytes, int] = {}   # digest -> ci index in the new blob
        self.bytes_in = 0

    def add_file(self, inode: Inode, f: BinaryIO, size: int) -> None:
        """Chunk a file read from ``f``. When ``f.data_regions`` lists the only ranges holding
        data, ``(offset, size)`` sorted (a sparse tar member), chunks wholly in a hole are not
        read: they are the zero chunk, so a sparse file costs work for its data only."""
        refs: list[ChunkRef] = []
        remaining = size
        cs = self.chunk_size
        regions = getattr(f, "data_regions", None)
        r = 0
        pos = 0
        while remaining > 0:
            want = min(cs, remaining)
            if regions is not None:
                while r < len(regions) and regions[r][0] + regions[r][1] <= pos:
                    r += 1
                if r >= len(regions) or regions[r][0] >= pos + want:  # a hole
                    refs.append(self._zero_chunk(want))
                    remaining -= want
                    pos += want
                    if self.progress is not None:
                        self.progress(want)
                    continue
                f.seek(pos)
            data = f.read(want)
            while len(data) < want:
                more = f.read(want - len(data))
                if not more:
                    raise BuildError(f"file shrank while reading (wanted {size} bytes)")
                data += more
            remaining -= want
            pos += want
            refs.append(self._zero_chunk(want) if self._is_zero(data) else self._chunk(data))
            if self.progress is not None:
                self.progress(want)
        inode.chunks = refs
        inode.size = size
        self.bytes_in += size

    def add_path(self, inode: Inode, path: str, size: int) -> None:
        """Chunk a file of the source directory (plain ``os.read`` of whole chunks)."""
        flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                fd = os.open(path, flags)
            except PermissionError:
                fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise BuildError(f"cannot read {path!r}: {exc}") from exc
        try:
            refs: list[ChunkRef] = []
            remaining = size
            cs = self.chunk_size
            while remaining > 0:
                want = min(cs, remaining)
                data = os.read(fd, want)
                while len(data) < want:
                    more = os.read(fd, want - len(data))
                    if not more:
                        raise BuildError(f"{path!r} shrank while reading (expected {size} bytes)")
                    data += more
                remaining -= want
                refs.append(self._chunk(data))
                if self.progress is not None:
                    self.progress(want)
        except OSError as exc:
            raise BuildError(f"cannot read {path!r}: {exc}") from exc
        finally:
            os.close(fd)
        inode.chunks = refs
        inode.size = size
        self.bytes_in += size

    def _is_zero(self, data: bytes) -> bool:
        if len(self._zero_buf) < len(data):
            self._zero_buf = bytes(len(data))
        return memoryview(self._zero_buf)[: len(data)] == data

    def _zero_chunk(self, size: int) -> ChunkRef:
        """The chunk of ``size`` zero bytes (hashed and stored once per build and size)."""
        ref = self._zero_refs.get(size)
        if ref is None:
            ref = self._zero_refs[size] = self._chunk(bytes(size))
        return ref

    def _chunk(self, data: bytes) -> ChunkRef:
        d = compute_digest(self.digester, data)
        ref = self.store.by_digest.get(d)
        if ref is not None:
            return ref
        assert self.writer is not None
        index = self.pending.get(d)
        if index is None:
            index = self.writer.add_chunk(data, d)
            self.pending[d] = index
        return ChunkRef(self.writer.blob_index, index)
