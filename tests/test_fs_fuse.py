"""The pyfuse3 filesystem over real FUSE, with a fake metadata tree and device."""

from __future__ import annotations

import errno
import json
import mmap
import re
import os
import stat
import threading
import time

import pytest

from rafs import erofs
from tests.fs_fakes import make_image
from tests.fs_harness import require_fuse, running_daemon

pytestmark = [pytest.mark.fuse, pytest.mark.root]

BIG = bytes(range(256)) * 64 * 5 + b"tail"  # 5 chunks + 4 bytes


def _tree(tmp_path, name="image", marker=b"x"):
    files = {
        "/etc": {"mode": 0o750, "uid": 7, "gid": 8},
        "/etc/hosts": {"data": b"127.0.0.1 localhost\n" + marker, "uid": 11, "gid": 12, "mode": 0o640,
                       "xattrs": {"user.k": "v", "security.x": "y"}},
        "/big": BIG,
        "/empty": b"",
        "/link": "->etc/hosts",
        "/hard": "=>/big",
        "/d": None,
    }
    for i in range(300):
        files[f"/d/f{i:03d}"] = f"file {i}\n".encode()
    return make_image(str(tmp_path), files, name=name)


@pytest.mark.parametrize("no_open", [None, False], ids=["auto", "open-release"])
def test_tree_content_modes_xattrs(tmp_path, no_open):
    require_fuse()
    boot = _tree(tmp_path)
    with running_daemon(tmp_path, bootstrap=boot, fuse_no_open=no_open) as (client, mnt, _):
        assert erofs.mounted_fstype(mnt) == "fuse.rafs"
        st = os.lstat(f"{mnt}/etc")
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
        assert (st.st_uid, st.st_gid) == (7, 8)
        st = os.lstat(f"{mnt}/etc/hosts")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 11, 12)
        assert open(f"{mnt}/etc/hosts", "rb").read() == b"127.0.0.1 localhost\nx"
        assert open(f"{mnt}/big", "rb").read() == BIG
        with open(f"{mnt}/big", "rb") as f:
            f.seek(4090)
            assert f.read(20) == BIG[4090:4110]
        assert open(f"{mnt}/empty", "rb").read() == b""
        assert os.readlink(f"{mnt}/link") == "etc/hosts"
        assert os.stat(f"{mnt}/hard").st_ino == os.stat(f"{mnt}/big").st_ino
        assert os.stat(f"{mnt}/big").st_nlink == 2
        assert sorted(os.listxattr(f"{mnt}/etc/hosts")) == ["security.x", "user.k"]
        assert os.getxattr(f"{mnt}/etc/hosts", "user.k") == b"v"
        with pytest.raises(OSError) as ei:
            os.getxattr(f"{mnt}/etc/hosts", "user.none")
        assert ei.value.errno == errno.ENODATA
        names = os.listdir(f"{mnt}/d")
        assert names == [f"f{i:03d}" for i in range(300)]  # stable dirent order across readdir pages
        assert sorted(os.listdir(mnt)) == ["big", "d", "empty", "etc", "hard", "link"]
        with pytest.raises(FileNotFoundError):
            os.stat(f"{mnt}/nope")
        for op in (lambda: open(f"{mnt}/big", "wb"), lambda: os.mkdir(f"{mnt}/x"),
                   lambda: os.unlink(f"{mnt}/big"), lambda: os.chmod(f"{mnt}/big", 0o600)):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EROFS
        sv = os.statvfs(mnt)
        assert sv.f_bsize == 4096 and sv.f_files >= 300
        bdi = f"/sys/class/bdi/{erofs.mountinfo(mnt)[0]}/read_ahead_kb"
        for _ in range(100):  # raised right after FUSE INIT (which resets it to 128)
            if open(bdi).read().strip() == "1024":
                break
            time.sleep(0.05)
        assert open(bdi).read().strip() == "1024"


@pytest.mark.parametrize("no_open", [None, False], ids=["auto", "open-release"])
def test_lazy_reads_and_concurrency(tmp_path, no_open):
    require_fuse()
    boot = _tree(tmp_path)
    reads = tmp_path / "image.blob.reads"
    with running_daemon(tmp_path, bootstrap=boot, fuse_no_open=no_open) as (client, mnt, _):
        os.listdir(f"{mnt}/d")
        os.stat(f"{mnt}/big")
        assert not reads.exists(), "metadata operations must not read blob data"
        assert open(f"{mnt}/d/f007", "rb").read() == b"file 7\n"
        assert len(reads.read_text().split()) == 1  # exactly the one chunk of that file
        errors = []

        def reader(i):
            try:
                for _ in range(5):
                    assert open(f"{mnt}/d/f{i * 7 % 300:03d}", "rb").read() == f"file {i * 7 % 300}\n".encode()
                    assert open(f"{mnt}/big", "rb").read() == BIG
            except Exception as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        metrics = client.metrics()
        assert "nydusd_read_count" in metrics and "nydusd_read_errors{id=\"/\"} 0" in metrics


