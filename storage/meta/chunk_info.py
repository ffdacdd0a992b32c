"""Chunk-info (CI) entries of a blob's compression-context table.

v1 (16 bytes, ``BlobChunkInfoV1Ondisk``): sizes stored minus one, split 20+4 bits; no flags
("compressed" means compressed_size != uncompressed_size).  v2 (24 bytes,
``BlobChunkInfoV2Ondisk``): flags byte, exact compressed size, and a ``data`` word (ZRAN
context index/offset, batch index/offset, or CRC-32C).

API::

    chunks = decode_ci_array(ci_bytes, chunk_count, v2=False)   # -> list[BlobChunk]
    table = CiTable(ci_bytes, chunk_count, v2=False)             # the same, each entry made on use
    raw = encode_ci_array(chunks, v2=False)                      # round-trips
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar, overload

from storage.errors import MetaFormatError
from storage.structs import Struct, StructTooShort

#: largest chunk a CI entry can describe (24 bits of size-1)
MAX_CHUNK_SIZE = 1 << 24


class CiFlags(enum.IntFlag):
    """Flags byte of a v2 CI entry (bits 56..63 of ``uncomp_info``)."""

    COMPRESSED = 0x01
    ZRAN = 0x02
    BATCH = 0x04
    ENCRYPTED = 0x08
    HAS_CRC32 = 0x10


# plain ints for the per-chunk tests: ``int & IntFlag`` builds an enum member each time (~1 µs)
_COMPRESSED, _ZRAN, _BATCH, _HAS_CRC32 = (int(f) for f in (CiFlags.COMPRESSED, CiFlags.ZRAN, CiFlags.BATCH,
                                                            CiFlags.HAS_CRC32))


class ChunkInfoV1Ondisk(Struct):
    """16-byte v1 CI entry."""

    FIELDS = (("uncomp_info", "u64"), ("comp_info", "u64"))


class ChunkInfoV2Ondisk(Struct):
    """24-byte v2 CI entry."""

    FIELDS = (("uncomp_info", "u64"), ("comp_info", "u64"), ("data", "u64"))


@dataclass(frozen=True, slots=True)
class BlobChunk:
    """One decoded CI entry: where chunk ``index`` lives in the blob and in its uncompressed form.

    ``flags`` are :class:`CiFlags` (for v1 entries COMPRESSED is derived from the sizes);
    ``data`` is the v2 data word (0 for v1).
    """

    index: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    flags: int = 0
    data: int = 0

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & _COMPRESSED)

    @property
    def is_zran(self) -> bool:
        return bool(self.flags & _ZRAN)

    @property
    def is_batch(self) -> bool:
        return bool(self.flags & _BATCH)

    @property
    def context_index(self) -> int:
        """ZRAN/batch context index (v2 ``data`` high 32 bits)."""
        return self.data >> 32

    @property
    def context_offset(self) -> int:
        """Offset of the chunk inside its ZRAN/batch context's uncompressed output."""
        return self.data & 0xFFFF_FFFF

    @property
    def crc32(self) -> int:
        return self.data & 0xFFFF_FFFF if self.flags & _HAS_CRC32 else 0


def _check(chunk: BlobChunk) -> None:
    if not 0 < chunk.uncompressed_size <= MAX_CHUNK_SIZE:
        raise MetaFormatError(f"chunk {chunk.index}: uncompressed_size {chunk.uncompressed_size} out of range")
    if chunk.uncompressed_offset & 0xFFF:
        raise MetaFormatError(f"chunk {chunk.index}: uncompressed_offset {chunk.uncompressed_offset:#x} not 4K aligned")
    if chunk.compressed_offset >= 1 << 40:
        raise MetaFormatError(f"chunk {chunk.index}: compressed_offset {chunk.compressed_offset:#x} too large")


def encode_v1(chunk: BlobChunk) -> bytes:
    _check(chunk)
    if not 0 < chunk.compressed_size <= MAX_CHUNK_SIZE:
        raise MetaFormatError(f"chunk {chunk.index}: compressed_size {chunk.compressed_size} out of range for CI v1")
    if chunk.uncompressed_offset >= 1 << 44:
        raise MetaFormatError(f"chunk {chunk.index}: uncompressed_offset too large for CI v1")
    csz = chunk.compressed_size - 1
    usz = chunk.uncompressed_size - 1
    comp = chunk.compressed_offset | ((csz & 0xF0_0000) << 20) | ((csz & 0xF_FFFF) << 44)
    uncomp = ((usz & 0xF0_0000) >> 12) | chunk.uncompressed_offset | ((usz & 0xF_FFFF) << 44)
    return ChunkInfoV1Ondisk(uncomp_info=uncomp, comp_info=comp).pack()


