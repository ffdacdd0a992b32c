"""storage.meta: CI entries, blob meta header, TOC and reverse tar, on upstream vectors."""

from __future__ import annotations

import hashlib

import pytest

from storage.errors import MetaFormatError
from storage.meta import (
    BlobChunk,
    BlobCompressionContextHeader,
    BlobMeta,
    TocEntry,
    decode_ci_array,
    encode_blob_meta_file,
    encode_ci_array,
    load_blob_meta_file,
    load_from_blob,
    tar_header,
    walk_sections,
    write_blob_meta_file,
)
from storage.meta.blob_meta import parse_blob_meta_file
from storage.meta.toc import extract_entry, parse_tar_header, read_toc
from storage.records import BlobFeatures, Compressor

BE7D = "dragonflyoss-nydus/tests/texture/blobs/be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
TOC = "dragonflyoss-nydus/tests/texture/toc/2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
ZRAN = "dragonflyoss-nydus/tests/texture/zran/233c72f2b6b698c07021c4da367cfe2dff4f049efbaa885ca0ff760ea297865a.blob.meta"


def _reader(buf: bytes):
    return lambda off, size: buf[off:off + size]


def test_struct_sizes():
    assert len(BlobCompressionContextHeader) == 4096
    assert len(TocEntry) == 128
    from storage.meta.blob_meta import ZranContext
    from storage.meta.chunk_info import ChunkInfoV1Ondisk, ChunkInfoV2Ondisk
    from storage.meta.toc import TarHeader
    assert (len(ChunkInfoV1Ondisk), len(ChunkInfoV2Ondisk), len(ZranContext), len(TarHeader)) == (16, 24, 40, 512)


@pytest.mark.parametrize("v2", [False, True])
def test_ci_roundtrip(v2):
    chunks = [
        BlobChunk(0, 0, 4828, 0, 16931, 1),
        BlobChunk(1, 4828, 1 << 20, 20480, 1 << 20, 0),
        BlobChunk(2, (1 << 39) + 5, 0xABCDE, 1 << 40, (1 << 24), 1),
    ]
    raw = encode_ci_array(chunks, v2=v2)
    assert len(raw) == (24 if v2 else 16) * 3
    assert decode_ci_array(raw, 3, v2=v2) == chunks


@pytest.mark.parametrize("v2", [False, True])
def test_ci_table_reads_entries_on_use(v2):
    from storage.meta.chunk_info import CiTable

    chunks = [BlobChunk(i, i * 5000, 4000 + i, i << 20, 1 << 20, 1, (i << 32) | 7 if v2 else 0) for i in range(50)]
    raw = b"\xff" * 8 + encode_ci_array(chunks, v2=v2)  # at an offset, as inside a blob.meta
    table = CiTable(raw, 50, v2=v2, offset=8)
    assert len(table) == 50 and table == chunks and list(table) == chunks
    assert table[0] == chunks[0] and table[-1] == chunks[49] and table[10:13] == chunks[10:13]
    assert table == CiTable(raw, 50, v2=v2, offset=8) and table != chunks[:49]
    with pytest.raises(IndexError):
        table[50]
    with pytest.raises(MetaFormatError, match="truncated"):
        CiTable(raw, 51, v2=v2, offset=8)


def test_loaded_blob_meta_keeps_the_ci_table_lazy():
    from storage.meta.blob_meta import BlobMeta, load_from_ci_bytes
    from storage.meta.chunk_info import CiTable
    from storage.meta.header import BlobCompressionContextHeader
    from storage.records import Compressor

    chunks = [BlobChunk(i, i * 3000, 3000, i << 12, 4096, 1) for i in range(2000)]
    meta, packed = BlobMeta.build(chunks, features=0, ci_compressor=Compressor.ZSTD, ci_offset=0)
    header = BlobCompressionContextHeader.parse(packed, len(packed) - BlobCompressionContextHeader.SIZE)
    loaded = load_from_ci_bytes(packed[: header.s_ci_compressed_size], header)
    assert isinstance(loaded.chunks, CiTable) and loaded.chunk_count == 2000
    assert loaded.chunks[1999] == chunks[1999] and loaded.chunks == meta.chunks