def test_backend_down_gives_eio_for_that_read_only(tmp_path, capfd):
    require_fuse()
    boot = _tree(tmp_path)
    down = tmp_path / "image.blob.down"
    with running_daemon(tmp_path, bootstrap=boot) as (client, mnt, proc):
        assert open(f"{mnt}/d/f001", "rb").read() == b"file 1\n"
        down.write_text("")
        with pytest.raises(OSError) as ei:
            open(f"{mnt}/d/f002", "rb").read()
        assert ei.value.errno == errno.EIO
        assert open(f"{mnt}/d/f001", "rb").read() == b"file 1\n"  # page cache still serves it
        down.unlink()
        assert open(f"{mnt}/d/f002", "rb").read() == b"file 2\n"  # the daemon kept serving
        assert proc.is_alive()
        m = re.search(r'nydusd_read_errors\{id="/"\} (\d+)', client.metrics())
        assert m and int(m.group(1)) >= 1  # the kernel may retry the failed page once
        err = capfd.readouterr().err
        assert re.search(r"read failed: .*blob \S+ chunk \d+: BackendError: backend unreachable", err), err


def test_shared_daemon_instances(tmp_path):
    require_fuse()
    a = _tree(tmp_path, "a", b"A")
    b = _tree(tmp_path, "b", b"B")
    with running_daemon(tmp_path) as (client, mnt, _):
        assert client.info()["mode"] == "shared"
        assert os.listdir(mnt) == []
        client.mount("/img-a", a, {})
        client.mount("/img-b", b, {})
        assert sorted(os.listdir(mnt)) == ["img-a", "img-b"]
        assert open(f"{mnt}/img-a/etc/hosts", "rb").read().endswith(b"A")
        assert open(f"{mnt}/img-b/etc/hosts", "rb").read().endswith(b"B")
        assert os.stat(f"{mnt}/img-a/big").st_ino != os.stat(f"{mnt}/img-b/big").st_ino
        with pytest.raises(Exception) as ei:
            client.mount("/img-a", a, {})
        assert getattr(ei.value, "status", None) == 409
        client.umount("/img-a")
        assert os.listdir(mnt) == ["img-b"]
        with pytest.raises(FileNotFoundError):
            os.stat(f"{mnt}/img-a/etc/hosts")
        assert open(f"{mnt}/img-b/etc/hosts", "rb").read().endswith(b"B")
        assert set(client.info()["instances"]) == {"/img-b"}
        with pytest.raises(Exception) as ei:
            client.umount("/img-a")
        assert getattr(ei.value, "status", None) == 404


def test_sigterm_unmounts(tmp_path):
    require_fuse()
    boot = _tree(tmp_path)
    import signal

    with running_daemon(tmp_path, bootstrap=boot) as (client, mnt, proc):
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(15)
        assert proc.exitcode == 0
        assert erofs.mounted_fstype(mnt) is None
        assert not os.path.exists(client.apisock)


def test_complete_cache_file_fast_path(tmp_path):
    """Once the device reports a complete cache file, reads pread it directly (no device.read)."""
    require_fuse()
    boot = _tree(tmp_path)
    spec = json.load(open(boot))
    spec["complete"] = True
    json.dump(spec, open(boot, "w"))
    with running_daemon(tmp_path, bootstrap=boot) as (client, mnt, _):
        assert open(f"{mnt}/big", "rb").read() == BIG
        assert open(f"{mnt}/d/f123", "rb").read() == b"file 123\n"
        assert not (tmp_path / "image.blob.reads").exists()
        assert 'nydusd_read_errors{id="/"} 0' in client.metrics()


def test_slow_chunk_does_not_block_other_reads(tmp_path):
    require_fuse()
    boot = _tree(tmp_path)
    spec = json.load(open(boot))
    slow_entry = next(e for e in spec["entries"] if e["path"] == "/d/f100")
    (tmp_path / "image.blob.slow").write_text(f"{slow_entry['data_off'] // 4096} 4")
    with running_daemon(tmp_path, bootstrap=boot) as (client, mnt, _):
        done = {}

        def slow_reader():
            done["slow_data"] = open(f"{mnt}/d/f100", "rb").read()
            done["slow"] = time.monotonic()

        t = threading.Thread(target=slow_reader)
        start = time.monotonic()
        t.start()
        time.sleep(0.3)
        for i in range(20):  # other files are served while that chunk is still being fetched
            assert open(f"{mnt}/d/f{i:03d}", "rb").read() == f"file {i}\n".encode()
        fast = time.monotonic()
        t.join(30)
        assert done["slow_data"] == b"file 100\n"
        assert fast - start < 3 < done["slow"] - start


