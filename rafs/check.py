"""``nydus-image check``: a full consistency check of a bootstrap (and its blobs if given).

Metadata: every inode reachable from the root parses (v5: its Merkle digest matches); directory entries are sane and sorted,
no cycles, dirent file types match inodes, symlink targets and xattrs decode, every chunk
reference resolves (blob index, chunk index, chunk table).  Data (with ``--blob``/``--blob-dir``):
every referenced chunk is read once, decompressed to its recorded size and its digest verified.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from rafs._blobfile import LocalBlobs
from rafs.errors import RafsError
from rafs.layout import constants as C
from rafs.metadata import Rafs
from storage.digest import hasher
from storage.errors import StorageError

#: stop collecting after this many problems
MAX_PROBLEMS = 100


@dataclass
class CheckReport:
    version: int = 0
    inodes: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    chunks_referenced: int = 0
    chunks_verified: int = 0
    bytes_verified: int = 0
    data_checked: bool = False
    problems: list[str] = field(default_factory=list)

    def add(self, msg: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(msg)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {
            "version": self.version,
            "inodes": self.inodes,
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "chunks_referenced": self.chunks_referenced,
            "chunks_verified": self.chunks_verified,
            "bytes_verified": self.bytes_verified,
            "data_checked": self.data_checked,
            "ok": self.ok,
            "problems": list(self.problems),
        }


def check(fs: Rafs, blobs: LocalBlobs | None = None, *, verbose=None) -> CheckReport:
    """Check ``fs``; ``verbose(msg)`` is called per checked entry when given."""
    report = CheckReport(version=fs.version)
    if blobs is not None:
        report.data_checked = True
        for info in blobs.missing:
            report.add(f"blob {info.blob_id}: data blob file not found")
    for ino in fs.prefetch_inos:
        try:
            fs.inode(ino).attr()
        except RafsError as exc:
            report.add(f"prefetch table: inode {ino}: {exc}")
    for b in fs.blobs:
        if b.chunk_size != fs.chunk_size:
            report.add(f"blob {b.blob_id}: chunk size {b.chunk_size} differs from the superblock {fs.chunk_size}")
    seen: set[tuple[int, int]] = set()
    try:
        for path, node in fs.walk():
            if len(report.problems) >= MAX_PROBLEMS:
                break
            report.inodes += 1
            if verbose:
                verbose(path)
            try:
                _check_inode(fs, path, node, report, blobs, seen)
            except (RafsError, StorageError) as exc:
                report.add(f"{path}: {exc}")
    except RafsError as exc:
        report.add(f"tree walk: {exc}")
    if fs.version == 6:
        try:
            for info in fs.chunk_table():
                blob = fs.blobs[info.blob_index]
                if blob.uncompressed_size and info.uncompressed_offset + info.uncompressed_size > blob.uncompressed_size:
                    report.add(
                        f"chunk table: chunk {info.index} of blob {info.blob_index} ends at "
                        f"{info.uncompressed_offset + info.uncompressed_size}, beyond uncompressed size "
                        f"{blob.uncompressed_size}"
                    )
                if blob.compressed_size and info.compressed_offset + info.compressed_size > blob.compressed_size:
                    report.add(
                        f"chunk table: chunk {info.index} of blob {info.blob_index} ends at "
                        f"{info.compressed_offset + info.compressed_size}, beyond compressed size "
                        f"{blob.compressed_size}"
                    )
        except RafsError as exc:
            report.add(f"chunk table: {exc}")
    return report


def _v5_digest_ok(fs, node) -> bool:
    """v5 inodes carry a Merkle digest: of the chunk digests (files), the target (symlinks), or
    the children's digests (directories), with the image's digester."""
    h = hasher(fs.digester)
    if node.is_symlink():
        h.update(node.readlink())
    elif node.is_reg():
        for chunk, _off in node.chunk_infos():
            h.update(chunk.digest)
    elif node.is_dir():
        for _off, _name, child in node.readdir():
            h.update(child.raw.i_digest)
    else:
        return True
    return h.digest() == node.raw.i_digest


def _check_inode(fs, path, node, report, blobs, seen) -> None:
    a = node.attr()
    node.xattrs()
    if fs.version == 5 and not _v5_digest_ok(fs, node):
        report.add(f"{path}: v5 inode digest does not match its content (i_digest {node.raw.i_digest.hex()[:16]}…)")
    fmt = stat.S_IFMT(a.mode)
    if fmt == stat.S_IFDIR:
        report.dirs += 1
        if fs.version == 6:
            types = node.dirent_types()
            for off, name, child in node.readdir():
                want = C.EROFS_FT_FROM_MODE.get(stat.S_IFMT(child.mode))
                got = types.get(name)
                if got not in (want, C.EROFS_FT_UNKNOWN):
                    report.add(f"{path.rstrip('/')}/{name.decode(errors='replace')}: dirent file type {got} "
                               f"but inode mode {child.mode:o}")
            if b"." not in types or b".." not in types:
                report.add(f"{path}: directory lacks '.' or '..' entries")
        return
    if fmt == stat.S_IFLNK:
        report.symlinks += 1
        target = node.readlink()
        if len(target) != a.size:
            report.add(f"{path}: symlink size {a.size} but target has {len(target)} bytes")
        return
    if fmt != stat.S_IFREG:
        return
    report.files += 1
    vec = node.chunks(0, a.size)
    if vec.size != a.size:
        report.add(f"{path}: chunks cover {vec.size} of {a.size} bytes")
    for desc in vec:
        if desc.is_hole:
            continue
        key = (desc.chunk.blob_index, desc.chunk.index)
        if key in seen:
            continue
        seen.add(key)
        report.chunks_referenced += 1
        if blobs is not None and blobs.has(desc.blob.blob_index):
            try:
                data = blobs.read_chunk(desc.blob, desc.chunk)
            except (RafsError, StorageError) as exc:
                report.add(f"{path}: {exc}")
                continue
            report.chunks_verified += 1
            report.bytes_verified += len(data)
