"""``nydus-image unpack``: write a RAFS image's tree to a directory or a tar file.

Content, modes, ownership (when permitted), mtimes, xattrs, symlinks, hard links and device
nodes are reproduced; zero ranges of files stay holes in a directory output and in a tar output
(PAX 1.0 sparse members, as GNU tar writes them).  Output appears atomically: it is written to
a temporary sibling and renamed into place, so a failed (or SIGTERM/SIGINT-ed) unpack leaves
nothing behind.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import stat
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from rafs._blobfile import LocalBlobs
from rafs.errors import RafsError
from rafs.metadata import Inode, Rafs
from storage.atomic import atomic_open
from storage.digest import digest


@dataclass
class UnpackReport:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    hardlinks: int = 0
    warnings: list[str] = field(default_factory=list)


def _warn(report: UnpackReport, msg: str) -> None:
    if len(report.warnings) < 1000:
        report.warnings.append(msg)


def unpack(fs: Rafs, blobs: LocalBlobs, output: str) -> UnpackReport:
    """Unpack to ``output``: a ``.tar`` path writes a tar archive, anything else a directory."""
    if output.endswith(".tar"):
        return unpack_tar(fs, blobs, output)
    return unpack_dir(fs, blobs, output)


def unpack_dir(fs: Rafs, blobs: LocalBlobs, output: str) -> UnpackReport:
    output = os.path.abspath(output)
    if os.path.lexists(output):
        if not os.path.isdir(output) or os.listdir(output):
            raise RafsError(f"{output}: exists and is not an empty directory")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    # named first and made inside the try: a Ctrl-C / SIGTERM right after the mkdir still removes it
    tmp = os.path.join(parent, ".unpack-" + secrets.token_hex(16))
    try:
        os.mkdir(tmp, 0o700)
        report = _write_tree(fs, blobs, tmp)
        if os.path.isdir(output):
            os.rmdir(output)
        os.rename(tmp, output)
    except BaseException as exc:
        if not (isinstance(exc, FileExistsError) and exc.filename == tmp):  # (never someone else's)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_tree(fs: Rafs, blobs: LocalBlobs, root: str) -> UnpackReport:
    report = UnpackReport()
    is_root = os.geteuid() == 0
    links: dict[int, str] = {}
    dirs: list[tuple[str, Inode]] = []
    for path, node in fs.walk():
        report.entries += 1
        a = node.attr()
        dest = root if path == "/" else os.path.join(root, path.lstrip("/"))
        mode = a.mode
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFDIR:
            if path != "/":
                os.mkdir(dest, 0o700)
            dirs.append((dest, node))
            continue
        key = node.hardlink_key
        if key is not None and key in links:
            os.link(links[key], dest)
            report.hardlinks += 1
            continue
        if fmt == stat.S_IFREG:
            _write_sparse(dest, blobs, node, report)
            report.files += 1
        elif fmt == stat.S_IFLNK:
            os.symlink(node.readlink(), dest)
        elif fmt == stat.S_IFIFO:
            os.mkfifo(dest, 0o600)
        else:  # chr, blk, sock
            try:
                os.mknod(dest, fmt | 0o600, a.rdev)
            except PermissionError:
                _warn(report, f"{path}: cannot create device node without privileges; skipped")
                continue
        if key is not None:
            links[key] = dest
        _apply_meta(dest, path, node, is_root, report)
    # directories last and deepest first, so their mtimes/modes survive the writes into them
    for dest, node in reversed(dirs):
        _apply_meta(dest, "/" + os.path.relpath(dest, root).lstrip("."), node, is_root, report)
    return report


def _zero_digest(algo, size: int, memo: dict) -> bytes:
    key = (algo, size)
    d = memo.get(key)
    if d is None:
        d = memo[key] = digest(algo, bytes(size))
    return d


_BLOCK = 64 << 10
_ZEROS = bytes(_BLOCK)


def _write_nonzero(f, pos: int, piece: bytes) -> None:
    """Write the 64 KiB blocks of ``piece`` that are not all zeros (runs of them at once)."""
    mv = memoryview(piece)
    start = None
    for off in range(0, len(piece), _BLOCK):
        block = mv[off : off + _BLOCK]
        zero = block == _ZEROS[: len(block)]
        if not zero and start is None:
            start = off
        elif zero and start is not None:
            f.seek(pos + start)
            f.write(mv[start:off])
            start = None
    if start is not None:
        f.seek(pos + start)
        f.write(mv[start:])


def _write_sparse(dest: str, blobs: LocalBlobs, node: Inode, report: UnpackReport) -> None:
    """Write a regular file, keeping holes: holes in the image, chunks whose digest is that of
    all zeros (read nothing) and zero pieces (read, not written) are skipped by seeking; the
    file gets its size with ``ftruncate``. A sparse-file bomb costs neither disk nor data reads."""
    size = node.size
    memo: dict = {}
    window = 4 << 20
    with open(dest, "wb") as f:
        pos = 0
        while pos < size:
            n = min(window, size - pos)
            vec = node.chunks(pos, n)
            data_descs = []
            for d in vec:
                if d.chunk is None or (d.chunk.digest and d.blob is not None and
                                       d.chunk.digest == _zero_digest(d.blob.digester, d.chunk.uncompressed_size, memo)):
                    continue
                data_descs.append(d)
            if data_descs:
                piece = blobs.read(vec)
                if len(piece) != n:
                    raise RafsError(f"inode {node.ino}: read {len(piece)} bytes at {pos}, expected {n}")
                _write_nonzero(f, pos, piece)
            report.bytes += n
            pos += n
        f.truncate(size)


def _apply_meta(dest: str, path: str, node: Inode, is_root: bool, report: UnpackReport) -> None:
    """Apply ownership, mode, xattrs and mtime, in that order.

    chown(2) clears ``security.capability`` (and set-id bits), and chmod can too, so xattrs
    are set only after both; utime comes last because setxattr does not touch mtime but
    must not be undone by later writes either.
    """
    a = node.attr()
    link = stat.S_ISLNK(a.mode)
    if is_root:
        try:
            os.chown(dest, a.uid, a.gid, follow_symlinks=False)
        except OSError as exc:
            _warn(report, f"{path}: chown: {exc.strerror}")
    if not link:
        os.chmod(dest, stat.S_IMODE(a.mode))
    for name, value in node.xattrs().items():
        try:
            os.setxattr(dest, name, value, follow_symlinks=False)
        except OSError as exc:
            _warn(report, f"{path}: xattr {name.decode(errors='replace')}: {exc.strerror}")
    try:
        os.utime(dest, ns=(a.mtime * 10**9 + a.mtime_nsec,) * 2, follow_symlinks=False)
    except OSError as exc:
        _warn(report, f"{path}: utime: {exc.strerror}")


class _ChunkStream(io.RawIOBase):
    """A read-only stream over byte pieces, by default a file's content (for tarfile.addfile)."""

    def __init__(self, blobs: LocalBlobs, node: Inode, pieces: Iterable[bytes] | None = None) -> None:
        self._it = iter(pieces if pieces is not None else blobs.iter_file(node))
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _data_regions(node: Inode) -> list[tuple[int, int]]:
    """The file ranges ``(offset, size)`` that hold data, merged, in file order: holes in the
    image and chunks whose digest is that of all zeros are left out (nothing is read)."""
    size = node.size
    memo: dict = {}
    regions: list[tuple[int, int]] = []
    pos = 0
    window = 4 << 20
    while pos < size:
        n = min(window, size - pos)
        off = pos
        for d in node.chunks(pos, n):
            hole = d.chunk is None or (d.chunk.digest and d.blob is not None and
                                       d.chunk.digest == _zero_digest(d.blob.digester, d.chunk.uncompressed_size, memo))
            if not hole:
                if regions and regions[-1][0] + regions[-1][1] == off:
                    regions[-1] = (regions[-1][0], regions[-1][1] + d.size)
                else:
                    regions.append((off, d.size))
            off += d.size
        pos += n
    return regions


