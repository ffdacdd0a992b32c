"""RAFS v6 bootstrap structs: the EROFS superblock, RAFS extended superblock and blob table.

Layout of a v6 bootstrap (``nydus-image`` ``Bootstrap::v6_dump``)::

    0      1024        1152            1408                    blob_table_offset (4K aligned)
    | 0s   | SB (128)  | ext SB (256)  | device slots 128*n    | blob table 256*n | prefetch u32*k | ...
    meta_blkaddr*bs: inodes (nid = (offset - meta_blkaddr*bs) / 32), dirents, tails ... chunk table (80*m)

The inode/dirent/xattr/chunk-index/device-slot structs are the kernel EROFS ones, declared once in
:mod:`rafs.layout.erofs` under their kernel names; the chunk table entry is the 80-byte
:class:`rafs.layout.v5.RafsV5ChunkInfo` (as upstream).
"""

from __future__ import annotations

from rafs.errors import FormatError
from rafs.layout.constants import (
    BLOB_FEATURE_INCOMPAT_MASK,
    BLOB_FEATURES_ON_DISK,
    BLOB_FEATURE_V5_NO_EXT_BLOB_TABLE,
    EROFS_BLOCK_BITS_9,
    EROFS_BLOCK_BITS_12,
    EROFS_DEVT_SLOT_OFFSET,
    EROFS_FEATURE_COMPAT_RAFS_V6,
    EROFS_SUPER_MAGIC_V1,
    RAFS_MAX_CHUNK_SIZE,
    RAFS_MAX_CHUNKS_PER_BLOB,
    RAFS_MIN_CHUNK_SIZE,
    RAFSV6_BLOB_ENTRY_SIZE,
    RAFSV6_CHUNK_INFO_SIZE,
    RAFSV6_FEATURE_INCOMPAT,
    RafsSuperFlags,
    validate_super_flags,
)
from rafs.layout.v5 import RafsV5ChunkInfo
from storage.records import BlobFeatures, BlobInfo, Compressor, Digester
from storage.structs import Struct

assert RafsV5ChunkInfo.SIZE == RAFSV6_CHUNK_INFO_SIZE


def _bad(struct: str, field: str, value: object, why: str = "") -> FormatError:
    return FormatError(f"{struct}.{field} = {value!r}" + (f": {why}" if why else ""))


class RafsV6SuperBlock(Struct):
    """EROFS superblock, 128 bytes at :data:`EROFS_SUPER_OFFSET` (1024)."""

    FIELDS = (
        ("s_magic", "u32"),
        ("s_checksum", "u32"),
        ("s_feature_compat", "u32"),
        ("s_blkszbits", "u8"),
        ("s_extslots", "u8"),
        ("s_root_nid", "u16"),
        ("s_inos", "u64"),
        ("s_build_time", "u64"),
        ("s_build_time_nsec", "u32"),
        ("s_blocks", "u32"),
        ("s_meta_blkaddr", "u32"),
        ("s_xattr_blkaddr", "u32"),
        ("s_uuid", "16s"),
        ("s_volume_name", "16s"),
        ("s_feature_incompat", "u32"),
        ("s_u", "u16"),
        ("s_extra_devices", "u16"),
        ("s_devt_slotoff", "u16"),
        ("s_reserved", "38s"),
    )

    @property
    def block_size(self) -> int:
        return 1 << self.s_blkszbits

    def validate(self) -> None:
        n = type(self).__name__
        if self.s_magic != EROFS_SUPER_MAGIC_V1:
            raise _bad(n, "s_magic", hex(self.s_magic), f"expected {EROFS_SUPER_MAGIC_V1:#x}")
        if self.s_checksum != 0:
            raise _bad(n, "s_checksum", hex(self.s_checksum), "must be 0")
        if not self.s_feature_compat & EROFS_FEATURE_COMPAT_RAFS_V6:
            raise _bad(n, "s_feature_compat", hex(self.s_feature_compat), "RAFS_V6 bit not set")
        if self.s_blkszbits not in (EROFS_BLOCK_BITS_12, EROFS_BLOCK_BITS_9):
            raise _bad(n, "s_blkszbits", self.s_blkszbits, "expected 12 (or 9 for tarfs)")
        if self.s_extslots != 0:
            raise _bad(n, "s_extslots", self.s_extslots, "must be 0")
        if self.s_xattr_blkaddr != 0:
            raise _bad(n, "s_xattr_blkaddr", self.s_xattr_blkaddr, "shared xattrs unsupported")
        if self.s_feature_incompat != RAFSV6_FEATURE_INCOMPAT:
            raise _bad(n, "s_feature_incompat", hex(self.s_feature_incompat),
                       f"expected {RAFSV6_FEATURE_INCOMPAT:#x} (CHUNKED_FILE|DEVICE_TABLE)")
        if self.s_u != 0:
            raise _bad(n, "s_u", self.s_u, "must be 0")
        if self.s_devt_slotoff != EROFS_DEVT_SLOT_OFFSET:
            raise _bad(n, "s_devt_slotoff", self.s_devt_slotoff, f"expected {EROFS_DEVT_SLOT_OFFSET}")
        if self.s_meta_blkaddr == 0:
            raise _bad(n, "s_meta_blkaddr", 0, "must be non-zero")


