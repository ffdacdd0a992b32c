"""The builder's in-memory filesystem tree.

An :class:`Inode` holds attributes and content; a directory inode maps names to child inodes
(``entries``).  Hard links are the same :class:`Inode` object under several names, so
``nlink`` is derived when the bootstrap is written.  Regular-file content is referenced by
``chunks`` (a list of :class:`ChunkRef` into the image's blob list) once the chunker ran.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Iterator

from rafs.errors import BuildError

#: OCI whiteout prefixes (``.wh.<name>`` deletes ``name`` of lower layers)
WHITEOUT_PREFIX = b".wh."
OPAQUE_WHITEOUT = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = b"trusted.overlay.opaque"

#: maximum name length (EROFS)
NAME_MAX = 255


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a file: chunk ``ci_index`` of blob ``blob_index`` (image blob table order)."""

    blob_index: int
    ci_index: int


@dataclass(eq=False, slots=True)
class Inode:
    """A file, directory, symlink or special file of the tree."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    rdev: int = 0
    size: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    symlink: bytes = b""
    entries: dict[bytes, "Inode"] | None = None
    chunks: list[ChunkRef] = field(default_factory=list)
    #: where regular-file content comes from before chunking (a path for directory sources)
    source: str | None = None
    #: force an extended (64-byte) v6 inode
    force_extended: bool = False
    #: a directory the layer never listed (parent of a listed path, or a tar without ``./``):
    #: default attributes that never override a lower layer's in :func:`overlay`
    implicit: bool = False

    def __post_init__(self) -> None:
        if stat.S_ISDIR(self.mode) and self.entries is None:
            self.entries = {}

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def sorted_entries(self) -> list[tuple[bytes, "Inode"]]:
        assert self.entries is not None
        return sorted(self.entries.items())


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise BuildError(f"invalid file name {name!r}")
    if len(name) > NAME_MAX:
        raise BuildError(f"file name longer than {NAME_MAX} bytes: {name[:40]!r}...")


def split_path(path: str | bytes) -> list[bytes]:
    """``"./a/b/"`` -> ``[b"a", b"b"]``; rejects ``..`` components."""
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    for p in parts:
        if p == b"..":
            raise BuildError(f"path {raw!r} escapes the root")
        check_name(p)
    return parts


class Tree:
    """A root directory plus path helpers."""

    def __init__(self, root: Inode | None = None) -> None:
        self.root = root if root is not None else Inode(mode=stat.S_IFDIR | 0o755, implicit=True)

    def lookup(self, path: str | bytes) -> Inode | None:
        node = self.root
        for part in split_path(path):
            if node.entries is None:
                return None
            nxt = node.entries.get(part)
            if nxt is None:
                return None
            node = nxt
        return node

    def prefetch_matches(self, patterns: list[str]) -> Iterator[Inode]:
        """The nodes named by prefetch patterns (one path per pattern; blank and missing skipped)."""
        for pat in patterns:
            pat = pat.strip()
            if not pat:
                continue
            node = self.lookup(pat)
            if node is not None:
                yield node

    def parent_dir(self, parts: list[bytes], *, create: bool = True) -> Inode:
        """The directory holding ``parts[-1]``, creating missing parents as implicit
        directories (mode 0755, owner 0, mtime 0)."""
        node = self.root
        for part in parts[:-1]:
            assert node.entries is not None
            nxt = node.entries.get(part)
            if nxt is None:
                if not create:
                    raise BuildError(f"missing parent directory {b'/'.join(parts)!r}")
                nxt = Inode(mode=stat.S_IFDIR | 0o755, mtime=0, implicit=True)
                node.entries[part] = nxt
            elif not nxt.is_dir:
                # a later entry turns a non-directory into a directory (tar semantics: replace)
                nxt = Inode(mode=stat.S_IFDIR | 0o755, implicit=True)
                node.entries[part] = nxt
            node = nxt
        return node

    def insert(self, path: str | bytes, inode: Inode) -> None:
        parts = split_path(path)
        if not parts:
            # the root itself: keep children, take attributes
            inode.entries = self.root.entries if inode.is_dir else None
            if not inode.is_dir:
                raise BuildError("the root of a layer must be a directory")
            self.root = inode
            return
        parent = self.parent_dir(parts)
        assert parent.entries is not None
        old = parent.entries.get(parts[-1])
        if old is not None and old.is_dir and inode.is_dir:
            inode.entries = old.entries  # re-declared directory keeps its children
        parent.entries[parts[-1]] = inode

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Depth-first, sorted by name: ``(path, inode)``, root is ``b"/"``."""
        stack: list[tuple[bytes, Inode]] = [(b"/", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.entries:
                prefix = path if path.endswith(b"/") else path + b"/"
                for name, child in reversed(node.sorted_entries()):
                    stack.append((prefix + name, child))

    def bfs(self) -> list[tuple[bytes, Inode]]:
        """Breadth-first, each directory's children sorted by name (the layout order)."""
        out: list[tuple[bytes, Inode]] = [(b"/", self.root)]
        i = 0
        while i < len(out):
            path, node = out[i]
            i += 1
            if node.entries:
                prefix = path if path.endswith(b"/") else path + b"/"
                out.extend((prefix + name, child) for name, child in node.sorted_entries())
        return out


def is_oci_whiteout(name: bytes) -> bool:
    return name.startswith(WHITEOUT_PREFIX)


def is_overlay_whiteout(inode: Inode) -> bool:
    return stat.S_ISCHR(inode.mode) and inode.rdev == 0


def is_overlay_opaque(inode: Inode) -> bool:
    return inode.is_dir and inode.xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y"


def apply_whiteouts_in_layer(tree: Tree, spec: str) -> None:
    """``--whiteout-spec oci|overlayfs`` on a single layer: drop the whiteout markers.

    Per the OCI image spec a whiteout only hides entries of *lower* layers, so entries of the
    same layer stay; with no lower layer the markers have nothing to hide.  ``none`` keeps
    everything verbatim (for a later merge).
    """
    if spec == "none":
        return
    if spec not in ("oci", "overlayfs"):
        raise BuildError(f"unknown whiteout spec {spec!r}")

    def visit(node: Inode) -> None:
        assert node.entries is not None
        for name, child in list(node.entries.items()):
            if (spec == "oci" and is_oci_whiteout(name)) or (spec == "overlayfs" and is_overlay_whiteout(child)):
                del node.entries[name]
        for child in node.entries.values():
            if child.is_dir:
                if spec == "overlayfs":
                    child.xattrs.pop(OVERLAY_OPAQUE_XATTR, None)
                visit(child)

    visit(tree.root)


def overlay(lower: Tree, upper: Tree, spec: str = "oci") -> Tree:
    """Apply ``upper`` on ``lower`` with overlay semantics (upper wins, whiteouts delete,
    opaque hides lower); returns the merged tree.  Whiteout entries are dropped.  An implicit
    upper directory over a lower directory keeps the lower one's attributes (as applying an
    OCI layer to a rootfs does); over nothing or a non-directory it keeps its defaults."""

    def merge_dir(low: Inode, up: Inode) -> None:
        assert low.entries is not None and up.entries is not None
        opaque = (spec == "oci" and OPAQUE_WHITEOUT in up.entries) or (spec == "overlayfs" and is_overlay_opaque(up))
        if opaque:
            low.entries.clear()
        # whiteouts hide lower entries first; entries of this layer are added afterwards
        regular: list[tuple[bytes, Inode]] = []
        for name, child in sorted(up.entries.items()):
            if spec == "oci" and is_oci_whiteout(name):
                if name != OPAQUE_WHITEOUT:
                    low.entries.pop(name[len(WHITEOUT_PREFIX):], None)
            elif spec == "overlayfs" and is_overlay_whiteout(child):
                low.entries.pop(name, None)
            else:
                regular.append((name, child))
        for name, child in regular:
            old = low.entries.get(name)
            if old is not None and old.is_dir and child.is_dir:
                merged = _copy_attrs(old if child.implicit else child, old.entries)
                merge_dir(merged, child)
                low.entries[name] = merged
            else:
                low.entries[name] = _strip(child, spec)
        if spec == "overlayfs":
            low.xattrs.pop(OVERLAY_OPAQUE_XATTR, None)

    root = _copy_attrs(lower.root if upper.root.implicit else upper.root, lower.root.entries)
    merge_dir(root, upper.root)
    return Tree(root)


def _copy_attrs(src: Inode, entries: dict[bytes, Inode] | None) -> Inode:
    xattrs = dict(src.xattrs)
    return Inode(mode=src.mode, uid=src.uid, gid=src.gid, mtime=src.mtime, mtime_nsec=src.mtime_nsec,
                 rdev=src.rdev, size=src.size, xattrs=xattrs, entries=dict(entries or {}),
                 force_extended=src.force_extended, implicit=src.implicit)


def _strip(node: Inode, spec: str) -> Inode:
    """A new upper subtree: remove whiteout entries that have nothing to hide."""
    if node.is_dir:
        apply = Tree(node)
        apply_whiteouts_in_layer(apply, spec)
    return node
