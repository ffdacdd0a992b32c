"""Constants of the RAFS v5/v6 and EROFS on-disk formats, with their upstream/kernel names."""

from __future__ import annotations

import enum

from rafs.errors import FormatError
from storage.records import Compressor, Digester

# --- generic -------------------------------------------------------------------------------
RAFS_SUPER_VERSION_V4 = 0x400
RAFS_SUPER_VERSION_V5 = 0x500
RAFS_SUPER_VERSION_V6 = 0x600
RAFS_DEFAULT_CHUNK_SIZE = 0x100000
RAFS_MAX_CHUNK_SIZE = 0x100_0000  # 16 MiB
RAFS_MIN_CHUNK_SIZE = 0x1000
RAFS_MAX_CHUNKS_PER_BLOB = 1 << 24
RAFS_MAX_BLOBS = 255  # blob_index+1 must fit in one byte of the chunk address
RAFS_MAX_NAME = 255
RAFS_MAX_SYMLINK = 4096
RAFS_DIGEST_SIZE = 32
#: 64-hex-char placeholder blob id current builders write into inline (layer) bootstraps
RAFS_INLINE_BLOB_ID_PLACEHOLDER = "x" * 64

# --- EROFS / RAFS v6 -----------------------------------------------------------------------
EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC_V1 = 0xE0F5E1E2
RAFSV6_SUPER_MAGIC = EROFS_SUPER_MAGIC_V1
RAFSV6_SUPERBLOCK_SIZE = 1024 + 128 + 256  # bootstrap bytes before the device table (1408)
RAFSV6_EXT_SUPER_OFFSET = EROFS_SUPER_OFFSET + 128  # 1152
EROFS_BLOCK_BITS_12 = 12
EROFS_BLOCK_BITS_9 = 9
EROFS_BLOCK_SIZE_4096 = 4096
EROFS_BLOCK_SIZE_512 = 512
EROFS_BLKSIZ = EROFS_BLOCK_SIZE_4096
EROFS_INODE_SLOT_BITS = 5
EROFS_INODE_SLOT_SIZE = 1 << EROFS_INODE_SLOT_BITS  # 32
EROFS_DEVT_SLOT_SIZE = 128
EROFS_DEVT_SLOT_OFFSET = 11  # s_devt_slotoff: 11 * 128 = 1408
RAFSV6_DEVSLOT_OFFSET = EROFS_DEVT_SLOT_OFFSET * EROFS_DEVT_SLOT_SIZE
RAFSV6_BLOB_ENTRY_SIZE = 256
RAFSV6_CHUNK_INFO_SIZE = 80
RAFSV6_ALIGNMENT = 8  # chunk index array alignment after inode + xattrs
RAFSV6_ROOT_NID_DEFAULT = 128
EROFS_NAME_LEN = 255
V6_BLOCK_SEG_ALIGNMENT = 0x80000

# s_feature_compat
EROFS_FEATURE_COMPAT_SB_CHKSUM = 0x0000_0001
EROFS_FEATURE_COMPAT_MTIME = 0x0000_0002
EROFS_FEATURE_COMPAT_RAFS_V6 = 0x4000_0000
# s_feature_incompat
EROFS_FEATURE_INCOMPAT_ZERO_PADDING = 0x0000_0001
EROFS_FEATURE_INCOMPAT_COMPR_CFGS = 0x0000_0002
EROFS_FEATURE_INCOMPAT_CHUNKED_FILE = 0x0000_0004
EROFS_FEATURE_INCOMPAT_DEVICE_TABLE = 0x0000_0008
RAFSV6_FEATURE_INCOMPAT = EROFS_FEATURE_INCOMPAT_CHUNKED_FILE | EROFS_FEATURE_INCOMPAT_DEVICE_TABLE

# i_format: bit 0 version, bits 1..3 data layout
EROFS_I_VERSION_BIT = 0
EROFS_I_VERSION_BITS = 1
EROFS_I_DATALAYOUT_BIT = 1
EROFS_I_DATALAYOUT_BITS = 3
EROFS_I_ALL = 0xF  # any bit above bit 3 is invalid
EROFS_INODE_LAYOUT_COMPACT = 0
EROFS_INODE_LAYOUT_EXTENDED = 1
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_COMPRESSION_LEGACY = 1
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_FLAT_COMPRESSION = 3
EROFS_INODE_CHUNK_BASED = 4

