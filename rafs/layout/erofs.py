"""EROFS kernel structs used by RAFS v6 bootstraps (inodes, chunk indexes, dirents, xattrs, device slots).

Each struct has one name, the kernel's (``fs/erofs/erofs_fs.h``); its docstring gives the name
upstream nydus uses for it (``RafsV6InodeCompact`` ...).
"""

from __future__ import annotations

from rafs.errors import FormatError
from rafs.layout.constants import (
    EROFS_CHUNK_FORMAT_ALL,
    EROFS_CHUNK_FORMAT_BLKBITS_MASK,
    EROFS_CHUNK_FORMAT_INDEXES,
    EROFS_FT_MAX,
    EROFS_I_ALL,
    EROFS_I_DATALAYOUT_BIT,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_INODE_LAYOUT_EXTENDED,
    EROFS_XATTR_PREFIXES,
)
from storage.structs import Struct


def _bad(struct: str, field: str, value: object, why: str = "") -> FormatError:
    return FormatError(f"{struct}.{field} = {value!r}" + (f": {why}" if why else ""))


# --- inodes --------------------------------------------------------------------------------


def inode_format(version: int, datalayout: int) -> int:
    """Build ``i_format`` from the layout version (0 compact, 1 extended) and data layout."""
    return (version & 1) | (datalayout << EROFS_I_DATALAYOUT_BIT)


def inode_version(i_format: int) -> int:
    return i_format & 1


def inode_datalayout(i_format: int) -> int:
    return (i_format >> EROFS_I_DATALAYOUT_BIT) & 0x7


def _validate_format(name: str, i_format: int) -> None:
    if i_format & ~EROFS_I_ALL:
        raise _bad(name, "i_format", hex(i_format), "unknown bits above bit 3")
    layout = inode_datalayout(i_format)
    if layout not in (EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE, EROFS_INODE_CHUNK_BASED):
        raise _bad(name, "i_format", hex(i_format), f"unsupported data layout {layout}")


class ErofsInodeCompact(Struct):
    """32-byte compact inode (``erofs_inode_compact``; nydus ``RafsV6InodeCompact``)."""

    FIELDS = (
        ("i_format", "u16"),
        ("i_xattr_icount", "u16"),
        ("i_mode", "u16"),
        ("i_nlink", "u16"),
        ("i_size", "u32"),
        ("i_reserved", "u32"),  # mtime delta in EROFS >= 6.15; nydus writes 0
        ("i_u", "u32"),  # raw blkaddr / chunk header / rdev
        ("i_ino", "u32"),
        ("i_uid", "u16"),
        ("i_gid", "u16"),
        ("i_reserved2", "4s"),
    )

    def validate(self) -> None:
        _validate_format(type(self).__name__, self.i_format)
        if inode_version(self.i_format) != 0:
            raise _bad(type(self).__name__, "i_format", hex(self.i_format), "not a compact inode")


class ErofsInodeExtended(Struct):
    """64-byte extended inode (``erofs_inode_extended``; nydus ``RafsV6InodeExtended``)."""

    FIELDS = (
        ("i_format", "u16"),
        ("i_xattr_icount", "u16"),
        ("i_mode", "u16"),
        ("i_reserved", "u16"),
        ("i_size", "u64"),
        ("i_u", "u32"),
        ("i_ino", "u32"),
        ("i_uid", "u32"),
        ("i_gid", "u32"),
        ("i_mtime", "u64"),
        ("i_mtime_nsec", "u32"),
        ("i_nlink", "u32"),
        ("i_reserved2", "16s"),
    )

    def validate(self) -> None:
        _validate_format(type(self).__name__, self.i_format)
        if inode_version(self.i_format) != EROFS_INODE_LAYOUT_EXTENDED:
            raise _bad(type(self).__name__, "i_format", hex(self.i_format), "not an extended inode")
        if self.i_mtime_nsec >= 1_000_000_000:
            raise _bad(type(self).__name__, "i_mtime_nsec", self.i_mtime_nsec, "not below 10^9")


# --- chunk-based files ---------------------------------------------------------------------


def encode_chunk_format(chunk_size: int, blkszbits: int) -> int:
    """The ``i_u`` chunk header of a chunk-based inode: INDEXES | log2(chunk_size) - blkszbits."""
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise FormatError(f"chunk size {chunk_size} is not a power of two")
    bits = chunk_size.bit_length() - 1 - blkszbits
    if not 0 <= bits <= EROFS_CHUNK_FORMAT_BLKBITS_MASK:
        raise FormatError(f"chunk size {chunk_size} out of range for block bits {blkszbits}")
    return EROFS_CHUNK_FORMAT_INDEXES | bits


def decode_chunk_format(i_u: int, blkszbits: int) -> int:
    """Return the chunk size advertised by a chunk header ``i_u``; FormatError if invalid."""
    fmt = i_u & 0xFFFF
    if i_u >> 16:
        raise FormatError(f"chunk header i_u = {i_u:#x}: reserved high 16 bits set")
    if fmt & ~EROFS_CHUNK_FORMAT_ALL:
        raise FormatError(f"chunk header format = {fmt:#x}: unknown bits")
    if not fmt & EROFS_CHUNK_FORMAT_INDEXES:
        raise FormatError(f"chunk header format = {fmt:#x}: EROFS_CHUNK_FORMAT_INDEXES not set")
    bits = blkszbits + (fmt & EROFS_CHUNK_FORMAT_BLKBITS_MASK)
    if bits > 63:
        raise FormatError(f"chunk header format = {fmt:#x}: chunk bits {bits} too large")
    return 1 << bits


