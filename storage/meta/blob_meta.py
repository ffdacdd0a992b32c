"""A blob's chunk-info (CI) table: load it from the blob or from a ``.blob.meta`` cache file.

API (used by the storage cache and the builder)::

    meta = load_from_blob(read_at, blob_size)                    # via the reverse-tar "blob.meta"
    meta = load_from_blob(read_at, blob_size, ci_offset=..., ci_compressed_size=...,
                          ci_uncompressed_size=..., ci_compressor=...)   # via blob-table fields
    meta = load_blob_meta_file(path)                             # <blob_id>.blob.meta cache file
    write_blob_meta_file(path, meta)                             # temp + rename
    meta.chunks[i]  -> BlobChunk (compressed/uncompressed offset+size, flags)
    meta.build_section(...) / BlobMeta.build(...)                # builder side

``read_at(offset, size) -> bytes`` must return exactly ``size`` bytes.  The cache-file layout
is the uncompressed CI data padded to 4 KiB followed by the 4096-byte header.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from storage.atomic import atomic_write
from storage.compress import compress, decompress
from storage.errors import DecompressError, MetaFormatError
from storage.meta.chunk_info import BlobChunk, CiTable, encode_ci_array
from storage.meta.header import BLOB_CCT_HEADER_SIZE, BlobCompressionContextHeader
from storage.meta.toc import ENTRY_BLOB_META, ReadAt, walk_sections
from storage.records import BlobFeatures, Compressor
from storage.structs import Struct, StructTooShort

CI_V1_SIZE = 16
CI_V2_SIZE = 24


class ZranContext(Struct):
    """40-byte ZRAN context (random-access point into an original gzip stream)."""

    FIELDS = (
        ("in_offset", "u64"),
        ("out_offset", "u64"),
        ("dict_offset", "u64"),
        ("in_len", "u32"),
        ("out_len", "u32"),
        ("dict_size", "u32"),
        ("ctx_byte", "u8"),
        ("ctx_bits", "u8"),
        ("reserved", "2s"),
    )


def _round_up_4k(n: int) -> int:
    return (n + 4095) & ~4095


@dataclass(frozen=True, slots=True)
class BlobMeta:
    """Header plus decoded CI entries (and the raw uncompressed CI data incl. ZRAN/batch contexts)."""

    header: BlobCompressionContextHeader
    chunks: Sequence[BlobChunk]   #: a :class:`CiTable` when decoded (each entry made on use)
    ci_data: bytes

    @property
    def features(self) -> int:
        return self.header.s_features

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    @property
    def is_v2(self) -> bool:
        return bool(self.header.s_features & BlobFeatures.CHUNK_INFO_V2)

    def zran_contexts(self) -> list[ZranContext]:
        h = self.header
        if not h.s_ci_zran_count:
            return []
        try:
            return ZranContext.parse_array(self.ci_data, h.s_ci_zran_offset, h.s_ci_zran_count)
        except StructTooShort as exc:
            raise MetaFormatError(f"zran contexts truncated: {exc}") from exc

    def zran_dictionary(self, ctx: ZranContext) -> bytes:
        """The 32 KiB window of a ZRAN context."""
        h = self.header
        base = h.s_ci_zran_offset + h.s_ci_zran_count * ZranContext.SIZE
        start = base + ctx.dict_offset
        if start + ctx.dict_size > len(self.ci_data):
            raise MetaFormatError(f"zran dictionary at {start}+{ctx.dict_size} beyond CI data")
        return self.ci_data[start:start + ctx.dict_size]

    @classmethod
    def build(cls, chunks: Sequence[BlobChunk], *, features: int, ci_compressor: Compressor,
              ci_offset: int, zran: Sequence[tuple[ZranContext, bytes]] = (),
              zstd_level: int | None = None) -> tuple["BlobMeta", bytes]:
        """Builder side: encode the CI array for a blob whose CI starts at ``ci_offset``.

        Returns ``(meta, section)`` where ``section`` = compressed CI ‖ 4096-byte header,
        exactly the ``blob.meta`` section content.  The CI array is stored raw (compressor
        NONE) when compression does not make it smaller.  ``zran``: (context, window) pairs of a
        ZRAN blob, stored after the CI array as upstream does (contexts, then the windows; each
        context's ``dict_offset``/``dict_size`` are filled in here). ``zstd_level``: for a zstd
        ``ci_compressor`` (default: the builder's level).
        """
        v2 = bool(features & BlobFeatures.CHUNK_INFO_V2)
        ci_data = encode_ci_array(chunks, v2=v2)
        zran_extra: dict[str, int] = {}
        if zran:
            dict_offset, packed_ctx, windows = 0, [], []
            for ctx, window in zran:
                packed_ctx.append(ZranContext(**{**ctx.__dict__, "dict_offset": dict_offset,
                                                 "dict_size": len(window)}).pack())
                windows.append(window)
                dict_offset += len(window)
            area = b"".join(packed_ctx) + b"".join(windows)
            zran_extra = dict(s_ci_zran_count=len(zran), s_ci_zran_size=len(area))
            ci_data += area
        packed = compress(ci_compressor, ci_data, zstd_level=zstd_level) if ci_data else b""
        if ci_compressor == Compressor.NONE or len(packed) >= len(ci_data):
            packed, ci_compressor = ci_data, Compressor.NONE
        header = BlobCompressionContextHeader.new(
            s_features=int(features), s_ci_compressor=int(ci_compressor), s_ci_entries=len(chunks),
            s_ci_offset=ci_offset, s_ci_compressed_size=len(packed), s_ci_uncompressed_size=len(ci_data),
            s_ci_zran_offset=len(chunks) * CI_V2_SIZE if v2 else 0, **zran_extra)
        return cls(header, tuple(chunks), ci_data), packed + header.pack()


def load_from_ci_bytes(ci_compressed: bytes, header: BlobCompressionContextHeader) -> BlobMeta:
    """Validate ``header``, decompress the CI array and decode it."""
    header.validate()
    h = header
    if len(ci_compressed) != h.s_ci_compressed_size:
        raise MetaFormatError(f"CI array: {len(ci_compressed)} bytes, header says {h.s_ci_compressed_size}")
    try:
        ci_data = decompress(Compressor(h.s_ci_compressor), ci_compressed, h.s_ci_uncompressed_size)
    except (DecompressError, ValueError) as exc:
        raise MetaFormatError(f"CI array does not decompress: {exc}") from exc
    return _decode(h, ci_data)


def _decode(h: BlobCompressionContextHeader, ci_data: bytes) -> BlobMeta:
    v2 = bool(h.s_features & BlobFeatures.CHUNK_INFO_V2)
    entry = CI_V2_SIZE if v2 else CI_V1_SIZE
    need = h.s_ci_entries * entry
    special = h.s_features & (BlobFeatures.ZRAN | BlobFeatures.BATCH | BlobFeatures.ENCRYPTED)
    if special and not v2:
        raise MetaFormatError(f"blob meta: features {h.s_features:#x} need CHUNK_INFO_V2")
    if (need > len(ci_data)) if special else (need != len(ci_data)):
        if not h.s_features & BlobFeatures.IS_CHUNKDICT_GENERATED or need > len(ci_data):
            raise MetaFormatError(
                f"blob meta: s_ci_uncompressed_size {len(ci_data)} does not fit {h.s_ci_entries} "
                f"{'v2' if v2 else 'v1'} entries")
    if h.s_ci_zran_count and h.s_ci_zran_offset + h.s_ci_zran_size > len(ci_data):
        raise MetaFormatError(
            f"blob meta: zran area {h.s_ci_zran_offset}+{h.s_ci_zran_size} beyond CI data {len(ci_data)}")
    return BlobMeta(h, CiTable(ci_data, h.s_ci_entries, v2=v2), bytes(ci_data))


def _check_expected(h: BlobCompressionContextHeader, **expect: int | None) -> None:
    for name, want in expect.items():
        if want is not None and getattr(h, "s_" + name) != int(want):
            raise MetaFormatError(f"blob meta header: s_{name} {getattr(h, 's_' + name)} != blob table {int(want)}")


def load_from_blob(read_at: ReadAt, blob_size: int, *, ci_offset: int | None = None,
                   ci_compressed_size: int | None = None, ci_uncompressed_size: int | None = None,
                   ci_compressor: int | None = None, chunk_count: int | None = None) -> BlobMeta:
    """Load the CI table of a blob.

    With ``ci_offset``/``ci_compressed_size`` (from the v6 blob table) reads
    ``ci_compressed_size + 4096`` bytes there; otherwise finds the ``blob.meta`` reverse-tar
    section.  Given blob-table values are checked against the header.
    """
    if ci_offset is None or ci_compressed_size is None:
        found = [s for s in walk_sections(read_at, blob_size) if s.name == ENTRY_BLOB_META]
        if not found:
            raise MetaFormatError("blob has no blob.meta section")
        sec = found[-1]
        if sec.size < BLOB_CCT_HEADER_SIZE:
            raise MetaFormatError(f"blob.meta section of {sec.size} bytes is smaller than its header")
        raw = read_at(sec.offset, sec.size)
        ci_len = sec.size - BLOB_CCT_HEADER_SIZE
        header = BlobCompressionContextHeader.parse(raw, ci_len)
        header.validate()
        if header.s_ci_offset != sec.offset or header.s_ci_compressed_size != ci_len:
            raise MetaFormatError(
                f"blob meta header: ci {header.s_ci_offset}+{header.s_ci_compressed_size} != "
                f"section {sec.offset}+{ci_len}")
    else:
        if ci_offset + ci_compressed_size + BLOB_CCT_HEADER_SIZE > blob_size:
            raise MetaFormatError(
                f"ci_offset {ci_offset} + ci_compressed_size {ci_compressed_size} + header beyond blob size {blob_size}")
        raw = read_at(ci_offset, ci_compressed_size + BLOB_CCT_HEADER_SIZE)
        ci_len = ci_compressed_size
        header = BlobCompressionContextHeader.parse(raw, ci_len)
        header.validate()
        _check_expected(header, ci_offset=ci_offset, ci_compressed_size=ci_compressed_size)
    _check_expected(header, ci_uncompressed_size=ci_uncompressed_size, ci_compressor=ci_compressor,
                    ci_entries=chunk_count)
    return load_from_ci_bytes(bytes(raw[:ci_len]), header)


def encode_blob_meta_file(meta: BlobMeta) -> bytes:
    """Cache-file form: uncompressed CI data padded to 4 KiB, then the header."""
    pad = _round_up_4k(len(meta.ci_data)) - len(meta.ci_data)
    return meta.ci_data + bytes(pad) + meta.header.pack()


def parse_blob_meta_file(buf: bytes | memoryview) -> BlobMeta:
    """Decode a ``.blob.meta`` cache file's bytes."""
    if len(buf) < BLOB_CCT_HEADER_SIZE or len(buf) % 4096:
        raise MetaFormatError(f"blob.meta file size {len(buf)} is not a positive multiple of 4096")
    header = BlobCompressionContextHeader.parse(buf, len(buf) - BLOB_CCT_HEADER_SIZE)
    header.validate()
    size = header.s_ci_uncompressed_size
    if _round_up_4k(size) + BLOB_CCT_HEADER_SIZE != len(buf):
        raise MetaFormatError(
            f"blob.meta file size {len(buf)} != round_up_4k(ci_uncompressed_size {size}) + 4096")
    return _decode(header, bytes(buf[:size]))


def load_blob_meta_file(path: str | os.PathLike) -> BlobMeta:
    """Load a ``<blob_id>.blob.meta`` cache file; raises :class:`MetaFormatError`."""
    with open(path, "rb") as f:
        return parse_blob_meta_file(f.read())


def write_blob_meta_file(path: str | os.PathLike, meta: BlobMeta) -> None:
    """Write a cache file atomically (temp file in the same directory + fsync + rename)."""
    atomic_write(path, encode_blob_meta_file(meta), perms=0o600)


def expand_blob(read_at: ReadAt, meta: BlobMeta, compressor: int, out: "os.PathLike | str") -> int:
    """Write the blob's uncompressed form (each chunk at its uncompressed offset, zero gaps) to
    ``out`` — the layout of a complete ``<blob_id>.blob.data`` cache file, which the kernel
    EROFS driver reads as the blob device.  Returns the file size.  Not for ZRAN/batch blobs."""
    if meta.header.s_features & (BlobFeatures.ZRAN | BlobFeatures.BATCH | BlobFeatures.ENCRYPTED):
        raise MetaFormatError("expand_blob: ZRAN/batch/encrypted blobs are not supported")
    size = 0
    with open(out, "wb") as f:
        for c in meta.chunks:
            raw = read_at(c.compressed_offset, c.compressed_size)
            if c.is_compressed:
                try:
                    raw = decompress(Compressor(compressor), raw, c.uncompressed_size)
                except DecompressError as exc:
                    raise MetaFormatError(f"chunk {c.index}: {exc}") from exc
            elif len(raw) != c.uncompressed_size:
                raise MetaFormatError(f"chunk {c.index}: raw size {len(raw)} != {c.uncompressed_size}")
            f.seek(c.uncompressed_offset)
            f.write(raw)
            size = max(size, _round_up_4k(c.uncompressed_offset + c.uncompressed_size))
        f.truncate(size)
    return size