# chunk-based inode: i_u low u16 = chunk format
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x001F
EROFS_CHUNK_FORMAT_INDEXES = 0x0020
EROFS_CHUNK_FORMAT_ALL = EROFS_CHUNK_FORMAT_BLKBITS_MASK | EROFS_CHUNK_FORMAT_INDEXES

# dirent file types
EROFS_FT_UNKNOWN = 0
EROFS_FT_REG_FILE = 1
EROFS_FT_DIR = 2
EROFS_FT_CHRDEV = 3
EROFS_FT_BLKDEV = 4
EROFS_FT_FIFO = 5
EROFS_FT_SOCK = 6
EROFS_FT_SYMLINK = 7
EROFS_FT_MAX = 8

# xattr name prefix indexes
EROFS_XATTR_INDEX_USER = 1
EROFS_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EROFS_XATTR_INDEX_TRUSTED = 4
EROFS_XATTR_INDEX_LUSTRE = 5
EROFS_XATTR_INDEX_SECURITY = 6
#: prefix index -> name prefix (ACL indexes carry the whole name; the suffix is empty)
EROFS_XATTR_PREFIXES: dict[int, bytes] = {
    EROFS_XATTR_INDEX_USER: b"user.",
    EROFS_XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    EROFS_XATTR_INDEX_TRUSTED: b"trusted.",
    EROFS_XATTR_INDEX_LUSTRE: b"lustre.",
    EROFS_XATTR_INDEX_SECURITY: b"security.",
}

# --- RAFS v5 -------------------------------------------------------------------------------
RAFSV5_SUPER_MAGIC = 0x5241_4653  # "RAFS" little-endian read of b"SFAR"
RAFSV5_SUPERBLOCK_SIZE = 8192
RAFSV5_ALIGNMENT = 8
RAFSV5_INODE_SIZE = 128
RAFSV5_EXT_BLOB_ENTRY_SIZE = 64
RAFSV5_CHUNK_INFO_SIZE = 80
RAFSV5_ROOT_INODE = 1

# --- file types (st_mode) ------------------------------------------------------------------
S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000

#: st_mode file type -> EROFS dirent file type
EROFS_FT_FROM_MODE: dict[int, int] = {
    S_IFREG: EROFS_FT_REG_FILE,
    S_IFDIR: EROFS_FT_DIR,
    S_IFCHR: EROFS_FT_CHRDEV,
    S_IFBLK: EROFS_FT_BLKDEV,
    S_IFIFO: EROFS_FT_FIFO,
    S_IFSOCK: EROFS_FT_SOCK,
    S_IFLNK: EROFS_FT_SYMLINK,
}


class RafsSuperFlags(enum.IntFlag):
    """``s_flags`` of the v5 superblock and the v6 extended superblock."""

    COMPRESSION_NONE = 0x1
    COMPRESSION_LZ4 = 0x2
    HASH_BLAKE3 = 0x4
    HASH_SHA256 = 0x8
    EXPLICIT_UID_GID = 0x10
    HAS_XATTR = 0x20
    COMPRESSION_GZIP = 0x40
    COMPRESSION_ZSTD = 0x80
    INLINED_CHUNK_DIGEST = 0x100
    TARTFS_MODE = 0x200
    ENCRYPTION_NONE = 0x0100_0000
    ENCRYPTION_ASE_128_XTS = 0x0200_0000
    PRESERVED_COMPAT_5 = 0x0400_0000
    PRESERVED_COMPAT_4 = 0x0800_0000
    PRESERVED_COMPAT_3 = 0x1000_0000
    PRESERVED_COMPAT_2 = 0x2000_0000
    PRESERVED_COMPAT_1 = 0x4000_0000
    PRESERVED_COMPAT_0 = 0x8000_0000


