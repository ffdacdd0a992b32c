"""RAFS on-disk structs: sizes, parse -> pack round trips, validation, vector superblocks."""

from __future__ import annotations

import random
import tarfile

import pytest

import rafs.layout as L
from rafs.errors import FormatError
from storage.records import Compressor, Digester

SIZES = {
    L.RafsV6SuperBlock: 128,
    L.RafsV6SuperBlockExt: 256,
    L.ErofsDeviceSlot: 128,
    L.RafsV6Blob: 256,
    L.ErofsInodeCompact: 32,
    L.ErofsInodeExtended: 64,
    L.ErofsInodeChunkIndex: 8,
    L.ErofsDirent: 12,
    L.ErofsXattrIbodyHeader: 12,
    L.ErofsXattrEntry: 4,
    L.RafsV5ChunkInfo: 80,
    L.RafsV5SuperBlock: 8192,
    L.RafsV5Inode: 128,
    L.RafsV5ExtBlobEntry: 64,
}


@pytest.mark.parametrize("cls,size", [(c, s) for c, s in SIZES.items()], ids=lambda x: getattr(x, "__name__", str(x)))
def test_sizes_and_random_roundtrip(cls, size):
    assert len(cls) == cls.SIZE == size
    rng = random.Random(size)
    for _ in range(20):
        raw = bytes(rng.getrandbits(8) for _ in range(size))
        obj = cls.parse(raw)
        assert obj.pack() == raw
        assert cls.parse(obj.pack()) == obj
        buf = bytearray(size + 8)
        obj.pack_into(buf, 8)
        assert bytes(buf[8:]) == raw


def test_constants():
    assert L.EROFS_SUPER_OFFSET == 1024
    assert L.EROFS_SUPER_MAGIC_V1 == 0xE0F5E1E2
    assert L.RAFSV5_SUPER_MAGIC == 0x52414653
    assert L.EROFS_INODE_SLOT_SIZE == 32
    assert L.EROFS_BLKSIZ == 4096
    assert L.EROFS_DEVT_SLOT_OFFSET == 11
    assert L.RAFSV6_DEVSLOT_OFFSET == 1408
    assert (L.EROFS_INODE_FLAT_PLAIN, L.EROFS_INODE_FLAT_INLINE, L.EROFS_INODE_CHUNK_BASED) == (0, 2, 4)
    assert L.EROFS_CHUNK_FORMAT_INDEXES == 0x20
    assert L.RAFSV6_FEATURE_INCOMPAT == 0xC
    assert L.EROFS_FEATURE_COMPAT_RAFS_V6 == 0x4000_0000
    assert L.RafsSuperFlags.INLINED_CHUNK_DIGEST == 0x100
    assert L.EROFS_XATTR_PREFIXES[1] == b"user." and L.EROFS_XATTR_PREFIXES[6] == b"security."


def test_inode_format_helpers():
    f = L.inode_format(1, L.EROFS_INODE_CHUNK_BASED)
    assert f == 9 and L.inode_version(f) == 1 and L.inode_datalayout(f) == 4
    assert L.inode_format(0, L.EROFS_INODE_FLAT_INLINE) == 4
    L.ErofsInodeExtended(i_format=f).validate()
    with pytest.raises(FormatError, match="i_format"):
        L.ErofsInodeExtended(i_format=0x19).validate()
    with pytest.raises(FormatError, match="data layout"):
        L.ErofsInodeCompact(i_format=L.inode_format(0, 1)).validate()
    with pytest.raises(FormatError, match="not a compact"):
        L.ErofsInodeCompact(i_format=1).validate()


def test_chunk_format_and_address():
    assert L.encode_chunk_format(1 << 20, 12) == 0x28
    assert L.decode_chunk_format(0x28, 12) == 1 << 20
    for bad in (0x08, 0x10028, 0x68):
        with pytest.raises(FormatError):
            L.decode_chunk_format(bad, 12)
    with pytest.raises(FormatError):
        L.encode_chunk_format(3000, 12)
    a = L.ErofsInodeChunkIndex.encode(blob_index=3, ci_index=0x12_3456, blkaddr=77)
    assert (a.advise, a.device_id, a.blkaddr) == (0x3456, 0x1204, 77)
    back = L.ErofsInodeChunkIndex.parse(a.pack())
    assert (back.blob_index, back.ci_index, back.blkaddr) == (3, 0x12_3456, 77)
    back.validate()
    with pytest.raises(FormatError, match="device_id"):
        L.ErofsInodeChunkIndex(device_id=0x100).validate()
    with pytest.raises(FormatError, match="blob_index"):
        L.ErofsInodeChunkIndex.encode(255, 0, 0)
    with pytest.raises(FormatError, match="ci_index"):
        L.ErofsInodeChunkIndex.encode(0, 1 << 24, 0)


