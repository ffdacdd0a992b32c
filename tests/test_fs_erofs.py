"""Kernel EROFS: support detection, mount(2) of the upstream v6 vector, lazy blob files over FUSE."""

from __future__ import annotations

import os
import stat

import pytest

from rafs import erofs
from rafs.errors import MountError, UnsupportedError
from rafs.fs import session
from rafs.fs.instance import BlobFiles
from storage.compress import decompress
from storage.records import Compressor
from tests.fs_fakes import FakeOpener, FakeRafs
from tests.fs_harness import require_fuse, running_daemon

pytestmark = [pytest.mark.erofs, pytest.mark.root]

V6_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
#: (compressed offset, compressed size, uncompressed offset, uncompressed size, file) of the
#: vector blob's two zstd chunks (vectors README: CI table of blobs/be7d77…)
V6_CHUNKS = [(0x0, 0x12DC, 0x0, 16931, "lib.rs"), (0x12DC, 0xB9E, 0x5000, 13400, "sync_io.rs")]


def require_erofs() -> erofs.ErofsSupport:
    if os.geteuid() != 0:
        pytest.skip("EROFS mounts need root")
    sup = erofs.detect_support()
    if not sup.usable:
        pytest.skip(f"kernel EROFS unusable here: {sup.reason}")
    return sup


@pytest.fixture
def v6(vectors_dir, tmp_path):
    """(bootstrap, uncompressed blob data file, {name: content}) of the upstream v6 vector."""
    tex = vectors_dir / "dragonflyoss-nydus/tests/texture"
    blob = (tex / "blobs" / V6_BLOB).read_bytes()
    data = bytearray(0x5000 + 16384)
    contents = {}
    for c_off, c_size, u_off, u_size, name in V6_CHUNKS:
        chunk = decompress(Compressor.ZSTD, blob[c_off:c_off + c_size], u_size)
        data[u_off:u_off + u_size] = chunk
        contents[name] = chunk
    path = tmp_path / f"{V6_BLOB}.blob.data"
    path.write_bytes(bytes(data))
    return str(tex / "bootstrap/rafs-v6-2.2.boot"), str(path), contents


def test_support_detection_is_precise():
    if not os.path.exists("/proc/filesystems"):
        pytest.skip("no /proc")
    sup = erofs.detect_support()
    assert sup.erofs == ("erofs" in open("/proc/filesystems").read().split())
    if sup.erofs and not sup.ondemand:
        assert "\n" not in sup.reason
        if os.geteuid() == 0:
            assert "CONFIG_EROFS_FS_ONDEMAND" in sup.reason
        else:  # unprivileged: fsopen(2) itself is refused, and the reason says so
            assert "fsopen(erofs) failed" in sup.reason or "CONFIG_EROFS_FS_ONDEMAND" in sup.reason
    if sup.usable:
        erofs.require_file_backed()
    else:
        with pytest.raises(UnsupportedError):
            erofs.require_file_backed()


def test_mount2_v6_vector_with_blob_data_file(v6, tmp_path):
    require_erofs()
    boot, data, contents = v6
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    erofs.mount_erofs(boot, str(mnt), [data])
    try:
        info = erofs.mountinfo(str(mnt))
        assert info[1] == "erofs" and info[2] == boot  # file-backed: the bootstrap is the source, no loop
        assert sorted(os.listdir(mnt)) == ["lib.rs", "sync_io.rs"]
        for name, content in contents.items():
            assert (mnt / name).read_bytes() == content
            assert stat.S_ISREG(os.stat(mnt / name).st_mode)
    finally:
        erofs.umount(str(mnt))
    assert erofs.mounted_fstype(str(mnt)) is None


def test_mount_errors_are_precise(tmp_path):
    require_erofs()
    junk = tmp_path / "junk.boot"
    junk.write_bytes(b"\0" * 8192)
    (tmp_path / "m").mkdir()
    with pytest.raises(MountError, match=r"mount\(2\) erofs .*EINVAL"):
        erofs.mount_erofs(str(junk), str(tmp_path / "m"), [])
    with pytest.raises(MountError, match="umount2"):
        erofs.umount(str(tmp_path / "m"))


def _vector_tree(data_file: str) -> dict:
    return {"blob_file": data_file, "blob_id": V6_BLOB, "chunk_size": 1 << 20, "entries": [
        {"path": "/lib.rs", "type": "reg", "mode": 0o644, "data_off": 0, "size": 16931},
        {"path": "/sync_io.rs", "type": "reg", "mode": 0o644, "data_off": 0x5000, "size": 13400}]}


def test_blob_files_layout(v6):
    _, data, _ = v6
    tree = FakeRafs(_vector_tree(data))
    bf = BlobFiles(tree)
    assert bf.data_size(0) == 0x5000 + 16384
    iov = bf.blob_range(0, 16000, 0x5000)  # end of chunk 0, the alignment gap, start of chunk 1
    # chunk 0 ends at 16931, chunk 1 spans 0x5000..0x5000+13400, the range ends at 16000+0x5000
    assert [(d.chunk.index if d.chunk else None, d.offset, d.size) for d in iov] == [
        (0, 16000, 931), (None, 0, 0x5000 - 16931), (5, 0, 13400), (None, 0, 16000 - 13400)]
    spec = _vector_tree(data)
    spec["entries"][1]["data_off"] = 0x4200
    with pytest.raises(UnsupportedError, match="4 KiB aligned"):
        BlobFiles(FakeRafs(spec))
    tree.version = 5
    with pytest.raises(UnsupportedError, match="v6"):
        BlobFiles(tree)


