"""Records of the storage layer: blobs, chunks, byte ranges and the algorithm numbers.

Frozen slotted dataclasses and enums only, no behaviour beyond predicates: every storage module
(compress, digest, cache, prefetch, device) and the ``rafs`` readers and builder share them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Compressor(enum.IntEnum):
    """On-disk compression algorithm numbers (v6 blob table ``compression_algo``)."""

    NONE = 0
    LZ4_BLOCK = 1
    GZIP = 2
    ZSTD = 3


class Digester(enum.IntEnum):
    """On-disk digest algorithm numbers (v6 blob table ``digest_algo``)."""

    BLAKE3 = 0
    SHA256 = 1


class BlobFeatures(enum.IntFlag):
    ALIGNED = 0x1
    INLINED_FS_META = 0x2
    CHUNK_INFO_V2 = 0x4
    ZRAN = 0x8
    SEPARATE = 0x10
    INLINED_CHUNK_DIGEST = 0x20
    TARFS = 0x40
    BATCH = 0x80
    ENCRYPTED = 0x100
    IS_CHUNKDICT_GENERATED = 0x200
    IS_SEPARATED_WITH_PREFETCH_FILES = 0x400
    EXTERNAL = 0x800
    HAS_TAR_HEADER = 0x1000_0000
    HAS_TOC = 0x2000_0000
    CAP_TAR_TOC = 0x4000_0000


class ChunkFlags(enum.IntFlag):
    """``BlobChunkFlags`` of the 80-byte chunk info."""

    COMPRESSED = 0x1
    HOLECHUNK = 0x2
    ENCRYPTED = 0x4
    BATCH = 0x8
    HAS_CRC32 = 0x10


#: a plain int for the per-chunk test: ``int & IntFlag`` builds an enum member each time (~1 µs)
_CHUNK_COMPRESSED = int(ChunkFlags.COMPRESSED)


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob of an image, as the bootstrap's blob table describes it."""

    blob_index: int
    blob_id: str
    chunk_count: int
    chunk_size: int
    compressor: Compressor
    digester: Digester
    features: int = 0
    compressed_size: int = 0
    uncompressed_size: int = 0
    ci_compressor: Compressor = Compressor.NONE
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_size: int = 0
    blob_toc_digest: bytes = b""
    #: SEPARATE blobs (OCI-ref/ZRAN): the blob holding this blob's blob.meta (upstream's "ref"
    #: blob, addressed by its sha256) and its size; ``ci_offset`` etc. are offsets in that blob
    blob_meta_digest: bytes = b""
    blob_meta_size: int = 0

    @property
    def blob_meta_id(self) -> str | None:
        """Id of the blob holding the CI table when it is not this blob (SEPARATE), else None."""
        if self.features & BlobFeatures.SEPARATE and self.blob_meta_digest.strip(b"\0"):
            return self.blob_meta_digest.hex()
        return None

    def has(self, feature: BlobFeatures) -> bool:
        return bool(self.features & feature)


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One chunk as the bootstrap records it (v5 chunk info / v6 chunk table entry)."""

    blob_index: int
    index: int  #: ci index within the blob
    digest: bytes
    flags: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & _CHUNK_COMPRESSED)


@dataclass(frozen=True, slots=True)
class BlobIoDesc:
    """``size`` bytes at ``offset`` within the uncompressed data of one chunk.

    ``blob`` and ``chunk`` are both ``None`` for a hole (v5 sparse files): the device
    returns ``size`` zero bytes for it.
    """

    blob: BlobInfo | None
    chunk: ChunkInfo | None
    offset: int
    size: int

    @property
    def is_hole(self) -> bool:
        return self.chunk is None


class BlobIoVec(list):
    """An ordered list of :class:`BlobIoDesc`; the bytes of a file range, in file order."""

    @property
    def size(self) -> int:
        return sum(desc.size for desc in self)
