"""Kernel EROFS helpers: mount(2)/umount2(2) via ctypes and precise support detection.

``mount(8)`` attaches a loop device when its source is a regular file (and then ``device=``
must be a block device), so file-backed EROFS mounts call mount(2) directly. Support is
probed with the new mount API (``fsopen``/``fsconfig``), which parses options and creates a
superblock without attaching anything, so the probes leave no state behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass

from rafs.errors import MountError, UnsupportedError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_FORCE = 0x1
MNT_DETACH = 0x2

#: x86_64 / aarch64 share these numbers for the new mount API (asm-generic)
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

#: the block size kernel EROFS uses for a RAFS v6 image's data device
EROFS_BLOCK_SIZE = 4096

#: FS_IOC_GETFSSYSFSPATH (Linux 6.10): _IOR(0x15, 1, struct fs_sysfs_path {u8 len; u8 name[128]})
FS_IOC_GETFSSYSFSPATH = (2 << 30) | (129 << 16) | (0x15 << 8) | 1

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


def _b(value: str | os.PathLike | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """Call mount(2) directly; raise :class:`MountError` naming the errno."""
    rc = _libc.mount(_b(source), _b(target), _b(fstype), flags, data.encode() or None)
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"mount(2) {fstype} {source} on {target} ({data or 'no options'}): "
            f"{errno.errorcode.get(err, err)} {os.strerror(err)}"
        )


def umount(target: str, *, lazy: bool = False) -> None:
    """umount2(2); ``lazy`` detaches now and frees when the last user goes (MNT_DETACH)."""
    rc = _libc.umount2(_b(target), MNT_DETACH if lazy else 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(f"umount2 {target}: {errno.errorcode.get(err, err)} {os.strerror(err)}")


def mount_erofs(bootstrap: str, mountpoint: str, devices: list[str]) -> None:
    """Mount a RAFS v6 bootstrap file with kernel EROFS, one ``device=`` file per blob."""
    data = ",".join(f"device={d}" for d in devices)
    if any("," in d for d in devices):
        raise MountError(f"blob device path contains ',' and cannot be passed to EROFS: {devices}")
    mount(bootstrap, mountpoint, "erofs", MS_RDONLY | MS_NODEV | MS_NOSUID, data)


def bdi_name(mountpoint: str) -> str | None:
    """The backing device (bdi) of a file-backed EROFS mount: kernel EROFS gives each such
    superblock its own, named as its sysfs directory (``/sys/fs/erofs/erofs-N`` →
    ``/sys/class/bdi/erofs-N``). None when the kernel cannot tell (before 6.10)."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = bytearray(129)
        fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    name = os.path.basename(buf[1:1 + buf[0]].decode("ascii", "replace"))
    return name or None


def set_read_ahead(mountpoint: str, read_ahead_kb: int) -> bool:
    """Set the kernel's read-ahead of the files of an EROFS mount (``read_ahead_kb`` of its
    bdi; 128 by default). Best effort: False, with one warning, when it cannot."""
    try:
        name = bdi_name(mountpoint)
    except OSError as exc:
        log.warning("EROFS mount %s: cannot set read-ahead: %s", mountpoint, exc)
        return False
    if name is None:
        log.warning("EROFS mount %s: the kernel does not name its bdi; read-ahead stays at "
                    "the default", mountpoint)
        return False
    return write_bdi_read_ahead(name, read_ahead_kb)


def write_bdi_read_ahead(bdi: str, read_ahead_kb: int) -> bool:
    """Write ``/sys/class/bdi/<bdi>/read_ahead_kb`` (``bdi``: ``maj:min`` or a name such as
    ``erofs-N``). Best effort: False, with one warning, when it cannot."""
    path = f"/sys/class/bdi/{bdi}/read_ahead_kb"
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(str(read_ahead_kb))
        return True
    except OSError as exc:
        log.warning("cannot set %s: %s", path, exc)
        return False


def mounted_fstype(path: str) -> str | None:
    """The filesystem type mounted exactly at ``path`` (from /proc/self/mountinfo), or None."""
    info = mountinfo(path)
    return info[1] if info else None


def mountinfo(path: str) -> tuple[str, str, str] | None:
    """``(major:minor, fstype, source)`` of the top mount exactly at ``path``, or None."""
    want = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            mnt = _unescape(fields[4])
            if mnt == want:
                rfields = right.split()
                found = (fields[2], rfields[0], _unescape(rfields[1]))
    return found


def _unescape(field: str) -> str:
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


# --------------------------------------------------------------------- support detection


