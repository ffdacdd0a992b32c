"""This project's own low-level FUSE session over ``/dev/fuse`` (no libfuse, no trio).

It serves a :class:`~rafs.fs.ops.RafsFs` (the same ops layer the pyfuse3 path uses): worker
threads each read requests from their own clone of the session fd (``FUSE_DEV_IOC_CLONE``),
parse them with :mod:`struct`, call the ops and write the reply. Only the opcodes a read-only
filesystem needs are handled; the rest get ENOSYS (write-type ones EROFS).

Why not libfuse: a session that has done INIT cannot be handed to libfuse again; owning the
loop is the prerequisite for adopting a live FUSE connection after a daemon restart.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from typing import Any

import pyfuse3

from rafs.errors import MountError
from rafs.fs.ops import RafsFs, fuse_errno

log = logging.getLogger(__name__)

# opcodes (include/uapi/linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK = 1, 2, 3, 4, 5
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 22, 23, 25, 26, 27, 28, 29
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS = 34, 35, 36, 38, 42, 44
OP_NAMES = {LOOKUP: "lookup", GETATTR: "getattr", READLINK: "readlink", OPEN: "open", READ: "read",
            STATFS: "statfs", RELEASE: "release", GETXATTR: "getxattr", LISTXATTR: "listxattr",
            OPENDIR: "opendir", READDIR: "readdir", ACCESS: "access"}
WRITE_OPS = frozenset({SETATTR, 6, 8, 9, 10, 11, 12, 13, WRITE, 21, 24, CREATE, 43, 45})

IN_HEADER = struct.Struct("<IIQQIIIHH")   # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")        # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr (88 bytes)
ENTRY_OUT = struct.Struct("<QQQQII")       # + ATTR
ATTR_OUT = struct.Struct("<QII")           # + ATTR
OPEN_OUT = struct.Struct("<QII")
READ_IN = struct.Struct("<QQIIQII")
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
KSTATFS = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")

KERNEL_MAJOR, KERNEL_MINOR = 7, 31
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
# INIT flags we ask for (each only if the kernel offers it)
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
WANTED_FLAGS = (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO | FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS
                | FUSE_MAX_PAGES | FUSE_CACHE_SYMLINKS)
MAX_WRITE = 128 * 1024
MAX_PAGES = 256                     #: 1 MiB reads
MAX_READAHEAD = 1 << 20
BUF_SIZE = MAX_PAGES * 4096 + 8192
FUSE_DEV_IOC_CLONE = 0x8004E500     #: _IOR(229, 0, uint32_t)
NOTIFY_INVAL_ENTRY = 3
NOTIFY_RESEND = 7                   #: Linux 6.9: re-queue the requests taken but not answered
UNIQUE_RESEND = 1 << 63             #: set in ``unique`` of a re-queued request
STATE_VERSION = 1
FAILOVER_POLICIES = ("resend", "flush")
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _ns(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def _attr(e: Any) -> bytes:
    return ATTR.pack(e.st_ino, e.st_size, e.st_blocks,
                     e.st_atime_ns // 10**9, e.st_mtime_ns // 10**9, e.st_ctime_ns // 10**9,
                     e.st_atime_ns % 10**9, e.st_mtime_ns % 10**9, e.st_ctime_ns % 10**9,
                     e.st_mode, e.st_nlink, e.st_uid, e.st_gid, e.st_rdev, e.st_blksize, 0)


def _entry_out(e: Any) -> bytes:
    es, ens = _ns(e.entry_timeout)
    as_, ans = _ns(e.attr_timeout)
    return ENTRY_OUT.pack(e.st_ino, e.generation, es, as_, ens, ans) + _attr(e)


def _run(coro: Any) -> Any:
    """Drive one of RafsFs's coroutine ops to completion; they never suspend (but ``read``,
    which this loop calls synchronously instead)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("FUSE op suspended outside trio")


