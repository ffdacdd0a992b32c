"""Source walkers: a directory, a tar stream, or an OCI layer (tar, tar+gzip, tar+zstd).

Each walker fills a :class:`~rafs.builder.tree.Tree`.  Regular-file content is handed to
``on_file(inode, fileobj, size)`` — immediately for tar streams (the data is only readable
while the walker is on that member), later (in layout order) for directories, where the
inode just remembers its path in ``source``.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import stat
import tarfile
from typing import BinaryIO, Callable, Iterator

import zstandard
from dataclasses import dataclass

from rafs.builder.tree import Inode, Tree, check_name, split_path
from rafs.errors import BuildError

OnFile = Callable[[Inode, BinaryIO, int], None]


@dataclass(frozen=True, slots=True)
class LayerLimits:
    """Caps on what one layer may declare, checked as entries are read (before any data is),
    so a hostile layer (a tiny tar declaring a 1 TiB sparse file, millions of entries) fails
    fast with a clear error instead of costing unbounded work. 0 = no cap."""

    max_file_size: int = 64 << 30  #: bytes of one regular file (``--max-file-size``)
    max_layer_size: int = 256 << 30  #: bytes of all regular files of the layer (``--max-layer-size``)
    max_entries: int = 4_000_000  #: entries of the layer (``--max-entries``)


class _Budget:
    def __init__(self, limits: LayerLimits | None) -> None:
        self.limits = limits or LayerLimits()
        self.entries = 0
        self.total = 0

    def entry(self, name: str, size: int = 0) -> None:
        lim = self.limits
        self.entries += 1
        if lim.max_entries and self.entries > lim.max_entries:
            raise BuildError(f"layer has more than {lim.max_entries} entries (limit: --max-entries)")
        if lim.max_file_size and size > lim.max_file_size:
            raise BuildError(f"{name}: declared size {size} bytes exceeds the per-file limit of "
                             f"{lim.max_file_size} bytes (--max-file-size)")
        self.total += size
        if lim.max_layer_size and self.total > lim.max_layer_size:
            raise BuildError(f"{name}: files of the layer exceed {lim.max_layer_size} bytes in total "
                             f"(--max-layer-size)")

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _read_xattrs(path: str) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return out
        raise
    for name in sorted(names):
        try:
            out[name.encode()] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                continue
            raise
    return out


def _inode_from_stat(st: os.stat_result, xattrs: dict[bytes, bytes]) -> Inode:
    return Inode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime=st.st_mtime_ns // 1_000_000_000,
                 mtime_nsec=st.st_mtime_ns % 1_000_000_000,
                 rdev=st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                 size=st.st_size if stat.S_ISREG(st.st_mode) else 0, xattrs=xattrs)


def walk_directory(root: str | os.PathLike, limits: LayerLimits | None = None) -> Tree:
    """Build a tree from a directory (``lstat``; xattrs; hard links by (dev, ino))."""
    root = os.fspath(root)
    try:
        st = os.lstat(root)
    except OSError as exc:
        raise BuildError(f"cannot read source {root!r}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"source {root!r} is not a directory")
    tree = Tree(_inode_from_stat(st, _read_xattrs(root)))
    budget = _Budget(limits)
    links: dict[tuple[int, int], Inode] = {}
    stack: list[tuple[str, Inode]] = [(root, tree.root)]
    while stack:
        dpath, dnode = stack.pop()
        assert dnode.entries is not None
        try:
            names = sorted(os.listdir(os.fsencode(dpath)))
        except OSError as exc:
            raise BuildError(f"cannot list {dpath!r}: {exc}") from exc
        for name in names:
            check_name(name)
            path = os.path.join(dpath, os.fsdecode(name))
            st = os.lstat(path)
            counted = stat.S_ISREG(st.st_mode) and (st.st_nlink == 1 or (st.st_dev, st.st_ino) not in links)
            budget.entry(path, st.st_size if counted else 0)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in links:
                    dnode.entries[name] = links[key]
                    continue
            inode = _inode_from_stat(st, _read_xattrs(path))
            if stat.S_ISLNK(st.st_mode):
                inode.symlink = os.fsencode(os.readlink(path))
                inode.size = len(inode.symlink)
            elif stat.S_ISREG(st.st_mode):
                inode.source = path
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                links[(st.st_dev, st.st_ino)] = inode
            dnode.entries[name] = inode
            if inode.is_dir:
                stack.append((path, inode))
    return tree


def open_layer(stream: BinaryIO) -> BinaryIO:
    """Wrap an OCI layer stream: detects gzip and zstd by magic, else plain tar."""
    if not isinstance(stream, io.BufferedReader) or not hasattr(stream, "peek"):
        stream = io.BufferedReader(stream, 1 << 20)  # type: ignore[arg-type]
    head = stream.peek(4)[:4]
    if head[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if head == ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)  # type: ignore[return-value]
    return stream


def _pax_bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _tar_xattrs(member: tarfile.TarInfo) -> dict[bytes, bytes]:
    """``SCHILY.xattr.*`` PAX records (``LIBARCHIVE.xattr.*`` duplicates are ignored, as upstream)."""
    out: dict[bytes, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[_pax_bytes(key[len("SCHILY.xattr."):])] = _pax_bytes(value)
    return out


def _tar_mtime(member: tarfile.TarInfo) -> tuple[int, int]:
    raw = member.pax_headers.get("mtime")
    if raw is not None:
        sec, _, frac = raw.partition(".")
        nsec = int((frac + "000000000")[:9]) if frac else 0
        sec_i = int(sec)
        if sec.startswith("-") and nsec:
            sec_i -= 1
            nsec = 1_000_000_000 - nsec
        return sec_i, nsec
    return int(member.mtime), 0


_TAR_TYPES = {
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def tar_path(name: str) -> str:
    """A tar member name as an absolute image path (``./a/b/`` -> ``/a/b``)."""
    return "/" + "/".join(p.decode("utf-8", "surrogateescape") for p in split_path(name))


@contextlib.contextmanager
def _tar_stream(stream: BinaryIO) -> Iterator[tarfile.TarFile]:
    """The tar stream opened for one in-order pass; a bad stream (at open or while the body
    reads it) raises :class:`BuildError`, and the stream is closed afterwards."""
    try:
        tf = tarfile.open(fileobj=stream, mode="r|", errorlevel=2)
    except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError) as exc:
        raise BuildError(f"not a tar stream: {exc}") from exc
    try:
        yield tf
    except (tarfile.TarError, EOFError, zstandard.ZstdError, gzip.BadGzipFile) as exc:
        raise BuildError(f"bad tar stream: {exc}") from exc
    finally:
        tf.close()


def spool_tar_files(stream: BinaryIO, wanted: Callable[[str], bool], out: BinaryIO,
                    links: dict[str, str] | None = None,
                    limits: LayerLimits | None = None) -> dict[str, tuple[int, int]]:
    """Copy the content of the regular files whose path ``wanted`` accepts to ``out``.

    Returns ``path -> (offset in out, size)``; a path named twice keeps its last member (tar
    semantics), a hard link gets its target's content.  A wanted hard link whose target was not
    wanted goes to ``links`` (path -> target) instead.  ``limits`` are checked as in
    :func:`walk_tar`; sparse members are not spooled (they keep their tar position).  Used to
    lay out a tar layer's prefetch files first: they are chunked from ``out`` before the
    layer's normal walk.
    """
    found: dict[str, tuple[int, int]] = {}
    budget = _Budget(limits)
    with _tar_stream(stream) as tf:
        for member in tf:
            budget.entry(member.name, member.size if member.isreg() else 0)
            path = tar_path(member.name)
            if not wanted(path):
                continue
            if member.issparse():
                found.pop(path, None)
                continue
            if member.islnk():
                target = found.get(tar_path(member.linkname))
                if target is not None:
                    found[path] = target
                else:
                    found.pop(path, None)
                    if links is not None:
                        links[path] = tar_path(member.linkname)
                continue
            if not member.isreg():
                found.pop(path, None)
                continue
            fobj = tf.extractfile(member)
            assert fobj is not None
            offset = out.tell()
            left = member.size
            while left:
                buf = fobj.read(min(left, 1 << 20))
                if not buf:
                    raise BuildError(f"{member.name}: tar member is truncated")
                out.write(buf)
                left -= len(buf)
            found[path] = (offset, member.size)
    return found


def walk_tar(stream: BinaryIO, on_file: OnFile, limits: LayerLimits | None = None, *,
             with_offsets: bool = False) -> Tree:
    """Build a tree from a tar stream (read once, in order).  Entries named later win;
    hard links share the target's inode. ``limits`` caps declared sizes and the entry count.
    ``with_offsets``: ``on_file`` also gets the offset of the member's data in the
    (uncompressed) tar stream; sparse members are then refused."""
    tree = Tree()
    budget = _Budget(limits)
    with _tar_stream(stream) as tf:
        for member in tf:
            budget.entry(member.name, member.size if member.isreg() else 0)
            parts = split_path(member.name)
            sec, nsec = _tar_mtime(member)
            xattrs = _tar_xattrs(member)
            if member.islnk():
                target = tree.lookup(member.linkname)
                if target is None or target.is_dir:
                    raise BuildError(f"{member.name}: hard link to missing {member.linkname!r}")
                if not parts:
                    raise BuildError("hard link as the layer root")
                tree.parent_dir(parts).entries[parts[-1]] = target  # type: ignore[index]
                continue
            if member.isreg():
                inode = Inode(mode=stat.S_IFREG | (member.mode & 0o7777), uid=member.uid, gid=member.gid,
                              mtime=sec, mtime_nsec=nsec, size=member.size, xattrs=xattrs)
                tree.insert(member.name, inode)
                if member.size:
                    fobj = tf.extractfile(member)
                    assert fobj is not None
                    if with_offsets:
                        if member.sparse is not None:
                            raise BuildError(f"{member.name}: sparse tar members cannot be referenced in place")
                        on_file(inode, fobj, member.size, member.offset_data)  # type: ignore[call-arg]
                        continue
                    if member.sparse is not None:
                        # holes are not read (Chunker.add_file): the unbuffered member file
                        # seeks forward over them, reading only the data regions
                        fobj = fobj.raw  # type: ignore[attr-defined]
                        fobj.data_regions = sorted((o, n) for o, n in member.sparse if n)
                    on_file(inode, fobj, member.size)  # type: ignore[arg-type]
                continue
            ftype = _TAR_TYPES.get(member.type)
            if ftype is None:
                raise BuildError(f"{member.name}: unsupported tar entry type {member.type!r}")
            inode = Inode(mode=ftype | (member.mode & 0o7777), uid=member.uid, gid=member.gid,
                          mtime=sec, mtime_nsec=nsec, xattrs=xattrs)
            if member.issym():
                inode.symlink = _pax_bytes(member.linkname)
                inode.size = len(inode.symlink)
            elif member.ischr() or member.isblk():
                inode.rdev = os.makedev(member.devmajor, member.devminor)
            tree.insert(member.name, inode)
    return tree