RAFS_SUPER_FLAGS_ALL = int(
    RafsSuperFlags.COMPRESSION_NONE
    | RafsSuperFlags.COMPRESSION_LZ4
    | RafsSuperFlags.HASH_BLAKE3
    | RafsSuperFlags.HASH_SHA256
    | RafsSuperFlags.EXPLICIT_UID_GID
    | RafsSuperFlags.HAS_XATTR
    | RafsSuperFlags.COMPRESSION_GZIP
    | RafsSuperFlags.COMPRESSION_ZSTD
    | RafsSuperFlags.INLINED_CHUNK_DIGEST
    | RafsSuperFlags.TARTFS_MODE
    | 0xFF00_0000
)
RAFS_SUPER_FLAGS_COMPRESSION = int(
    RafsSuperFlags.COMPRESSION_NONE
    | RafsSuperFlags.COMPRESSION_LZ4
    | RafsSuperFlags.COMPRESSION_GZIP
    | RafsSuperFlags.COMPRESSION_ZSTD
)
RAFS_SUPER_FLAGS_HASH = int(RafsSuperFlags.HASH_BLAKE3 | RafsSuperFlags.HASH_SHA256)


class RafsV5InodeFlags(enum.IntFlag):
    """``i_flags`` of a v5 inode."""

    SYMLINK = 0x1
    HARDLINK = 0x2
    XATTR = 0x4
    HAS_HOLE = 0x8


RAFSV5_INODE_FLAGS_ALL = 0xF

#: BlobFeatures bits that must never be set on disk (mask 0xf000 and the in-memory v5 marker)
BLOB_FEATURE_INCOMPAT_MASK = 0x0000_F000
#: every BlobFeatures bit an on-disk v6 blob table entry may carry
BLOB_FEATURES_ON_DISK = 0x0000_0FFF | 0x7000_0000
BLOB_FEATURE_V5_NO_EXT_BLOB_TABLE = 0x8000_0000
#: chunk flags known to the reader
BLOB_CHUNK_FLAGS_ALL = 0x1F


def validate_super_flags(struct: str, flags: int) -> None:
    """Known bits only, at most one compression and at most one hash algorithm.

    Upstream tolerates a missing algorithm bit (old v5 images carry ``0x1``): see
    :func:`compressor_from_flags` / :func:`digester_from_flags` for the defaults.
    """
    if flags & ~RAFS_SUPER_FLAGS_ALL:
        raise FormatError(f"{struct}.s_flags = {flags:#x}: unknown bits {flags & ~RAFS_SUPER_FLAGS_ALL:#x}")
    if bin(flags & RAFS_SUPER_FLAGS_COMPRESSION).count("1") > 1:
        raise FormatError(f"{struct}.s_flags = {flags:#x}: more than one COMPRESSION_* flag")
    if bin(flags & RAFS_SUPER_FLAGS_HASH).count("1") > 1:
        raise FormatError(f"{struct}.s_flags = {flags:#x}: more than one HASH_* flag")


def compressor_from_flags(flags: int) -> Compressor:
    """Chunk compressor named by superblock flags (upstream default without a bit: lz4_block)."""
    if flags & RafsSuperFlags.COMPRESSION_NONE:
        return Compressor.NONE
    if flags & RafsSuperFlags.COMPRESSION_ZSTD:
        return Compressor.ZSTD
    if flags & RafsSuperFlags.COMPRESSION_GZIP:
        return Compressor.GZIP
    return Compressor.LZ4_BLOCK


def digester_from_flags(flags: int) -> Digester:
    """Chunk digester named by superblock flags (upstream default without a bit: blake3)."""
    if flags & RafsSuperFlags.HASH_SHA256 and not flags & RafsSuperFlags.HASH_BLAKE3:
        return Digester.SHA256
    return Digester.BLAKE3


def flags_from_algorithms(compressor: Compressor, digester: Digester) -> int:
    """Superblock flag bits for a (compressor, digester) pair (for the builder)."""
    comp = {
        Compressor.NONE: RafsSuperFlags.COMPRESSION_NONE,
        Compressor.LZ4_BLOCK: RafsSuperFlags.COMPRESSION_LZ4,
        Compressor.GZIP: RafsSuperFlags.COMPRESSION_GZIP,
        Compressor.ZSTD: RafsSuperFlags.COMPRESSION_ZSTD,
    }[Compressor(compressor)]
    dig = {Digester.BLAKE3: RafsSuperFlags.HASH_BLAKE3, Digester.SHA256: RafsSuperFlags.HASH_SHA256}[
        Digester(digester)
    ]
    return int(comp | dig)
