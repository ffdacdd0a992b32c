"""Upstream nydus-snapshotter's hot-upgrade sequence against real nydusd processes.

Upstream (nydus-snapshotter ``DoDaemonUpgrade``) starts the new daemon with ``--upgrade``, waits
for state INIT, calls ``PUT /api/v1/daemon/fuse/takeover`` on it (READY), ``PUT
/api/v1/daemon/exit`` on the old one (which exits without unmounting), then ``PUT
/api/v1/daemon/start`` on the new one (RUNNING). Here the FUSE session is held by an fd holder
(``--supervisor``), the way this project's snapshotter holds it, and every request goes over the
daemons' API sockets as raw HTTP, as upstream's Go client sends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rafs import erofs
from tests import fs_harness
from tests.fs_harness import cleanup_mounts, require_fuse
from tests.test_fs_takeover import _holder, _stop
from tests.test_upstream_api import _call, _config, _image

pytestmark = [pytest.mark.fuse, pytest.mark.root]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spawn(tmp_path, name: str, *args: str) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "ab")
    env = dict(os.environ, PYTHONPATH=REPO)
    try:
        return subprocess.Popen([sys.executable, "-m", "rafs.daemon.cli", "fuse", "--id", "d", *args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    finally:
        log.close()


def _state(sock: str) -> str | None:
    try:
        status, _, body = _call(sock, "GET", "/api/v1/daemon")
    except OSError:
        return None
    return json.loads(body)["state"] if status == 200 else None


def _wait_state(sock: str, proc: subprocess.Popen, want: str, tmp_path, name: str) -> None:
    deadline = time.monotonic() + 30
    while _state(sock) != want:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}: {(tmp_path / f'{name}.log').read_text()[-2000:]}")
        assert time.monotonic() < deadline, f"{name} not {want} within 30 s (state {_state(sock)})"
        time.sleep(0.05)


def _put(sock: str, path: str) -> tuple[int, dict | None]:
    status, _, body = _call(sock, "PUT", path)
    return status, (json.loads(body) if body else None)


def _kill(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_upstream_hot_upgrade_sequence_keeps_the_mount_serving(tmp_path, driver):
    require_fuse()
    if driver == "erofs":
        from tests.test_fs_erofs import require_erofs

        require_erofs()
    files = {f"f{i}": os.urandom(64 << 10) + bytes([i]) for i in range(6)}
    boot = _image(tmp_path, files)
    config = _config(tmp_path)
    holder_sock, holder = _holder(tmp_path)
    mnt = str(tmp_path / "mnt")
    a_sock, b_sock = str(tmp_path / "api1.sock"), str(tmp_path / "api2.sock")
    a = b = None
    try:
        a = _spawn(tmp_path, "a", "--mountpoint", mnt, "--apisock", a_sock, "--supervisor", holder_sock,
                   "--fs-driver", driver)
        _wait_state(a_sock, a, "RUNNING", tmp_path, "a")
        body = json.dumps({"fs_type": "rafs", "source": boot, "config": json.dumps(config)}).encode()
        assert _call(a_sock, "POST", "/api/v1/mount?mountpoint=/img", body)[0] == 204
        assert open(os.path.join(mnt, "img", "f0"), "rb").read() == files["f0"]
        # a daemon that is not an --upgrade successor refuses the successor's steps
        for path, event in (("/api/v1/daemon/fuse/takeover", "Takeover"), ("/api/v1/daemon/start", "Start")):
            status, err = _put(a_sock, path)
            assert status == 400 and err["code"] == "UnexpectedEvent" and event in err["message"], err
        assert _put(a_sock, "/api/v1/daemon/fuse/sendfd") == (204, None)  # upstream's SendStates

        b = _spawn(tmp_path, "b", "--mountpoint", mnt, "--apisock", b_sock, "--supervisor", holder_sock,
                   "--upgrade", "--fs-driver", driver)
        _wait_state(b_sock, b, "INIT", tmp_path, "b")
        status, err = _put(b_sock, "/api/v1/daemon/start")  # start before takeover: refused
        assert status == 400 and err["code"] == "UnexpectedEvent", err
        t0 = time.monotonic()
        assert _put(b_sock, "/api/v1/daemon/fuse/takeover") == (204, None)
        takeover_s = time.monotonic() - t0
        assert _state(b_sock) == "READY"
        _, _, info = _call(b_sock, "GET", "/api/v1/daemon")
        assert json.loads(info)["instances"]["/img"]["fs_driver"] == driver  # restored from the holder's state
        status, err = _put(b_sock, "/api/v1/daemon/fuse/takeover")  # once only
        assert status == 400 and err["code"] == "UnexpectedEvent", err
        # the old daemon still serves until it exits
        assert _state(a_sock) == "RUNNING"
        assert open(os.path.join(mnt, "img", "f1"), "rb").read() == files["f1"]

        assert _put(a_sock, "/api/v1/daemon/exit") == (204, None)  # upstream: exit without umount
        assert a.wait(15) == 0
        assert erofs.mounted_fstype(os.path.join(mnt, "img") if driver == "erofs" else mnt) is not None
        result = {}
        reader = threading.Thread(target=lambda: result.update(
            data=open(os.path.join(mnt, "img", "f2"), "rb").read()))
        reader.start()  # nobody serves the FUSE connection now: a read reaching it waits in the kernel
        time.sleep(0.3)
        assert _state(b_sock) == "READY"
        if driver == "fusedev":  # (erofs: the kernel may find the data in the cache file instead)
            assert reader.is_alive()

        assert _put(b_sock, "/api/v1/daemon/start") == (204, None)
        assert _state(b_sock) == "RUNNING"
        reader.join(20)
        assert result == {"data": files["f2"]}
        for name, data in files.items():
            with open(os.path.join(mnt, "img", name), "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert f.read() == data, name
        assert sorted(os.listdir(os.path.join(mnt, "img"))) == sorted(files)
        status, err = _put(b_sock, "/api/v1/daemon/start")  # already RUNNING
        assert status == 400 and err["code"] == "UnexpectedEvent", err
        print(f"takeover answered in {takeover_s:.3f} s")
    finally:
        _kill(*(p for p in (a, b) if p is not None))
        left = fs_harness.mounts_under(mnt)  # (with <mnt>.blobs, the erofs driver's blob files)
        cleanup_mounts(mnt)
        _stop(holder)
    assert not left, f"the successor left mounts behind after SIGTERM: {left}"


def test_upgrade_daemon_in_init_exits_cleanly_and_a_failed_takeover_stays_init(tmp_path):
    """An ``--upgrade`` daemon whose supervisor holds nothing: takeover fails (409, the reason),
    the daemon stays INIT and nothing is mounted; SIGTERM ends it."""
    require_fuse()
    holder_sock, holder = _holder(tmp_path)
    mnt = str(tmp_path / "mnt")
    sock = str(tmp_path / "api.sock")
    b = None
    try:
        b = _spawn(tmp_path, "b", "--mountpoint", mnt, "--apisock", sock, "--supervisor", holder_sock, "--upgrade")
        _wait_state(sock, b, "INIT", tmp_path, "b")
        status, err = _put(sock, "/api/v1/daemon/fuse/takeover")
        assert status == 409 and "holds no FUSE session" in err["message"], err
        assert _state(sock) == "INIT" and not fs_harness.mounts_under(str(tmp_path))
        b.send_signal(signal.SIGTERM)
        assert b.wait(15) == 0
        assert not os.path.exists(sock)
    finally:
        _kill(*(p for p in (b,) if p is not None))
        _stop(holder)


def test_exit_without_supervisor_unmounts(tmp_path):
    """Upstream's plain ``PUT /api/v1/daemon/exit`` on a daemon with no supervisor: nothing
    could serve its mount any more, so it unmounts (upstream would leave a dead mount)."""
    require_fuse()
    boot = _image(tmp_path, {"f": b"x" * 5000})
    mnt = str(tmp_path / "mnt")
    sock = str(tmp_path / "api.sock")
    a = None
    try:
        a = _spawn(tmp_path, "a", "--mountpoint", mnt, "--apisock", sock)
        _wait_state(sock, a, "RUNNING", tmp_path, "a")
        body = json.dumps({"fs_type": "rafs", "source": boot, "config": json.dumps(_config(tmp_path))}).encode()
        assert _call(sock, "POST", "/api/v1/mount?mountpoint=/img", body)[0] == 204
        assert open(os.path.join(mnt, "img", "f"), "rb").read() == b"x" * 5000
        status, err = _put(sock, "/api/v1/daemon/exit?handover=maybe")
        assert status == 400 and "handover" in err["message"]
        assert _put(sock, "/api/v1/daemon/exit") == (204, None)
        assert a.wait(15) == 0
        assert not fs_harness.mounts_under(mnt)
    finally:
        _kill(*(p for p in (a,) if p is not None))
        cleanup_mounts(mnt)


def test_a_ready_successor_stopped_before_start_leaves_the_old_daemon_serving(tmp_path):
    """An upgrade abandoned after ``takeover`` (the successor SIGTERMed in READY): the session
    is still the old daemon's, so the successor exits without unmounting and reads go on."""
    require_fuse()
    files = {"f": os.urandom(32 << 10), "g": os.urandom(8 << 10)}
    boot = _image(tmp_path, files)
    holder_sock, holder = _holder(tmp_path)
    mnt = str(tmp_path / "mnt")
    a_sock, b_sock = str(tmp_path / "api1.sock"), str(tmp_path / "api2.sock")
    a = b = None
    try:
        a = _spawn(tmp_path, "a", "--mountpoint", mnt, "--apisock", a_sock, "--supervisor", holder_sock)
        _wait_state(a_sock, a, "RUNNING", tmp_path, "a")
        body = json.dumps({"fs_type": "rafs", "source": boot, "config": json.dumps(_config(tmp_path))}).encode()
        assert _call(a_sock, "POST", "/api/v1/mount?mountpoint=/img", body)[0] == 204
        assert open(os.path.join(mnt, "img", "f"), "rb").read() == files["f"]
        assert _put(a_sock, "/api/v1/daemon/fuse/sendfd") == (204, None)
        b = _spawn(tmp_path, "b", "--mountpoint", mnt, "--apisock", b_sock, "--supervisor", holder_sock, "--upgrade")
        _wait_state(b_sock, b, "INIT", tmp_path, "b")
        assert _put(b_sock, "/api/v1/daemon/fuse/takeover") == (204, None)
        b.send_signal(signal.SIGTERM)
        assert b.wait(15) == 0
        assert _state(a_sock) == "RUNNING"
        assert open(os.path.join(mnt, "img", "g"), "rb").read() == files["g"]
        assert [m for m in fs_harness.mounts_under(mnt) if m == mnt]
    finally:
        _kill(*(p for p in (a, b) if p is not None))
        left = fs_harness.mounts_under(mnt)
        cleanup_mounts(mnt)
        _stop(holder)
    assert not left, f"the old daemon left mounts behind after SIGTERM: {left}"
