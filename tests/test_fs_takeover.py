"""Failover over real FUSE: a daemon is SIGKILLed while readers read, a successor adopts the
live FUSE connection from an fd holder (SCM_RIGHTS) without a new mount or INIT, and the
requests the dead daemon had taken are replayed (FUSE_NOTIFY_RESEND) or, with the flush
policy, answered EIO."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import multiprocessing
import os
import re
import signal
import threading
import time

import pytest

from rafs import erofs
from rafs.daemon.client import DaemonClient
from rafs.errors import MountError
from rafs.fs.fuse_ll import FuseSession
from rafs.fs.ops import RafsFs
from rafs.fs.takeover import FdHolder, fetch_handover, send_handover
from tests import fs_harness
from tests.fs_fakes import FakeOpener, make_image
from tests.fs_harness import cleanup_mounts, require_fuse
from tests.test_fs_erofs import _vector_tree, require_erofs, v6  # noqa: F401 - v6 is a fixture

pytestmark = [pytest.mark.fuse, pytest.mark.root]

CTX = multiprocessing.get_context("fork")


def _tree(tmp_path):
    files = {"/d": None}
    for i in range(64):
        files[f"/d/f{i:02d}"] = hashlib.sha256(str(i).encode()).digest() * 512  # 16 KiB each
    return make_image(str(tmp_path), files, name="image"), files


def _holder(tmp_path):
    sock = str(tmp_path / "holder.sock")
    proc = CTX.Process(target=lambda: FdHolder(sock).serve_forever(), daemon=True)
    proc.start()
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert time.monotonic() < deadline, "holder did not start"
        time.sleep(0.02)
    return sock, proc


def _daemon(tmp_path, name, bootstrap, opener, **kwargs):
    sock = str(tmp_path / f"{name}.sock")
    kwargs.update(apisock=sock, daemon_id=name, fuse_impl="ll")
    proc = CTX.Process(target=fs_harness._child, args=(kwargs, bootstrap, {}, opener), daemon=True)
    proc.start()
    client = DaemonClient(sock, timeout=10)
    deadline = time.monotonic() + 20
    while True:
        try:
            if client.state() == "RUNNING":
                return proc, client
        except OSError:
            pass
        assert proc.is_alive(), f"daemon {name} exited with {proc.exitcode}"
        assert time.monotonic() < deadline, f"daemon {name} not RUNNING within 20 s"
        time.sleep(0.05)


def _stop(*procs):
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
            p.join(15)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)


def _replayed(client) -> int:
    m = re.search(r"nydusd_fuse_requests_replayed_total\{[^}]*\} (\d+)", client.metrics())
    assert m, "replayed counter missing"
    return int(m.group(1))


def _slow(tmp_path, boot, path, seconds):
    spec = json.load(open(boot))
    entry = next(e for e in spec["entries"] if e["path"] == path)
    (tmp_path / "image.blob.slow").write_text(f"{entry['data_off'] // 4096} {seconds}")


@pytest.mark.parametrize("policy", ["resend", "flush"])
def test_sigkill_successor_adopts_fusedev_session(tmp_path, policy):
    require_fuse()
    boot, files = _tree(tmp_path)
    _slow(tmp_path, boot, "/d/f63", 2)  # keeps one request in the daemon when it is killed
    sock, holder = _holder(tmp_path)
    mnt = str(tmp_path / "mnt")
    a = b = None
    try:
        a, _ = _daemon(tmp_path, "a", boot, "fake", mountpoint=mnt, supervisor=sock)
        errors, good, stop = [], [0], threading.Event()

        def reader(k):
            i = k
            while not stop.is_set():
                path = f"/d/f{i % 63:02d}"
                try:
                    with open(mnt + path, "rb", buffering=0) as f:
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                        data = f.read()
                    if data != files[path]:
                        errors.append(f"{path}: wrong data")
                    good[0] += 1
                except OSError as exc:
                    errors.append(f"{path}: {exc}")
                i += 3

        slow_result = {}

        def slow_reader():  # O_DIRECT: the page cache cannot retry a failed read on its own
            fd = os.open(mnt + "/d/f63", os.O_RDONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, 16384)
            try:
                n = os.readv(fd, [buf])
                slow_result["data"] = bytes(buf[:n])
            except OSError as exc:
                slow_result["errno"] = exc.errno
            finally:
                os.close(fd)

        readers = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        for t in readers:
            t.start()
        slow = threading.Thread(target=slow_reader)
        slow.start()
        time.sleep(0.5)  # the slow read is inside daemon a now
        os.kill(a.pid, signal.SIGKILL)
        a.join(5)
        before = good[0]
        b, client = _daemon(tmp_path, "b", boot, "fake", mountpoint=mnt, supervisor=sock,
                            upgrade_from=sock, failover_policy=policy)
        slow.join(20)
        time.sleep(0.5)
        stop.set()
        for t in readers:
            t.join(20)
        assert not slow.is_alive()
        assert good[0] > before  # the readers went on through the successor
        assert _replayed(client) >= 1
        assert erofs.mounted_fstype(mnt) is not None  # never unmounted in between
        if policy == "resend":
            assert errors == []
            assert slow_result == {"data": files["/d/f63"]}
        else:  # the requests the dead daemon had taken fail; nothing hangs; later reads work
            assert slow_result == {"errno": errno.EIO}
            assert all(e.endswith("Input/output error") for e in errors), errors
            assert open(mnt + "/d/f63", "rb").read() == files["/d/f63"]
        assert client.info()["fuse_impl"] == "ll"
    finally:
        _stop(*(p for p in (a, b) if p is not None))
        left = fs_harness.mounts_under(mnt)
        cleanup_mounts(mnt)
        _stop(holder)
    assert not left, f"successor left mounts behind after SIGTERM: {left}"


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "dedicated"])
def test_the_holder_gets_every_fd_of_the_session_once_it_is_initialised(tmp_path, shared):
    """The fd holder must hold the whole FUSE session (the main fd and every worker's clone)
    as soon as the daemon serves: a request on a clone it does not hold dies with the daemon
    (ECONNABORTED). RUNNING can come before the kernel's INIT is answered (a shared daemon's
    always did), so the session is handed over once INIT is answered and the workers' fds
    exist, whichever of the two comes last."""
    require_fuse()
    boot, files = _tree(tmp_path)
    sock, holder = _holder(tmp_path)
    mnt = str(tmp_path / "mnt")
    a = None
    try:
        a, client = _daemon(tmp_path, "a", None if shared else boot, "fake", mountpoint=mnt, supervisor=sock,
                            thread_num=3)
        deadline = time.monotonic() + 10
        while True:
            try:
                fds, state = fetch_handover(sock)
                if len(fds) == 3:
                    break
                for fd in fds:
                    os.close(fd)
            except MountError:
                pass
            assert time.monotonic() < deadline, "the holder never got the session's 3 fds"
            time.sleep(0.05)
        try:
            assert state["session"]["mountpoint"] == mnt and state["session"]["major"] == 7
            assert all(os.major(os.fstat(fd).st_rdev) == 10 for fd in fds)  # /dev/fuse
        finally:
            for fd in fds:
                os.close(fd)
        if not shared:
            assert open(mnt + "/d/f00", "rb").read() == files["/d/f00"]
    finally:
        _stop(*(p for p in (a,) if p is not None))
        cleanup_mounts(mnt)
        _stop(holder)


def test_bad_handover_state_is_rejected_clearly(tmp_path):
    require_fuse()
    fs = RafsFs(shared=True)
    good = {"version": 1, "mountpoint": "/x", "major": 7, "minor": 31, "flags": 0,
            "max_readahead": 0, "max_write": 4096}
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        for bad, why in [(None, "not an object"), ({**good, "version": 9}, "version"),
                         ({**good, "minor": "x"}, "'minor'"), ({**good, "major": 8}, "protocol 8.31"),
                         ({k: v for k, v in good.items() if k != "mountpoint"}, "mountpoint")]:
            with pytest.raises(MountError, match=f"cannot adopt the FUSE session: .*{re.escape(why)}"):
                FuseSession(fs).adopt([fd], bad)
        with open(os.devnull) as f:
            with pytest.raises(MountError, match="is not /dev/fuse"):
                FuseSession(fs).adopt([f.fileno()], good)
        with pytest.raises(MountError, match="no /dev/fuse fd"):
            FuseSession(fs).adopt([], good)
        with pytest.raises(MountError, match="failover policy"):
            FuseSession(fs).adopt([fd], good, "later")
    finally:
        os.close(fd)


def test_holder_round_trip_and_daemon_state_mismatch(tmp_path):
    require_fuse()
    sock, holder = _holder(tmp_path)
    try:
        with pytest.raises(MountError, match="holds no FUSE session"):
            fetch_handover(sock)
        fd = os.open("/dev/fuse", os.O_RDWR)
        send_handover(sock, {"version": 1, "fs_driver": "erofs", "mountpoint": "/elsewhere"}, [fd])
        os.close(fd)
        fds, state = fetch_handover(sock)
        assert len(fds) == 1 and os.major(os.fstat(fds[0]).st_rdev) == 10
        boot, _ = _tree(tmp_path)
        # a successor for another mountpoint refuses before touching anything
        kwargs = dict(mountpoint=str(tmp_path / "m"), fuse_impl="ll", takeover=(fds, state))
        from rafs.daemon.service import Nydusd
        import trio

        with pytest.raises(MountError, match="belongs to a erofs daemon at /elsewhere"):
            trio.run(Nydusd(opener=FakeOpener(), **kwargs).run, boot, {})
        for f in fds:
            os.close(f)
    finally:
        _stop(holder)


@pytest.mark.erofs
def test_sigkill_successor_adopts_erofs_blob_file_session(v6, tmp_path):
    """The erofs driver: the kernel EROFS mount reads the FUSE blob file; the daemon serving it
    dies mid-read, the successor adopts the blob-file session and the EROFS mount never notices."""
    require_erofs()
    require_fuse()
    boot, data, contents = v6
    opener = FakeOpener({boot: _vector_tree(data)})
    open(data + ".slow", "w").write("5 2")  # sync_io.rs: one chunk stays in the daemon for 2 s
    sock, holder = _holder(tmp_path)
    mnt = str(tmp_path / "emnt")
    a = b = None
    try:
        a, _ = _daemon(tmp_path, "ea", boot, opener, mountpoint=mnt, fs_driver="erofs", supervisor=sock)
        assert erofs.mounted_fstype(mnt) == "erofs"
        result = {}

        def reader():
            try:
                result["sync_io.rs"] = open(os.path.join(mnt, "sync_io.rs"), "rb").read()
            except OSError as exc:
                result["error"] = exc

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.5)
        os.kill(a.pid, signal.SIGKILL)
        a.join(5)
        b, client = _daemon(tmp_path, "eb", boot, opener, mountpoint=mnt, fs_driver="erofs",
                            supervisor=sock, upgrade_from=sock)
        t.join(20)
        assert result == {"sync_io.rs": contents["sync_io.rs"]}
        assert open(os.path.join(mnt, "lib.rs"), "rb").read() == contents["lib.rs"]
        assert _replayed(client) >= 1
        assert client.info()["instances"]["/"]["fs_driver"] == "erofs"
    finally:
        _stop(*(p for p in (a, b) if p is not None))
        left = fs_harness.mounts_under(mnt)
        cleanup_mounts(mnt)
        _stop(holder)
    assert not left, f"successor left mounts behind after SIGTERM: {left}"


def test_hot_upgrade_via_api_exit_handover(tmp_path):
    """``PUT /api/v1/daemon/exit?handover=1``: the old daemon exits without unmounting, a
    successor takes over, and a reader started in between gets its data from the successor."""
    require_fuse()
    boot, files = _tree(tmp_path)
    sock, holder = _holder(tmp_path)
    mnt = str(tmp_path / "mnt")
    a = b = None
    try:
        a, old = _daemon(tmp_path, "a", boot, "fake", mountpoint=mnt, supervisor=sock)
        assert open(mnt + "/d/f01", "rb").read() == files["/d/f01"]
        old.exit(handover=True)
        a.join(15)
        assert a.exitcode == 0 and erofs.mounted_fstype(mnt) is not None
        result = {}
        t = threading.Thread(target=lambda: result.update(data=open(mnt + "/d/f02", "rb").read()))
        t.start()  # blocks in the kernel until someone serves the connection
        b, client = _daemon(tmp_path, "b", boot, "fake", mountpoint=mnt, supervisor=sock, upgrade_from=sock)
        t.join(20)
        assert result == {"data": files["/d/f02"]}
        assert sorted(os.listdir(mnt + "/d"))[:2] == ["f00", "f01"]
    finally:
        _stop(*(p for p in (a, b) if p is not None))
        left = fs_harness.mounts_under(mnt)
        cleanup_mounts(mnt)
        _stop(holder)
    assert not left, f"successor left mounts behind after SIGTERM: {left}"


def test_keeper_process_survives_its_starter_and_ends_with_its_socket(tmp_path):
    """FdKeeper: a process of its own session, attached again by path; it holds what it was sent
    and exits (closing the fds) when its socket is removed (its root went away)."""
    from rafs.fs.takeover import FdKeeper, holder_status

    path = str(tmp_path / "k.sock")
    keeper = FdKeeper.attach(path)
    try:
        assert keeper.wait_ready()
        assert os.getsid(keeper.pid) == keeper.pid and holder_status(path) == {"held": False, "pid": keeper.pid, "fds": 0}
        r, w = os.pipe()
        send_handover(path, {"version": 1}, [r])
        os.close(r)
        again = FdKeeper.attach(path)  # as a restarted snapshotter does
        assert again.pid == keeper.pid and again.held
        os.unlink(path)
        deadline = time.monotonic() + 10
        while keeper._proc.poll() is None:
            assert time.monotonic() < deadline, "keeper still running after its socket was removed"
            time.sleep(0.05)
        with pytest.raises(BrokenPipeError):  # the held read end was closed with it
            os.write(w, b"x")
        os.close(w)
    finally:
        if keeper._proc.poll() is None:
            keeper.close()