def test_xattr_helpers():
    assert L.xattr_ibody_size(0) == 0
    assert L.xattr_ibody_size(1) == 12 and L.xattr_ibody_size(5) == 28
    assert L.xattr_icount(28) == 5
    assert L.xattr_split_name(b"user.foo") == (1, b"foo")
    assert L.xattr_split_name(b"system.posix_acl_access") == (2, b"")
    assert L.xattr_split_name(b"security.capability") == (6, b"capability")
    with pytest.raises(FormatError, match="prefix"):
        L.xattr_split_name(b"foo.bar")
    with pytest.raises(FormatError, match="e_name_index"):
        L.ErofsXattrEntry(e_name_index=9).validate()


def test_flag_helpers():
    assert L.compressor_from_flags(0x194) == Compressor.ZSTD
    assert L.digester_from_flags(0x194) == Digester.BLAKE3
    assert L.compressor_from_flags(0x9) == Compressor.NONE
    assert L.digester_from_flags(0x9) == Digester.SHA256
    assert L.compressor_from_flags(0x6) == Compressor.LZ4_BLOCK
    assert L.flags_from_algorithms(Compressor.ZSTD, Digester.BLAKE3) == 0x84
    with pytest.raises(FormatError, match="s_flags"):
        L.validate_super_flags("X", 0x1000)
    with pytest.raises(FormatError, match="COMPRESSION"):
        L.validate_super_flags("X", 0x3)


def test_v5_tables_roundtrip():
    entries = [L.RafsV5BlobTableEntry(0, 0, "a" * 64), L.RafsV5BlobTableEntry(1, 2, "b" * 64)]
    raw = L.pack_v5_blob_table(entries)
    assert len(raw) % 8 == 0
    assert L.parse_v5_blob_table(raw) == entries
    pairs = {b"user.a": b"1", b"security.capability": b"\x01\x02"}
    raw = L.pack_v5_xattrs(pairs)
    got, size = L.parse_v5_xattrs(raw, 0, len(raw))
    assert got == pairs and size == len(raw)
    with pytest.raises(FormatError):
        L.parse_v5_xattrs(raw[:-8], 0, len(raw) - 8)


def _v6_boot(vectors_dir):
    return (vectors_dir / "dragonflyoss-nydus/tests/texture/bootstrap/rafs-v6-2.2.boot").read_bytes()


def _from_tar(path):
    with tarfile.open(path) as tf:
        return tf.extractfile("image/image.boot").read()


def test_v6_vector_superblocks(vectors_dir):
    b = _v6_boot(vectors_dir)
    sb = L.RafsV6SuperBlock.parse(b, L.EROFS_SUPER_OFFSET)
    sb.validate()
    assert (sb.s_magic, sb.s_blkszbits, sb.s_root_nid, sb.s_inos, sb.s_meta_blkaddr) == (
        0xE0F5E1E2, 12, 128, 3, 2)
    assert (sb.s_extra_devices, sb.s_devt_slotoff, sb.s_feature_incompat) == (1, 11, 0xC)
    assert sb.pack() == b[1024:1152]
    ext = L.RafsV6SuperBlockExt.parse(b, L.RAFSV6_EXT_SUPER_OFFSET)
    ext.validate()
    assert ext.s_flags == 0x194 and ext.s_chunk_size == 1 << 20
    assert (ext.s_blob_table_offset, ext.s_blob_table_size) == (4096, 256)
    assert (ext.s_chunk_table_offset, ext.s_chunk_table_size) == (16384, 160)
    assert ext.pack() == b[1152:1408]
    dev = L.ErofsDeviceSlot.parse(b, 1408)
    dev.validate()
    assert dev.blob_id.startswith(b"be7d77") and dev.mapped_blkaddr == 512
    blob = L.RafsV6Blob.parse(b, 4096)
    blob.validate(0, ext.s_chunk_size)
    assert blob.blob_id_str.startswith("be7d77")
    assert (blob.chunk_count, blob.compression_algo, blob.features) == (2, 3, 0x70000021)
    assert (blob.ci_offset, blob.ci_compressed_size, blob.ci_uncompressed_size) == (8314, 32, 32)
    assert (blob.compressed_size, blob.blob_toc_size) == (14554, 1024)
    chunks = L.RafsV5ChunkInfo.parse_array(b, 16384, 2)
    assert [(c.index, c.compressed_offset, c.compressed_size, c.uncompressed_offset, c.uncompressed_size)
            for c in chunks] == [(1, 0x12DC, 0xB9E, 0x5000, 0x3458), (0, 0, 0x12DC, 0, 0x4223)]
    root = L.ErofsInodeExtended.parse(b, 2 * 4096 + 128 * 32)
    root.validate()
    assert L.inode_datalayout(root.i_format) == L.EROFS_INODE_FLAT_INLINE and root.i_size == 67


