"""``targz-ref`` builds: a RAFS v6 bootstrap whose data blob is the original gzip OCI layer.

Upstream calls these ZRAN / OCI-ref images (``nydus-image create --type targz-ref``,
``nydusify convert --oci-ref``). No data is copied: the layer is inflated once to find gzip
checkpoints (``storage.zran.scan_gzip``, one every ``spacing`` uncompressed bytes) and to read
the tar; file data is cut into chunks at their offsets in the tar stream; each chunk points at the
checkpoint before it (a ZRAN context). The result is the bootstrap plus ``<blob_id>.blob.meta``
(cache-file format: CI v2 entries with the ZRAN flag, the 40-byte contexts, their 32 KiB
windows, with the bytes nothing copies zeroed: ``storage.zran.trim_window``); the blob id is the layer's sha256, so the registry's layer blob serves the data.
Layers that are not gzip are refused (they have no checkpoints; convert them normally).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import tempfile
from typing import BinaryIO

from rafs.builder.blob import BlobRecord, Chunker, ChunkStore, round_up
from rafs.builder.source import GZIP_MAGIC, walk_tar
from rafs.builder.tree import Inode
from rafs.errors import BuildError
from storage.errors import StorageError
from storage.compress import REF_META_ZSTD_LEVEL, compress
from storage.meta.blob_meta import BlobMeta, write_blob_meta_file
from storage.meta.header import BLOB_CCT_HEADER_SIZE
from storage.meta.chunk_info import BlobChunk, CiFlags
from storage.meta.toc import (
    ENTRY_BLOB_DIGEST,
    ENTRY_BLOB_META,
    ENTRY_BLOB_META_HEADER,
    ENTRY_BOOTSTRAP,
    ENTRY_TOC,
    TocEntry,
    TocFlags,
    tar_header,
)
from storage.records import BlobFeatures, BlobInfo, ChunkFlags, ChunkInfo, Compressor, Digester
from storage.zran import plan_contexts, scan_gzip, trim_window

#: default uncompressed distance between checkpoints (upstream's contexts are ~1 MiB apart)
DEFAULT_ZRAN_SPACING = 1 << 20
#: blob features of a ZRAN blob (upstream: 4K-aligned, CI v2, ZRAN)
ZRAN_FEATURES = BlobFeatures.ALIGNED | BlobFeatures.CHUNK_INFO_V2 | BlobFeatures.ZRAN
#: the upstream-compatible layout: the blob.meta lives in a separate "ref" blob
REF_FEATURES = ZRAN_FEATURES | BlobFeatures.SEPARATE


class ZranWriter:
    """Stands in for ``BlobWriter``: records where each new chunk is in the tar stream instead of
    writing it; ``finish`` turns that into CI entries and ZRAN contexts."""

    def __init__(self, *, blob_index: int, chunk_size: int, digester: Digester) -> None:
        self.blob_index = blob_index
        self.chunk_size = chunk_size
        self.digester = digester
        self.next_offset = 0  #: tar-stream offset of the chunk ``add_chunk`` gets next
        self.extents: list[tuple[int, int]] = []
        self.digests: list[bytes] = []
        self.ci: list[BlobChunk] = []
        self.chunk_infos: list[ChunkInfo] = []
        self.blob_meta: BlobMeta | None = None
        self.meta_section = b""  #: compressed CI data + 4096-byte header, as stored in a ref blob

    def add_chunk(self, data: bytes, chunk_digest: bytes) -> int:
        self.extents.append((self.next_offset, len(data)))
        self.digests.append(chunk_digest)
        return len(self.extents) - 1

    def close(self) -> None:
        pass

    def finish(self, points, boundaries, *, blob_id: str, blob_size: int, ref_blob: bool = False) -> BlobInfo:
        try:
            contexts, places = plan_contexts(points, boundaries, self.extents)
        except StorageError as exc:
            raise BuildError(f"gzip layer {blob_id}: {exc}") from exc
        flags = int(CiFlags.COMPRESSED | CiFlags.ZRAN)
        uoff = 0
        for i, ((_, size), place, d) in enumerate(zip(self.extents, places, self.digests)):
            c = BlobChunk(i, place.in_offset, place.in_len, uoff, size, flags,
                          place.context_index << 32 | place.context_offset)
            self.ci.append(c)
            self.chunk_infos.append(ChunkInfo(self.blob_index, i, d, int(ChunkFlags.COMPRESSED),
                                              c.compressed_offset, c.compressed_size, uoff, size))
            uoff += round_up(size, 4096)
        # the ref-blob layout stores the CI table zstd-compressed at offset 0 of the ref blob
        # (upstream compresses ref-type blob.meta with zstd: the 32 KiB windows shrink ~3x; at
        # level 19 ~11 % smaller than at 3 — the windows are most of what the image adds)
        features = int(REF_FEATURES if ref_blob else ZRAN_FEATURES)
        meta, section = BlobMeta.build(self.ci, features=features,
                                       ci_compressor=Compressor.ZSTD if ref_blob else Compressor.NONE,
                                       ci_offset=0, zran=contexts, zstd_level=REF_META_ZSTD_LEVEL)
        self.blob_meta = meta
        self.meta_section = section
        h = meta.header
        return BlobInfo(blob_index=self.blob_index, blob_id=blob_id, chunk_count=len(self.ci),
                        chunk_size=self.chunk_size, compressor=Compressor.GZIP, digester=self.digester,
                        features=features, compressed_size=blob_size, uncompressed_size=uoff,
                        ci_compressor=Compressor(h.s_ci_compressor), ci_offset=0,
                        ci_compressed_size=h.s_ci_compressed_size, ci_uncompressed_size=h.s_ci_uncompressed_size)


class ZranChunker(Chunker):
    """Cuts files like :class:`Chunker`, telling the writer each chunk's tar-stream offset."""

    writer: ZranWriter

    def add_file_at(self, inode: Inode, f: BinaryIO, size: int, offset: int) -> None:
        refs = []
        done = 0
        while done < size:
            want = min(self.chunk_size, size - done)
            data = f.read(want)
            while len(data) < want:
                more = f.read(want - len(data))
                if not more:
                    raise BuildError(f"tar member shrank while reading (wanted {size} bytes)")
                data += more
            self.writer.next_offset = offset + done
            refs.append(self._chunk(data))
            done += want
            if self.progress is not None:
                self.progress(want)
        inode.chunks = refs
        inode.size = size
        self.bytes_in += size