def _fuse_requests(client) -> dict[str, int]:
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r'nydusd_fuse_requests_total\{daemon="[^"]*",op="(\w+)"\} (\d+)', client.metrics())}


def _require_no_open():
    from rafs.fs.ops import no_open_unsupported_reason

    why = no_open_unsupported_reason()
    if why:
        pytest.skip(f"FUSE no_open unavailable: {why}")


def test_no_open_reads_every_file_without_open_or_release(tmp_path):
    """no_open: one ENOSYS answer, then the kernel opens files itself; reads name the inode."""
    require_fuse()
    _require_no_open()
    boot = _tree(tmp_path)
    with running_daemon(tmp_path, bootstrap=boot, fuse_no_open=True) as (client, mnt, _):
        assert client.info()["fuse_no_open"] is True
        for _ in range(2):
            for i in range(300):
                assert open(f"{mnt}/d/f{i:03d}", "rb").read() == f"file {i}\n".encode()
            assert open(f"{mnt}/big", "rb").read() == BIG
            assert open(f"{mnt}/hard", "rb").read() == BIG
            assert open(f"{mnt}/link", "rb").read().startswith(b"127.0.0.1")
        with open(f"{mnt}/big", "rb") as f:  # reads at offsets inside one kept-open file
            assert os.pread(f.fileno(), 10, len(BIG) - 4) == b"tail"
            assert os.pread(f.fileno(), 3, 4097) == BIG[4097:4100]

        def reads() -> int:
            return int(re.search(r'nydusd_read_count\{id="/"\} (\d+)', client.metrics()).group(1))

        before = reads()
        with open(f"{mnt}/d/f299", "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                assert m[:] == b"file 299\n"
        assert reads() == before + 1  # the page fault read through FUSE with handle 0
        with pytest.raises(OSError) as ei:
            open(f"{mnt}/big", "r+b")
        assert ei.value.errno == errno.EROFS
        reqs = _fuse_requests(client)
        assert reqs["open"] == 1 and reqs["release"] == 0, reqs  # the one ENOSYS, then none
        # the second pass came from the page cache (no_open implies keep_cache)
        assert 302 <= reads() < 320, reads()  # 300 small files, big, etc/hosts, the mmap fault


def test_no_open_in_a_shared_daemon(tmp_path):
    require_fuse()
    _require_no_open()
    a = _tree(tmp_path, "a", b"A")
    b = _tree(tmp_path, "b", b"B")
    with running_daemon(tmp_path, fuse_no_open=True) as (client, mnt, _):
        client.mount("/img-a", a, {})
        client.mount("/img-b", b, {})
        assert open(f"{mnt}/img-a/etc/hosts", "rb").read().endswith(b"A")
        assert open(f"{mnt}/img-b/etc/hosts", "rb").read().endswith(b"B")
        client.umount("/img-a")
        client.mount("/img-c", a, {})  # a new slot: never the old instance's cached pages
        assert open(f"{mnt}/img-c/etc/hosts", "rb").read().endswith(b"A")
        assert open(f"{mnt}/img-b/d/f042", "rb").read() == b"file 42\n"
        assert _fuse_requests(client)["release"] == 0


def test_classic_open_release_path(tmp_path):
    """With no_open off every open and release reaches the daemon (stock pyfuse3's only mode)."""
    require_fuse()
    boot = _tree(tmp_path)
    with running_daemon(tmp_path, bootstrap=boot, fuse_no_open=False) as (client, mnt, _):
        assert client.info()["fuse_no_open"] is False
        for i in range(50):
            assert open(f"{mnt}/d/f{i:03d}", "rb").read() == f"file {i}\n".encode()
        deadline = time.monotonic() + 5
        while (reqs := _fuse_requests(client))["release"] < 50 and time.monotonic() < deadline:
            time.sleep(0.05)  # release is sent after close() returns
        assert reqs["open"] == 50 and reqs["release"] == 50, reqs


@pytest.mark.parametrize("release, ok", [("4.19.300", False), ("4.20.0", True), ("6.18.44-fc-v445", True),
                                         ("3.10.0-1160.el7", False), ("weird", False)])
def test_kernel_no_open_version_gate(release, ok):
    from rafs.fs.ops import _kernel_has_no_open

    assert _kernel_has_no_open(release) is ok
