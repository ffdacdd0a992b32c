"""The Rafs/Inode metadata API on upstream images (golden content checks) and bad images."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat

import pytest

from rafs.errors import FormatError, NotADirectory, NotFound, RafsError
from rafs.metadata import InodeAttr, Rafs
from storage.device import BlobIoVec, Compressor, Digester
from tests._rafs_util import SNAP, TEXTURE, extract_boot, flatten_tree, parse_result, read_iovec

V5_BLOB = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"
V6_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


@pytest.fixture(scope="module")
def boots(vectors_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("boots")
    return {
        "v6large": extract_boot(vectors_dir, "v6-bootstrap-chunk-pos-438272", d),
        "v5large": extract_boot(vectors_dir, "v5-bootstrap-file-size-736032", d),
        "invalid": extract_boot(vectors_dir, "invalid-bootstrap-file-size-133513", d),
    }


# --- v5 golden --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,digester", [
    ("sha256-nocompress-repeatable", Digester.SHA256),
    ("blake3-lz4_block-non_repeatable", Digester.BLAKE3),
])
def test_v5_repeatable_golden(vectors_dir, name, digester):
    tex = vectors_dir / TEXTURE / "repeatable"
    tree, md5s = parse_result(tex / f"{name}.result")
    assert len(md5s) == 23
    blobs = {V5_BLOB: tex / "blobs" / V5_BLOB}
    with Rafs.open(tex / name) as fs:
        assert fs.version == 5 and fs.root_ino == 1 and fs.inode_count == 51
        assert fs.chunk_size == 1 << 20
        assert [b.blob_id for b in fs.blobs] == [V5_BLOB]
        assert fs.blobs[0].digester == digester and fs.blobs[0].compressor == Compressor.NONE
        assert fs.blobs[0].chunk_count == 23
        seen = {}
        for path, node in fs.walk():
            a = node.attr()
            assert isinstance(a, InodeAttr) and a.ino == node.ino
            if node.is_reg():
                data = read_iovec(node.chunks(0, a.size), blobs)
                assert len(data) == a.size
                seen[path] = hashlib.md5(data).hexdigest()
                # partial reads agree with the whole-file read
                if a.size > 10:
                    mid = a.size // 3
                    assert read_iovec(node.chunks(mid, 7), blobs) == data[mid : mid + 7]
        assert seen == md5s
        # the JSON tree: every path with its type and link target
        expected = flatten_tree(tree)
        got = {}
        for path, node in fs.walk():
            if node.is_dir():
                got[path] = ("directory", None)
            elif node.is_symlink():
                got[path] = ("link", os.fsdecode(node.readlink()))
            else:
                got[path] = ("file", None)
        assert got == expected
        # hard links share the inode number; holes come back as hole descriptors
        a = fs.lookup_path("/hardlink-test/foo")
        b = fs.lookup_path("/normal-file-test/test.sh")
        assert a.ino == b.ino and a.attr().nlink == 3 and a.hardlink_key == b.hardlink_key
        hole = fs.lookup_path("/normal-file-test/holefiles/head-hole-1")
        vec = hole.chunks(0, hole.size)
        assert vec.size == hole.size == 2097159
        assert stat.S_IMODE(fs.lookup_path("/normal-file-test/busybox").attr().mode) == 0o775
        link = fs.lookup_path("/symlink-test/root-2")
        assert link.readlink() == b"/foobar" and link.attr().size == 7


def test_v5_hole_descriptors(vectors_dir, tmp_path):
    """Chunk gaps are holes: drop head-hole-1's leading zero chunk and read the same bytes."""
    tex = vectors_dir / TEXTURE / "repeatable"
    src = tex / "sha256-nocompress-repeatable"
    blobs = {V5_BLOB: tex / "blobs" / V5_BLOB}
    with Rafs.open(src) as fs:
        node = fs.lookup_path("/normal-file-test/holefiles/head-hole-1")
        off, chunks_at = node.offset, node._chunk_offset
        assert not any(d.is_hole for d in node.chunks(0, node.size))
    raw = bytearray(src.read_bytes())
    raw[chunks_at : chunks_at + 160] = raw[chunks_at + 80 : chunks_at + 240]
    raw[off + 96 : off + 100] = (2).to_bytes(4, "little")  # i_child_count 3 -> 2
    (tmp_path / "holes.boot").write_bytes(bytes(raw))
    with Rafs.open(tmp_path / "holes.boot") as fs:
        node = fs.lookup_path("/normal-file-test/holefiles/head-hole-1")
        vec = node.chunks(0, node.size)
        assert vec[0].is_hole and vec[0].blob is None and vec[0].size == 1 << 20
        assert vec.size == node.size
        data = read_iovec(vec, blobs)
        assert hashlib.md5(data).hexdigest() == "ea7ac8dc0ae3673040f3b1d816d972d7"
        part = node.chunks((1 << 20) - 5, 10)
        assert [(d.is_hole, d.offset, d.size) for d in part] == [(True, 0, 5), (False, 0, 5)]


