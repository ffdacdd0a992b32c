"""DaemonManager with the real nydusd, reader and storage on the upstream vectors."""

from __future__ import annotations

import os
import signal

import pytest

from integration.fs_support import require_stack
from rafs import erofs
from rafs.daemon.manager import DaemonManager

pytestmark = [pytest.mark.fuse, pytest.mark.root]

V6_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


@pytest.fixture
def setup(vectors_dir, tmp_path):
    require_stack()
    tex = vectors_dir / "dragonflyoss-nydus/tests/texture"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    os.symlink(tex / "blobs" / V6_BLOB, blobs / V6_BLOB)
    for f in (tex / "repeatable/blobs").iterdir():
        os.symlink(f, blobs / f.name)
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                      "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}}}
    managers = []

    def make(**kw):
        kw.setdefault("monitor_interval", None)
        m = DaemonManager(str(tmp_path / "root"), nydusd_config=cfg, **kw)
        managers.append(m)
        return m

    yield tex, make
    for m in managers:
        m.shutdown(keep_records=False)
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if str(tmp_path) in line]
    for p in sorted(left, key=len, reverse=True):
        erofs.umount(p, lazy=True)
    assert not left, f"mounts left behind: {left}"


def test_erofs_preferred_with_fusedev_fallback(setup, monkeypatch):
    tex, make = setup

    def walked_twice(bootstrap):  # shared mode: the daemon checks the image, not the manager
        raise AssertionError(f"the manager walked {bootstrap} for kernel EROFS itself")

    monkeypatch.setattr("rafs.daemon.manager.erofs_image_problem", walked_twice)
    m = make(mode="shared", fs_driver="erofs")
    v6 = m.mount("v6", str(tex / "bootstrap/rafs-v6-2.2.boot"), None, None)
    v5 = m.mount("v5", str(tex / "repeatable/sha256-nocompress-repeatable"), None, None)
    states = m.instances()
    want_v6 = "erofs" if erofs.detect_support().usable else "fusedev"
    assert states["v6"].fs_driver == want_v6 and erofs.mounted_fstype(v6) == (
        "erofs" if want_v6 == "erofs" else None)
    assert states["v5"].fs_driver == "fusedev"  # v5 cannot use kernel EROFS
    assert len(open(os.path.join(v6, "lib.rs"), "rb").read()) == 16931
    assert os.path.isdir(os.path.join(v5, "normal-file-test"))
    m.umount("v6")
    assert erofs.mounted_fstype(v6) is None
    assert os.path.isdir(os.path.join(v5, "normal-file-test"))


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_daemon_sigkill_cleaned_and_remount_serves(setup, mode, driver):
    tex, make = setup
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    m = make(mode=mode, fs_driver=driver)
    boot = str(tex / "bootstrap/rafs-v6-2.2.boot")
    mnt = m.mount("v6", boot, None, None)
    assert m.instances()["v6"].fs_driver == driver
    rec = next(iter(m._records.values()))
    os.kill(rec.pid, signal.SIGKILL)
    m._procs[rec.daemon_id].wait(10)
    with pytest.raises(OSError):  # FUSE: ENOTCONN; EROFS: its blob file is gone -> EIO
        open(os.path.join(mnt, "sync_io.rs"), "rb").read()
    assert m.mount("v6", boot, None, None) == mnt
    assert m.instances()["v6"].state == "RUNNING"
    assert len(open(os.path.join(mnt, "sync_io.rs"), "rb").read()) == 13400
    # the mount point itself (shared fusedev: the daemon's FUSE mount above the instance dir)
    target = rec.mountpoint if (mode, driver) == ("shared", "fusedev") else mnt
    with open("/proc/self/mountinfo") as f:
        assert sum(1 for line in f if f" {target} " in line) == 1  # the stale mount was removed
