"""Mounting a :class:`~rafs.fs.RafsFs` with pyfuse3 and tuning the FUSE bdi."""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3

from rafs import erofs
from rafs.errors import MountError
from rafs.fs.ops import RafsFs

log = logging.getLogger(__name__)

#: FUSE bdi readahead: 1 MiB requests (the default 128 KiB quadruples the request count)
DEFAULT_READ_AHEAD_KB = 1024
#: kernel EROFS mounts: the read-ahead within an image file, which is also the window the kernel
#: reads around a page fault of a mapped file. 512 KiB: numpy's start fetched 0.9 MB less than
#: with 1 MiB (with ``amplify_io`` 256 KiB) and started 0.06 s sooner at 20 MB/s; reading the
#: whole image sequentially took as long (docs/perf.md, 2026-12-07 eighth)
EROFS_READ_AHEAD_KB = 512


def fuse_options(fsname: str, *, allow_other: bool = True) -> set[str]:
    """Read-only mount options; permissions are enforced by the kernel from the image modes."""
    opts = {f"fsname={fsname}", "subtype=rafs", "ro", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    return opts


def mount(fs: RafsFs, mountpoint: str, *, fsname: str = "nydusd") -> None:
    """Mount ``fs`` (pyfuse3.init); then run :func:`tune_after_init` beside the session."""
    try:
        pyfuse3.init(fs, mountpoint, fuse_options(fsname, allow_other=os.geteuid() == 0))
    except RuntimeError as exc:
        raise MountError(f"FUSE mount on {mountpoint} failed: {exc}") from exc


def tune_after_init(mountpoint: str, read_ahead_kb: int = DEFAULT_READ_AHEAD_KB) -> bool:
    """Raise the bdi readahead once the kernel has processed FUSE INIT (which resets it).

    Blocking: ``statvfs`` waits for INIT, so run it in a worker thread while the session runs.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        log.warning("statvfs %s: %s", mountpoint, exc)
        return False
    return set_read_ahead(mountpoint, read_ahead_kb)


def set_read_ahead(mountpoint: str, read_ahead_kb: int) -> bool:
    """Set ``/sys/class/bdi/<maj:min>/read_ahead_kb`` of the mount (without touching the FS)."""
    info = erofs.mountinfo(mountpoint)
    if info is None:
        return False
    return erofs.write_bdi_read_ahead(info[0], read_ahead_kb)


def is_stale_mount(path: str) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN (or ECONNABORTED)."""
    try:
        os.stat(path)
        return False
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