# --- v6 golden --------------------------------------------------------------------------------


def test_v6_22_golden(vectors_dir):
    boot = vectors_dir / TEXTURE / "bootstrap/rafs-v6-2.2.boot"
    blobs = {V6_BLOB: vectors_dir / TEXTURE / "blobs" / V6_BLOB}
    with Rafs.open(boot) as fs:
        assert fs.version == 6 and fs.root_ino == 128 and fs.inode_count == 3
        assert fs.flags == 0x194 and fs.chunk_size == 1 << 20 and fs.prefetch_inos == []
        (blob,) = fs.blobs
        assert blob.blob_id == V6_BLOB and blob.compressor == Compressor.ZSTD
        assert blob.digester == Digester.BLAKE3 and blob.chunk_count == 2 and blob.features == 0x70000021
        assert (blob.ci_offset, blob.ci_compressed_size) == (8314, 32)
        entries = [(name, node.attr().size) for _, name, node in fs.root.readdir()]
        assert entries == [(b"lib.rs", 16931), (b"sync_io.rs", 13400)]
        for name, size in entries:
            node = fs.root.lookup(name)
            vec = node.chunks(0, 1 << 30)
            assert vec.size == size and len(vec) == 1
            data = read_iovec(vec, blobs)
            assert len(data) == size
            assert b"Copyright" in data[:200]
            assert node.xattrs() == {}
        lib = fs.lookup_path("/lib.rs")
        (desc,) = lib.chunks(0, 16931)
        assert (desc.chunk.index, desc.chunk.compressed_offset, desc.chunk.compressed_size) == (0, 0, 0x12DC)
        assert desc.chunk.uncompressed_size == 0x4223 and desc.chunk.is_compressed
        sync = fs.lookup_path("/sync_io.rs")
        (desc,) = sync.chunks(100, 50)
        assert (desc.offset, desc.size, desc.chunk.index, desc.chunk.uncompressed_offset) == (100, 50, 1, 0x5000)
        assert sync.chunks(13400, 10) == BlobIoVec() and sync.chunks(13390, 100).size == 10
        root = fs.root.attr()
        assert stat.S_ISDIR(root.mode) and root.nlink >= 2
        assert {p for p, _ in fs.walk()} == {"/", "/lib.rs", "/sync_io.rs"}


def test_v6_large_walk(boots):
    with Rafs.open(boots["v6large"]) as fs:
        assert fs.version == 6 and fs.inode_count == 3517 and fs.prefetch_inos == [142]
        assert fs.blobs[0].compressor == Compressor.LZ4_BLOCK and fs.blobs[0].chunk_count == 2515
        counts = {"reg": 0, "dir": 0, "lnk": 0, "other": 0}
        chunk_based = inline = 0
        total = 0
        for path, node in fs.walk():
            total += 1
            node.xattrs()
            kind = "reg" if node.is_reg() else "dir" if node.is_dir() else "lnk" if node.is_symlink() else "other"
            counts[kind] += 1
            if node.is_reg():
                chunk_based += 1
                assert node.chunks(0, node.size).size == node.size
            elif node.layout == 2:
                inline += 1
            if node.is_symlink():
                assert node.readlink()
        assert total == 3517 and chunk_based == 2627 and inline == 890
        assert fs.lookup_path("/bin").ino == 142 and fs.inode(142).is_symlink()
        perl, perl5 = fs.lookup_path("/usr/bin/perl"), fs.lookup_path("/usr/bin/perl5.34.0")
        assert (perl.ino, perl5.ino) == (1552, 1555)
        assert perl.hardlink_key == perl5.hardlink_key == 381 and perl.attr().nlink == 2
        assert [d.chunk for d in perl.chunks(0, perl.size)] == [d.chunk for d in perl5.chunks(0, perl5.size)]
        assert len(list(fs.chunk_table())) == 2515


def test_v5_large_walk(boots):
    with Rafs.open(boots["v5large"]) as fs:
        assert fs.version == 5 and fs.inode_count == 3515
        n = sum(1 for _ in fs.walk())
        assert n == 3517
        assert fs.lookup_path("/bin").is_symlink()
        assert fs.lookup_path("/usr/bin/perl").ino == fs.lookup_path("/usr/bin/perl5.34.0").ino


# --- API behaviour -----------------------------------------------------------------------------


