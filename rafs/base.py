"""The RAFS metadata API both readers implement: :class:`Rafs`, :class:`Inode`, :class:`InodeAttr`,
and the bootstrap access they share (:class:`BootstrapImage`, :class:`LRU`, name and blob-id checks).

Import :class:`Rafs` from :mod:`rafs.metadata`: it loads the v5 and v6 readers, which register
themselves here by their ``version``, so ``Rafs.open`` finds them without this module importing
them back.

``Rafs.open(path)`` mmaps the bootstrap and validates the superblock and the fixed tables
(device slots, blob table, table bounds); inodes, directories, xattrs and chunk lists are
parsed lazily when touched and cached in bounded caches, so memory grows with what is used,
not with the image.  Every malformation raises :class:`rafs.errors.FormatError` naming the
structure, field and value; nothing else escapes for bad input.

Inode numbers: v6 uses the nid (inode slot number) as ``ino``, v5 the on-disk inode number.
"""

from __future__ import annotations

import abc
import mmap
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

from rafs.errors import FormatError, NotADirectory, NotFound, RafsError
from rafs.layout.constants import (
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
    RAFS_INLINE_BLOB_ID_PLACEHOLDER,
    RAFS_SUPER_VERSION_V5,
    RAFSV5_SUPER_MAGIC,
)
from storage.records import BlobFeatures, BlobInfo, BlobIoVec, ChunkInfo
from storage.structs import Scalar, Struct, StructTooShort

__all__ = ["BootstrapImage", "Inode", "InodeAttr", "LRU", "Rafs", "check_name", "detect_version", "substitute_blob_id"]

#: default number of parsed inodes kept per image
INODE_CACHE_SIZE = 16384
#: maximum directory nesting depth accepted by walk() (deeper = corrupt or hostile)
MAX_DEPTH = 4096


