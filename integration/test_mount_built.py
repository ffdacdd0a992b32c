"""Builder-made images from a generated tree, mounted with both drivers, compared with the source."""

from __future__ import annotations

import os
import random
import stat

import pytest

from integration.fs_support import localfs_config, metric, nydusd, require_stack, settled_metric
from rafs import erofs

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def make_tree(root: str, seed: int = 7) -> None:
    rnd = random.Random(seed)
    os.makedirs(f"{root}/etc/conf.d")
    os.makedirs(f"{root}/usr/lib/deep/er/still")
    os.makedirs(f"{root}/empty-dir")
    os.makedirs(f"{root}/many")
    files = {
        "etc/hosts": b"127.0.0.1 localhost\n",
        "etc/conf.d/empty": b"",
        "usr/lib/big.bin": rnd.randbytes(3 * 1024 * 1024 + 123),  # several chunks, unaligned tail
        "usr/lib/zeros": bytes(2 * 1024 * 1024),                   # compresses, dedups
        "usr/lib/deep/er/still/text": b"hello world\n" * 5000,
        "usr/lib/page": rnd.randbytes(4096),
    }
    for i in range(600):
        files[f"many/f{i:04d}"] = rnd.randbytes(rnd.randint(0, 9000))
    for path, data in files.items():
        with open(f"{root}/{path}", "wb") as f:
            f.write(data)
    os.chmod(f"{root}/etc/hosts", 0o640)
    os.chown(f"{root}/etc/hosts", 1234, 5678)
    os.chmod(f"{root}/usr/lib/deep", 0o700)
    os.chown(f"{root}/usr/lib/deep", 42, 43)
    os.chmod(f"{root}/usr/lib/page", 0o4755)
    os.symlink("../etc/hosts", f"{root}/usr/hosts-link")
    os.symlink("/nonexistent/target", f"{root}/dangling")
    os.link(f"{root}/usr/lib/page", f"{root}/usr/page-hardlink")
    os.mkfifo(f"{root}/fifo")
    os.setxattr(f"{root}/etc/hosts", "user.color", b"blue")
    os.setxattr(f"{root}/etc/hosts", "trusted.x", b"\x00\x01binary")
    os.setxattr(f"{root}/usr/lib", "user.dir", b"yes")


def snapshot(root: str, *, content: bool = True) -> dict[str, tuple]:
    out = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            p = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(p, root)
            if not name and rel != ".":
                continue
            st = os.lstat(p)
            entry = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns // 10**9]
            if stat.S_ISREG(st.st_mode):
                entry += [st.st_size, st.st_nlink]
                if content:
                    with open(p, "rb") as f:
                        entry.append(f.read())
                first = inodes.setdefault(st.st_ino, rel)
                entry.append(first if st.st_nlink > 1 else None)
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(p))
            if not stat.S_ISLNK(st.st_mode):
                entry.append(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                    for k in os.listxattr(p, follow_symlinks=False)))
            out[rel] = tuple(entry)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    require_stack()
    from rafs.builder import BuildOptions, build

    work = tmp_path_factory.mktemp("built")
    src = str(work / "src")
    make_tree(src)
    blobs = work / "blobs"
    blobs.mkdir()
    res = build(src, bootstrap_out=str(work / "image.boot"), blob_dir=str(blobs), options=BuildOptions())
    return src, res.bootstrap, str(blobs)


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_built_image_matches_source(built, tmp_path, driver):
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    src, boot, blobs = built
    expect = snapshot(src)
    with nydusd(tmp_path, bootstrap=boot, config=localfs_config(blobs, str(tmp_path / "cache")),
                fs_driver=driver) as (client, mnt, _):
        assert erofs.mounted_fstype(mnt) == ("erofs" if driver == "erofs" else "fuse.rafs")
        # the mount fetches the blob's CI table (one request), nothing else
        tables = settled_metric(client, "nydus_storage_backend_read_requests_total")
        assert tables <= 1
        meta = snapshot(mnt, content=False)
        assert metric(client.metrics(), "nydus_storage_backend_read_requests_total") == tables  # lazy
        with open(os.path.join(mnt, "etc/hosts"), "rb") as f:
            assert f.read() == b"127.0.0.1 localhost\n"
        assert metric(client.metrics(), "nydus_storage_backend_read_requests_total") > tables
        got = snapshot(mnt)
    assert set(got) == set(expect)
    for rel in sorted(expect):
        assert got[rel] == expect[rel], rel
    assert set(meta) == set(expect)


def test_digest_mismatch_gives_eio_and_log(tmp_path):
    require_stack()
    import errno

    from rafs.builder import BuildOptions, build
    from storage.records import Compressor

    src = tmp_path / "src"
    src.mkdir()
    (src / "good").write_bytes(b"g" * 5000)
    (src / "bad").write_bytes(bytes(range(256)) * 40)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    res = build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(blobs),
                options=BuildOptions(compressor=Compressor.NONE, chunk_size=0x1000))
    blob = blobs / res.blob_ids[0]
    data = bytearray(blob.read_bytes())
    at = bytes(data).find(bytes(range(256)))
    assert at >= 0
    data[at + 10] ^= 0xFF
    blob.write_bytes(bytes(data))
    cfg = localfs_config(str(blobs), str(tmp_path / "cache"), digest_validate=True)
    with nydusd(tmp_path, bootstrap=res.bootstrap, config=cfg) as (client, mnt, proc):
        with pytest.raises(OSError) as ei:
            open(os.path.join(mnt, "bad"), "rb").read()
        assert ei.value.errno == errno.EIO
        assert open(os.path.join(mnt, "good"), "rb").read() == b"g" * 5000
        assert proc.poll() is None
    log = (tmp_path / "n.log").read_text()
    assert "read failed" in log and "Digest" in log, log[-2000:]
