"""Read a RAFS v6 bootstrap back into a builder :class:`Tree` and its blob list.

Used by ``merge`` (per-layer bootstraps), ``--parent-bootstrap``, ``--chunk-dict`` and tests.
The bootstrap is decoded by the reader (:meth:`rafs.metadata.Rafs.open`, the same code that
mounts it); this module only turns the reader's inodes into builder :class:`Inode` objects.
Regular files keep their chunk references (blob index in this bootstrap's table + ci index);
chunk details come from the bootstrap's chunk table.  Hard links (one nid under several names)
become one :class:`Inode`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from rafs.builder.blob import BlobRecord
from rafs.builder.bootstrap import IMPLICIT_DIR_MARK
from rafs.builder.tree import ChunkRef, Inode, Tree
from rafs.errors import BuildError, FormatError
from rafs.layout.constants import compressor_from_flags, digester_from_flags
from rafs.metadata import InodeV6, Rafs, RafsV6
from storage.records import Compressor, Digester


@dataclass(slots=True)
class LoadedBootstrap:
    """A parsed bootstrap: its tree, blobs (table order), chunk size, algorithms, flags."""

    tree: Tree
    blobs: list[BlobRecord]
    chunk_size: int
    compressor: Compressor
    digester: Digester
    flags: int


def load_bootstrap(path: str | os.PathLike) -> LoadedBootstrap:
    """Parse a v6 bootstrap file; raises :class:`FormatError` when it is not one."""
    with Rafs.open(path) as fs:
        if not isinstance(fs, RafsV6):
            raise FormatError(f"{os.fspath(path)}: a RAFS v{fs.version} bootstrap, the builder reads v6 only")
        return _load(fs)


def _load(fs: RafsV6) -> LoadedBootstrap:
    blobs = [BlobRecord(info, [None] * info.chunk_count) for info in fs.blobs]  # type: ignore[list-item]
    for c in fs.chunk_table():
        if c.index >= len(blobs[c.blob_index].chunks):
            raise FormatError(f"chunk table entry blob_index={c.blob_index} index={c.index} out of range")
        blobs[c.blob_index].chunks[c.index] = c
    nodes: dict[int, Inode] = {}  # nid -> node: hard links share one
    dirs: dict[str, Inode] = {}  # path -> directory node
    for path, ino in fs.walk("/"):
        node = nodes.get(ino.ino)
        if node is None:
            node = nodes[ino.ino] = _node(ino)
        if path == "/":
            dirs[path] = node
            continue
        parent, _, name = path.rpartition("/")
        dirs[parent or "/"].entries[os.fsencode(name)] = node  # type: ignore[index]
        if node.is_dir:
            dirs[path] = node
    return LoadedBootstrap(Tree(dirs["/"]), blobs, fs.chunk_size, compressor_from_flags(fs.flags),
                           digester_from_flags(fs.flags), fs.flags)


def _node(ino: InodeV6) -> Inode:
    """The builder node of reader inode ``ino`` (without directory entries)."""
    a = ino.attr()
    mode = a.mode
    node = Inode(mode=mode, uid=a.uid, gid=a.gid, mtime=a.mtime - (1 << 64) if a.mtime >> 63 else a.mtime,
                 mtime_nsec=a.mtime_nsec, size=a.size, xattrs=ino.xattrs(),
                 implicit=stat.S_ISDIR(mode) and ino.raw.i_reserved2[:4] == IMPLICIT_DIR_MARK)
    if stat.S_ISDIR(mode):
        node.size = 0
    elif stat.S_ISLNK(mode):
        node.symlink = ino.readlink()
    elif stat.S_ISREG(mode):
        for i, ref in enumerate(ino.chunk_refs()):
            if ref is None:
                raise FormatError(f"nid {ino.ino}: chunk {i} is a hole (unsupported by the builder)")
            node.chunks.append(ChunkRef(ref[0], ref[1]))
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        node.rdev = a.rdev
    return node


def load_chunk_dict(path: str, chunk_size: int) -> list[BlobRecord]:
    """Blobs and chunks of a chunk-dictionary bootstrap (``--chunk-dict bootstrap=<path>``)."""
    if path.startswith("bootstrap="):
        path = path[len("bootstrap="):]
    loaded = load_bootstrap(path)
    if loaded.chunk_size != chunk_size:
        raise BuildError(f"chunk dict {path!r} has chunk size {loaded.chunk_size:#x}, build uses {chunk_size:#x}")
    return loaded.blobs
