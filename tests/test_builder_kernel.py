"""Kernel EROFS round trip: mount(2) our bootstrap with the blob's uncompressed form as device
and compare the tree with the source byte for byte (content, modes, ids, mtimes, xattrs,
links, devices)."""

from __future__ import annotations

import os

import pytest

from rafs.builder import BuildOptions, build
from rafs.builder.merge import merge
from storage.records import Compressor
from tests.builder_helpers import CHUNK, erofs_supported, expand, kernel_erofs_mount, kernel_umount, make_tree, snapshot

pytestmark = [pytest.mark.root, pytest.mark.erofs]


@pytest.fixture
def mnt(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("kernel EROFS mounts need root")
    if not erofs_supported():
        pytest.skip("kernel has no EROFS support (/proc/filesystems)")
    path = tmp_path / "mnt"
    path.mkdir()
    mounted: list[str] = []
    yield path, mounted
    for m in mounted:
        try:
            kernel_umount(m)
        except OSError:
            pass


def _mount(mnt, mounted, boot, devices):
    kernel_erofs_mount(boot, str(mnt), devices)
    mounted.append(str(mnt))


@pytest.mark.parametrize("compressor,chunk_size", [(Compressor.NONE, CHUNK), (Compressor.ZSTD, CHUNK),
                                                   (Compressor.LZ4_BLOCK, 0x1000), (Compressor.ZSTD, 0x100000)])
def test_kernel_mount_roundtrip(tmp_path, mnt, compressor, chunk_size):
    mnt, mounted = mnt
    src = tmp_path / "src"
    make_tree(str(src))
    boot, blob = str(tmp_path / "boot"), str(tmp_path / "blob")
    res = build(str(src), bootstrap_out=boot, blob_out=blob,
                options=BuildOptions(chunk_size=chunk_size, compressor=compressor, blob_toc=True))
    data = str(tmp_path / "blob.data")
    expand(blob, data, res.blob)
    assert os.path.getsize(data) == res.blob.uncompressed_size
    _mount(mnt, mounted, boot, [data])
    assert snapshot(str(mnt)) == snapshot(str(src))


def test_kernel_mount_merged_layers(tmp_path, mnt):
    """Three layers (tar with whiteouts) -> merge -> kernel mount with three devices."""
    mnt, mounted = mnt
    import io
    import tarfile

    def layer(entries, name):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for path, data in entries:
                ti = tarfile.TarInfo(path)
                ti.mtime = 1_700_000_000
                if data is None:
                    ti.type = tarfile.DIRTYPE
                    ti.mode = 0o755
                    tf.addfile(ti)
                else:
                    ti.size = len(data)
                    ti.mode = 0o644
                    tf.addfile(ti, io.BytesIO(data))
        tar = tmp_path / f"{name}.tar"
        tar.write_bytes(buf.getvalue())
        boot, blob = str(tmp_path / f"{name}.boot"), str(tmp_path / f"{name}.blob")
        res = build(str(tar), bootstrap_out=boot, blob_out=blob, source_type="tar-rafs",
                    options=BuildOptions(chunk_size=CHUNK, whiteout_spec="none"))
        data_path = str(tmp_path / f"{res.blob.blob_id}.data")
        expand(blob, data_path, res.blob)
        return boot, data_path

    big = os.urandom(3 * CHUNK + 5)
    l1 = layer([("etc", None), ("etc/a", b"a1"), ("etc/b", b"b1"), ("opq", None), ("opq/x", b"x"), ("big", big)], "l1")
    l2 = layer([("etc", None), ("etc/.wh.b", b""), ("etc/c", b"c2"), ("opq", None), ("opq/.wh..wh..opq", b""),
                ("opq/y", b"y2")], "l2")
    l3 = layer([("etc", None), ("etc/a", b"a3")], "l3")
    out = str(tmp_path / "merged.boot")
    merge([l1[0], l2[0], l3[0]], out)
    _mount(mnt, mounted, out, [l1[1], l2[1], l3[1]])
    got = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for n in filenames:
            p = os.path.join(dirpath, n)
            got[os.path.relpath(p, mnt)] = open(p, "rb").read()
    assert got == {"etc/a": b"a3", "etc/c": b"c2", "opq/y": b"y2", "big": big}


def test_kernel_mount_compact_inodes(tmp_path, mnt):
    """``compact_inodes``: upstream's rule; the kernel reads the mixed image back (compact
    inodes have no mtime: they show the build time 0, extended ones keep theirs)."""
    mnt, mounted = mnt
    src = tmp_path / "src"
    make_tree(str(src))
    (src / "mod.pyc").write_bytes(b"bytecode")
    os.utime(src / "mod.pyc", ns=(1_650_000_000_000_000_001,) * 2)
    os.utime(src, ns=(1_500_000_000_123_456_789,) * 2)
    boot, blob = str(tmp_path / "boot"), str(tmp_path / "blob")
    res = build(str(src), bootstrap_out=boot, blob_out=blob,
                options=BuildOptions(chunk_size=CHUNK, compact_inodes=True))
    ext_boot = str(tmp_path / "ext.boot")
    build(str(src), bootstrap_out=ext_boot, blob_out=str(tmp_path / "ext.blob"), options=BuildOptions(chunk_size=CHUNK))
    assert os.path.getsize(boot) < os.path.getsize(ext_boot)
    data = str(tmp_path / "blob.data")
    expand(blob, data, res.blob)
    _mount(mnt, mounted, boot, [data])
    assert snapshot(str(mnt), times=False) == snapshot(str(src), times=False)
    assert os.lstat(mnt / "one").st_mtime_ns == 0                       # compact
    assert os.lstat(mnt / "mod.pyc").st_mtime_ns == 1_650_000_000_000_000_001  # .pyc: extended
    assert os.lstat(mnt / "a" / "multi").st_mtime_ns == os.lstat(src / "a" / "multi").st_mtime_ns  # uid > 65535
    assert os.lstat(mnt / "bdev").st_rdev == os.lstat(src / "bdev").st_rdev  # rdev != 0: extended