@dataclass(frozen=True, slots=True)
class ErofsSupport:
    """What this kernel's EROFS can do; ``reason`` is one line when something is missing."""

    erofs: bool
    file_backed: bool
    ondemand: bool
    reason: str

    @property
    def usable(self) -> bool:
        """File-backed EROFS mounts (the ``erofs`` fs driver of this project) work."""
        return self.erofs and self.file_backed


def _fsopen(fstype: str) -> int:
    fd = _libc.syscall(SYS_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _fsconfig(fd: int, cmd: int, key: str | None, value: str | None) -> int:
    rc = _libc.syscall(SYS_FSCONFIG, fd, cmd, _b(key), _b(value), 0)
    return 0 if rc == 0 else ctypes.get_errno()


def _fs_messages(fd: int) -> str:
    out = []
    while True:
        try:
            msg = os.read(fd, 1024)
        except OSError:
            break
        if not msg:
            break
        out.append(msg.decode(errors="replace").strip())
    return "; ".join(out)


def detect_support(probe_dir: str | None = None) -> ErofsSupport:
    """Probe the running kernel for EROFS, file-backed mounts and fscache on-demand mode.

    ``probe_dir``: where the file-backed probe's image file is made (its nearest existing
    ancestor; default the temp dir). The kernel refuses files of some filesystems (overlayfs,
    e.g. a container's /tmp: ENOTBLK) and takes others, so probe where the images will be."""
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            have = any(line.split()[-1] == "erofs" for line in f if line.strip())
    except OSError:
        have = False
    if not have:
        return ErofsSupport(False, False, False, "kernel has no EROFS (erofs not in /proc/filesystems)")
    try:
        fd = _fsopen("erofs")
    except OSError as exc:
        return ErofsSupport(True, False, False, f"fsopen(erofs) failed: {exc}")
    try:
        # Without CONFIG_EROFS_FS_ONDEMAND the "fsid" parameter is either unknown (EINVAL,
        # older kernels) or accepted with the logged error "fsid option not supported".
        err = _fsconfig(fd, FSCONFIG_SET_STRING, "fsid", "pynydus-probe")
        ondemand_msg = _fs_messages(fd)
        ondemand = err == 0 and "not supported" not in ondemand_msg
    finally:
        os.close(fd)
    file_backed, fb_msg = _probe_file_backed(probe_dir)
    reasons = []
    if not file_backed:
        reasons.append(f"no file-backed EROFS mounts (CONFIG_EROFS_FS_BACKED_BY_FILE): {fb_msg}")
    if not ondemand:
        reasons.append(
            "no fscache on-demand mode: kernel built without CONFIG_EROFS_FS_ONDEMAND "
            f"(kernel says: {ondemand_msg or errno.errorcode.get(err, err)})"
        )
    return ErofsSupport(True, file_backed, ondemand, "; ".join(reasons) or "ok")


def _probe_file_backed(probe_dir: str | None = None) -> tuple[bool, str]:
    """Create a superblock from an all-zero regular file: ENOTBLK = unsupported, else supported."""
    try:
        fd = _fsopen("erofs")
    except OSError as exc:
        return False, str(exc)
    try:
        while probe_dir and not os.path.isdir(probe_dir):
            probe_dir = os.path.dirname(probe_dir.rstrip("/")) or None
        # unnamed (O_TMPFILE where the fs has it): a process killed mid-probe leaves no file behind
        with tempfile.TemporaryFile(prefix="erofs-probe-", dir=probe_dir) as tmp:
            tmp.write(b"\0" * 2 * EROFS_BLOCK_SIZE)
            tmp.flush()
            err = _fsconfig(fd, FSCONFIG_SET_STRING, "source", f"/proc/self/fd/{tmp.fileno()}")
            if err == 0:
                err = _fsconfig(fd, FSCONFIG_CMD_CREATE, None, None)
            msg = _fs_messages(fd)
    finally:
        os.close(fd)
    if err == 0:  # cannot happen for an all-zero image, but then it certainly works
        return True, "ok"
    if err == errno.ENOTBLK:
        return False, f"source must be a block device ({msg or 'ENOTBLK'})"
    if err == errno.EPERM:
        return False, "mounting needs CAP_SYS_ADMIN"
    # EINVAL "cannot find valid erofs superblock": the file was opened and parsed
    return True, msg or errno.errorcode.get(err, str(err))


def require_file_backed(probe_dir: str | None = None) -> ErofsSupport:
    """Return the support record, or raise :class:`UnsupportedError` with its one-line reason."""
    sup = detect_support(probe_dir)
    if not sup.usable:
        raise UnsupportedError(f"kernel EROFS driver unusable: {sup.reason}")
    return sup