def _sparse_map(node: Inode, regions: list[tuple[int, int]]) -> bytes:
    """The map block of a PAX 1.0 sparse member: the entry count, then offset and size of each
    data region, one number a line, zero-padded to a 512-byte block; a trailing hole adds the
    entry ``(real size, 0)`` so the map spans the whole file."""
    entries = list(regions)
    if not entries or entries[-1][0] + entries[-1][1] < node.size:
        entries.append((node.size, 0))
    head = (f"{len(entries)}\n" + "".join(f"{o}\n{n}\n" for o, n in entries)).encode()
    return head + bytes(-len(head) % tarfile.BLOCKSIZE)


def _sparse_pieces(blobs: LocalBlobs, node: Inode, regions: list[tuple[int, int]],
                   sparse_map: bytes) -> Iterator[bytes]:
    """The data of a PAX 1.0 sparse member: its map, then the regions' bytes."""
    yield sparse_map
    for off, size in regions:
        end = off + size
        while off < end:
            n = min(4 << 20, end - off)
            piece = blobs.read(node.chunks(off, n))
            if len(piece) != n:
                raise RafsError(f"inode {node.ino}: read {len(piece)} bytes at {off}, expected {n}")
            yield piece
            off += n


def unpack_tar(fs: Rafs, blobs: LocalBlobs, output: str) -> UnpackReport:
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    report = UnpackReport()
    links: dict[int, str] = {}
    with atomic_open(output, "wb", perms=0o600) as out, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path, node in fs.walk():
            report.entries += 1
            a = node.attr()
            name = "." if path == "/" else "." + path
            ti = tarfile.TarInfo(name)
            ti.mode = stat.S_IMODE(a.mode)
            ti.uid, ti.gid = a.uid, a.gid
            ti.mtime = a.mtime + a.mtime_nsec / 1e9 if a.mtime_nsec else a.mtime
            pax = {}
            for k, v in node.xattrs().items():
                pax["SCHILY.xattr." + k.decode("utf-8", "surrogateescape")] = v.decode(
                    "utf-8", "surrogateescape"
                )
            if a.mtime_nsec:
                pax["mtime"] = f"{a.mtime}.{a.mtime_nsec:09d}"
            ti.pax_headers = pax
            fmt = stat.S_IFMT(a.mode)
            data = None
            key = node.hardlink_key
            if key is not None and key in links:
                ti.type = tarfile.LNKTYPE
                ti.linkname = links[key]
                report.hardlinks += 1
            elif fmt == stat.S_IFDIR:
                ti.type = tarfile.DIRTYPE
            elif fmt == stat.S_IFREG:
                ti.type = tarfile.REGTYPE
                ti.size = a.size
                regions = _data_regions(node) if a.size else []
                if a.size and sum(n for _, n in regions) < a.size:
                    # holes stay holes: a PAX 1.0 sparse member (GNU tar's layout and names)
                    pax.update({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                "GNU.sparse.name": name, "GNU.sparse.realsize": str(a.size)})
                    head, base = os.path.split(name)
                    ti.name = f"{head}/GNUSparseFile.0/{base}"
                    sparse_map = _sparse_map(node, regions)
                    ti.size = len(sparse_map) + sum(n for _, n in regions)
                    data = io.BufferedReader(
                        _ChunkStream(blobs, node, _sparse_pieces(blobs, node, regions, sparse_map)), 1 << 20)
                else:
                    data = io.BufferedReader(_ChunkStream(blobs, node), 1 << 20)
                report.files += 1
                report.bytes += a.size
                if key is not None:
                    links[key] = name
            elif fmt == stat.S_IFLNK:
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.fsdecode(node.readlink())
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(a.rdev), os.minor(a.rdev)
            elif fmt == stat.S_IFIFO:
                ti.type = tarfile.FIFOTYPE
            else:
                _warn(report, f"{path}: sockets cannot be stored in tar; skipped")
                continue
            tf.addfile(ti, data)
    return report


def print_warnings(report: UnpackReport) -> None:
    for w in report.warnings[:20]:
        print(f"warning: {w}", file=sys.stderr)
    if len(report.warnings) > 20:
        print(f"warning: ... {len(report.warnings) - 20} more", file=sys.stderr)