def test_ci_rejects_bad_values():
    with pytest.raises(MetaFormatError):
        encode_ci_array([BlobChunk(0, 0, 10, 100, 10)])  # unaligned uncompressed offset
    with pytest.raises(MetaFormatError):
        encode_ci_array([BlobChunk(0, 0, 10, 0, (1 << 24) + 1)])
    with pytest.raises(MetaFormatError):
        decode_ci_array(b"\0" * 20, 2)


def test_be7d_blob_sections_and_ci(vectors_dir):
    blob = (vectors_dir / BE7D).read_bytes()
    read = _reader(blob)
    secs = walk_sections(read, len(blob))
    assert [(s.name, s.offset, s.size) for s in secs] == [
        ("image.blob", 0, 7802), ("blob.meta", 8314, 4128), ("blob.digest", 12954, 64), ("rafs.blob.toc", 13530, 512)]
    # our header writer produces upstream's bytes exactly
    for s in secs:
        assert tar_header(s.name, s.size) == blob[s.header_offset:s.header_offset + 512]
    entries, toc_digest = read_toc(read, len(blob))
    assert [e.entry_name for e in entries] == ["image.blob", "blob.meta", "blob.meta.header", "blob.digest"]
    # 2.2 quirk: image.blob's compressed_offset equals its size
    assert entries[0].compressed_offset == entries[0].compressed_size == 7802
    assert len(toc_digest) == 32
    meta = load_from_blob(read, len(blob))
    assert meta.header.s_features == 0x70000021
    assert meta.chunks == (
        BlobChunk(0, 0x0, 0x12DC, 0x0, 16931, 1),
        BlobChunk(1, 0x12DC, 0xB9E, 0x5000, 13400, 1),
    )
    # the same via blob-table fields
    again = load_from_blob(read, len(blob), ci_offset=8314, ci_compressed_size=32, ci_uncompressed_size=32,
                           ci_compressor=0, chunk_count=2)
    assert again.chunks == meta.chunks
    with pytest.raises(MetaFormatError):
        load_from_blob(read, len(blob), ci_offset=8314, ci_compressed_size=32, chunk_count=3)
    # chunk data decodes to the sizes the CI says; digest array has one digest per chunk
    from storage.compress import decompress
    for c in meta.chunks:
        data = decompress(Compressor.ZSTD, blob[c.compressed_offset:c.compressed_offset + c.compressed_size],
                          c.uncompressed_size)
        assert len(data) == c.uncompressed_size
    import blake3
    digests = blob[12954:12954 + 64]
    c0 = meta.chunks[0]
    d0 = decompress(Compressor.ZSTD, blob[c0.compressed_offset:c0.compressed_offset + c0.compressed_size], c0.uncompressed_size)
    assert blake3.blake3(d0).digest() == digests[:32]


def test_toc_blob_inline_bootstrap(vectors_dir):
    blob = (vectors_dir / TOC).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == TOC.rsplit("/", 1)[1]
    read = _reader(blob)
    entries, toc_digest = read_toc(read, len(blob))
    assert [e.entry_name for e in entries] == ["image.blob", "blob.meta", "blob.meta.header", "image.boot"]
    assert toc_digest.hex().startswith("4fdfbb36ef74a3c6") and toc_digest.hex().endswith("286c")
    boot = extract_entry(read, entries[3])
    assert len(boot) == 20480
    assert hashlib.sha256(boot).digest() == entries[3].uncompressed_digest
    assert entries[1].uncompressed_size == 0x30 and entries[2].uncompressed_size == 0x1000
    meta = load_from_blob(read, len(blob))
    assert meta.chunk_count == 3 and meta.features == BlobFeatures.ALIGNED
    # tampering with the inline bootstrap is detected
    bad = bytearray(blob)
    bad[entries[3].compressed_offset + 10] ^= 0xFF
    with pytest.raises(MetaFormatError):
        extract_entry(_reader(bytes(bad)), entries[3])