class RafsV6SuperBlockExt(Struct):
    """RAFS v6 extended superblock, 256 bytes at 1152."""

    FIELDS = (
        ("s_flags", "u64"),
        ("s_blob_table_offset", "u64"),
        ("s_blob_table_size", "u32"),
        ("s_chunk_size", "u32"),
        ("s_chunk_table_offset", "u64"),
        ("s_chunk_table_size", "u64"),
        ("s_prefetch_table_offset", "u64"),
        ("s_prefetch_table_size", "u32"),
        ("s_padding", "u32"),
        ("s_reserved", "200s"),
    )

    def validate(self, block_size: int = 4096) -> None:
        n = type(self).__name__
        validate_super_flags(n, self.s_flags)
        cs = self.s_chunk_size
        if cs & (cs - 1) or not RAFS_MIN_CHUNK_SIZE <= cs <= RAFS_MAX_CHUNK_SIZE:
            raise _bad(n, "s_chunk_size", cs, "not a power of two in 4096..16MiB")
        if self.s_blob_table_size % RAFSV6_BLOB_ENTRY_SIZE:
            raise _bad(n, "s_blob_table_size", self.s_blob_table_size, "not a multiple of 256")
        if self.s_blob_table_offset % block_size:
            raise _bad(n, "s_blob_table_offset", self.s_blob_table_offset, "not block aligned")
        if self.s_chunk_table_size % RAFSV6_CHUNK_INFO_SIZE:
            raise _bad(n, "s_chunk_table_size", self.s_chunk_table_size, "not a multiple of 80")
        if self.s_chunk_table_size and self.s_chunk_table_offset % block_size:
            raise _bad(n, "s_chunk_table_offset", self.s_chunk_table_offset, "not block aligned")
        if self.s_prefetch_table_size % 4:
            raise _bad(n, "s_prefetch_table_size", self.s_prefetch_table_size, "not a multiple of 4")

    @property
    def flags(self) -> RafsSuperFlags:
        return RafsSuperFlags(self.s_flags)