def inflate_layer(path: str, tar_out: BinaryIO, spacing: int):
    """Inflate the gzip layer at ``path`` into ``tar_out``; returns (checkpoints, boundaries,
    sha256 hex of the layer, its size). Refuses a layer that is not gzip."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise BuildError(f"cannot open {path!r}: {exc}") from exc
    with f:
        if f.read(2) != GZIP_MAGIC:
            raise BuildError(f"{path}: targz-ref needs a gzip layer (zstd or uncompressed layers have no "
                             f"gzip checkpoints; build them with --type tar-rafs)")
        f.seek(0)
        h = hashlib.sha256()
        size = 0

        def pieces():
            nonlocal size
            while piece := f.read(1 << 20):
                h.update(piece)
                size += len(piece)
                yield piece

        boundaries: list[tuple[int, int]] = []
        try:
            points = list(scan_gzip(pieces(), spacing=spacing, on_data=tar_out.write, boundaries=boundaries))
            # windows keep only the bytes the stream after them copies (the rest zeroed): the
            # blob.meta shrinks ~5x, readers get identical output
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    points = [dataclasses.replace(p, window=trim_window(view[p.in_offset :], p)) for p in points]
                finally:
                    view.release()
        except StorageError as exc:
            raise BuildError(f"{path}: bad gzip layer: {exc}") from exc
    return points, boundaries, h.hexdigest(), size


def build_zran_tree(path: str, store: ChunkStore, *, chunk_size: int, digester: Digester, spacing: int,
                    work_dir: str, progress=None, limits=None, ref_blob: bool = False):
    """Index the gzip layer at ``path``: returns (tree, BlobInfo or None when the layer has no
    file data, the ZranWriter, bytes of file data)."""
    fd, tmp = tempfile.mkstemp(dir=work_dir, prefix=".tmp-zran-tar.")
    try:
        with os.fdopen(fd, "w+b") as tar:
            points, boundaries, blob_id, size = inflate_layer(path, tar, spacing)
            tar.seek(0)
            writer = ZranWriter(blob_index=len(store.blobs), chunk_size=chunk_size, digester=digester)
            chunker = ZranChunker(store, writer, chunk_size=chunk_size, digester=digester,  # type: ignore[arg-type]
                                  progress=progress)
            tree = walk_tar(tar, chunker.add_file_at, limits, with_offsets=True)  # type: ignore[arg-type]
    finally:
        os.unlink(tmp)
    info = (writer.finish(points, boundaries, blob_id=blob_id, blob_size=size, ref_blob=ref_blob)
            if writer.extents else None)
    if info is not None:
        store.blobs.append(BlobRecord(info, list(writer.chunk_infos), new=True))
    return tree, info, writer, chunker.bytes_in


def write_zran_blob_meta(writer: ZranWriter, out: str) -> None:
    """``<blob_id>.blob.meta`` in cache-file format (temp + rename)."""
    assert writer.blob_meta is not None
    write_blob_meta_file(out, writer.blob_meta)


def encode_ref_blob(writer: ZranWriter, bootstrap: bytes) -> tuple[bytes, bytes, int]:
    """Upstream's OCI-ref "ref" blob (``nydus-image create --type targz-ref --blob-inline-meta
    --features blob-toc``): a reverse tar of ``blob.meta`` (zstd CI data with the ZRAN contexts and
    windows, then the 4096-byte header; CI at offset 0), ``blob.digest`` (the chunk digests),
    ``image.boot`` (zstd) and the TOC. Returns ``(blob, toc_digest, toc_size)``: sha256 and size
    of the TOC entries + their tar header, what merge's ``--blob-toc-digests``/``-sizes`` take."""
    assert writer.blob_meta is not None and writer.meta_section
    meta, section = writer.blob_meta, writer.meta_section
    h = meta.header
    out = bytearray()
    toc: list[TocEntry] = []

    def put(name: str, data: bytes) -> int:
        off = len(out)
        out.extend(data)
        out.extend(tar_header(name, len(data)))
        return off

    put(ENTRY_BLOB_META, section)
    flags = TocFlags.COMPRESSION_ZSTD if h.s_ci_compressor == Compressor.ZSTD else TocFlags.COMPRESSION_NONE
    toc.append(TocEntry.for_section(ENTRY_BLOB_META, 0, h.s_ci_compressed_size, h.s_ci_uncompressed_size,
                                    hashlib.sha256(meta.ci_data).digest(), flags))
    toc.append(TocEntry.for_section(ENTRY_BLOB_META_HEADER, h.s_ci_compressed_size, BLOB_CCT_HEADER_SIZE,
                                    BLOB_CCT_HEADER_SIZE, hashlib.sha256(h.pack()).digest()))
    digests = b"".join(writer.digests)
    off = put(ENTRY_BLOB_DIGEST, digests)
    toc.append(TocEntry.for_section(ENTRY_BLOB_DIGEST, off, len(digests), len(digests),
                                    hashlib.sha256(digests).digest()))
    packed = compress(Compressor.ZSTD, bootstrap, zstd_level=REF_META_ZSTD_LEVEL)
    off = put(ENTRY_BOOTSTRAP, packed)
    toc.append(TocEntry.for_section(ENTRY_BOOTSTRAP, off, len(packed), len(bootstrap),
                                    hashlib.sha256(bootstrap).digest(), TocFlags.COMPRESSION_ZSTD))
    raw = b"".join(e.pack() for e in toc)
    hdr = tar_header(ENTRY_TOC, len(raw))
    out.extend(raw)
    out.extend(hdr)
    return bytes(out), hashlib.sha256(raw + hdr).digest(), len(raw) + len(hdr)