def test_zran_blob_meta_file(vectors_dir, tmp_path):
    meta = load_blob_meta_file(vectors_dir / ZRAN)
    h = meta.header
    assert h.s_features == 0xF and h.s_ci_uncompressed_size == 0xA1290
    assert meta.chunk_count == 163 and meta.is_v2
    assert all(c.is_zran and c.is_compressed for c in meta.chunks)
    ctxs = meta.zran_contexts()
    assert len(ctxs) == 21 and h.s_ci_zran_offset == 163 * 24
    assert meta.chunks[-1].context_index < 21
    assert len(meta.zran_dictionary(ctxs[1])) == ctxs[1].dict_size == 32768
    # write -> identical bytes
    out = tmp_path / "x.blob.meta"
    write_blob_meta_file(out, meta)
    assert out.read_bytes() == (vectors_dir / ZRAN).read_bytes()


def test_blob_meta_build_and_negative(tmp_path):
    chunks = [BlobChunk(i, i * 100, 100, i * 4096, 4000, 1) for i in range(50)]
    meta, section = BlobMeta.build(chunks, features=BlobFeatures.ALIGNED, ci_compressor=Compressor.ZSTD, ci_offset=5000)
    assert meta.header.s_ci_compressor == Compressor.ZSTD and len(section) == meta.header.s_ci_compressed_size + 4096
    blob = bytes(5000) + section + tar_header("blob.meta", len(section))
    loaded = load_from_blob(_reader(blob), len(blob))
    assert loaded.chunks == tuple(chunks)
    raw = encode_blob_meta_file(loaded)
    assert parse_blob_meta_file(raw).chunks == tuple(chunks)
    broken = bytearray(raw)
    broken[-4] ^= 1
    with pytest.raises(MetaFormatError, match="magic2"):
        parse_blob_meta_file(bytes(broken))
    with pytest.raises(MetaFormatError):
        parse_blob_meta_file(raw[:-4096])
    with pytest.raises(MetaFormatError, match="checksum"):
        hdr = bytearray(tar_header("x", 1))
        hdr[0] = ord("y")
        parse_tar_header(bytes(hdr))


def test_tar_header_large_size():
    big = (10 << 30) + 7
    name, size = parse_tar_header(tar_header("image.blob", big))
    assert (name, size) == ("image.blob", big)
    assert parse_tar_header(tar_header("x", 512)) == ("x", 512)


@pytest.mark.parametrize("ci_compressor", [Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD])
@pytest.mark.parametrize("v2", [False, True])
def test_ci_compressors_and_versions_roundtrip(ci_compressor, v2):
    """blob.meta with a none/lz4_block/zstd-compressed v1 or v2 CI array: header magics
    0xB10BB10B at both ends of the 4 KiB header, found via the reverse-tar section and via the
    blob-table fields, and the CI table decodes back."""
    from storage.meta.header import BLOB_CCT_MAGIC

    chunks = [BlobChunk(i, i * 1000, 900 + i, i * 4096, 4096, 1) for i in range(200)]
    features = BlobFeatures.ALIGNED | (BlobFeatures.CHUNK_INFO_V2 if v2 else 0)
    meta, section = BlobMeta.build(chunks, features=features, ci_compressor=ci_compressor, ci_offset=8192)
    assert meta.header.s_ci_compressor == ci_compressor  # 200 regular entries always compress
    assert meta.header.s_ci_uncompressed_size == len(chunks) * (24 if v2 else 16)
    header = section[-4096:]
    assert int.from_bytes(header[:4], "little") == BLOB_CCT_MAGIC == int.from_bytes(header[-4:], "little")
    blob = bytes(8192) + section + tar_header("blob.meta", len(section))
    by_section = load_from_blob(_reader(blob), len(blob))
    by_table = load_from_blob(_reader(blob), len(blob), ci_offset=8192,
                              ci_compressed_size=meta.header.s_ci_compressed_size,
                              ci_uncompressed_size=meta.header.s_ci_uncompressed_size,
                              ci_compressor=int(ci_compressor), chunk_count=len(chunks))
    assert by_section.chunks == by_table.chunks == tuple(chunks)
    assert by_section.is_v2 == v2
    if ci_compressor != Compressor.NONE:
        bad = bytearray(blob)
        n = meta.header.s_ci_compressed_size
        bad[8192:8192 + n] = b"\xff" * n  # garbage instead of the compressed CI array
        with pytest.raises(MetaFormatError):
            load_from_blob(_reader(bytes(bad)), len(bad))