class RafsV6Blob(Struct):
    """256-byte blob table entry."""

    FIELDS = (
        ("blob_id", "64s"),
        ("blob_index", "u32"),
        ("chunk_size", "u32"),
        ("chunk_count", "u32"),
        ("compression_algo", "u32"),
        ("digest_algo", "u32"),
        ("features", "u32"),
        ("compressed_size", "u64"),
        ("uncompressed_size", "u64"),
        ("blob_toc_size", "u32"),
        ("ci_compressor", "u32"),
        ("ci_offset", "u64"),
        ("ci_compressed_size", "u64"),
        ("ci_uncompressed_size", "u64"),
        ("blob_toc_digest", "32s"),
        ("blob_meta_digest", "32s"),
        ("blob_meta_size", "u64"),
        ("cipher_iv", "8s"),
        ("cipher_algo", "u32"),
        ("reserved", "36s"),
    )

    @property
    def blob_id_str(self) -> str:
        return self.blob_id.rstrip(b"\0").decode("utf-8", "replace")

    def blob_info(self, blob_id: str | None = None) -> BlobInfo:
        """This entry as the storage record (the one conversion, for the reader and the builder);
        ``blob_id`` replaces the id on disk (an inline-bootstrap placeholder resolved by the caller)."""
        return BlobInfo(
            blob_index=self.blob_index,
            blob_id=self.blob_id_str if blob_id is None else blob_id,
            chunk_count=self.chunk_count,
            chunk_size=self.chunk_size,
            compressor=Compressor(self.compression_algo),
            digester=Digester(self.digest_algo),
            features=self.features,
            compressed_size=self.compressed_size,
            uncompressed_size=self.uncompressed_size,
            ci_compressor=Compressor(self.ci_compressor),
            ci_offset=self.ci_offset,
            ci_compressed_size=self.ci_compressed_size,
            ci_uncompressed_size=self.ci_uncompressed_size,
            blob_toc_size=self.blob_toc_size,
            blob_toc_digest=self.blob_toc_digest,
            blob_meta_digest=self.blob_meta_digest,
            blob_meta_size=self.blob_meta_size,
        )

    def validate(self, index: int | None = None, chunk_size: int | None = None) -> None:
        n = type(self).__name__
        try:
            blob_id = self.blob_id.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(n, "blob_id", self.blob_id, "not UTF-8") from None
        if not blob_id or "\0" in blob_id:
            raise _bad(n, "blob_id", self.blob_id, "empty or contains NUL")
        if index is not None and self.blob_index != index:
            raise _bad(n, "blob_index", self.blob_index, f"entry is at position {index}")
        if chunk_size is not None and self.chunk_size != chunk_size:
            raise _bad(n, "chunk_size", self.chunk_size, f"superblock chunk size is {chunk_size}")
        if self.chunk_count > RAFS_MAX_CHUNKS_PER_BLOB:
            raise _bad(n, "chunk_count", self.chunk_count, "above 2^24")
        if self.compression_algo > 3:
            raise _bad(n, "compression_algo", self.compression_algo, "unknown compressor")
        if self.ci_compressor > 3:
            raise _bad(n, "ci_compressor", self.ci_compressor, "unknown compressor")
        if self.digest_algo > 1:
            raise _bad(n, "digest_algo", self.digest_algo, "unknown digester")
        if self.features & (BLOB_FEATURE_INCOMPAT_MASK | BLOB_FEATURE_V5_NO_EXT_BLOB_TABLE):
            raise _bad(n, "features", hex(self.features), "illegal feature bits")
        if self.features & ~BLOB_FEATURES_ON_DISK:
            raise _bad(n, "features", hex(self.features), f"unknown bits {self.features & ~BLOB_FEATURES_ON_DISK:#x}")
        f = BlobFeatures(self.features)
        tarfs = bool(f & BlobFeatures.TARFS)
        if tarfs == bool(f & BlobFeatures.ALIGNED):
            raise _bad(n, "features", hex(self.features), "ALIGNED is required (and forbidden for TARFS)")
        special = f & (BlobFeatures.ZRAN | BlobFeatures.BATCH | BlobFeatures.ENCRYPTED)
        if f & BlobFeatures.CHUNK_INFO_V2:
            want = self.chunk_count * 24
            if (self.ci_uncompressed_size < want) if special else (self.ci_uncompressed_size != want):
                raise _bad(n, "ci_uncompressed_size", self.ci_uncompressed_size,
                           f"CHUNK_INFO_V2 with {self.chunk_count} chunks needs {want}")
        elif special:
            raise _bad(n, "features", hex(self.features), "ZRAN/BATCH/ENCRYPTED require CHUNK_INFO_V2")
        elif not tarfs and not f & BlobFeatures.IS_CHUNKDICT_GENERATED \
                and self.ci_uncompressed_size != self.chunk_count * 16:
            raise _bad(n, "ci_uncompressed_size", self.ci_uncompressed_size,
                       f"v1 chunk info with {self.chunk_count} chunks needs {self.chunk_count * 16}")
        if self.compressed_size > 1 << 40:
            raise _bad(n, "compressed_size", self.compressed_size, "above 1 TiB")
        if self.uncompressed_size > 1 << 44:
            raise _bad(n, "uncompressed_size", self.uncompressed_size, "above 16 TiB")
        if self.ci_compressed_size > self.ci_uncompressed_size:
            raise _bad(n, "ci_compressed_size", self.ci_compressed_size,
                       f"larger than ci_uncompressed_size {self.ci_uncompressed_size}")
        if self.cipher_algo > 1:
            raise _bad(n, "cipher_algo", self.cipher_algo, "unknown cipher")
