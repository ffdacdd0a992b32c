"""``nydus-image inspect``: describe a bootstrap (superblock, blobs, tree, one inode, chunks)."""

from __future__ import annotations

import os
import stat
from typing import Iterable

from rafs.metadata import Inode, Rafs
from storage.records import BlobInfo, ChunkInfo, Compressor, Digester


def blob_dict(b: BlobInfo) -> dict:
    return {
        "blob_index": b.blob_index,
        "blob_id": b.blob_id,
        "chunk_count": b.chunk_count,
        "chunk_size": b.chunk_size,
        "compressor": Compressor(b.compressor).name.lower(),
        "digester": Digester(b.digester).name.lower(),
        "features": b.features,
        "compressed_size": b.compressed_size,
        "uncompressed_size": b.uncompressed_size,
        "ci_compressor": Compressor(b.ci_compressor).name.lower(),
        "ci_offset": b.ci_offset,
        "ci_compressed_size": b.ci_compressed_size,
        "ci_uncompressed_size": b.ci_uncompressed_size,
        "blob_toc_size": b.blob_toc_size,
        "blob_toc_digest": b.blob_toc_digest.hex(),
    }


def chunk_dict(c: ChunkInfo) -> dict:
    return {
        "blob_index": c.blob_index,
        "index": c.index,
        "digest": c.digest.hex(),
        "flags": c.flags,
        "compressed_offset": c.compressed_offset,
        "compressed_size": c.compressed_size,
        "uncompressed_offset": c.uncompressed_offset,
        "uncompressed_size": c.uncompressed_size,
    }


def inode_dict(path: str, node: Inode, *, chunks: bool = False) -> dict:
    a = node.attr()
    out = {
        "path": path,
        "ino": a.ino,
        "mode": f"{a.mode:o}",
        "type": _type_name(a.mode),
        "uid": a.uid,
        "gid": a.gid,
        "size": a.size,
        "nlink": a.nlink,
        "rdev": a.rdev,
        "mtime": a.mtime,
        "mtime_nsec": a.mtime_nsec,
        "blocks": a.blocks,
    }
    xattrs = node.xattrs()
    if xattrs:
        out["xattrs"] = {k.decode(errors="replace"): v.hex() for k, v in xattrs.items()}
    if node.is_symlink():
        out["target"] = os.fsdecode(node.readlink())
    if chunks and node.is_reg():
        out["chunks"] = [
            dict(chunk_dict(d.chunk), file_offset=pos, size=d.size) if not d.is_hole
            else {"hole": True, "file_offset": pos, "size": d.size}
            for pos, d in _positions(node)
        ]
    if node.is_dir():
        out["entries"] = [os.fsdecode(name) for _, name, _ in node.readdir()]
    return out


def _positions(node: Inode) -> Iterable:
    pos = 0
    for d in node.chunks(0, node.size):
        yield pos, d
        pos += d.size


def _type_name(mode: int) -> str:
    return {
        stat.S_IFREG: "file",
        stat.S_IFDIR: "directory",
        stat.S_IFLNK: "symlink",
        stat.S_IFCHR: "char",
        stat.S_IFBLK: "block",
        stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "socket",
    }.get(stat.S_IFMT(mode), "unknown")


def report(fs: Rafs, *, path: str | None = None, tree: bool = False, chunks: bool = False) -> dict:
    """The JSON-able description used by ``inspect --json``."""
    out: dict = {"bootstrap": fs.path, "superblock": fs.info(), "blobs": [blob_dict(b) for b in fs.blobs]}
    if path is not None:
        out["inode"] = inode_dict(path, fs.lookup_path(path), chunks=True)
    if tree:
        out["tree"] = [inode_dict(p, n, chunks=chunks) for p, n in fs.walk()]
    if chunks and path is None:
        out["chunk_table"] = [chunk_dict(c) for c in fs.chunk_table()]
    return out


def render(data: dict) -> str:
    """Human-readable text for an ``inspect`` report."""
    sb = data["superblock"]
    lines = [
        f"bootstrap:      {data['bootstrap']}",
        f"RAFS version:   v{sb['version']}",
        f"flags:          {sb['flags']:#x} ({', '.join(sb['flag_names'])})",
        f"chunk size:     {sb['chunk_size']:#x}",
        f"inodes:         {sb['inode_count']} (root ino {sb['root_ino']})",
        f"prefetch:       {sb['prefetch_inos'] or 'none'}",
        f"blobs:          {len(data['blobs'])}",
    ]
    for b in data["blobs"]:
        lines.append(
            f"  [{b['blob_index']}] {b['blob_id']}  chunks {b['chunk_count']}  {b['compressor']}/{b['digester']}  "
            f"compressed {b['compressed_size']}  uncompressed {b['uncompressed_size']}  features {b['features']:#x}"
        )
    node = data.get("inode")
    if node:
        lines.append(f"inode {node['path']}:")
        for k in ("ino", "type", "mode", "uid", "gid", "size", "nlink", "rdev", "mtime", "blocks"):
            lines.append(f"  {k:<8} {node[k]}")
        if "target" in node:
            lines.append(f"  target   {node['target']}")
        for k, v in node.get("xattrs", {}).items():
            lines.append(f"  xattr    {k} = {v}")
        for name in node.get("entries", []):
            lines.append(f"  entry    {name}")
        for c in node.get("chunks", []):
            if c.get("hole"):
                lines.append(f"  chunk    @{c['file_offset']} hole {c['size']}")
            else:
                lines.append(
                    f"  chunk    @{c['file_offset']} blob {c['blob_index']} index {c['index']} "
                    f"c {c['compressed_offset']}+{c['compressed_size']} u {c['uncompressed_offset']}+"
                    f"{c['uncompressed_size']} digest {c['digest'][:16]}"
                )
    for ent in data.get("tree", []):
        lines.append(f"{ent['mode']:>7} {ent['uid']:>5} {ent['gid']:>5} {ent['size']:>10}  {ent['path']}"
                     + (f" -> {ent['target']}" if "target" in ent else ""))
    if "chunk_table" in data:
        lines.append(f"chunk table: {len(data['chunk_table'])} entries")
        for c in data["chunk_table"]:
            lines.append(
                f"  blob {c['blob_index']} index {c['index']} c {c['compressed_offset']}+{c['compressed_size']} "
                f"u {c['uncompressed_offset']}+{c['uncompressed_size']} digest {c['digest'][:16]}"
            )
    return "\n".join(lines)
