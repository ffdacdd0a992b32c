"""The Rafs/Inode metadata API on upstream images (golden content checks) and bad images."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import stat

import pytest

from rafs.errors import FormatError, NotADirectory, NotFound, RafsError
from rafs.metadata import InodeAttr, Rafs
from storage.records import BlobIoVec, Compressor, Digester
from tests._rafs_util import TEXTURE, extract_boot, flatten_tree, parse_result, read_iovec, rich_tree

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
                assert node.chunk_refs() == [(d.chunk.blob_index, d.chunk.index, d.chunk.uncompressed_offset // 4096)
                                             for d in node.chunks(0, node.size)]
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
    with Rafs.open(src, blob_id_hint="a" * 64) as fs:  # a real id (CAP_TAR_TOC, not inline) is kept
        assert fs.blobs[0].blob_id == V6_BLOB


def test_inline_bootstrap_from_toc_blob(vectors_dir, tmp_path):
    """The 2022 blob with an inlined bootstrap: old placeholder id replaced by the blob's own id."""
    import zstandard

    blob_id = "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
    blob_path = vectors_dir / TEXTURE / "toc" / blob_id
    raw = blob_path.read_bytes()
    boot = tmp_path / "toc.boot"
    boot.write_bytes(zstandard.ZstdDecompressor().decompress(raw[7997 : 7997 + 501], max_output_size=1 << 20))
    with Rafs.open(boot) as fs:
        assert fs.blobs[0].blob_id.startswith("d788a0")
    with Rafs.open(boot, blob_id_hint=blob_id) as fs:
        assert fs.blobs[0].blob_id == blob_id
        sizes = {}
        for path, node in fs.walk():
            if node.is_reg():
                data = read_iovec(node.chunks(0, node.size), {blob_id: blob_path})
                sizes[path] = len(data)
                assert b"Copyright" in data[:300] or b"//" in data[:300]
        assert sizes == {"/error.rs": 2816, "/lib.rs": 678, "/logger.rs": 3115}


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


def _blob_data_file(fs, blob_dir, out):
    """Write the uncompressed chunk space of blob 0 (what fsck.erofs --device expects)."""
    from rafs._blobfile import LocalBlobs

    buf = bytearray(fs.blobs[0].uncompressed_size)
    with LocalBlobs(fs.blobs, blob_dir=str(blob_dir)) as bf:
        for c in fs.chunk_table():
            data = bf.read_chunk(fs.blobs[c.blob_index], c)
            buf[c.uncompressed_offset : c.uncompressed_offset + len(data)] = data
    out.write_bytes(bytes(buf))
    return out


def test_v6_agrees_with_fsck_erofs(vectors_dir, tmp_path):
    """Kernel-format cross-check: erofs-utils' own extraction equals what our reader reads."""
    import subprocess

    if shutil.which("fsck.erofs") is None:
        pytest.skip("fsck.erofs (erofs-utils) not installed")
    boot = vectors_dir / TEXTURE / "bootstrap/rafs-v6-2.2.boot"
    blobs = {V6_BLOB: vectors_dir / TEXTURE / "blobs" / V6_BLOB}
    with Rafs.open(boot) as fs:
        dev = _blob_data_file(fs, vectors_dir / TEXTURE / "blobs", tmp_path / "blob.data")
        out = tmp_path / "x"
        subprocess.run(["fsck.erofs", f"--device={dev}", f"--extract={out}", str(boot)], check=True,
                       capture_output=True, timeout=60)
        extracted = {}
        for path, node in fs.walk():
            p = out / path.lstrip("/") if path != "/" else out
            st = p.lstat()
            a = node.attr()
            assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(a.mode), path
            if node.is_reg():
                assert p.read_bytes() == read_iovec(node.chunks(0, a.size), blobs), path
                assert int(st.st_mtime) == a.mtime and stat.S_IMODE(st.st_mode) == stat.S_IMODE(a.mode)
                extracted[path] = a.size
        assert extracted == {"/lib.rs": 16931, "/sync_io.rs": 13400}


