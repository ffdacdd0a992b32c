"""RAFS v5 bootstrap structs (legacy format, read-only here).

Layout: 8192-byte superblock at 0; inode table (u32 per inode number = ``offset >> 3``);
prefetch table; blob table (``u32 readahead_offset, u32 readahead_size, blob_id`` records separated
by NUL, padded to 8); extended blob table (64 B entries); inodes (128 B + name + symlink
(8-aligned) + xattr table + chunk infos (80 B)).
"""

from __future__ import annotations

from dataclasses import dataclass

from rafs.errors import FormatError
from rafs.layout.constants import (
    RAFS_MAX_CHUNK_SIZE,
    RAFS_SUPER_VERSION_V5,
    RAFSV5_ALIGNMENT,
    RAFSV5_INODE_FLAGS_ALL,
    RAFSV5_SUPER_MAGIC,
    RAFSV5_SUPERBLOCK_SIZE,
    BLOB_CHUNK_FLAGS_ALL,
    validate_super_flags,
)
from storage.records import BlobInfo, ChunkInfo, Compressor, Digester
from storage.structs import Scalar, Struct


def _bad(struct: str, field: str, value: object, why: str = "") -> FormatError:
    return FormatError(f"{struct}.{field} = {value!r}" + (f": {why}" if why else ""))


def rafsv5_align(size: int) -> int:
    return (size + RAFSV5_ALIGNMENT - 1) & ~(RAFSV5_ALIGNMENT - 1)


class RafsV5SuperBlock(Struct):
    """8192-byte v5 superblock at offset 0."""

    FIELDS = (
        ("s_magic", "u32"),
        ("s_fs_version", "u32"),
        ("s_sb_size", "u32"),
        ("s_block_size", "u32"),
        ("s_flags", "u64"),
        ("s_inodes_count", "u64"),
        ("s_inode_table_offset", "u64"),
        ("s_prefetch_table_offset", "u64"),
        ("s_blob_table_offset", "u64"),
        ("s_inode_table_entries", "u32"),
        ("s_prefetch_table_entries", "u32"),
        ("s_blob_table_size", "u32"),
        ("s_extended_blob_table_entries", "u32"),
        ("s_extended_blob_table_offset", "u64"),
        ("s_reserved", f"{RAFSV5_SUPERBLOCK_SIZE - 80}s"),
    )

    def validate(self, meta_size: int | None = None) -> None:
        n = type(self).__name__
        if self.s_magic != RAFSV5_SUPER_MAGIC:
            raise _bad(n, "s_magic", hex(self.s_magic), f"expected {RAFSV5_SUPER_MAGIC:#x}")
        if self.s_fs_version != RAFS_SUPER_VERSION_V5:
            raise _bad(n, "s_fs_version", hex(self.s_fs_version), f"expected {RAFS_SUPER_VERSION_V5:#x}")
        if self.s_sb_size != RAFSV5_SUPERBLOCK_SIZE:
            raise _bad(n, "s_sb_size", self.s_sb_size, f"expected {RAFSV5_SUPERBLOCK_SIZE}")
        bs = self.s_block_size
        if bs & (bs - 1) or bs < 0x1000 or (bs > RAFS_MAX_CHUNK_SIZE and bs != 4 << 20):
            raise _bad(n, "s_block_size", bs, "not a power of two in 4096..16MiB")
        validate_super_flags(n, self.s_flags)
        if self.s_inodes_count > self.s_inode_table_entries:
            raise _bad(n, "s_inodes_count", self.s_inodes_count,
                       f"more than s_inode_table_entries {self.s_inode_table_entries}")
        if meta_size is None:
            return
        if meta_size <= RAFSV5_SUPERBLOCK_SIZE:
            raise FormatError(f"v5 bootstrap size {meta_size} not larger than the superblock")
        ranges = []
        for name, off, size in (
            ("inode table", self.s_inode_table_offset, self.s_inode_table_entries * 4),
            ("blob table", self.s_blob_table_offset, self.s_blob_table_size),
            ("extended blob table", self.s_extended_blob_table_offset,
             self.s_extended_blob_table_entries * 64),
            ("prefetch table", self.s_prefetch_table_offset, self.s_prefetch_table_entries * 4),
        ):
            if size == 0:
                continue
            if off < RAFSV5_SUPERBLOCK_SIZE or off + size > meta_size:
                raise FormatError(
                    f"{n}: {name} at {off}+{size} outside the bootstrap (8192..{meta_size})"
                )
            for other, o2, s2 in ranges:
                if off < o2 + s2 and o2 < off + size:
                    raise FormatError(f"{n}: {name} at {off}+{size} overlaps {other} at {o2}+{s2}")
            ranges.append((name, off, size))