def test_erofs_driver_lazy_blob_files_over_fuse(v6, tmp_path):
    """Kernel EROFS metadata + blob data fetched on demand through the daemon's FUSE blob file."""
    require_erofs()
    require_fuse()
    boot, data, contents = v6
    opener = FakeOpener({boot: _vector_tree(data)})
    reads = data + ".reads"
    for shared in (False, True):
        if os.path.exists(reads):
            os.unlink(reads)
        with running_daemon(tmp_path, bootstrap=None if shared else boot, fs_driver="erofs",
                            opener=opener, name=f"e{int(shared)}") as (client, mnt, _):
            target = mnt
            if shared:
                client.mount("/img", boot, {})
                target = os.path.join(mnt, "img")
            inst = client.info()["instances"]["/img" if shared else "/"]
            assert inst["fs_driver"] == "erofs"
            assert erofs.mountinfo(target)[1] == "erofs"
            assert sorted(os.listdir(target)) == ["lib.rs", "sync_io.rs"]
            assert not os.path.exists(reads), "metadata must come from the bootstrap, not the blob"
            assert open(os.path.join(target, "sync_io.rs"), "rb").read() == contents["sync_io.rs"]
            assert set(open(reads).read().split()) == {"5"}  # only sync_io.rs's chunk was fetched
            assert open(os.path.join(target, "lib.rs"), "rb").read() == contents["lib.rs"]
            if shared:
                client.umount("/img")
                assert erofs.mounted_fstype(target) is None
        assert erofs.mounted_fstype(mnt) is None and erofs.mounted_fstype(mnt + ".blobs") is None


def test_erofs_blob_files_serve_only_what_erofs_asks(v6, tmp_path):
    """The blob files are opened with direct I/O: reading the first file fetches its chunk, not
    the next file's chunk 20 KiB further on (the FUSE page cache's 128 KiB read-ahead of the blob
    file would take it); the EROFS mount reads ahead ``EROFS_READ_AHEAD_KB`` within its files."""
    require_erofs()
    require_fuse()
    boot, data, contents = v6
    opener = FakeOpener({boot: _vector_tree(data)})
    with running_daemon(tmp_path, bootstrap=boot, fs_driver="erofs", opener=opener, name="dio") as (_, mnt, _p):
        assert open(os.path.join(mnt, "lib.rs"), "rb").read() == contents["lib.rs"]
        assert set(open(data + ".reads").read().split()) == {"0"}
        bdi = erofs.bdi_name(mnt)
        if bdi is not None:  # (kernels before 6.10 cannot name it)
            assert open(f"/sys/class/bdi/{bdi}/read_ahead_kb").read().strip() == str(session.EROFS_READ_AHEAD_KB)
        assert open(os.path.join(mnt, "sync_io.rs"), "rb").read() == contents["sync_io.rs"]
        assert set(open(data + ".reads").read().split()) == {"0", "5"}


def test_erofs_driver_uses_complete_cache_file(v6, tmp_path):
    """A complete (unpadded) cache file becomes the device= directly: no reads reach the daemon."""
    require_erofs()
    require_fuse()
    boot, data, contents = v6
    unpadded = tmp_path / "complete.blob.data"
    unpadded.write_bytes(open(data, "rb").read()[:0x5000 + 13400])
    spec = _vector_tree(str(unpadded))
    spec["complete"] = True
    opener = FakeOpener({boot: spec})
    with running_daemon(tmp_path, bootstrap=boot, fs_driver="erofs", opener=opener, name="c") as (client, mnt, _):
        assert client.info()["instances"]["/"]["blob_files"] == [str(unpadded)]
        assert os.path.getsize(unpadded) == 0x5000 + 16384  # padded to whole 4 KiB blocks
        for name, content in contents.items():
            assert open(os.path.join(mnt, name), "rb").read() == content
        assert not os.path.exists(str(unpadded) + ".reads")


def test_erofs_shared_remount_of_same_instance_right_away(v6, tmp_path):
    """Unmount and remount the same instance id at once: the blob file of the new instance must
    be found (the kernel's cached entry of the old ``<blob_dir>/<id>`` is invalidated)."""
    require_erofs()
    require_fuse()
    boot, data, contents = v6
    opener = FakeOpener({boot: _vector_tree(data)})
    with running_daemon(tmp_path, bootstrap=None, fs_driver="erofs", opener=opener, name="r") as (client, mnt, _):
        target = os.path.join(mnt, "img")
        for _ in range(3):
            client.mount("/img", boot, {})
            blob_file = client.info()["instances"]["/img"]["blob_files"][0]
            os.stat(blob_file)  # the kernel caches the entry of <blob_dir>/img
            assert open(os.path.join(target, "sync_io.rs"), "rb").read() == contents["sync_io.rs"]
            client.umount("/img")
            assert erofs.mounted_fstype(target) is None


def test_detect_support_probes_where_it_is_told(tmp_path):
    # the file-backed probe's file goes to the nearest existing ancestor of probe_dir (where the
    # images live: a container's /tmp may be overlayfs, whose files the kernel refuses)
    here = erofs.detect_support(str(tmp_path / "not" / "yet"))
    assert here == erofs.detect_support(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
