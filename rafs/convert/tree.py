"""A filesystem tree as plain records: built by applying OCI layers (with whiteouts).

Used by ``nydusify check`` to know what the converted image must contain.
"""

from __future__ import annotations

import hashlib
import posixpath
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from .errors import SourceError

WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One path of an image tree; ``mode`` includes the file type bits."""

    path: str
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int = 0
    sha256: str = ""                  # regular files
    link_target: str = ""             # symlinks
    rdev: int = 0                     # device nodes
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    implicit: bool = False            # a parent directory the tar never listed


@dataclass(slots=True)
class Tree:
    """Path → entry; paths are absolute, ``/`` is the root."""

    entries: dict[str, FileEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.entries.setdefault("/", FileEntry("/", stat.S_IFDIR | 0o755, 0, 0, 0, implicit=True))

    def remove(self, path: str) -> None:
        prefix = path.rstrip("/") + "/"
        for p in [p for p in self.entries if p == path or p.startswith(prefix)]:
            del self.entries[p]

    def clear_dir(self, path: str) -> None:
        prefix = path.rstrip("/") + "/"
        for p in [p for p in self.entries if p.startswith(prefix)]:
            del self.entries[p]

    def ensure_parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        missing = []
        while parent not in self.entries:
            missing.append(parent)
            parent = posixpath.dirname(parent)
        for p in reversed(missing):
            self.entries[p] = FileEntry(p, stat.S_IFDIR | 0o755, 0, 0, 0, implicit=True)


def normalize(name: str) -> str:
    """A tar member name as an absolute, normalized path (``..`` is rejected)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SourceError(f"tar entry {name!r} escapes the root")
    return "/" + "/".join(parts)


def _xattrs(member: tarfile.TarInfo) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
            out.append((key[len("SCHILY.xattr."):].encode(), raw))
    return tuple(sorted(out))


def _mode(member: tarfile.TarInfo) -> int:
    kinds = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
             tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
             tarfile.FIFOTYPE: stat.S_IFIFO}
    return kinds.get(member.type, stat.S_IFREG) | (member.mode & 0o7777)


def apply_layer(tree: Tree, fileobj: BinaryIO) -> None:
    """Apply one uncompressed layer tar to ``tree`` (whiteouts hit only lower layers)."""
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|")
        added: dict[str, FileEntry] = {}
        removals: list[str] = []
        opaques: list[str] = []
        for member in tar:
            path = normalize(member.name)
            base = posixpath.basename(path)
            if base == WHITEOUT_OPAQUE:
                opaques.append(posixpath.dirname(path))
                continue
            if base.startswith(WHITEOUT_PREFIX):
                removals.append(posixpath.join(posixpath.dirname(path), base[len(WHITEOUT_PREFIX):]))
                continue
            digest, size = "", 0
            if member.isreg():
                fh = tar.extractfile(member)
                h = hashlib.sha256()
                assert fh is not None
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
                digest = h.hexdigest()
            entry = FileEntry(
                path=path, mode=_mode(member), uid=member.uid, gid=member.gid, mtime=int(member.mtime),
                size=size, sha256=digest,
                link_target=member.linkname if member.issym() else "",
                rdev=(member.devmajor << 8 | member.devminor) if member.ischr() or member.isblk() else 0,
                xattrs=_xattrs(member))
            if member.islnk():
                target = normalize(member.linkname)
                src = added.get(target) or tree.entries.get(target)
                if src is None or not stat.S_ISREG(src.mode):
                    raise SourceError(f"hard link {path} -> {target}: target is not a regular file")
                entry = FileEntry(path, src.mode, src.uid, src.gid, src.mtime, src.size, src.sha256,
                                  xattrs=src.xattrs)
            added[path] = entry
    except tarfile.TarError as exc:
        raise SourceError(f"layer is not a readable tar: {exc}") from exc
    for path in opaques:
        tree.clear_dir(path)
    for path in removals:
        tree.remove(path)
    for path, entry in added.items():
        old = tree.entries.get(path)
        if old is not None and not (stat.S_ISDIR(old.mode) and stat.S_ISDIR(entry.mode)):
            tree.remove(path)
        tree.ensure_parents(path)
        tree.entries[path] = entry


def build_tree(layers: Iterable[BinaryIO]) -> Tree:
    """Apply uncompressed layer tars, lowest first."""
    tree = Tree()
    for fh in layers:
        apply_layer(tree, fh)
    return tree
