"""Run a :class:`~rafs.daemon.service.Nydusd` in a forked child (so fakes can be injected)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time

import pytest

from rafs import erofs
from rafs.daemon.client import DaemonClient


def require_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("FUSE mount tests need root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse missing")


def _child(kwargs: dict, bootstrap: str | None, config: dict, opener_name) -> None:
    import logging

    import trio

    from rafs.daemon.service import Nydusd

    handler = logging.StreamHandler(os.fdopen(os.dup(2), "w", buffering=1))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    opener = None
    if opener_name == "fake":
        from tests.fs_fakes import FakeOpener

        opener = FakeOpener()
    elif opener_name != "real":
        opener = opener_name  # an opener object (fork: not pickled)
    upgrade_from = kwargs.pop("upgrade_from", None)
    if upgrade_from:  # the FUSE fds arrive over the holder's socket (SCM_RIGHTS), as with --upgrade
        from rafs.fs.takeover import fetch_handover

        kwargs["takeover"] = fetch_handover(upgrade_from)
    daemon = Nydusd(opener=opener, **kwargs)
    trio.run(daemon.run, bootstrap, config)


@contextlib.contextmanager
def running_daemon(tmp_path, *, bootstrap: str | None = None, config: dict | None = None,
                   fs_driver: str = "fusedev", opener="fake", name: str = "d",
                   fuse_no_open: bool | None = None, fuse_impl: str | None = None):
    """Yield ``(client, mountpoint, process)``; always unmounts and stops the child."""
    mnt = str(tmp_path / f"{name}-mnt")
    sock = str(tmp_path / f"{name}.sock")
    kwargs = dict(mountpoint=mnt, apisock=sock, fs_driver=fs_driver, daemon_id=name,
                  fuse_no_open=fuse_no_open)
    fuse_impl = fuse_impl or os.environ.get("NYDUS_TEST_FUSE_IMPL")  # run a whole suite on one impl
    if fuse_impl:
        kwargs["fuse_impl"] = fuse_impl
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_child, args=(kwargs, bootstrap, config or {}, opener), daemon=True)
    proc.start()
    client = DaemonClient(sock, timeout=10)
    try:
        deadline = time.monotonic() + 20
        while client.state() != "RUNNING":
            if not proc.is_alive():
                raise AssertionError(f"daemon exited with {proc.exitcode} before RUNNING")
            if time.monotonic() > deadline:
                raise AssertionError("daemon not RUNNING within 20 s")
            time.sleep(0.05)
        yield client, mnt, proc
    finally:
        clean_exit = True
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(15)
        if proc.is_alive():
            clean_exit = False
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(5)
        left = mounts_under(mnt)
        cleanup_mounts(mnt)
    # only reached when the body succeeded: a daemon must unmount everything on SIGTERM
    assert clean_exit, "daemon did not exit within 15 s of SIGTERM"
    assert not left, f"daemon left mounts behind after SIGTERM: {left}"


def mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [erofs._unescape(line.split()[4]) for line in f]
    return [p for p in points if p == path or p.startswith(path.rstrip("/") + "/") or p == path + ".blobs"]


def cleanup_mounts(*paths: str) -> None:
    """Lazily unmount anything still mounted at or below ``paths`` (deepest first)."""
    with open("/proc/self/mountinfo") as f:
        points = [erofs._unescape(line.split()[4]) for line in f]
    for path in paths:
        for p in sorted((p for p in points if p == path or p.startswith(path.rstrip("/") + "/") or p == path + ".blobs"),
                        key=len, reverse=True):
            with contextlib.suppress(Exception):
                erofs.umount(p, lazy=True)
