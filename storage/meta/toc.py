"""Blob table of contents (``rafs.blob.toc``) and the reverse-tar section headers.

A nydus blob is a "reverse tar": each section's 512-byte GNU tar header comes *after* its
data.  ``walk_sections(read_at, blob_size)`` walks the headers backwards from the end and
returns the sections in file order; ``tar_header(name, size)`` writes one header exactly as
upstream does (mode/uid/gid NUL, mtime 0, type '0', magic ``"ustar  \\0"``).

The TOC is an array of 128-byte :class:`TocEntry` records stored as the last section;
``parse_toc`` decodes it, ``TocEntry.for_section`` builds one, ``extract_entry`` reads and
decompresses (none/zstd) one entry and checks its sha256.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Callable

import zstandard

from storage.errors import MetaFormatError
from storage.structs import Struct

TAR_BLOCK_SIZE = 512
TOC_ENTRY_SIZE = 128

#: section names (``storage/src/meta/toc.rs``)
ENTRY_BLOB_RAW = "image.blob"
ENTRY_BLOB_META = "blob.meta"
ENTRY_BLOB_META_HEADER = "blob.meta.header"
ENTRY_BLOB_DIGEST = "blob.digest"
ENTRY_BOOTSTRAP = "image.boot"
ENTRY_TOC = "rafs.blob.toc"

#: a reader callable: ``read_at(offset, size) -> bytes`` (exactly ``size`` bytes)
ReadAt = Callable[[int, int], bytes]


class TocFlags(enum.IntFlag):
    COMPRESSION_NONE = 0x1
    COMPRESSION_ZSTD = 0x2
    COMPRESSION_LZ4_BLOCK = 0x4


class TarHeader(Struct):
    """512-byte ustar/GNU tar header."""

    FIELDS = (
        ("name", "100s"),
        ("mode", "8s"),
        ("uid", "8s"),
        ("gid", "8s"),
        ("size", "12s"),
        ("mtime", "12s"),
        ("chksum", "8s"),
        ("typeflag", "1s"),
        ("linkname", "100s"),
        ("magic", "8s"),
        ("uname", "32s"),
        ("gname", "32s"),
        ("devmajor", "8s"),
        ("devminor", "8s"),
        ("prefix", "155s"),
        ("pad", "12s"),
    )


class TocEntry(Struct):
    """128-byte entry of ``rafs.blob.toc``."""

    FIELDS = (
        ("flags", "u32"),
        ("reserved1", "u32"),
        ("name", "16s"),
        ("uncompressed_digest", "32s"),
        ("compressed_offset", "u64"),
        ("compressed_size", "u64"),
        ("uncompressed_size", "u64"),
        ("reserved2", "48s"),
    )

    @property
    def entry_name(self) -> str:
        return self.name.rstrip(b"\0").decode("utf-8", "replace")

    @classmethod
    def for_section(cls, name: str, compressed_offset: int, compressed_size: int,
                    uncompressed_size: int, uncompressed_digest: bytes = bytes(32),
                    flags: int = TocFlags.COMPRESSION_NONE) -> "TocEntry":
        raw = name.encode()
        if len(raw) > 16:
            raise MetaFormatError(f"toc entry name {name!r} longer than 16 bytes")
        return cls(flags=int(flags), name=raw.ljust(16, b"\0"), uncompressed_digest=uncompressed_digest,
                   compressed_offset=compressed_offset, compressed_size=compressed_size,
                   uncompressed_size=uncompressed_size)

    def validate(self) -> None:
        if self.flags & ~0xF or not self.flags & 0x7:
            raise MetaFormatError(f"toc entry {self.entry_name!r}: flags {self.flags:#x} invalid")


@dataclass(frozen=True, slots=True)
class TarSection:
    """One reverse-tar section: data at ``[offset, offset+size)``, its header at ``header_offset``."""

    name: str
    offset: int
    size: int
    header_offset: int


def _octal(value: int, width: int) -> bytes:
    """``width-1`` octal digits and a NUL."""
    digits = b"%0*o" % (width - 1, value)
    if len(digits) > width - 1:
        raise MetaFormatError(f"tar field value {value} does not fit {width} bytes")
    return digits + b"\0"


def tar_header(name: str, size: int) -> bytes:
    """The GNU tar header upstream writes after a section of ``size`` bytes."""
    raw = name.encode()
    if len(raw) > 100:
        raise MetaFormatError(f"tar entry name {name!r} too long")
    size_field = _octal(size, 12) if size < 8 << 30 else b"\x80" + size.to_bytes(11, "big")  # GNU base-256
    hdr = TarHeader(name=raw, size=size_field, mtime=_octal(0, 12), chksum=b" " * 8,
                    typeflag=b"0", magic=b"ustar  \0")
    packed = hdr.pack()
    hdr.chksum = _octal(sum(packed), 8)
    return hdr.pack()


def parse_tar_header(buf: bytes, where: int = 0) -> tuple[str, int]:
    """``(name, size)`` of a header; checks the checksum. ``where`` is for messages only."""
    if len(buf) != TAR_BLOCK_SIZE:
        raise MetaFormatError(f"tar header at {where}: need 512 bytes, got {len(buf)}")
    hdr = TarHeader.parse(buf)
    try:
        want = int(hdr.chksum.replace(b"\0", b" ").strip() or b"-1", 8)
        if hdr.size[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
            size = int.from_bytes(hdr.size[1:], "big")
        else:
            size = int(hdr.size.replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError as exc:
        raise MetaFormatError(f"tar header at {where}: bad number field ({exc})") from exc
    got = sum(buf[:148]) + 8 * 32 + sum(buf[156:])
    if want != got:
        raise MetaFormatError(f"tar header at {where}: checksum {want} != computed {got}")
    return hdr.name.rstrip(b"\0").decode("utf-8", "replace"), size


def walk_sections(read_at: ReadAt, blob_size: int) -> list[TarSection]:
    """All reverse-tar sections of a blob, in file order.

    Stops at the start of the blob or when the bytes before a section are not a valid header
    (chunk data without an ``image.blob`` header).  Raises :class:`MetaFormatError` when the
    last 512 bytes are not a tar header.
    """
    sections: list[TarSection] = []
    pos = blob_size
    while pos >= TAR_BLOCK_SIZE:
        hdr_off = pos - TAR_BLOCK_SIZE
        try:
            name, size = parse_tar_header(read_at(hdr_off, TAR_BLOCK_SIZE), hdr_off)
        except MetaFormatError:
            if not sections:
                raise
            break
        if size > hdr_off:
            raise MetaFormatError(f"tar section {name!r} at {hdr_off}: size {size} exceeds blob start")
        sections.append(TarSection(name, hdr_off - size, size, hdr_off))
        pos = hdr_off - size
    sections.reverse()
    return sections


def parse_toc(buf: bytes) -> list[TocEntry]:
    """Decode TOC entries (the data of the ``rafs.blob.toc`` section)."""
    if len(buf) % TOC_ENTRY_SIZE:
        raise MetaFormatError(f"toc size {len(buf)} is not a multiple of {TOC_ENTRY_SIZE}")
    entries = TocEntry.parse_array(buf, 0, len(buf) // TOC_ENTRY_SIZE)
    for e in entries:
        e.validate()
    return entries


def read_toc(read_at: ReadAt, blob_size: int) -> tuple[list[TocEntry], bytes]:
    """Locate the TOC through the trailing tar header; returns ``(entries, toc_digest)``.

    ``toc_digest`` = sha256(entries ‖ tar header) as stored in the v6 blob table.
    """
    if blob_size < TAR_BLOCK_SIZE:
        raise MetaFormatError(f"blob of {blob_size} bytes has no TOC")
    hdr_off = blob_size - TAR_BLOCK_SIZE
    hdr = read_at(hdr_off, TAR_BLOCK_SIZE)
    name, size = parse_tar_header(hdr, hdr_off)
    if name != ENTRY_TOC:
        raise MetaFormatError(f"last tar section is {name!r}, not {ENTRY_TOC!r}")
    if size > hdr_off:
        raise MetaFormatError(f"toc size {size} exceeds the blob")
    data = read_at(hdr_off - size, size)
    return parse_toc(data), hashlib.sha256(data + hdr).digest()


def extract_entry(read_at: ReadAt, entry: TocEntry, *, offset_base: int = 0) -> bytes:
    """Read one TOC entry's content, decompress it (none/zstd) and check its sha256."""
    data = read_at(offset_base + entry.compressed_offset, entry.compressed_size)
    if entry.flags & TocFlags.COMPRESSION_ZSTD:
        try:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=entry.uncompressed_size)
        except zstandard.ZstdError as exc:
            raise MetaFormatError(f"toc entry {entry.entry_name!r}: zstd: {exc}") from exc
    elif not entry.flags & TocFlags.COMPRESSION_NONE:
        raise MetaFormatError(f"toc entry {entry.entry_name!r}: unsupported compression flags {entry.flags:#x}")
    if len(data) != entry.uncompressed_size:
        raise MetaFormatError(
            f"toc entry {entry.entry_name!r}: {len(data)} bytes, expected {entry.uncompressed_size}")
    if any(entry.uncompressed_digest) and hashlib.sha256(data).digest() != entry.uncompressed_digest:
        raise MetaFormatError(f"toc entry {entry.entry_name!r}: sha256 mismatch")
    return data
