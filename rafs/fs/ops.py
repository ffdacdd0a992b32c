"""pyfuse3 operations: a thin translation from FUSE requests to the RAFS metadata API.

One FUSE mount serves one or more :class:`~rafs.fs.instance.Instance` objects:

* *single* layout (dedicated daemon): the mount root is the one instance's root;
* *shared* layout: the mount root is a small pseudo directory whose entries are instance
  subdirectories, added and removed at runtime (``POST/DELETE /api/v1/mount``).

FUSE inode numbers are ``slot << 40 | ino`` (``ino`` = the image's inode number / v6 nid), so
instances never collide. The image is immutable: entries and attributes get a one-day
timeout, ``open`` replies ``keep_cache`` so warm reads never reach Python (or, with a pyfuse3
built with misc/pyfuse3/read-ino.patch, ENOSYS: the kernel's no_open mode, where opening a
file costs no request at all and ``read`` gets the inode as its handle), and readdir
offsets are the image's dirent indexes. Reads of data already in the local cache are answered
on the event loop; reads that may fetch run in worker threads, so a slow chunk never stalls
other requests.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import stat
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3
import trio

from rafs.errors import NotADirectory, NotFound, RafsError, ReadError, StaleHandle
from rafs.fs.instance import Instance
from storage.errors import StorageError

log = logging.getLogger(__name__)

#: the image never changes: cache entries and attributes for a day
IMMUTABLE_TIMEOUT = 86400.0
#: pseudo-root entries come and go with the control API
PSEUDO_TIMEOUT = 1.0
SLOT_SHIFT = 40
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
BLOCK_SIZE = 4096
#: FUSE requests counted per operation (``nydusd_fuse_requests_total``)
COUNTED_OPS = ("lookup", "getattr", "open", "release", "opendir", "readdir", "readlink")


def _kernel_has_no_open(release: str | None = None) -> bool:
    """FUSE no_open (ENOSYS from open = never send open/release) came with Linux 4.20."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (4, 20)


def no_open_unsupported_reason(read_gets_ino: bool = False) -> str | None:
    """Why FUSE no_open cannot be used here, or None when it can (``read_gets_ino``: the session
    hands ``read`` the inode when there is no handle, as the own loop in fuse_ll.py does)."""
    if not read_gets_ino and not getattr(pyfuse3, "READ_INO_WITHOUT_FH", False):
        return ("stock pyfuse3 drops the inode in read() when a file has no handle "
                "(install misc/pyfuse3/install.sh)")
    if not _kernel_has_no_open():
        return f"kernel {os.uname().release} predates FUSE no_open (4.20)"
    return None


#: resolved inodes kept (cleared wholesale when full or when an instance goes away)
NODE_CACHE_SIZE = 1 << 17

T = TypeVar("T")