# --- round trip through the builder -----------------------------------------------------------


def test_roundtrip_builder_image(tmp_path):
    """Build a rich directory with rafs.builder and read every attribute and byte back."""
    from rafs.builder import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir()
    rich_tree(src)
    boot, blob = tmp_path / "image.boot", tmp_path / "image.blob"
    opts = BuildOptions(chunk_size=0x2000)
    result = build(str(src), bootstrap_out=str(boot), blob_out=str(blob), options=opts)
    with Rafs.open(boot) as fs:
        assert fs.version == 6 and fs.chunk_size == 0x2000
        blob_paths = {fs.blobs[0].blob_id: pathlib.Path(result.blob_path or blob)}
        seen = set()
        for path, node in fs.walk():
            seen.add(path)
            p = src / path.lstrip("/") if path != "/" else src
            st = p.lstat()
            a = node.attr()
            assert a.mode == st.st_mode, path
            assert (a.uid, a.gid) == (st.st_uid, st.st_gid), path
            if not node.is_dir():
                assert a.size == st.st_size, path
                assert a.nlink == st.st_nlink, path
            if node.is_reg():
                assert read_iovec(node.chunks(0, a.size), blob_paths) == p.read_bytes(), path
                if a.size > 8192:
                    assert read_iovec(node.chunks(8000, 500), blob_paths) == p.read_bytes()[8000:8500]
            elif node.is_symlink():
                assert node.readlink() == os.fsencode(os.readlink(p)), path
            elif stat.S_ISCHR(a.mode) or stat.S_ISBLK(a.mode):
                assert a.rdev == st.st_rdev, path
            want = {k.encode(): os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)}
            want.pop(b"security.selinux", None)
            assert node.xattrs() == want, path
        expected = {"/"} | {"/" + str(q.relative_to(src)) for q in src.rglob("*")}
        assert seen == expected
        multi = fs.lookup_path("/multi")
        assert multi.attr().mtime == 1_600_000_000 and multi.attr().mtime_nsec == 123_456_789
        assert multi.hardlink_key == fs.lookup_path("/multi-link").hardlink_key is not None
        big = fs.lookup_path("/big")
        assert big.size > 4096
        for i in (0, 299, 599):
            name = f"entry-{i:04d}-{'x' * (i % 40)}".encode()
            assert big.lookup(name).size == i % 7
        with pytest.raises(NotFound):
            big.lookup(b"entry-0300")
        assert [n for _, n, _ in big.readdir(0)] == sorted(os.fsencode(x) for x in os.listdir(src / "big"))


def test_v6_compact_inodes_and_flat_plain(vectors_dir, tmp_path):
    """Rewrite the 2.2 image with compact inodes and a FLAT_PLAIN root: same tree, same data."""
    from rafs.layout import ErofsInodeCompact, ErofsInodeExtended, inode_format

    src = vectors_dir / TEXTURE / "bootstrap/rafs-v6-2.2.boot"
    blobs = {V6_BLOB: vectors_dir / TEXTURE / "blobs" / V6_BLOB}
    raw = bytearray(src.read_bytes())
    with Rafs.open(src) as fs:
        nodes = {p: (n.offset, n.layout, n.size) for p, n in fs.walk()}
    for path, (off, layout, size) in nodes.items():
        ext = ErofsInodeExtended.parse(raw, off)
        if path == "/":
            # root: FLAT_PLAIN with its 67 data bytes moved to the unused block 2
            tail = bytes(raw[off + 64 : off + 64 + size])
            raw[8192 : 8192 + size] = tail
            layout, i_u = 0, 2
        else:
            # files: compact inode, the chunk index array follows at +32
            idx = bytes(raw[off + 64 : off + 72])
            raw[off + 32 : off + 40] = idx
            i_u = ext.i_u
        compact = ErofsInodeCompact(
            i_format=inode_format(0, layout), i_mode=ext.i_mode, i_nlink=ext.i_nlink,
            i_size=ext.i_size, i_u=i_u, i_ino=ext.i_ino, i_uid=ext.i_uid, i_gid=ext.i_gid,
        )
        raw[off : off + 32] = compact.pack()
    (tmp_path / "c.boot").write_bytes(bytes(raw))
    with Rafs.open(tmp_path / "c.boot") as fs:
        assert not fs.root.extended and fs.root.layout == 0
        assert [n for _, n, _ in fs.root.readdir()] == [b"lib.rs", b"sync_io.rs"]
        for name, size in ((b"lib.rs", 16931), (b"sync_io.rs", 13400)):
            node = fs.root.lookup(name)
            assert not node.extended
            a = node.attr()
            assert a.size == size and a.mtime == 0  # compact: superblock build time
            assert len(read_iovec(node.chunks(0, size), blobs)) == size


