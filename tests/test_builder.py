"""Builder: blob format, bootstrap structure, sources, dedup, reproducibility, fsck.erofs round trip."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile

import pytest
import zstandard

from rafs.builder import BuildOptions, build
from rafs.builder.loader import load_bootstrap
from rafs.errors import BuildError, FormatError
from storage.compress import decompress
from storage.digest import digest
from storage.meta import load_from_blob, walk_sections
from storage.meta.toc import extract_entry, read_toc
from storage.records import BlobFeatures, Compressor, Digester
from tests.builder_helpers import CHUNK, expand, make_tree, snapshot


@pytest.fixture(scope="module")
def src_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "tree"
    make_tree(str(root), with_devices=os.geteuid() == 0)
    return str(root)


def _build(src, tmp_path, name="x", source_type="dir-rafs", **kw):
    kw.setdefault("chunk_size", CHUNK)
    boot, blob = str(tmp_path / f"{name}.boot"), str(tmp_path / f"{name}.blob")
    res = build(src, bootstrap_out=boot, blob_out=blob, source_type=source_type, options=BuildOptions(**kw))
    return res, boot, blob


def _file_bytes(loaded, node, blob_files: dict[str, bytes]) -> bytes:
    out = bytearray()
    for ref in node.chunks:
        rec = loaded.blobs[ref.blob_index]
        c = rec.chunks[ref.ci_index]
        raw = blob_files[rec.info.blob_id][c.compressed_offset:c.compressed_offset + c.compressed_size]
        if c.flags & 1:
            raw = decompress(rec.info.compressor, raw, c.uncompressed_size)
        assert digest(rec.info.digester, raw) == c.digest
        out += raw
    return bytes(out[:node.size])


def _tree_files(loaded, blob_files):
    """path -> (mode, data/target) read back through our own loader."""
    out = {}
    for path, node in loaded.tree.walk():
        if node.is_reg:
            out[path] = (node.mode, _file_bytes(loaded, node, blob_files))
        elif node.is_symlink:
            out[path] = (node.mode, node.symlink)
        else:
            out[path] = (node.mode, None)
    return out


def _src_files(root):
    out = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = b"/" + os.path.relpath(p, broot)
            if stat.S_ISREG(st.st_mode):
                out[rel] = (st.st_mode, open(p, "rb").read())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = (st.st_mode, os.fsencode(os.readlink(p)))
            else:
                out[rel] = (st.st_mode, None)
    out[b"/"] = (os.lstat(root).st_mode, None)
    return out


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE])
@pytest.mark.parametrize("digester", [Digester.BLAKE3, Digester.SHA256])
def test_dir_roundtrip_through_loader(src_tree, tmp_path, compressor, digester):
    res, boot, blob = _build(src_tree, tmp_path, compressor=compressor, digester=digester)
    data = open(blob, "rb").read()
    assert res.blob.blob_id == hashlib.sha256(data).hexdigest() == res.blob_ids[0]
    assert res.blob.compressed_size == len(data)
    loaded = load_bootstrap(boot)
    assert loaded.compressor == compressor and loaded.digester == digester
    assert _tree_files(loaded, {res.blob.blob_id: data}) == _src_files(src_tree)


def test_blob_layout_plain(src_tree, tmp_path):
    """No TOC / inline meta: chunk data then CI + header, no tar headers, ALIGNED, CI v1."""
    res, boot, blob = _build(src_tree, tmp_path)
    data = open(blob, "rb").read()
    info = res.blob
    assert info.features == BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC
    assert info.ci_offset + info.ci_compressed_size + 4096 == len(data)
    meta = load_from_blob(lambda o, s: data[o:o + s], len(data), ci_offset=info.ci_offset,
                          ci_compressed_size=info.ci_compressed_size, ci_uncompressed_size=info.ci_uncompressed_size,
                          ci_compressor=info.ci_compressor, chunk_count=info.chunk_count)
    assert info.ci_uncompressed_size == 16 * info.chunk_count
    prev = 0
    for c in meta.chunks:
        assert c.uncompressed_offset % 4096 == 0 and c.compressed_offset == prev
        prev = c.compressed_offset + c.compressed_size
    assert info.uncompressed_size == meta.chunks[-1].uncompressed_offset + ((meta.chunks[-1].uncompressed_size + 4095) & ~4095)


def test_blob_layout_toc_and_inline(src_tree, tmp_path):
    res, boot, blob = _build(src_tree, tmp_path, blob_toc=True, blob_inline_meta=True)
    data = open(blob, "rb").read()
    read = lambda o, s: data[o:o + s]  # noqa: E731
    secs = walk_sections(read, len(data))
    assert [s.name for s in secs] == ["image.blob", "blob.meta", "blob.digest", "image.boot", "rafs.blob.toc"]
    assert secs[0].offset == 0
    info = res.blob
    assert info.features == 0x70000023
    entries, _ = read_toc(read, len(data))
    assert [e.entry_name for e in entries] == ["image.blob", "blob.meta", "blob.meta.header", "blob.digest", "image.boot"]
    assert entries[0].compressed_offset == 0
    meta = load_from_blob(read, len(data))
    assert meta.chunk_count == info.chunk_count
    digests = extract_entry(read, entries[3])
    loaded = load_bootstrap(boot)
    by_ci = {c.index: c.digest for c in loaded.blobs[0].chunks if c is not None}
    assert all(digests[32 * i:32 * i + 32] == d for i, d in by_ci.items())
    # the inline bootstrap carries the placeholder id; the --bootstrap file the real one
    inline = extract_entry(read, entries[4])
    (tmp_path / "inline.boot").write_bytes(inline)
    assert load_bootstrap(tmp_path / "inline.boot").blobs[0].info.blob_id == "x" * 64
    assert loaded.blobs[0].info.blob_id == info.blob_id == hashlib.sha256(data).hexdigest()
    assert loaded.flags & 0x100  # INLINED_CHUNK_DIGEST


def test_blob_toc_without_inline(src_tree, tmp_path):
    res, boot, blob = _build(src_tree, tmp_path, blob_toc=True)
    data = open(blob, "rb").read()
    entries, toc_digest = read_toc(lambda o, s: data[o:o + s], len(data))
    assert res.blob.blob_toc_digest == toc_digest
    assert res.blob.blob_toc_size == 128 * len(entries) + 512
    assert load_bootstrap(boot).blobs[0].info.blob_toc_digest == toc_digest


def test_reproducible(src_tree, tmp_path):
    """Same input + options -> byte-identical bootstrap and blob, also from a regenerated copy
    of the tree (other inode numbers, other creation order on disk) and from a tar of it."""
    outs = []
    for i, src in enumerate([src_tree, src_tree, None]):
        if src is None:
            src = str(tmp_path / "regen")
            make_tree(src, with_devices=os.geteuid() == 0)
        d = tmp_path / str(i)
        d.mkdir()
        res, boot, blob = _build(src, d, name="a", blob_toc=True, blob_inline_meta=True)
        outs.append((open(boot, "rb").read(), open(blob, "rb").read()))
    assert outs[0] == outs[1] == outs[2]
    tars = []
    for i in range(2):
        tar = tmp_path / f"t{i}.tar"
        _tar_of(src_tree, tar)
        res, boot, blob = _build(str(tar), tmp_path, name=f"t{i}", source_type="tar-rafs")
        tars.append((open(boot, "rb").read(), open(blob, "rb").read()))
    assert tars[0] == tars[1]


def test_dedup_within_layer(src_tree, tmp_path):
    res, boot, blob = _build(src_tree, tmp_path)
    loaded = load_bootstrap(boot)
    multi = loaded.tree.lookup("/a/multi")
    dup = loaded.tree.lookup("/a/b/dup_of_multi")
    assert multi is not dup and multi.chunks == dup.chunks
    sparse = loaded.tree.lookup("/sparse")  # 6 chunks, 5 of them all zeros
    assert len(sparse.chunks) == 6 and len(set(sparse.chunks)) == 2
    digests = [c.digest for c in loaded.blobs[0].chunks]
    assert len(digests) == len(set(digests)) == res.blob.chunk_count


def test_chunk_dict_dedup(src_tree, tmp_path):
    res1, boot1, blob1 = _build(src_tree, tmp_path, name="dict")
    layer = tmp_path / "layer"
    layer.mkdir()
    shutil.copy(os.path.join(src_tree, "a", "multi"), layer / "same")
    (layer / "new").write_bytes(b"brand new content")
    res2, boot2, blob2 = _build(str(layer), tmp_path, name="l2", chunk_dict="bootstrap=" + boot1)
    loaded = load_bootstrap(boot2)
    ids = [b.info.blob_id for b in loaded.blobs]
    assert ids == [res1.blob.blob_id, res2.blob.blob_id]
    assert all(r.blob_index == 0 for r in loaded.tree.lookup("/same").chunks)
    assert loaded.tree.lookup("/new").chunks[0].blob_index == 1
    assert res2.blob.chunk_count == 1
    files = {res1.blob.blob_id: open(blob1, "rb").read(), res2.blob.blob_id: open(blob2, "rb").read()}
    assert _file_bytes(loaded, loaded.tree.lookup("/same"), files) == (layer / "same").read_bytes()
    # a dict nothing matches is dropped from the blob table
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_bytes(b"unrelated")
    res3, boot3, _ = _build(str(other), tmp_path, name="l3", chunk_dict="bootstrap=" + boot1)
    assert [b.info.blob_id for b in load_bootstrap(boot3).blobs] == [res3.blob.blob_id]


def _tar_of(src: str, out, compress: str = "") -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in sorted(os.walk(src)):
            for n in sorted(dirnames + filenames):
                p = os.path.join(dirpath, n)
                ti = tf.gettarinfo(p, arcname=os.path.relpath(p, src))
                if ti is None:  # socket
                    continue
                ti.mtime = os.lstat(p).st_mtime
                xs = {k: os.getxattr(p, k) for k in os.listxattr(p, follow_symlinks=False)} if not os.path.islink(p) else {}
                for k, v in xs.items():
                    ti.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
                if ti.isreg():
                    with open(p, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
    raw = buf.getvalue()
    if compress == "gz":
        import gzip

        raw = gzip.compress(raw)
    elif compress == "zst":
        raw = zstandard.ZstdCompressor().compress(raw)
    out.write_bytes(raw)


@pytest.mark.parametrize("compress", ["", "gz", "zst"])
def test_tar_sources_match_directory(src_tree, tmp_path, compress):
    tar = tmp_path / f"layer.tar{'.' + compress if compress else ''}"
    _tar_of(src_tree, tar, compress)
    res, boot, blob = _build(str(tar), tmp_path, source_type="targz-rafs" if compress else "tar-rafs")
    loaded = load_bootstrap(boot)
    got = _tree_files(loaded, {res.blob.blob_id: open(blob, "rb").read()})
    want = {k: v for k, v in _src_files(src_tree).items() if not stat.S_ISSOCK(v[0])}
    got[b"/"], want[b"/"] = None, None  # tar has no root entry
    assert got == want
    one = loaded.tree.lookup("/one")
    st = os.lstat(os.path.join(src_tree, "one"))
    assert one.xattrs == {b"user.comment": b"first", b"user.empty": b""} and (one.uid, one.gid) == (st.st_uid, st.st_gid)
    if os.geteuid() == 0:  # make_tree sets owners and security.capability only as root
        assert (one.uid, one.gid) == (1000, 1001)
        assert loaded.tree.lookup("/exec").xattrs[b"security.capability"].startswith(b"\x01\x00\x00\x02")
    assert loaded.tree.lookup("/links/hard1") is loaded.tree.lookup("/a/multi")
    # stdin-like stream
    with open(tar, "rb") as f:
        res2 = build(f, bootstrap_out=str(tmp_path / "s.boot"), blob_out=str(tmp_path / "s.blob"),
                     source_type="tar-rafs", options=BuildOptions(chunk_size=CHUNK))
    assert res2.blob.blob_id == res.blob.blob_id


def test_upstream_tar_vectors(vectors_dir, tmp_path):
    tars = vectors_dir / "dragonflyoss-nydus/tests/texture/tar"
    res, boot, blob = _build(str(tars / "all-entry-type.tar"), tmp_path, name="a", source_type="tar-rafs")
    loaded = load_bootstrap(boot)
    kinds = sorted(stat.S_IFMT(n.mode) for _, n in loaded.tree.walk())
    assert kinds.count(stat.S_IFDIR) >= 3 and stat.S_IFLNK in kinds
    # macOS xattrs have no Linux namespace ("SCHILY.xattr.dir"): rejected like upstream does
    with pytest.raises(BuildError, match="xattr b'dir'"):
        _build(str(tars / "all-entry-type-macos.tar"), tmp_path, name="m", source_type="tar-rafs")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_whiteouts_in_layer(tmp_path):
    layer = tmp_path / "l"
    (layer / "d").mkdir(parents=True)
    (layer / "d" / "keep").write_bytes(b"k")
    (layer / "d" / ".wh.gone").write_bytes(b"")
    (layer / "d" / "gone").write_bytes(b"g")
    (layer / ".wh..wh..opq").write_bytes(b"")
    _, boot_none, _ = _build(str(layer), tmp_path, name="none", whiteout_spec="none")
    names = {p for p, _ in load_bootstrap(boot_none).tree.walk()}
    assert {b"/d/.wh.gone", b"/.wh..wh..opq", b"/d/gone"} <= names
    _, boot_oci, _ = _build(str(layer), tmp_path, name="oci", whiteout_spec="oci")
    names = {p for p, _ in load_bootstrap(boot_oci).tree.walk()}
    # markers dropped; a whiteout never hides an entry of its own layer (OCI image spec)
    assert names == {b"/", b"/d", b"/d/keep", b"/d/gone"}


def test_prefetch_table_and_blob_order(src_tree, tmp_path):
    res, boot, blob = _build(src_tree, tmp_path, prefetch=["/a/b/c", "/one", "/missing"])
    from rafs.layout import RafsV6SuperBlockExt
    from storage.structs import Scalar

    raw = open(boot, "rb").read()
    ext = RafsV6SuperBlockExt.parse(raw, 1152)
    assert ext.s_prefetch_table_size == 8 and ext.s_prefetch_table_offset == ext.s_blob_table_offset + 256
    nids = Scalar.u32_array(raw, ext.s_prefetch_table_offset, 2)
    assert all(n >= 128 for n in nids)
    loaded = load_bootstrap(boot)
    first = loaded.blobs[0].chunks[loaded.tree.lookup("/a/b/c/text").chunks[0].ci_index]
    assert first.compressed_offset == 0  # prefetched files come first in the blob


def test_bad_input(tmp_path, src_tree):
    with pytest.raises(BuildError):
        _build(src_tree, tmp_path, chunk_size=3000)
    with pytest.raises(BuildError):
        _build(str(tmp_path / "missing"), tmp_path)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar" * 100)
    with pytest.raises(BuildError):
        _build(str(bad), tmp_path, name="bad", source_type="tar-rafs")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # no half-written files
    with pytest.raises(FormatError):
        load_bootstrap(str(bad))


def test_loader_reads_what_the_reader_reads(vectors_dir, tmp_path):
    """The loader is the reader plus builder nodes: same paths, attributes, links and chunks on an
    upstream image; a v5 bootstrap (which the reader opens) is refused."""
    from rafs.metadata import Rafs
    from tests._rafs_util import extract_boot

    boot = extract_boot(vectors_dir, "v6-bootstrap-chunk-pos-438272", tmp_path)
    loaded = load_bootstrap(boot)
    nodes = dict(loaded.tree.walk())
    with Rafs.open(boot) as fs:
        assert [b.info for b in loaded.blobs] == fs.blobs and loaded.flags == fs.flags
        key = lambda c: (c.blob_index, c.index)  # noqa: E731
        assert sorted((c for b in loaded.blobs for c in b.chunks if c), key=key) == sorted(fs.chunk_table(), key=key)
        seen = {}
        for path, ino in fs.walk():
            node, a = nodes.pop(os.fsencode(path)), ino.attr()
            assert (node.mode, node.uid, node.gid, node.mtime, node.xattrs) == (a.mode, a.uid, a.gid, a.mtime,
                                                                                ino.xattrs())
            assert seen.setdefault(ino.ino, node) is node  # hard links: one builder node
            if ino.is_reg():
                assert [(c.blob_index, c.ci_index) for c in node.chunks] == \
                    [(d.chunk.blob_index, d.chunk.index) for d in ino.chunks(0, a.size)]
            elif ino.is_symlink():
                assert node.symlink == ino.readlink()
    assert not nodes
    v5 = extract_boot(vectors_dir, "v5-bootstrap-file-size-736032", tmp_path)
    with pytest.raises(FormatError, match="v5"):
        load_bootstrap(v5)


def test_cli_create_and_json(src_tree, tmp_path):
    import json
    import sys

    out = tmp_path / "o.json"
    proc = subprocess.run(
        [sys.executable, "-m", "rafs.cli", "create", "--type", "dir-rafs", "--bootstrap", str(tmp_path / "b"),
         "--blob-dir", str(tmp_path), "--chunk-size", "0x10000", "--compressor", "lz4_block",
         "--features", "blob-toc", "--blob-inline-meta", "--prefetch-policy", "fs", "-J", str(out), src_tree],
        input=b"/a\n", capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["fs_version"] == "6" and doc["compressor"] == "lz4_block"
    assert os.path.exists(tmp_path / doc["blobs"][0])
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "create", "--source-type", "directory", "-B",
                           str(tmp_path / "c"), "-b", str(tmp_path / "cb"), "--chunk-size", "12345", src_tree], capture_output=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 1 and b"chunk size" in proc.stderr
    # a gzip'd layer on stdin, upstream's --source-type spelling
    tar = tmp_path / "l.tar.gz"
    _tar_of(src_tree, tar, "gz")
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "create", "--source-type", "targz-rafs", "-B",
                           str(tmp_path / "s.boot"), "-b", str(tmp_path / "s.blob"), "--chunk-size", "0x10000",
                           "--whiteout-spec", "none", "-"], input=tar.read_bytes(), capture_output=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    assert load_bootstrap(str(tmp_path / "s.boot")).tree.lookup("/a/multi").size == 5 * CHUNK + 123
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "create", "-B", str(tmp_path / "c"), src_tree],
                          capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2 and b"--blob" in proc.stderr


@pytest.mark.skipif(shutil.which("fsck.erofs") is None, reason="fsck.erofs (erofs-utils) not installed")
@pytest.mark.parametrize("compressor", [Compressor.NONE, Compressor.ZSTD])
def test_fsck_erofs_extract(src_tree, tmp_path, compressor):
    res, boot, blob = _build(src_tree, tmp_path, compressor=compressor)
    data = tmp_path / "blob.data"
    expand(blob, str(data), res.blob)
    out = tmp_path / "out"
    proc = subprocess.run(["fsck.erofs", f"--device={data}", f"--extract={out}", boot], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    want = snapshot(src_tree, xattrs=False)
    got = snapshot(str(out), xattrs=False)
    # erofs-utils 1.5 --extract writes hard links as copies and drops set-id bits (chown after chmod)
    for snap in (want, got):
        for rec in snap.values():
            rec.pop("nlink", None)
            rec["mode"] &= ~0o6000
    assert got == want


def test_empty_layer_and_old_mtime(tmp_path):
    """A layer without file data (inline meta) has an empty blob table; pre-1970 mtimes survive."""
    src = tmp_path / "e"
    (src / "d").mkdir(parents=True)
    os.utime(src / "d", ns=(-86400 * 10**9 + 5, -86400 * 10**9 + 5))
    res, boot, blob = _build(str(src), tmp_path, blob_inline_meta=True, blob_toc=True)
    assert res.blob_ids == [] and os.path.exists(blob)
    d = load_bootstrap(boot).tree.lookup("/d")
    assert d.mtime * 10**9 + d.mtime_nsec == -86400 * 10**9 + 5


@pytest.mark.parametrize("chunk_size", [0x1000, 0x1000000])
def test_chunk_size_range_ends(tmp_path, chunk_size):
    """The smallest (4 KiB) and largest (16 MiB) chunk sizes build images whose files read back
    byte for byte through the reader; sizes outside the range or not a power of two fail."""
    from rafs._blobfile import LocalBlobs
    from rafs.metadata import Rafs

    src = tmp_path / "src"
    src.mkdir()
    import random

    rnd = random.Random(chunk_size)
    files = {"empty": b"", "one": b"x", "b4095": rnd.randbytes(4095), "b4097": rnd.randbytes(4097),
             "over": rnd.randbytes(1 << 16) * ((chunk_size >> 16) + 1) + b"tail"}  # > one chunk
    for name, data in files.items():
        (src / name).write_bytes(data)
    res, boot, blob = _build(str(src), tmp_path, chunk_size=chunk_size, compressor=Compressor.LZ4_BLOCK)
    with Rafs.open(boot) as fs:
        assert fs.chunk_size == chunk_size
        blobs = LocalBlobs(fs.blobs, blob=blob)
        for name, data in files.items():
            node = fs.lookup_path("/" + name)
            assert b"".join(blobs.iter_file(node)) == data, name
        assert len(fs.lookup_path("/over").chunks(0, len(files["over"]))) >= 2
    for bad in (0x800, 0x2000000, 0x3000):
        with pytest.raises(BuildError):
            _build(str(src), tmp_path, name="bad", chunk_size=bad)


def test_cli_create_progress_bar_on_a_terminal(src_tree, tmp_path):
    """``create`` draws a progress bar on stderr when it is a terminal, and none otherwise."""
    import fcntl
    import pty
    import struct
    import sys
    import termios

    cmd = [sys.executable, "-m", "rafs.cli", "create", "--bootstrap", str(tmp_path / "b"), "--blob",
           str(tmp_path / "blob"), "--chunk-size", "0x10000", src_tree]
    cwd = os.path.dirname(os.path.dirname(__file__))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, cwd=cwd)
        os.close(slave)
        slave = -1
        seen = bytearray()
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=120) == 0, bytes(seen)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert b"nydus-image create" in seen and b"100%" in seen, bytes(seen)
    proc = subprocess.run(cmd[:5] + [str(tmp_path / "b2"), "--blob", str(tmp_path / "blob2")] + cmd[8:],
                          capture_output=True, cwd=cwd)
    assert proc.returncode == 0 and b"100%" not in proc.stderr, proc.stderr


def test_cli_create_and_merge_help():
    """``create --help`` / ``merge --help`` list upstream's flag names; bad usage exits 2."""
    import sys

    cwd = os.path.dirname(os.path.dirname(__file__))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "rafs.cli", *args], capture_output=True, text=True, cwd=cwd)

    out = run("create", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: nydus-image create")
    for flag in ("--bootstrap", "--blob", "--blob-dir", "--blob-inline-meta", "--chunk-size", "--compressor",
                 "--digester", "--fs-version", "--features", "--whiteout-spec", "--prefetch-policy", "--chunk-dict",
                 "--parent-bootstrap", "--output-json", "--source-type"):
        assert flag in out.stdout, flag
    out = run("merge", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: nydus-image merge")
    for flag in ("--bootstrap", "--parent-bootstrap", "--blob-digests", "--blob-sizes", "--blob-toc-digests",
                 "--blob-toc-sizes", "--prefetch-policy", "--output-json"):
        assert flag in out.stdout, flag
    assert run("create").returncode == 2   # no SOURCE
    assert run("merge", "-B", "x").returncode == 2
