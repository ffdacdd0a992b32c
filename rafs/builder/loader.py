"""Read a RAFS v6 bootstrap back into a builder :class:`Tree` and its blob list.

Used by ``merge`` (per-layer bootstraps), ``--chunk-dict`` and tests.  Regular files keep
their chunk references (blob index in this bootstrap's table + ci index); chunk details come
from the bootstrap's chunk table.  Hard links (one nid under several names) become one
:class:`Inode`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from rafs.builder.blob import BlobRecord
from rafs.builder.bootstrap import IMPLICIT_DIR_MARK
from rafs.builder.tree import ChunkRef, Inode, Tree
from rafs.errors import BuildError, FormatError
from rafs.layout import (
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    RafsV6Blob,
    RafsV6ChunkInfo,
    RafsV6Dirent,
    RafsV6InodeChunkAddr,
    RafsV6InodeCompact,
    RafsV6InodeExtended,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
    RafsV6XattrEntry,
    inode_datalayout,
    inode_version,
    xattr_ibody_size,
)
from rafs.layout.constants import (
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_PREFIXES,
    RAFSV6_EXT_SUPER_OFFSET,
    compressor_from_flags,
    digester_from_flags,
)
from storage.records import Compressor, Digester
from storage.structs import Scalar, StructTooShort


@dataclass(slots=True)
class LoadedBootstrap:
    """A parsed bootstrap: its tree, blobs (table order), chunk size, algorithms, prefetch nids."""

    tree: Tree
    blobs: list[BlobRecord]
    chunk_size: int
    compressor: Compressor
    digester: Digester
    flags: int


def _decode_dev(v: int) -> int:
    major = (v & 0xFFF00) >> 8
    minor = (v & 0xFF) | ((v >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def load_bootstrap(path: str | os.PathLike) -> LoadedBootstrap:
    """Parse a v6 bootstrap file; raises :class:`FormatError` when it is not one."""
    with open(path, "rb") as f:
        buf = f.read()
    try:
        return _load(buf)
    except StructTooShort as exc:
        raise FormatError(f"{os.fspath(path)}: truncated bootstrap ({exc})") from exc


def _load(buf: bytes) -> LoadedBootstrap:
    if len(buf) < 4096 or len(buf) % 4096:
        raise FormatError(f"bootstrap size {len(buf)} is not a positive multiple of 4096")
    sb = RafsV6SuperBlock.parse(buf, EROFS_SUPER_OFFSET)
    sb.validate()
    ext = RafsV6SuperBlockExt.parse(buf, RAFSV6_EXT_SUPER_OFFSET)
    ext.validate()
    bs = sb.block_size
    meta = sb.s_meta_blkaddr * bs
    nblobs = ext.s_blob_table_size // RafsV6Blob.SIZE
    raw_blobs = RafsV6Blob.parse_array(buf, ext.s_blob_table_offset, nblobs)
    blobs: list[BlobRecord] = []
    for i, b in enumerate(raw_blobs):
        b.validate(i, ext.s_chunk_size)
        info = b.blob_info()
        blobs.append(BlobRecord(info, [None] * b.chunk_count))  # type: ignore[list-item]
    nchunks = ext.s_chunk_table_size // RafsV6ChunkInfo.SIZE
    for c in RafsV6ChunkInfo.parse_array(buf, ext.s_chunk_table_offset, nchunks) if nchunks else []:
        if c.blob_index >= nblobs or c.index >= len(blobs[c.blob_index].chunks):
            raise FormatError(f"chunk table entry blob_index={c.blob_index} index={c.index} out of range")
        blobs[c.blob_index].chunks[c.index] = c.chunk_info()
    cache: dict[int, Inode] = {}

    def data_of(off: int, layout: int, i_u: int, size: int, ibody: int) -> bytes:
        if layout == EROFS_INODE_FLAT_INLINE:
            tail = size % bs
            full = size - tail
            head = buf[i_u * bs:i_u * bs + full] if full else b""
            t = off + ibody
            return head + buf[t:t + tail]
        return buf[i_u * bs:i_u * bs + size]

    def read_inode(nid: int, depth: int) -> Inode:
        if nid in cache:
            return cache[nid]
        if depth > 4096:
            raise FormatError("directory tree too deep (loop?)")
        off = meta + nid * 32
        fmt = Scalar.U16.unpack_from(buf, off)[0]
        if inode_version(fmt):
            ino = RafsV6InodeExtended.parse(buf, off)
            isize = RafsV6InodeExtended.SIZE
            mtime, nsec = ino.i_mtime - (1 << 64) if ino.i_mtime >> 63 else ino.i_mtime, ino.i_mtime_nsec
        else:
            ino = RafsV6InodeCompact.parse(buf, off)
            isize = RafsV6InodeCompact.SIZE
            mtime, nsec = 0, 0
        ino.validate()
        layout = inode_datalayout(ino.i_format)
        xsize = xattr_ibody_size(ino.i_xattr_icount)
        xattrs: dict[bytes, bytes] = {}
        if xsize:
            pos = off + isize + 12
            end = off + isize + xsize
            while pos < end:
                e = RafsV6XattrEntry.parse(buf, pos)
                e.validate()
                pos += RafsV6XattrEntry.SIZE
                name = EROFS_XATTR_PREFIXES[e.e_name_index] + buf[pos:pos + e.e_name_len]
                pos += e.e_name_len
                xattrs[name] = buf[pos:pos + e.e_value_size]
                pos += e.e_value_size
                pos += -(pos - off) % 4
        node = Inode(mode=ino.i_mode, uid=ino.i_uid, gid=ino.i_gid, mtime=mtime, mtime_nsec=nsec,
                     size=ino.i_size, xattrs=xattrs,
                     implicit=stat.S_ISDIR(ino.i_mode) and ino.i_reserved2[:4] == IMPLICIT_DIR_MARK)
        cache[nid] = node
        ibody = isize + xsize
        if stat.S_ISDIR(ino.i_mode):
            data = data_of(off, layout, ino.i_u, ino.i_size, ibody)
            node.size = 0
            for name, child_nid in _parse_dirents(data, bs):
                if name in (b".", b".."):
                    continue
                node.entries[name] = read_inode(child_nid, depth + 1)  # type: ignore[index]
        elif stat.S_ISLNK(ino.i_mode):
            node.symlink = data_of(off, layout, ino.i_u, ino.i_size, ibody)
        elif stat.S_ISREG(ino.i_mode):
            if layout != EROFS_INODE_CHUNK_BASED:
                raise FormatError(f"nid {nid}: regular file with data layout {layout} (expected chunk-based)")
            count = -(-ino.i_size // ext.s_chunk_size)
            pos = off + ((ibody + 7) & ~7)
            for idx in RafsV6InodeChunkAddr.parse_array(buf, pos, count):
                idx.validate()
                if idx.blob_index >= nblobs:
                    raise FormatError(f"nid {nid}: chunk blob index {idx.blob_index} out of range")
                node.chunks.append(ChunkRef(idx.blob_index, idx.ci_index))
        elif stat.S_ISCHR(ino.i_mode) or stat.S_ISBLK(ino.i_mode):
            node.rdev = _decode_dev(ino.i_u) if inode_version(ino.i_format) else 0
        return node

    root = read_inode(sb.s_root_nid, 0)
    if not root.is_dir:
        raise FormatError("root inode is not a directory")
    return LoadedBootstrap(Tree(root), blobs, ext.s_chunk_size, compressor_from_flags(ext.s_flags),
                           digester_from_flags(ext.s_flags), ext.s_flags)


def _parse_dirents(data: bytes, bs: int) -> list[tuple[bytes, int]]:
    out: list[tuple[bytes, int]] = []
    for start in range(0, len(data), bs):
        block = data[start:start + bs]
        first = RafsV6Dirent.parse(block, 0)
        n = first.e_nameoff // RafsV6Dirent.SIZE
        if n == 0 or first.e_nameoff % RafsV6Dirent.SIZE:
            raise FormatError(f"dirent block at {start}: bad first nameoff {first.e_nameoff}")
        ents = RafsV6Dirent.parse_array(block, 0, n)
        for i, d in enumerate(ents):
            end = ents[i + 1].e_nameoff if i + 1 < n else len(block)
            name = block[d.e_nameoff:end]
            if i + 1 == n:
                name = name.rstrip(b"\0")
            out.append((name, d.e_nid))
    return out


def load_chunk_dict(path: str, chunk_size: int) -> list[BlobRecord]:
    """Blobs and chunks of a chunk-dictionary bootstrap (``--chunk-dict bootstrap=<path>``)."""
    if path.startswith("bootstrap="):
        path = path[len("bootstrap="):]
    loaded = load_bootstrap(path)
    if loaded.chunk_size != chunk_size:
        raise BuildError(f"chunk dict {path!r} has chunk size {loaded.chunk_size:#x}, build uses {chunk_size:#x}")
    return loaded.blobs