def encode_v2(chunk: BlobChunk) -> bytes:
    _check(chunk)
    if chunk.compressed_size >= 1 << 24:
        raise MetaFormatError(f"chunk {chunk.index}: compressed_size {chunk.compressed_size} too large for CI v2")
    if chunk.uncompressed_offset >> 12 >= 1 << 32:
        raise MetaFormatError(f"chunk {chunk.index}: uncompressed_offset too large for CI v2")
    uncomp = (chunk.uncompressed_offset >> 12) | ((chunk.uncompressed_size - 1) << 32) | ((chunk.flags & 0xFF) << 56)
    comp = chunk.compressed_offset | (chunk.compressed_size << 40)
    return ChunkInfoV2Ondisk(uncomp_info=uncomp, comp_info=comp, data=chunk.data).pack()


def encode_ci_array(chunks: Iterable[BlobChunk], *, v2: bool = False) -> bytes:
    """Encode CI entries in order (the caller keeps ``index`` equal to the position)."""
    enc = encode_v2 if v2 else encode_v1
    return b"".join(enc(c) for c in chunks)


T = TypeVar("T")


class MadeOnUse(Sequence[T], Generic[T]):
    """``count`` items, item ``i`` made by ``make(i)`` each time it is asked for: a large table
    read as columns, without an object per row until a row is used."""

    __slots__ = ("_make", "_count")

    def __init__(self, make: Callable[[int], T], count: int) -> None:
        self._make = make
        self._count = count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self._make(k) for k in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"entry {i} out of range ({self._count} entries)")
        return self._make(i)

    def __iter__(self) -> Iterator[T]:
        return (self._make(k) for k in range(self._count))


class CiTable(MadeOnUse[BlobChunk]):
    """``count`` CI entries at ``offset`` of ``buf`` as a read-only sequence of :class:`BlobChunk`.

    The entries are read as columns (``Struct.parse_columns`` of the on-disk entry); each
    :class:`BlobChunk` is made when asked for. Loading the CI table of a blob of thousands
    of chunks then costs well under a millisecond instead of an object per chunk, on the path of
    the first read of that blob. Raises :class:`MetaFormatError` when ``buf`` is too short.
    """

    __slots__ = ("_uncomp", "_comp", "_data", "_v2")

    def __init__(self, buf: bytes | bytearray | memoryview, count: int, *, v2: bool = False, offset: int = 0) -> None:
        try:
            if v2:
                self._uncomp, self._comp, self._data = ChunkInfoV2Ondisk.parse_columns(
                    buf, offset, count, "uncomp_info", "comp_info", "data")
            else:
                self._uncomp, self._comp = ChunkInfoV1Ondisk.parse_columns(buf, offset, count, "uncomp_info", "comp_info")
                self._data = []
        except StructTooShort as exc:
            raise MetaFormatError(f"chunk-info array truncated: {exc}") from exc
        self._v2 = v2
        super().__init__(self._entry, count)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CiTable):
            return (self._v2, self._uncomp, self._comp, self._data) == (other._v2, other._uncomp, other._comp, other._data)
        if isinstance(other, (list, tuple)):
            return len(other) == self._count and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._v2, tuple(self._uncomp), tuple(self._comp)))

    def __repr__(self) -> str:
        return f"CiTable({self._count} {'v2' if self._v2 else 'v1'} entries)"

    def _entry(self, i: int) -> BlobChunk:
        u, c = self._uncomp[i], self._comp[i]
        if self._v2:
            return BlobChunk(i, c & 0xFF_FFFF_FFFF, c >> 40, (u & 0xFFFF_FFFF) << 12,
                             ((u >> 32) & 0xFF_FFFF) + 1, u >> 56, self._data[i])
        csz = (((c >> 20) & 0xF0_0000) | (c >> 44)) + 1
        usz = (((u & 0xF00) << 12) | (u >> 44)) + 1
        return BlobChunk(i, c & 0xFF_FFFF_FFFF, csz, u & 0xFFF_FFFF_F000, usz,
                         int(CiFlags.COMPRESSED) if csz != usz else 0, 0)


def decode_ci_array(buf: bytes | bytearray | memoryview, count: int, *, v2: bool = False, offset: int = 0) -> list[BlobChunk]:
    """Decode ``count`` CI entries at ``offset`` of ``buf``; raises :class:`MetaFormatError`."""
    return list(CiTable(buf, count, v2=v2, offset=offset))