class RafsV5Inode(Struct):
    """128-byte v5 inode; followed by name, symlink (each 8-aligned), xattrs and chunk infos."""

    FIELDS = (
        ("i_digest", "32s"),
        ("i_parent", "u64"),
        ("i_ino", "u64"),
        ("i_uid", "u32"),
        ("i_gid", "u32"),
        ("i_projid", "u32"),
        ("i_mode", "u32"),
        ("i_size", "u64"),
        ("i_blocks", "u64"),
        ("i_flags", "u64"),
        ("i_nlink", "u32"),
        ("i_child_index", "u32"),
        ("i_child_count", "u32"),
        ("i_name_size", "u16"),
        ("i_symlink_size", "u16"),
        ("i_rdev", "u32"),
        ("i_mtime_nsec", "u32"),
        ("i_mtime", "u64"),
        ("i_reserved", "8s"),
    )

    def validate(self) -> None:
        n = type(self).__name__
        if self.i_flags & ~RAFSV5_INODE_FLAGS_ALL:
            raise _bad(n, "i_flags", hex(self.i_flags), "unknown bits")
        if self.i_mode >> 16:
            raise _bad(n, "i_mode", oct(self.i_mode), "above 16 bits")
        if self.i_name_size > 255:
            raise _bad(n, "i_name_size", self.i_name_size, "above 255")
        if self.i_mtime_nsec >= 1_000_000_000:
            raise _bad(n, "i_mtime_nsec", self.i_mtime_nsec, "not below 10^9")

    @property
    def extra_size(self) -> int:
        """Bytes of name + symlink following the 128-byte inode."""
        return rafsv5_align(self.i_name_size) + rafsv5_align(self.i_symlink_size)


class RafsV5ExtBlobEntry(Struct):
    """64-byte v5 extended blob table entry."""

    FIELDS = (
        ("chunk_count", "u32"),
        ("features", "u32"),  # upstream: reserved1 (features in later builders)
        ("uncompressed_size", "u64"),
        ("compressed_size", "u64"),
        ("reserved2", "40s"),
    )

    def validate(self) -> None:
        if self.chunk_count > 1 << 24:
            raise _bad(type(self).__name__, "chunk_count", self.chunk_count, "above 2^24")


class RafsV5ChunkInfo(Struct):
    """80-byte chunk info: v5 per-inode chunk array and the v6 bootstrap chunk table."""

    FIELDS = (
        ("block_id", "32s"),
        ("blob_index", "u32"),
        ("flags", "u32"),
        ("compressed_size", "u32"),
        ("uncompressed_size", "u32"),
        ("compressed_offset", "u64"),
        ("uncompressed_offset", "u64"),
        ("file_offset", "u64"),
        ("index", "u32"),
        ("crc32", "u32"),  # upstream: reserved until CRC-32C support
    )

    def validate(self, chunk_size: int | None = None, blob_count: int | None = None) -> None:
        n = type(self).__name__
        if self.flags & ~BLOB_CHUNK_FLAGS_ALL:
            raise _bad(n, "flags", hex(self.flags), "unknown chunk flags")
        if blob_count is not None and self.blob_index >= blob_count:
            raise _bad(n, "blob_index", self.blob_index, f"image has {blob_count} blobs")
        if chunk_size is not None and self.uncompressed_size > chunk_size:
            raise _bad(n, "uncompressed_size", self.uncompressed_size, f"above chunk size {chunk_size}")
        if self.uncompressed_size == 0:
            raise _bad(n, "uncompressed_size", 0, "must be non-zero")
        if self.index >= 1 << 24:
            raise _bad(n, "index", self.index, "above 2^24")

    def chunk_info(self) -> ChunkInfo:
        """This entry as the storage record (the one conversion, for v5 and v6 readers and the builder)."""
        return ChunkInfo(
            blob_index=self.blob_index,
            index=self.index,
            digest=self.block_id,
            flags=self.flags,
            compressed_offset=self.compressed_offset,
            compressed_size=self.compressed_size,
            uncompressed_offset=self.uncompressed_offset,
            uncompressed_size=self.uncompressed_size,
        )