@dataclass(frozen=True, slots=True)
class InodeAttr:
    """``stat``-like attributes of an inode."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    rdev: int
    mtime: int
    mtime_nsec: int
    blocks: int  #: 512-byte blocks


@dataclass(frozen=True, slots=True)
class ChunkColumns:
    """The v6 chunk table as one list per field, in table order: what the erofs blob files need
    of every chunk, without a :class:`ChunkInfo` per chunk. ``entry(pos)`` is the ChunkInfo of
    table entry ``pos``, equal to the one :meth:`Rafs.chunk_table` yields."""

    blob_index: list[int]
    index: list[int]
    uncompressed_offset: list[int]
    uncompressed_size: list[int]
    entry: Callable[[int], ChunkInfo]

    def __len__(self) -> int:
        return len(self.index)


class BootstrapImage:
    """A read-only mmap of a bootstrap with bounds-checked access."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFound(f"bootstrap {self.path}: no such file") from exc
        except OSError as exc:
            raise RafsError(f"bootstrap {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"bootstrap {self.path}: not a regular file")
            self.size = st.st_size
            if self.size == 0:
                raise FormatError(f"bootstrap {self.path}: empty file")
            self.mm: mmap.mmap | None = mmap.mmap(fd, self.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def buffer(self) -> mmap.mmap:
        """The whole mapped bootstrap (for decoders that bound their own reads)."""
        if self.mm is None:
            raise RafsError(f"bootstrap {self.path}: image is closed")
        return self.mm

    def read(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise FormatError(f"{what}: range {offset}+{size} outside the bootstrap ({self.size} bytes)")
        return self.buffer()[offset : offset + size]

    def parse(self, cls: type[Struct], offset: int, what: str | None = None):
        try:
            return cls.parse(self.buffer(), offset)
        except StructTooShort:
            raise FormatError(
                f"{what or cls.__name__}: {cls.SIZE} bytes at offset {offset} outside the bootstrap "
                f"({self.size} bytes)"
            ) from None

    def parse_array(self, cls: type[Struct], offset: int, count: int, what: str) -> list:
        if count < 0 or offset < 0 or offset + count * cls.SIZE > self.size:
            raise FormatError(
                f"{what}: {count} x {cls.SIZE} bytes at offset {offset} outside the bootstrap ({self.size} bytes)"
            )
        return cls.parse_array(self.buffer(), offset, count)

    def parse_columns(self, cls: type[Struct], offset: int, count: int, what: str, *names: str) -> list[list[int]]:
        """The fields ``names`` of a table of ``count`` structs, one list per field (:meth:`Struct.parse_columns`)."""
        if count < 0 or offset < 0 or offset + count * cls.SIZE > self.size:
            raise FormatError(
                f"{what}: {count} x {cls.SIZE} bytes at offset {offset} outside the bootstrap ({self.size} bytes)"
            )
        return cls.parse_columns(self.buffer(), offset, count, *names)

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None


class LRU:
    """A small thread-safe LRU map (bounded inode / block caches)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key, make: Callable[[], object]):
        with self._lock:
            try:
                self._data.move_to_end(key)
                return self._data[key]
            except KeyError:
                pass
        value = make()
        with self._lock:
            self._data[key] = value
            if len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def detect_version(head: bytes) -> int | None:
    """5 or 6 from the first 1028+ bytes of a file, else ``None``."""
    if len(head) >= 8:
        magic, version = Scalar.u32_array(head, 0, 2)
        if magic == RAFSV5_SUPER_MAGIC:
            return 5 if version == RAFS_SUPER_VERSION_V5 else None
    if len(head) >= EROFS_SUPER_OFFSET + 4:
        (magic,) = Scalar.u32_array(head, EROFS_SUPER_OFFSET, 1)
        if magic == EROFS_SUPER_MAGIC_V1:
            return 6
    return None


def substitute_blob_id(blob_id: str, features: int, blob_count: int, hint: str | None) -> str:
    """Replace an inline-bootstrap placeholder blob id with ``hint`` (the containing layer's id).

    Upstream writes a placeholder id into a bootstrap that is stored inside its own data blob
    (current builders: 64 x ``x``; older ones: an unrelated digest) and nydusd substitutes the
    id of the blob the bootstrap came from.  We substitute the literal placeholder always, and
    for a single-blob image whose blob has ``INLINED_FS_META`` or lacks ``CAP_TAR_TOC`` (the
    cases ``RafsSuper::set_blob_id_from_meta_path`` covers).
    """
    if not hint:
        return blob_id
    if blob_id == RAFS_INLINE_BLOB_ID_PLACEHOLDER:
        return hint
    if blob_count == 1 and (features & BlobFeatures.INLINED_FS_META or not features & BlobFeatures.CAP_TAR_TOC):
        return hint
    return blob_id


def check_name(name: bytes, where: str) -> None:
    """A directory entry name: non-empty, at most 255 bytes, no '/' or NUL, not '.' or '..'."""
    if not name or len(name) > 255 or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FormatError(f"{where}: invalid entry name {name!r}")


class Rafs(abc.ABC):
    """A read-only RAFS image (v5 or v6 bootstrap)."""

    version: int
    chunk_size: int
    flags: int
    root_ino: int
    inode_count: int
    blobs: list[BlobInfo]
    prefetch_inos: list[int]

    #: version -> reader class; each subclass with a ``version`` registers itself
    _readers: ClassVar[dict[int, type["Rafs"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        version = cls.__dict__.get("version")
        if version is not None:
            Rafs._readers[version] = cls

    def __init__(self, image: BootstrapImage) -> None:
        self._img = image
        self.path = image.path
        self._inodes = LRU(INODE_CACHE_SIZE)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def open(cls, bootstrap: str | os.PathLike, *, blob_id_hint: str | None = None) -> "Rafs":
        """Open and validate a bootstrap; FormatError if it is not a valid RAFS v5/v6 image."""
        img = BootstrapImage(bootstrap)
        try:
            version = detect_version(img.read(0, min(img.size, 8192), "superblock"))
            if version is None:
                raise FormatError(
                    f"{img.path}: not a RAFS bootstrap (no v5 magic at 0 or EROFS magic at 1024)"
                )
            reader = Rafs._readers.get(version)
            if reader is None:
                raise RafsError(f"{img.path}: no RAFS v{version} reader loaded (import rafs.metadata)")
            return reader(img, blob_id_hint=blob_id_hint)
        except BaseException:
            img.close()
            raise

    def close(self) -> None:
        self._inodes.clear()
        self._img.close()

    def __enter__(self) -> "Rafs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inodes -----------------------------------------------------------------------------

    def inode(self, ino: int) -> "Inode":
        """The inode with FUSE inode number ``ino``; NotFound if there is none."""
        if not isinstance(ino, int) or ino < 0:
            raise NotFound(f"inode {ino!r}: invalid inode number")
        return self._inodes.get_or_make(ino, lambda: self._load_inode(ino))

    @abc.abstractmethod
    def _load_inode(self, ino: int) -> "Inode": ...

    @property
    def root(self) -> "Inode":
        return self.inode(self.root_ino)

    def lookup_path(self, path: str | bytes) -> "Inode":
        """Resolve an absolute path like ``/a/b`` (no symlink following)."""
        raw = os.fsencode(path)
        node = self.root
        for part in raw.split(b"/"):
            if not part or part == b".":
                continue
            node = node.lookup(part)
        return node

    def resolve(self, path: str | bytes, max_links: int = 40) -> "Inode":
        """Resolve an absolute path following symlinks in every component, as the container
        sees it: absolute targets start at the image's root, ``..`` stops at it.
        :class:`NotFound` for a missing entry or more than ``max_links`` links."""
        return self.resolve_path(path, max_links)[1]

    def realpath(self, path: str | bytes, max_links: int = 40) -> str:
        """The canonical path of :meth:`resolve`'s file (no symlink in it)."""
        return self.resolve_path(path, max_links)[0]

    def resolve_path(self, path: str | bytes, max_links: int = 40) -> "tuple[str, Inode]":
        """(:meth:`realpath`, :meth:`resolve`) of ``path`` from one walk."""
        trail = self._follow(path, max_links)
        return "/" + "/".join(os.fsdecode(name) for name, _ in trail[1:]), trail[-1][1]

    def _follow(self, path: str | bytes, max_links: int) -> "list[tuple[bytes, Inode]]":
        """The (name, inode) trail from the root to ``path``'s file, symlinks followed."""
        parts = [p for p in os.fsencode(path).split(b"/") if p and p != b"."]
        parts.reverse()  # a stack: the next component last
        trail: list[tuple[bytes, Inode]] = [(b"", self.root)]
        links = 0
        while parts:
            part = parts.pop()
            if part == b"..":
                if len(trail) > 1:
                    trail.pop()
                continue
            node = trail[-1][1].lookup(part)
            if not node.is_symlink():
                trail.append((part, node))
                continue
            links += 1
            if links > max_links:
                raise NotFound(f"{os.fsdecode(path)}: too many levels of symbolic links")
            target = node.readlink()
            if target.startswith(b"/"):
                trail = trail[:1]
            parts.extend(reversed([p for p in target.split(b"/") if p and p != b"."]))
        return trail

    def walk(self, top: str | bytes = "/") -> Iterator[tuple[str, "Inode"]]:
        """All (path, inode) pairs below ``top`` in pre-order, names sorted; detects cycles."""
        start = self.lookup_path(top)
        top_s = os.fsdecode(top) if top not in ("", b"") else "/"
        top_s = "/" + top_s.strip("/") if top_s.strip("/") else "/"
        yield top_s, start
        if not start.is_dir():
            return
        if start.ino == self.root_ino and self.version == 6:
            self._check_parent(start, start, "/")  # the root's '..' is the root itself
        on_path: set[int] = {start.ino}
        seen_dirs: set[int] = {start.ino}
        # stack of (path, dir inode, iterator over children)
        stack = [(top_s, start, start.readdir(0))]
        while stack:
            base, parent, it = stack[-1]
            try:
                _off, name, child = next(it)
            except StopIteration:
                stack.pop()
                on_path.discard(parent.ino)
                continue
            path = (base.rstrip("/") + "/" + os.fsdecode(name))
            yield path, child
            if child.is_dir():
                if child.ino in on_path:
                    raise FormatError(f"{path}: directory cycle (inode {child.ino} is its own ancestor)")
                if child.ino in seen_dirs:
                    raise FormatError(f"{path}: directory inode {child.ino} reachable by two paths")
                if len(stack) >= MAX_DEPTH:
                    raise FormatError(f"{path}: directory nesting deeper than {MAX_DEPTH}")
                self._check_parent(child, parent, path)
                seen_dirs.add(child.ino)
                on_path.add(child.ino)
                stack.append((path, child, child.readdir(0)))

    def _check_parent(self, child: "Inode", parent: "Inode", path: str) -> None:
        """Hook: version-specific check that ``child``'s parent link points at ``parent``."""

    def blob(self, blob_index: int) -> BlobInfo:
        if not 0 <= blob_index < len(self.blobs):
            raise FormatError(f"blob index {blob_index} out of range (image has {len(self.blobs)} blobs)")
        return self.blobs[blob_index]

    @abc.abstractmethod
    def info(self) -> dict:
        """Superblock and table summary for ``nydus-image inspect``."""

    @abc.abstractmethod
    def chunk_table(self) -> Iterator[ChunkInfo]:
        """Every chunk the bootstrap records (v6 chunk table; v5: per-inode chunk infos, deduplicated)."""

    def chunk_columns(self) -> "ChunkColumns | None":
        """The v6 chunk table as columns, every entry checked as :meth:`chunk_table` checks it
        (the same :class:`FormatError` for the first bad entry); None without a chunk table (v5)."""
        return None


class Inode(abc.ABC):
    """One inode of a RAFS image.  Obtain it from :meth:`Rafs.inode` / :meth:`lookup`."""

    ino: int

    def __init__(self, fs: Rafs, ino: int) -> None:
        self.fs = fs
        self.ino = ino

    def __repr__(self) -> str:
        return f"<{type(self).__name__} ino={self.ino} mode={self.mode:o}>"

    @property
    @abc.abstractmethod
    def mode(self) -> int: ...

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def attr(self) -> InodeAttr: ...

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def _need_dir(self) -> None:
        if not self.is_dir():
            raise NotADirectory(f"inode {self.ino} is not a directory")

    @abc.abstractmethod
    def lookup(self, name: bytes) -> "Inode": ...

    @abc.abstractmethod
    def readdir(self, offset: int = 0) -> Iterator[tuple[int, bytes, "Inode"]]: ...

    @abc.abstractmethod
    def readlink(self) -> bytes: ...

    @abc.abstractmethod
    def xattrs(self) -> dict[bytes, bytes]: ...

    @abc.abstractmethod
    def chunks(self, offset: int, size: int) -> BlobIoVec: ...

    @property
    def hardlink_key(self) -> int | None:
        """Identity shared by hard links of a regular file (``None`` when nlink == 1)."""
        return None