def fuse_errno(exc: BaseException, what: str) -> int:
    """The errno for the kernel of an error raised by an op (the only errno mapping; both FUSE
    session implementations use it), logging the failures that are not a plain "no such entry"."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, StaleHandle):
        return errno.ESTALE
    if isinstance(exc, (NotFound, KeyError, FileNotFoundError)):
        return errno.ENOENT
    if isinstance(exc, (NotADirectory, NotADirectoryError)):
        return errno.ENOTDIR
    if isinstance(exc, (RafsError, StorageError, OSError)):
        log.error("%s failed: %s: %s", what, type(exc).__name__, exc)
        return errno.EIO
    # a bug must not take the whole mount down
    log.error("%s: unexpected %s", what, type(exc).__name__, exc_info=exc)
    return errno.EIO


def fuse_errors(func: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Raise :func:`fuse_errno` of any error as ``pyfuse3.FUSEError``."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(fuse_errno(exc, func.__name__)) from exc

    return wrapper


class RafsFs(pyfuse3.Operations):
    """Read-only RAFS over FUSE; ``shared=False`` puts the single instance at the mount root."""

    enable_writeback_cache = False

    def __init__(self, *, shared: bool, no_open: bool | None = None, read_gets_ino: bool = False) -> None:
        super().__init__()
        self.shared = shared
        #: answer ``open`` with ENOSYS once, so the kernel stops sending open/release (its
        #: "no_open" mode keeps the page cache as ``keep_cache`` does); needs a pyfuse3 whose
        #: ``read`` gets the inode when there is no handle (misc/pyfuse3/read-ino.patch)
        why_not = no_open_unsupported_reason(read_gets_ino)
        if no_open and why_not:
            raise RafsError(f"FUSE no_open unavailable: {why_not}")
        self.no_open = why_not is None if no_open is None else no_open
        self.requests = dict.fromkeys(COUNTED_OPS, 0)
        self._slots: dict[int, Instance] = {}
        self._by_name: dict[str, int] = {}
        self._next_slot = 1
        self._lookups: dict[int, int] = {}
        self._lookup_lock = threading.Lock()
        self._nodes: dict[int, tuple[Instance, Any]] = {}  #: FUSE ino -> (instance, image inode)
        self._started = time.time()

    # ---------------------------------------------------------------- instance table

    def add_instance(self, inst: Instance, slot: int | None = None) -> None:
        """Serve ``inst`` (shared: as ``/<inst.name>``; single: at the root); ``slot``: the one
        it had in a daemon whose FUSE session this one took over (its inode numbers)."""
        if inst.name in self._by_name:
            raise RafsError(f"instance {inst.name!r} is already mounted")
        if not self.shared and self._slots:
            raise RafsError("a non-shared mount serves exactly one instance")
        if slot is None:
            slot = self._next_slot
        elif slot in self._slots or slot < 1:
            raise RafsError(f"instance slot {slot} is taken or invalid")
        self._next_slot = max(self._next_slot, slot + 1)
        self._slots[slot] = inst
        self._by_name[inst.name] = slot

    def remove_instance(self, name: str) -> Instance:
        """Stop serving an instance; its inodes answer ENOENT from now on."""
        slot = self._by_name.pop(name, None)
        if slot is None:
            raise NotFound(f"no instance {name!r}")
        self._nodes.clear()
        return self._slots.pop(slot)

    def replace_instance(self, name: str, inst: Instance) -> Instance:
        """Serve ``inst`` in place of the instance ``name`` (same slot, so the same inode
        numbers): every later request resolves its inode in ``inst``; returns the old one."""
        slot = self._by_name.get(name)
        if slot is None:
            raise NotFound(f"no instance {name!r}")
        if inst.name != name:
            raise RafsError(f"instance {inst.name!r} cannot replace {name!r}")
        old = self._slots[slot]
        self._slots[slot] = inst
        self._nodes.clear()
        return old

    def slot_of(self, name: str) -> int:
        return self._by_name[name]

    def instances(self) -> dict[str, Instance]:
        return {inst.name: inst for inst in self._slots.values()}

    # ---------------------------------------------------------------- inode numbers

    def _resolve(self, gino: int) -> tuple[Instance, Any]:
        """The instance and image inode of a FUSE inode number (KeyError/NotFound if gone)."""
        hit = self._nodes.get(gino)
        if hit is not None:
            return hit
        found = self._resolve_uncached(gino)
        if len(self._nodes) >= NODE_CACHE_SIZE:
            self._nodes.clear()
        self._nodes[gino] = found
        return found

    def _resolve_uncached(self, gino: int) -> tuple[Instance, Any]:
        if gino == pyfuse3.ROOT_INODE:
            if self.shared:
                raise KeyError(gino)
            inst = self._slots[1]
            return inst, inst.tree.inode(inst.tree.root_ino)
        inst = self._slots[gino >> SLOT_SHIFT]
        return inst, inst.tree.inode(gino & LOCAL_MASK)

    def _gino(self, slot: int, inst: Instance, ino: int) -> int:
        if not self.shared and ino == inst.tree.root_ino:
            return pyfuse3.ROOT_INODE
        return slot << SLOT_SHIFT | ino

    def _slot_of(self, gino: int) -> int:
        return 1 if gino == pyfuse3.ROOT_INODE else gino >> SLOT_SHIFT

    def _entry(self, gino: int, inode: Any, timeout: float = IMMUTABLE_TIMEOUT) -> pyfuse3.EntryAttributes:
        """The one place building ``EntryAttributes`` (from an image inode's attr)."""
        a = inode.attr()
        e = pyfuse3.EntryAttributes()
        e.st_ino = gino
        e.generation = 0
        e.entry_timeout = timeout
        e.attr_timeout = timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = BLOCK_SIZE
        e.st_blocks = a.blocks
        ns = a.mtime * 1_000_000_000 + a.mtime_nsec
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = ns
        return e

    def _pseudo_root_entry(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.ROOT_INODE
        e.entry_timeout = e.attr_timeout = PSEUDO_TIMEOUT
        e.st_mode = stat.S_IFDIR | 0o755
        e.st_nlink = 2 + len(self._slots)
        e.st_size = BLOCK_SIZE
        e.st_blksize = BLOCK_SIZE
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = int(self._started * 1e9)
        return e

    def _instance_root_entry(self, slot: int) -> pyfuse3.EntryAttributes:
        inst = self._slots[slot]
        root = inst.tree.inode(inst.tree.root_ino)
        return self._entry(self._gino(slot, inst, root.ino), root, PSEUDO_TIMEOUT)

    def _counted(self, entry: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        with self._lookup_lock:  # the own FUSE loop answers from several threads
            self._lookups[entry.st_ino] = self._lookups.get(entry.st_ino, 0) + 1
        return entry

    # ---------------------------------------------------------------- metadata ops

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.requests["lookup"] += 1
        if self.shared and parent_inode == pyfuse3.ROOT_INODE:
            if name == b".":
                return self._counted(self._pseudo_root_entry())
            slot = self._by_name.get(os.fsdecode(name))
            if slot is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._counted(self._instance_root_entry(slot))
        inst, parent = self._resolve(parent_inode)
        child = parent.lookup(name)
        slot = self._slot_of(parent_inode)
        return self._counted(self._entry(self._gino(slot, inst, child.ino), child))

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        with self._lookup_lock:
            self._forget(inode_list)

    def _forget(self, inode_list: list[tuple[int, int]]) -> None:
        for gino, nlookup in inode_list:
            left = self._lookups.get(gino, 0) - nlookup
            if left > 0:
                self._lookups[gino] = left
            else:
                self._lookups.pop(gino, None)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.requests["getattr"] += 1
        if self.shared and inode == pyfuse3.ROOT_INODE:
            return self._pseudo_root_entry()
        inst, node = self._resolve(inode)
        slot = self._slot_of(inode)
        if self.shared and node.ino == inst.tree.root_ino:
            return self._instance_root_entry(slot)
        return self._entry(inode, node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        self.requests["readlink"] += 1
        _, node = self._resolve(inode)
        if not node.is_symlink():
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.readlink()

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        self.requests["opendir"] += 1
        if self.shared and inode == pyfuse3.ROOT_INODE:
            return inode
        _, node = self._resolve(inode)
        if not node.is_dir():
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, entry, next_offset, accept in self.readdir_entries(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, entry, next_offset):
                return
            accept()

    def readdir_entries(self, fh: int, start_id: int) -> Any:
        """``(name, entry, next_offset, accept)`` of directory ``fh`` after ``start_id``; call
        ``accept()`` for each entry handed to the kernel with its attributes (a lookup count)."""
        self.requests["readdir"] += 1
        if self.shared and fh == pyfuse3.ROOT_INODE:
            # offsets are slot numbers: stable while instances come and go
            for slot in sorted(s for s in self._slots if s > start_id):
                entry = self._instance_root_entry(slot)
                yield self._slots[slot].name.encode(), entry, slot, functools.partial(self._counted, entry)
            return
        inst, node = self._resolve(fh)
        slot = self._slot_of(fh)
        for next_offset, name, child in node.readdir(start_id):
            entry = self._entry(self._gino(slot, inst, child.ino), child)
            yield name, entry, next_offset, functools.partial(self._counted, entry)

    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if self.shared and inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        inst, node = self._resolve(inode)
        if not inst.enable_xattr:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        value = node.xattrs().get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        if self.shared and inode == pyfuse3.ROOT_INODE:
            return []
        inst, node = self._resolve(inode)
        return list(node.xattrs()) if inst.enable_xattr else []

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True  # permission bits are checked by the kernel (default_permissions)

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK_SIZE
        files = 1
        blocks = 0
        for inst in self._slots.values():
            files += int(getattr(inst.tree, "inode_count", 0))
            for blob in getattr(inst.tree, "blobs", []):
                blocks += -(-blob.uncompressed_size // BLOCK_SIZE)
        s.f_blocks = blocks
        s.f_bfree = s.f_bavail = 0
        s.f_files = files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # ---------------------------------------------------------------- data ops

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        self.requests["open"] += 1
        if self.no_open:
            # the kernel takes ENOSYS as "never send open/release again" and opens every file
            # with keep_cache and fh 0; writes are refused by the read-only mount itself
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        inst, node = self._resolve(inode)
        if node.is_dir():
            raise pyfuse3.FUSEError(errno.EISDIR)
        if getattr(inst.tree, "direct_io", False):
            # blob files under kernel EROFS: no page cache and no read-ahead of their own
            return pyfuse3.FileInfo(fh=inode, direct_io=True)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        inst, node = self._read_target(fh)
        try:
            # data already in the local cache: pread it right here (a thread hop costs more
            # than the read); anything that may fetch runs in a worker thread
            iovec = node.chunks(off, size)  # metadata only: computed once, here on the loop
            data = inst.read_ready(node, off, size, iovec)
            if data is not None:
                return data
            return await trio.to_thread.run_sync(inst.read, node, off, size, iovec)
        except (StorageError, RafsError, OSError) as exc:
            raise ReadError(f"{_read_context(inst, node, off, size)}: {type(exc).__name__}: {exc}") from exc

    def read_sync(self, fh: int, off: int, size: int) -> bytes:
        """``read`` for a caller already on a worker thread (the own FUSE loop): the cached
        fast path first, then the fetching read, on the calling thread."""
        inst, node = self._read_target(fh)
        try:
            iovec = node.chunks(off, size)
            data = inst.read_ready(node, off, size, iovec)
            return data if data is not None else inst.read(node, off, size, iovec)
        except (StorageError, RafsError, OSError) as exc:
            raise ReadError(f"{_read_context(inst, node, off, size)}: {type(exc).__name__}: {exc}") from exc

    def _read_target(self, fh: int) -> tuple[Instance, Any]:
        try:
            return self._resolve(fh)
        except (KeyError, RafsError) as exc:
            raise StaleHandle(f"inode {fh}: its instance is gone") from exc

    async def release(self, fh: int) -> None:
        self.requests["release"] += 1
        return None

    # ---------------------------------------------------------------- writes: read-only

    async def _rofs(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _rofs
    write = create = setxattr = removexattr = _rofs


def _read_context(inst: Instance, node: Any, off: int, size: int) -> str:
    """Where a read failed: the instance, inode, range and (the first few) chunks."""
    try:
        descs = [d for d in node.chunks(off, size) if d.chunk is not None]
    except Exception:
        descs = []
    where = ", ".join(f"blob {d.blob.blob_id} chunk {d.chunk.index}" for d in descs[:4]) or "no chunk"
    if len(descs) > 4:
        where += f" (+{len(descs) - 4} more)"
    return f"instance {inst.name or '/'!r} ino {node.ino} range {off}+{size}: {where}"