def test_concurrent_readers_agree(boots):
    """Many threads sharing one Rafs (as the FUSE daemon does) see the same tree and chunks."""
    from concurrent.futures import ThreadPoolExecutor

    import rafs.base as md

    def snapshot(fs):
        out = []
        for path, node in fs.walk():
            a = node.attr()
            chunks = tuple((d.chunk.index if d.chunk else None, d.size) for d in node.chunks(0, a.size))
            out.append((path, a, chunks, node.readlink() if node.is_symlink() else None))
        return out

    for key in ("v6large", "v5large"):
        with Rafs.open(boots[key]) as fs:
            expected = snapshot(fs)
        old = md.INODE_CACHE_SIZE
        md.INODE_CACHE_SIZE = 64  # force evictions while threads race
        try:
            with Rafs.open(boots[key]) as fs, ThreadPoolExecutor(6) as pool:
                results = list(pool.map(lambda _: snapshot(fs), range(6)))
        finally:
            md.INODE_CACHE_SIZE = old
        assert all(r == expected for r in results), key


def test_v6_without_chunk_table(vectors_dir, tmp_path):
    """No bootstrap chunk table: descriptors still carry blob, ci index and uncompressed range."""
    from rafs._blobfile import ChunkReadError, LocalBlobs

    src = vectors_dir / TEXTURE / "bootstrap/rafs-v6-2.2.boot"
    boot = _patched(src, tmp_path / "nct.boot", [(1184, bytes(8))])  # s_chunk_table_size = 0
    with Rafs.open(boot) as fs:
        (d,) = fs.lookup_path("/sync_io.rs").chunks(0, 20000)
        assert (d.chunk.index, d.chunk.uncompressed_offset, d.chunk.uncompressed_size) == (1, 0x5000, 13400)
        assert d.chunk.compressed_size == 0 and d.chunk.digest == b""
        assert list(fs.chunk_table()) == []
        with LocalBlobs(fs.blobs, blob_dir=str(vectors_dir / TEXTURE / "blobs")) as lb:
            with pytest.raises(ChunkReadError, match="no compressed location"):
                lb.read_chunk(d.blob, d.chunk)


def test_open_is_lazy(boots):
    """Opening parses only the superblocks, tables and root; a lookup touches only its path."""
    import tracemalloc

    tracemalloc.start()
    try:
        with Rafs.open(boots["v6large"]) as fs:
            assert len(fs._inodes._data) == 1  # the root
            assert fs._chunk_keys is None
            perl = fs.lookup_path("/usr/bin/perl")
            assert len(fs._inodes._data) == 4  # /, /usr, /usr/bin, perl
            assert fs._chunk_keys is None
            perl.chunks(0, 1)
            assert fs._chunk_keys is not None and len(fs._chunk_keys) == 2515
            _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # the 643 KB bootstrap is mmapped, not copied