# --- variable-size tables ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RafsV5BlobTableEntry:
    """One record of the v5 blob table."""

    readahead_offset: int
    readahead_size: int
    blob_id: str

    def blob_info(self, blob_index: int, ext: "RafsV5ExtBlobEntry | None", *, chunk_size: int,
                  compressor: Compressor, digester: Digester, blob_id: str | None = None) -> BlobInfo:
        """This entry (and its extended entry, if the image has that table) as the storage
        record; v5 keeps chunk size and algorithms in the superblock, so the caller passes them.
        ``blob_id`` replaces the id on disk (an inline-bootstrap placeholder resolved by the caller)."""
        return BlobInfo(
            blob_index=blob_index,
            blob_id=self.blob_id if blob_id is None else blob_id,
            chunk_count=ext.chunk_count if ext else 0,
            chunk_size=chunk_size,
            compressor=compressor,
            digester=digester,
            features=0,
            compressed_size=ext.compressed_size if ext else 0,
            uncompressed_size=ext.uncompressed_size if ext else 0,
        )


def parse_v5_blob_table(buf: bytes | memoryview) -> list[RafsV5BlobTableEntry]:
    """Decode ``u32 readahead_offset, u32 readahead_size, blob_id`` records separated by NUL."""
    out = []
    data = bytes(buf)
    pos = 0
    while len(data) - pos > 8:
        ra_off, ra_size = Scalar.u32_array(data, pos, 2)
        end = data.find(b"\0", pos + 8)
        if end < 0:
            end = len(data)
        raw = data[pos + 8 : end]
        try:
            blob_id = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"v5 blob table entry {len(out)}: blob_id {raw!r} is not UTF-8") from None
        if not blob_id:
            # trailing padding after the last entry
            break
        out.append(RafsV5BlobTableEntry(ra_off, ra_size, blob_id))
        pos = end + 1
    return out


def pack_v5_blob_table(entries: list[RafsV5BlobTableEntry]) -> bytes:
    """Encode the v5 blob table (records joined by NUL, padded to 8)."""
    parts = [Scalar.pack_u32_array((e.readahead_offset, e.readahead_size)) + e.blob_id.encode() for e in entries]
    raw = b"\0".join(parts)
    return raw + bytes(rafsv5_align(len(raw)) - len(raw))


def parse_v5_xattrs(buf: bytes | memoryview, offset: int, limit: int) -> tuple[dict[bytes, bytes], int]:
    """Decode the v5 xattr table at ``offset``; return (pairs, aligned table size incl. the u64 size).

    Layout: ``u64 size`` then pairs ``{u32 pair_size, name NUL value}`` filling ``size`` bytes.
    """
    if offset < 0 or offset + 8 > limit or limit > len(buf):
        raise FormatError(f"v5 xattr table at {offset}: truncated (limit {limit})")
    (size,) = Scalar.U64.unpack_from(buf, offset)
    if offset + 8 + size > limit:
        raise FormatError(f"v5 xattr table at {offset}: size {size} beyond end {limit}")
    pos = offset + 8
    end = pos + size
    out: dict[bytes, bytes] = {}
    while pos < end:
        if pos + 4 > end:
            raise FormatError(f"v5 xattr pair at {pos}: truncated pair size")
        (pair_size,) = Scalar.U32.unpack_from(buf, pos)
        pos += 4
        if pair_size == 0 or pos + pair_size > end:
            raise FormatError(f"v5 xattr pair at {pos - 4}: pair_size {pair_size} beyond table end")
        pair = bytes(buf[pos : pos + pair_size])
        nul = pair.find(b"\0")
        if nul <= 0:
            raise FormatError(f"v5 xattr pair at {pos - 4}: name not NUL terminated or empty")
        out[pair[:nul]] = pair[nul + 1 :]
        pos += pair_size
    return out, 8 + rafsv5_align(size)


def pack_v5_xattrs(pairs: dict[bytes, bytes]) -> bytes:
    if not pairs:
        return b""
    body = b"".join(
        Scalar.U32.pack(len(k) + 1 + len(v)) + k + b"\0" + v for k, v in pairs.items()
    )
    return Scalar.U64.pack(len(body)) + body + bytes(rafsv5_align(len(body)) - len(body))


__all__ = [
    "RafsV5SuperBlock",
    "RafsV5Inode",
    "RafsV5ExtBlobEntry",
    "RafsV5ChunkInfo",
    "RafsV5BlobTableEntry",
    "parse_v5_blob_table",
    "pack_v5_blob_table",
    "parse_v5_xattrs",
    "pack_v5_xattrs",
    "rafsv5_align",
]
