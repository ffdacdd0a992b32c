"""Builder output read back through the project's reader (rafs.metadata) and nydus-image
check/unpack: the other half of the round trip."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from rafs.builder import BuildOptions, build
from rafs import metadata
from rafs.builder.merge import merge
from storage.records import Compressor
from tests.builder_helpers import CHUNK, make_tree, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("built")
    src = d / "src"
    make_tree(str(src), with_devices=os.geteuid() == 0)
    res = build(str(src), bootstrap_out=str(d / "boot"), blob_out=str(d / "blob"),
                options=BuildOptions(chunk_size=CHUNK, blob_toc=True, prefetch=["/a"]))
    return src, d, res


def test_reader_attrs_and_data(built):
    src, d, res = built
    from storage.compress import decompress

    blob = open(d / "blob", "rb").read()
    with metadata.Rafs.open(str(d / "boot")) as fs:
        assert fs.version == 6 and fs.chunk_size == CHUNK
        assert [b.blob_id for b in fs.blobs] == [res.blob.blob_id]
        assert fs.blobs[0].ci_offset == res.blob.ci_offset
        assert len(fs.prefetch_inos) == 1
        seen = 0
        for path, inode in fs.walk():
            rel = path.lstrip("/") or "."
            p = os.path.join(src, rel)
            st = os.lstat(p)
            attr = inode.attr()
            assert (attr.mode, attr.uid, attr.gid) == (st.st_mode, st.st_uid, st.st_gid), path
            assert attr.mtime * 10**9 + attr.mtime_nsec == st.st_mtime_ns, path
            if stat.S_ISREG(st.st_mode):
                out = bytearray()
                for desc in inode.chunks(0, attr.size):
                    c = desc.chunk
                    raw = blob[c.compressed_offset:c.compressed_offset + c.compressed_size]
                    if c.is_compressed:
                        raw = decompress(desc.blob.compressor, raw, c.uncompressed_size)
                    out += raw[desc.offset:desc.offset + desc.size]
                assert bytes(out) == open(p, "rb").read(), path
                assert attr.nlink == st.st_nlink
            elif stat.S_ISLNK(st.st_mode):
                assert inode.readlink() == os.fsencode(os.readlink(p))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                assert attr.rdev == st.st_rdev
            if not stat.S_ISLNK(st.st_mode) and not stat.S_ISSOCK(st.st_mode):
                want = {k.encode(): os.getxattr(p, k) for k in os.listxattr(p)}
                assert inode.xattrs() == want, path
            seen += 1
        assert seen == len(snapshot(str(src), xattrs=False))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rafs.cli", *args], capture_output=True, cwd=ROOT)


def test_nydus_image_check_and_unpack(built, tmp_path):
    src, d, res = built
    proc = _cli("check", "--bootstrap", str(d / "boot"), "--blob", str(d / "blob"))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = tmp_path / "out"
    proc = _cli("unpack", "--bootstrap", str(d / "boot"), "--blob", str(d / "blob"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    # without root make_tree sets no foreign owners, devices or trusted.*/security.* xattrs,
    # so the unprivileged unpack must reproduce the tree exactly too
    assert snapshot(str(out)) == snapshot(str(src))


def test_unpack_keeps_capability(built, tmp_path):
    """chown(2) clears security.capability and set-id bits: unpack must chown before it sets
    xattrs and the mode."""
    src, d, res = built
    if os.geteuid() != 0:
        pytest.skip("setting security.capability and chown need root")
    out = tmp_path / "out"
    assert _cli("unpack", "-B", str(d / "boot"), "--blob", str(d / "blob"), "--output", str(out)).returncode == 0
    want = os.getxattr(os.path.join(src, "exec"), "security.capability")
    assert want and os.getxattr(out / "exec", "security.capability") == want
    assert os.stat(out / "exec").st_mode == os.stat(os.path.join(src, "exec")).st_mode  # setuid kept
    assert os.stat(out / "one").st_uid == 1000


def test_unpack_tar_keeps_xattrs(built, tmp_path):
    """The tar output carries every xattr (incl. security.capability) as PAX SCHILY.xattr.*."""
    import tarfile

    src, d, res = built
    out = tmp_path / "out.tar"
    proc = _cli("unpack", "-B", str(d / "boot"), "--blob", str(d / "blob"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out) as tf:
        members = {m.name: m for m in tf.getmembers()}
    for rel in ("exec", "one", "a", "a/b"):
        p = os.path.join(src, rel)
        want = {k: os.getxattr(p, k) for k in os.listxattr(p)}
        got = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
               for k, v in members["./" + rel].pax_headers.items() if k.startswith("SCHILY.xattr.")}
        assert got == want, rel
    if os.geteuid() == 0:  # make_tree sets security.capability only as root
        assert "SCHILY.xattr.security.capability" in members["./exec"].pax_headers
    assert members["./exec"].mode == 0o4755


def test_reader_on_merged_image_with_inline_layers(tmp_path):
    """Layers with inline bootstraps (placeholder ids) merged with --blob-digests; the reader
    sees both blobs and the overlay result."""
    layers = []
    for i, files in enumerate([{"a": b"1", "d/x": b"x"}, {"b": b"2", "d/.wh.x": b""}]):
        s = tmp_path / f"s{i}"
        for name, data in files.items():
            (s / name).parent.mkdir(parents=True, exist_ok=True)
            (s / name).write_bytes(data)
        layers.append(build(str(s), bootstrap_out=str(tmp_path / f"l{i}.boot"), blob_out=str(tmp_path / f"l{i}.blob"),
                            options=BuildOptions(whiteout_spec="none", blob_inline_meta=True, blob_toc=True,
                                                 compressor=Compressor.LZ4_BLOCK)))
    m = merge([l.bootstrap for l in layers], str(tmp_path / "m.boot"), blob_digests=[l.blob.blob_id for l in layers])
    with metadata.Rafs.open(m.bootstrap) as fs:
        assert [b.blob_id for b in fs.blobs] == [l.blob.blob_id for l in layers]
        assert sorted(p for p, _ in fs.walk()) == ["/", "/a", "/b", "/d"]
    proc = _cli("check", "--bootstrap", m.bootstrap, "--blob-dir", str(tmp_path))
    # blobs are named l0.blob/l1.blob, not by id: link them by id for --blob-dir
    for l in layers:
        os.link(l.blob_path, tmp_path / l.blob.blob_id)
    proc = _cli("check", "--bootstrap", m.bootstrap, "--blob-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr + proc.stdout