def test_api_errors_and_readdir_offsets(boots):
    with Rafs.open(boots["v6large"]) as fs:
        etc = fs.lookup_path("/etc")
        all_entries = [(off, name) for off, name, _ in etc.readdir(0)]
        assert len(all_entries) > 10
        off, _ = all_entries[4]
        assert [(o, n) for o, n, _ in etc.readdir(off)] == all_entries[5:]
        names = [n for _, n in all_entries]
        assert names == sorted(names) and b"." not in names and b".." not in names
        for name in names:
            assert etc.lookup(name).ino == next(i.ino for _, n, i in etc.readdir(0) if n == name)
        with pytest.raises(NotFound):
            etc.lookup(b"no-such-file")
        with pytest.raises(NotFound):
            fs.lookup_path("/etc/no/such")
        f = fs.lookup_path("/etc/passwd")
        with pytest.raises(NotADirectory):
            f.lookup(b"x")
        with pytest.raises(NotADirectory):
            list(f.readdir())
        with pytest.raises(NotFound):
            fs.inode(10**12)
        with pytest.raises(FormatError):
            f.readlink()
        assert f.chunks(f.size, 10) == BlobIoVec() and f.chunks(0, 0) == BlobIoVec()
    with pytest.raises(RafsError):
        fs.lookup_path("/etc/passwd").chunks(0, 1)  # closed image (cached inode or not)


def test_bad_images(boots, vectors_dir, tmp_path):
    with pytest.raises(FormatError, match="not a RAFS bootstrap"):
        Rafs.open(boots["invalid"])
    with pytest.raises(FormatError, match="i_mode"):
        with Rafs.open(vectors_dir / TEXTURE / "bootstrap/nydusd_daemon_test_bootstrap") as fs:
            for _ in fs.walk():
                pass
    with pytest.raises(NotFound):
        Rafs.open(tmp_path / "missing")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        Rafs.open(tmp_path / "empty")
    raw = (vectors_dir / TEXTURE / "bootstrap/rafs-v6-2.2.boot").read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:12288])
    with pytest.raises(FormatError):
        with Rafs.open(tmp_path / "trunc") as fs:
            list(fs.walk())
    (tmp_path / "odd").write_bytes(raw + b"x")
    with pytest.raises(FormatError, match="multiple of the block size"):
        Rafs.open(tmp_path / "odd")


def _patched(src, dst, patches):
    data = bytearray(src.read_bytes())
    for off, new in patches:
        data[off : off + len(new)] = new
    dst.write_bytes(bytes(data))
    return dst


def test_blob_id_hint(vectors_dir, tmp_path):
    src = vectors_dir / TEXTURE / "bootstrap/rafs-v6-2.2.boot"
    boot = _patched(src, tmp_path / "x.boot", [(1408, b"x" * 64), (4096, b"x" * 64)])
    with Rafs.open(boot) as fs:
        assert fs.blobs[0].blob_id == "x" * 64
    with Rafs.open(boot, blob_id_hint=V6_BLOB) as fs:
        assert fs.blobs[0].blob_id == V6_BLOB
    with Rafs.open(src, blob_id_hint="a" * 64) as fs:  # a real id is kept
        assert fs.blobs[0].blob_id == V6_BLOB


def test_bad_names_rejected(vectors_dir, tmp_path):
    src = vectors_dir / TEXTURE / "bootstrap/rafs-v6-2.2.boot"
    raw = src.read_bytes()
    at = raw.index(b"lib.rs")
    for new, msg in ((b"lib/rs", "invalid entry name"), (b"\0ib.rs", "invalid entry name|not sorted")):
        boot = _patched(src, tmp_path / "n.boot", [(at, new)])
        with Rafs.open(boot) as fs:
            with pytest.raises(FormatError, match=msg):
                list(fs.walk())


def test_directory_cycle_rejected(boots, tmp_path):
    from rafs.layout import ErofsDirent

    src = boots["v6large"]
    with Rafs.open(src) as fs:
        etc = fs.lookup_path("/etc")
        root = fs.root
        # the root's dirent for "etc": rewrite its nid to the root itself
        blk = root._data_block(0)
        data_off = None
        raw = src.read_bytes()
        data_off = raw.index(blk)
        n = ErofsDirent.parse(blk, 0).e_nameoff // 12
        for i in range(n):
            d = ErofsDirent.parse(blk, 12 * i)
            if d.e_nid == etc.ino:
                pos = data_off + 12 * i
                break
        else:
            pytest.fail("no etc dirent")
    boot = _patched(src, tmp_path / "cyc.boot", [(pos, (128).to_bytes(8, "little"))])
    with Rafs.open(boot) as fs:
        with pytest.raises(FormatError, match="cycle|two paths|'..'"):
            list(fs.walk())
