"""``targz-ref`` builds: a RAFS v6 bootstrap whose data blob is the original gzip OCI layer.

Upstream calls these ZRAN / OCI-ref images (``nydus-image create --type targz-ref``,
``nydusify convert --oci-ref``). No data is copied: the layer is inflated once to find gzip
checkpoints (``storage.zran.scan_gzip``, one every ``spacing`` uncompressed bytes) and to read
the tar; file data is cut into chunks at their offsets in the tar stream; each chunk points at the
checkpoint before it (a ZRAN context). The result is the bootstrap plus ``<blob_id>.blob.meta``
(cache-file format: CI v2 entries with the ZRAN flag, the 40-byte contexts, their 32 KiB
windows); the blob id is the layer's sha256, so the registry's layer blob serves the data.
Layers that are not gzip are refused (they have no checkpoints; convert them normally).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import BinaryIO

from rafs.builder.blob import BlobRecord, Chunker, ChunkStore, round_up
from rafs.builder.source import GZIP_MAGIC, walk_tar
from rafs.builder.tree import Inode
from rafs.errors import BuildError
from storage.errors import StorageError
from storage.meta.blob_meta import BlobMeta, write_blob_meta_file
from storage.meta.chunk_info import BlobChunk, CiFlags
from storage.records import BlobFeatures, BlobInfo, ChunkFlags, ChunkInfo, Compressor, Digester
from storage.zran import plan_contexts, scan_gzip

#: default uncompressed distance between checkpoints (upstream's contexts are ~1 MiB apart)
DEFAULT_ZRAN_SPACING = 1 << 20
#: blob features of a ZRAN blob (upstream: 4K-aligned, CI v2, ZRAN)
ZRAN_FEATURES = BlobFeatures.ALIGNED | BlobFeatures.CHUNK_INFO_V2 | BlobFeatures.ZRAN


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

    def add_chunk(self, data: bytes, chunk_digest: bytes) -> int:
        self.extents.append((self.next_offset, len(data)))
        self.digests.append(chunk_digest)
        return len(self.extents) - 1

    def close(self) -> None:
        pass

    def finish(self, points, boundaries, *, blob_id: str, blob_size: int) -> BlobInfo:
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
        meta, _ = BlobMeta.build(self.ci, features=int(ZRAN_FEATURES), ci_compressor=Compressor.NONE,
                                 ci_offset=0, zran=contexts)
        self.blob_meta = meta
        h = meta.header
        return BlobInfo(blob_index=self.blob_index, blob_id=blob_id, chunk_count=len(self.ci),
                        chunk_size=self.chunk_size, compressor=Compressor.GZIP, digester=self.digester,
                        features=int(ZRAN_FEATURES), compressed_size=blob_size, uncompressed_size=uoff,
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
        except StorageError as exc:
            raise BuildError(f"{path}: bad gzip layer: {exc}") from exc
    return points, boundaries, h.hexdigest(), size


def build_zran_tree(path: str, store: ChunkStore, *, chunk_size: int, digester: Digester, spacing: int,
                    work_dir: str, progress=None, limits=None):
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
    info = writer.finish(points, boundaries, blob_id=blob_id, blob_size=size) if writer.extents else None
    if info is not None:
        store.blobs.append(BlobRecord(info, list(writer.chunk_infos), new=True))
    return tree, info, writer, chunker.bytes_in


def write_zran_blob_meta(writer: ZranWriter, out: str) -> None:
    """``<blob_id>.blob.meta`` in cache-file format (temp + rename)."""
    assert writer.blob_meta is not None
    write_blob_meta_file(out, writer.blob_meta)