def test_v6_large_vector(vectors_dir):
    b = _from_tar(vectors_dir / "containerd-nydus-snapshotter/pkg/filesystem/testdata/"
                  "v6-bootstrap-chunk-pos-438272.tar.gz")
    sb = L.RafsV6SuperBlock.parse(b, 1024)
    sb.validate()
    assert (sb.s_inos, sb.s_blocks, sb.s_root_nid) == (3517, 4096, 128)
    ext = L.RafsV6SuperBlockExt.parse(b, 1152)
    ext.validate()
    assert (ext.s_chunk_table_offset, ext.s_chunk_table_size) == (438272, 2515 * 80)
    assert (ext.s_prefetch_table_offset, ext.s_prefetch_table_size) == (4352, 4)
    blob = L.RafsV6Blob.parse(b, ext.s_blob_table_offset)
    blob.validate(0, ext.s_chunk_size)
    assert (blob.chunk_count, blob.compressed_size, blob.uncompressed_size) == (2515, 43090887, 83767296)


def test_v5_vector_superblocks(vectors_dir):
    tex = vectors_dir / "dragonflyoss-nydus/tests/texture/repeatable"
    for name, flags in (("sha256-nocompress-repeatable", 0x9), ("blake3-lz4_block-non_repeatable", 0x5)):
        b = (tex / name).read_bytes()
        sb = L.RafsV5SuperBlock.parse(b)
        sb.validate(len(b))
        assert sb.pack() == b[:8192]
        assert (sb.s_flags, sb.s_inodes_count, sb.s_block_size) == (flags, 51, 1 << 20)
        table = L.parse_v5_blob_table(b[sb.s_blob_table_offset: sb.s_blob_table_offset + sb.s_blob_table_size])
        assert [e.blob_id[:8] for e in table] == ["7334a259"]
        ext = L.RafsV5ExtBlobEntry.parse(b, sb.s_extended_blob_table_offset)
        assert (ext.chunk_count, ext.uncompressed_size) == (23, 3508766)
    b = _from_tar(vectors_dir / "containerd-nydus-snapshotter/pkg/filesystem/testdata/"
                  "v5-bootstrap-file-size-736032.tar.gz")
    sb = L.RafsV5SuperBlock.parse(b)
    sb.validate(len(b))
    assert (sb.s_inodes_count, sb.s_extended_blob_table_entries) == (3515, 1)


def test_validation_names_field(vectors_dir):
    b = bytearray(_v6_boot(vectors_dir))
    b[1024] ^= 1
    with pytest.raises(FormatError, match=r"s_magic"):
        L.RafsV6SuperBlock.parse(b, 1024).validate()
    sb = L.RafsV6SuperBlock.parse(_v6_boot(vectors_dir), 1024)
    with pytest.raises(FormatError, match=r"s_feature_incompat = '0xd'"):
        sb.replace(s_feature_incompat=0xD).validate()
    with pytest.raises(FormatError, match=r"s_blkszbits = 10"):
        sb.replace(s_blkszbits=10).validate()
    ext = L.RafsV6SuperBlockExt.parse(_v6_boot(vectors_dir), 1152)
    with pytest.raises(FormatError, match=r"s_chunk_size = 12345"):
        ext.replace(s_chunk_size=12345).validate()
    blob = L.RafsV6Blob.parse(_v6_boot(vectors_dir), 4096)
    with pytest.raises(FormatError, match=r"blob_index = 0: entry is at position 1"):
        blob.validate(1, 1 << 20)
    with pytest.raises(FormatError, match=r"features"):
        blob.replace(features=0x1000).validate()
    with pytest.raises(FormatError, match=r"i_flags"):
        L.RafsV5Inode(i_flags=0x10).validate()
    with pytest.raises(FormatError, match=r"flags"):
        L.RafsV5ChunkInfo(flags=0x100, uncompressed_size=1).validate()
    with pytest.raises(FormatError, match=r"s_fs_version"):
        L.RafsV5SuperBlock(s_magic=L.RAFSV5_SUPER_MAGIC, s_fs_version=0x400).validate()


def test_blob_entry_feature_rules(vectors_dir):
    blob = L.RafsV6Blob.parse(_v6_boot(vectors_dir), 4096)
    blob.validate(0, 1 << 20)
    for features, field in ((0x70000020, "ALIGNED"), (0x70000061, "ALIGNED"), (0x00100001, "unknown"),
                            (0x70000029, "CHUNK_INFO_V2"), (0x70000025, "ci_uncompressed_size")):
        with pytest.raises(FormatError, match=field):
            blob.replace(features=features).validate()
    blob.replace(features=0x70000025, ci_uncompressed_size=48, ci_compressed_size=48).validate()
    with pytest.raises(FormatError, match="ci_uncompressed_size"):
        blob.replace(ci_uncompressed_size=33).validate()
    blob.replace(features=0x70000221, ci_uncompressed_size=0, ci_compressed_size=0).validate()  # chunk dict