class FuseSession:
    """One FUSE connection: ``mount`` then ``start``; ``stop`` unmounts and joins the workers."""

    def __init__(self, fs: RafsFs, *, threads: int = 2) -> None:
        self.fs = fs
        self.threads = max(1, threads)
        self.mountpoint: str | None = None
        self._fd = -1
        self._workers: list[threading.Thread] = []
        self._clones: list[int] = []
        #: :meth:`start` has answered INIT (or adopted a session) and every worker's fd exists
        self.serving = False
        self._stopping = False
        self._ended = threading.Event()
        self.init_state: dict[str, int] = {}
        self._adopted = False
        #: "resend": replayed requests are served; "flush": they are answered EIO
        self.failover_policy = "resend"
        self._lock = threading.Lock()
        #: requests the kernel re-queued after a takeover (FUSE_NOTIFY_RESEND) and we answered
        self.replayed = 0
        #: per worker fd: (nodeid, opcode, unique, wall-clock second) of the request it is serving
        self._inflight: dict[int, tuple[int, int, int, int]] = {}

    def inflight(self) -> list[dict[str, int]]:
        """The requests the workers are serving now, as upstream nydusd's
        ``/api/v1/metrics/inflight`` lists them (``inode`` is the FUSE node id)."""
        return [{"inode": n, "opcode": o, "unique": u, "timestamp_secs": t}
                for n, o, u, t in list(self._inflight.values())]

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def fds(self) -> list[int]:
        """Every fd of the connection this session reads from (the main one first)."""
        return [self._fd, *self._clones]

    def handover_state(self) -> dict[str, Any]:
        """What a successor needs besides the fds to adopt this session (JSON-able)."""
        if not self.init_state:
            raise MountError("FUSE session not initialised: nothing to hand over")
        return {"version": STATE_VERSION, "mountpoint": self.mountpoint, **self.init_state}

    def adopt(self, fds: list[int], state: Any, failover_policy: str = "resend") -> None:
        """Take over a live, initialised connection: no mount, no INIT. ``start`` then serves
        ``fds`` and asks the kernel to resend what the previous daemon had taken."""
        if failover_policy not in FAILOVER_POLICIES:
            raise MountError(f"failover policy: expected one of {FAILOVER_POLICIES}, got {failover_policy!r}")
        problem = _state_problem(state)
        if problem is None and not fds:
            problem = "no /dev/fuse fd"
        for fd in fds if problem is None else ():
            try:
                st = os.fstat(fd)
            except OSError as exc:
                problem = f"fd {fd}: {exc}"
                break
            if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) != 10 or os.minor(st.st_rdev) != 229:
                problem = f"fd {fd} is not /dev/fuse"
                break
        if problem is not None:
            raise MountError(f"cannot adopt the FUSE session: {problem}")
        self._fd, self._clones = fds[0], list(fds[1:])
        self.mountpoint = state["mountpoint"]
        self.init_state = {k: state[k] for k in ("major", "minor", "flags", "max_readahead", "max_write")}
        self.failover_policy = failover_policy
        self._adopted = True

    # -------------------------------------------------------------- mount / unmount

    def mount(self, mountpoint: str, *, fsname: str = "nydusd", allow_other: bool = True) -> None:
        """Open /dev/fuse and mount(2) it read-only at ``mountpoint`` (needs CAP_SYS_ADMIN)."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        st = os.stat(mountpoint)
        opts = (f"fd={fd},rootmode={stat.S_IFMT(st.st_mode):o},user_id={os.geteuid()},"
                f"group_id={os.getegid()},default_permissions")
        if allow_other:
            opts += ",allow_other"
        rc = _libc.mount(fsname.encode(), mountpoint.encode(), b"fuse.rafs",
                         MS_RDONLY | MS_NOSUID | MS_NODEV, opts.encode())
        if rc != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise MountError(f"FUSE mount on {mountpoint} failed: {os.strerror(err)}")
        self._fd = fd
        self.mountpoint = mountpoint

    def start(self) -> None:
        """Answer INIT (on the calling thread), then serve from ``threads`` worker threads
        (an adopted session: from the adopted fds, after asking for a resend)."""
        if self._adopted:
            fds = self.fds
        else:
            self._handle_init()
            fds = [self._fd]
            for _ in range(self.threads - 1):
                try:
                    fds.append(self._clone())
                except OSError as exc:  # old kernels: all workers share the one fd
                    log.debug("FUSE_DEV_IOC_CLONE: %s", exc)
                    fds.append(self._fd)
            self._clones = [f for f in fds if f != self._fd]
        for i, fd in enumerate(fds):
            t = threading.Thread(target=self._serve, args=(fd,), name=f"fuse-ll-{i}", daemon=True)
            self._workers.append(t)
            t.start()
        self.serving = True
        if self._adopted:
            self._request_resend()

    def _request_resend(self) -> None:
        try:
            os.write(self._fd, OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0))
        except OSError as exc:  # before Linux 6.9: what the old daemon had taken stays lost
            log.warning("FUSE_NOTIFY_RESEND refused (%s): requests in flight at the takeover hang "
                        "until interrupted", exc)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the connection ends (unmounted or aborted); True when it has."""
        return self._ended.wait(timeout)

    def stop(self, *, unmount: bool = True) -> None:
        """End the session; ``unmount=False`` (handover): leave the connection to a successor
        and do not wait for workers blocked in read(2) (the process is about to exit)."""
        self._stopping = True
        if not unmount:
            self._ended.set()
            return
        if unmount and self.mountpoint:
            if _libc.umount2(self.mountpoint.encode(), 0) != 0:
                _libc.umount2(self.mountpoint.encode(), MNT_DETACH)
        for t in self._workers:
            if t is not threading.current_thread():
                t.join(timeout=5)
        for fd in self._clones:
            os.close(fd)
        self._clones = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._ended.set()

    def _clone(self) -> int:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, struct.pack("I", self._fd))
        except OSError:
            os.close(fd)
            raise
        return fd

    # -------------------------------------------------------------- notifications

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        body = struct.pack("<QII", parent, len(name), 0) + name + b"\0"
        os.write(self._fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY, 0) + body)

    # -------------------------------------------------------------- request loop

    def _handle_init(self) -> None:
        while True:
            buf = os.read(self._fd, BUF_SIZE)
            _, opcode, unique, *_ = IN_HEADER.unpack_from(buf)
            if opcode != INIT:
                self._reply_err(self._fd, unique, errno.EIO)
                continue
            major, minor, max_readahead, flags = INIT_IN.unpack_from(buf, IN_HEADER.size)
            if major != KERNEL_MAJOR:
                self._reply_err(self._fd, unique, errno.EPROTO)
                raise MountError(f"FUSE protocol {major}.{minor} unsupported")
            flags_out = flags & WANTED_FLAGS
            self.init_state = {"major": major, "minor": min(minor, KERNEL_MINOR), "flags": flags_out,
                               "max_readahead": min(max_readahead, MAX_READAHEAD),
                               "max_write": MAX_WRITE}
            body = INIT_OUT.pack(KERNEL_MAJOR, self.init_state["minor"], self.init_state["max_readahead"],
                                 flags_out, 16, 12, MAX_WRITE, 1, MAX_PAGES, 0, 0, 0)
            self._reply(self._fd, unique, body)
            return

    def _serve(self, fd: int) -> None:
        try:
            while True:
                try:
                    buf = os.read(fd, BUF_SIZE)
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.EAGAIN):  # interrupted request / nonblock
                        continue
                    if exc.errno != errno.ENODEV and not self._stopping:
                        log.error("reading /dev/fuse: %s", exc)
                    return
                if len(buf) >= IN_HEADER.size:
                    _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(buf)
                    self._inflight[fd] = (nodeid, opcode, unique, int(time.time()))
                try:
                    self._dispatch(fd, buf)
                finally:
                    self._inflight.pop(fd, None)
        finally:
            self._ended.set()

    def _reply(self, fd: int, unique: int, body: bytes = b"") -> None:
        try:
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body)
        except OSError as exc:  # ENOENT: the request was interrupted meanwhile
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("FUSE reply: %s", exc)

    def _reply_err(self, fd: int, unique: int, err: int) -> None:
        try:
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, -err, unique))
        except OSError:
            pass

    def _dispatch(self, fd: int, buf: bytes) -> None:
        _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(buf)
        off = IN_HEADER.size
        fs = self.fs
        if unique & UNIQUE_RESEND:
            with self._lock:
                self.replayed += 1
            if self.failover_policy == "flush" and opcode not in (FORGET, BATCH_FORGET, INTERRUPT):
                self._reply_err(fd, unique, errno.EIO)
                return
        try:
            if opcode == READ:
                fh, offset, size = READ_IN.unpack_from(buf, off)[:3]
                self._reply(fd, unique, fs.read_sync(nodeid, offset, size))
            elif opcode == LOOKUP:
                name = buf[off:buf.index(b"\0", off)]
                self._reply(fd, unique, _entry_out(_run(fs.lookup(nodeid, name))))
            elif opcode == GETATTR:
                e = _run(fs.getattr(nodeid))
                s, ns = _ns(e.attr_timeout)
                self._reply(fd, unique, ATTR_OUT.pack(s, ns, 0) + _attr(e))
            elif opcode == FORGET:
                (nlookup,) = struct.unpack_from("<Q", buf, off)
                fs.forget([(nodeid, nlookup)])
            elif opcode == BATCH_FORGET:
                (count,) = struct.unpack_from("<I", buf, off)
                fs.forget([struct.unpack_from("<QQ", buf, off + 8 + 16 * i) for i in range(count)])
            elif opcode == OPEN:
                fi = _run(fs.open(nodeid, struct.unpack_from("<I", buf, off)[0], None))
                self._reply(fd, unique, OPEN_OUT.pack(fi.fh, (FOPEN_KEEP_CACHE if fi.keep_cache else 0)
                                                     | (FOPEN_DIRECT_IO if fi.direct_io else 0), 0))
            elif opcode == OPENDIR:
                fh = _run(fs.opendir(nodeid, None))
                self._reply(fd, unique, OPEN_OUT.pack(fh, FOPEN_KEEP_CACHE, 0))
            elif opcode in (READDIR, READDIRPLUS):
                fh, offset, size = READ_IN.unpack_from(buf, off)[:3]
                self._reply(fd, unique, self._readdir(fh, offset, size, opcode == READDIRPLUS))
            elif opcode == READLINK:
                self._reply(fd, unique, _run(fs.readlink(nodeid, None)))
            elif opcode in (RELEASE, RELEASEDIR, FLUSH):
                if opcode == RELEASE:
                    _run(fs.release(nodeid))
                self._reply(fd, unique)
            elif opcode == STATFS:
                s = _run(fs.statfs(None))
                self._reply(fd, unique, KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files,
                                                     s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize, 0))
            elif opcode == GETXATTR:
                (size,) = struct.unpack_from("<I", buf, off)
                name = buf[off + 8:buf.index(b"\0", off + 8)]
                self._reply_sized(fd, unique, _run(fs.getxattr(nodeid, name, None)), size)
            elif opcode == LISTXATTR:
                (size,) = struct.unpack_from("<I", buf, off)
                names = _run(fs.listxattr(nodeid, None))
                self._reply_sized(fd, unique, b"".join(n + b"\0" for n in names), size)
            elif opcode == ACCESS:
                _run(fs.access(nodeid, struct.unpack_from("<I", buf, off)[0], None))
                self._reply(fd, unique)
            elif opcode == INTERRUPT:
                pass  # requests are short: they are answered anyway
            elif opcode == DESTROY:
                self._reply(fd, unique)
            elif opcode in WRITE_OPS:
                self._reply_err(fd, unique, errno.EROFS)
            else:
                self._reply_err(fd, unique, errno.ENOSYS)
        except Exception as exc:
            self._reply_err(fd, unique, fuse_errno(exc, OP_NAMES.get(opcode, f"FUSE opcode {opcode}")))

    def _reply_sized(self, fd: int, unique: int, data: bytes, size: int) -> None:
        if size == 0:
            self._reply(fd, unique, struct.pack("<II", len(data), 0))
        elif len(data) > size:
            self._reply_err(fd, unique, errno.ERANGE)
        else:
            self._reply(fd, unique, data)

    def _readdir(self, fh: int, offset: int, size: int, plus: bool) -> bytes:
        out = bytearray()
        for name, entry, next_off, accept in self.fs.readdir_entries(fh, offset):
            rec = DIRENT.pack(entry.st_ino, next_off, len(name), stat.S_IFMT(entry.st_mode) >> 12) + name
            rec += b"\0" * (-len(rec) % 8)
            if plus:  # fuse_direntplus: the entry (the kernel takes a lookup reference) + dirent
                rec = _entry_out(entry) + rec
            if len(out) + len(rec) > size:
                break
            out += rec
            if plus:
                accept()
        return bytes(out)


def _state_problem(state: Any) -> str | None:
    """Why ``state`` is not a usable handover state, or None."""
    if not isinstance(state, dict):
        return f"state is a {type(state).__name__}, not an object"
    if state.get("version") != STATE_VERSION:
        return f"state version {state.get('version')!r}, expected {STATE_VERSION}"
    for key in ("major", "minor", "flags", "max_readahead", "max_write"):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            return f"state field {key!r} missing or not a non-negative integer"
    if state["major"] != KERNEL_MAJOR or state["minor"] > KERNEL_MINOR:
        return f"protocol {state['major']}.{state['minor']} was not negotiated by this implementation"
    if not isinstance(state.get("mountpoint"), str):
        return "state field 'mountpoint' missing"
    return None