class ErofsInodeChunkIndex(Struct):
    """8-byte chunk index (``erofs_inode_chunk_index``; nydus ``RafsV6InodeChunkAddr``).

    nydus meaning: ``advise`` = ci_index bits 0..15, ``device_id`` low byte = blob_index + 1,
    high byte = ci_index bits 16..23; ``blkaddr`` = uncompressed offset / block size.
    """

    FIELDS = (("advise", "u16"), ("device_id", "u16"), ("blkaddr", "u32"))

    @classmethod
    def encode(cls, blob_index: int, ci_index: int, blkaddr: int) -> "ErofsInodeChunkIndex":
        if not 0 <= blob_index < 255:
            raise FormatError(f"chunk address blob_index = {blob_index}: must be in 0..254")
        if not 0 <= ci_index < (1 << 24):
            raise FormatError(f"chunk address ci_index = {ci_index}: must be below 2^24")
        if not 0 <= blkaddr < (1 << 32):
            raise FormatError(f"chunk address blkaddr = {blkaddr}: must fit in u32")
        return cls(
            advise=ci_index & 0xFFFF,
            device_id=((ci_index >> 16) << 8) | (blob_index + 1),
            blkaddr=blkaddr,
        )

    @property
    def blob_index(self) -> int:
        """0-based blob index; -1 when the device byte is 0 (invalid / unset)."""
        return (self.device_id & 0xFF) - 1

    @property
    def ci_index(self) -> int:
        return ((self.device_id >> 8) << 16) | self.advise

    def validate(self) -> None:
        if self.device_id & 0xFF == 0:
            raise _bad(type(self).__name__, "device_id", hex(self.device_id), "blob index byte is 0")


# --- directories ---------------------------------------------------------------------------


class ErofsDirent(Struct):
    """12-byte directory entry (``erofs_dirent``; nydus ``RafsV6Dirent``)."""

    FIELDS = (("e_nid", "u64"), ("e_nameoff", "u16"), ("e_file_type", "u8"), ("e_reserved", "u8"))

    def validate(self) -> None:
        if self.e_file_type >= EROFS_FT_MAX:
            raise _bad(type(self).__name__, "e_file_type", self.e_file_type, "unknown file type")


# --- xattrs --------------------------------------------------------------------------------


class ErofsXattrIbodyHeader(Struct):
    """12-byte inline xattr header (``erofs_xattr_ibody_header``)."""

    FIELDS = (("h_reserved", "u32"), ("h_shared_count", "u8"), ("h_reserved2", "7s"))

    def validate(self) -> None:
        if self.h_shared_count:
            raise _bad(type(self).__name__, "h_shared_count", self.h_shared_count,
                       "shared xattrs are not used by RAFS v6")


class ErofsXattrEntry(Struct):
    """4-byte xattr entry header (``erofs_xattr_entry``), followed by name suffix and value."""

    FIELDS = (("e_name_len", "u8"), ("e_name_index", "u8"), ("e_value_size", "u16"))

    def validate(self) -> None:
        if self.e_name_index not in EROFS_XATTR_PREFIXES:
            raise _bad(type(self).__name__, "e_name_index", self.e_name_index, "unknown xattr prefix index")


def xattr_ibody_size(i_xattr_icount: int) -> int:
    """Bytes of the inline xattr region for ``i_xattr_icount`` (0 -> none)."""
    if i_xattr_icount == 0:
        return 0
    return ErofsXattrIbodyHeader.SIZE + (i_xattr_icount - 1) * 4


def xattr_icount(ibody_size: int) -> int:
    """Inverse of :func:`xattr_ibody_size` for a 4-aligned region size (0 -> 0)."""
    if ibody_size == 0:
        return 0
    if ibody_size < ErofsXattrIbodyHeader.SIZE or ibody_size % 4:
        raise FormatError(f"xattr region size {ibody_size} is not 12 + 4*k")
    return (ibody_size - ErofsXattrIbodyHeader.SIZE) // 4 + 1


def xattr_split_name(name: bytes) -> tuple[int, bytes]:
    """Split a full xattr name into (prefix index, suffix); FormatError for an unknown prefix."""
    best = None
    for index, prefix in EROFS_XATTR_PREFIXES.items():
        if index == 5:  # lustre: unused by nydus
            continue
        if name.startswith(prefix) and (best is None or len(prefix) > len(EROFS_XATTR_PREFIXES[best])):
            best = index
    if best is None:
        raise FormatError(f"xattr name {name!r}: unsupported prefix")
    return best, name[len(EROFS_XATTR_PREFIXES[best]):]


# --- devices -------------------------------------------------------------------------------


class ErofsDeviceSlot(Struct):
    """128-byte device slot (``erofs_deviceslot``; nydus ``RafsV6Device``): one per blob."""

    FIELDS = (("blob_id", "64s"), ("blocks", "u32"), ("mapped_blkaddr", "u32"), ("reserved", "56s"))

    def validate(self) -> None:
        try:
            blob_id = self.blob_id.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(type(self).__name__, "blob_id", self.blob_id, "not UTF-8") from None
        if len(blob_id) != 64 or "\0" in blob_id:
            raise _bad(type(self).__name__, "blob_id", self.blob_id, "not a 64-character id")
        if self.blocks == 0:
            raise _bad(type(self).__name__, "blocks", 0, "must be non-zero")
