"""RAFS v6 (EROFS-compatible) reader behind :class:`rafs.base.Rafs` (registered by its ``version``)."""

from __future__ import annotations

import bisect
import stat
import threading
from functools import cached_property, reduce
from operator import or_
from typing import Iterator

from rafs.errors import FormatError, NotFound, UnsupportedError
from rafs.layout import constants as C
from rafs.layout.constants import BLOB_CHUNK_FLAGS_ALL
from rafs.layout.erofs import (
    ErofsDeviceSlot,
    ErofsDirent,
    ErofsInodeChunkIndex,
    ErofsInodeCompact,
    ErofsInodeExtended,
    ErofsXattrEntry,
    ErofsXattrIbodyHeader,
    decode_chunk_format,
    inode_datalayout,
    inode_version,
    xattr_ibody_size,
)
from rafs.layout.v5 import RafsV5ChunkInfo
from rafs.layout.v6 import RafsV6Blob, RafsV6SuperBlock, RafsV6SuperBlockExt
from rafs.base import BootstrapImage, ChunkColumns, Inode, InodeAttr, Rafs, check_name, substitute_blob_id
from storage.records import BlobFeatures, BlobIoDesc, BlobIoVec, ChunkInfo
from storage.structs import Scalar

#: kernel EROFS "no block" marker in a chunk index: the chunk is a hole
EROFS_NULL_ADDR = 0xFFFF_FFFF
_CHUNK_BATCH = 4096


class RafsV6(Rafs):
    version = 6

    def __init__(self, img: BootstrapImage, *, blob_id_hint: str | None = None) -> None:
        super().__init__(img)
        if img.size < 4096:
            raise FormatError(f"v6 bootstrap size {img.size}: smaller than one 4096-byte block")
        sb = img.parse(RafsV6SuperBlock, C.EROFS_SUPER_OFFSET)
        sb.validate()
        self.sb = sb
        self.block_size = bs = sb.block_size
        if img.size % bs:
            raise FormatError(f"v6 bootstrap size {img.size}: not a multiple of the block size {bs}")
        ext = img.parse(RafsV6SuperBlockExt, C.RAFSV6_EXT_SUPER_OFFSET)
        ext.validate(bs)
        self.ext = ext
        self.flags = ext.s_flags
        self.chunk_size = ext.s_chunk_size
        self.inode_count = sb.s_inos
        self.meta_base = sb.s_meta_blkaddr * bs
        if self.meta_base >= img.size:
            raise FormatError(
                f"RafsV6SuperBlock.s_meta_blkaddr = {sb.s_meta_blkaddr}: beyond the bootstrap ({img.size} bytes)"
            )
        self.max_nid = (img.size - self.meta_base) // C.EROFS_INODE_SLOT_SIZE - 1
        self.root_ino = sb.s_root_nid
        if self.root_ino > self.max_nid:
            raise FormatError(f"RafsV6SuperBlock.s_root_nid = {self.root_ino}: beyond the bootstrap")

        # tables: bounds and overlap
        ndev = sb.s_extra_devices
        dev_off = C.RAFSV6_DEVSLOT_OFFSET
        dev_end = dev_off + ndev * C.EROFS_DEVT_SLOT_SIZE
        nblob = ext.s_blob_table_size // C.RAFSV6_BLOB_ENTRY_SIZE
        if nblob != ndev:
            raise FormatError(
                f"RafsV6SuperBlockExt.s_blob_table_size = {ext.s_blob_table_size}: {nblob} blobs but "
                f"s_extra_devices = {ndev}"
            )
        if nblob > C.RAFS_MAX_BLOBS - 1:
            raise FormatError(f"RafsV6SuperBlockExt.s_blob_table_size: {nblob} blobs, at most 254 allowed")
        ranges = [("device table", dev_off, dev_end - dev_off)]
        if nblob:
            if ext.s_blob_table_offset < dev_end:
                raise FormatError(
                    f"RafsV6SuperBlockExt.s_blob_table_offset = {ext.s_blob_table_offset}: "
                    f"inside the device table (ends at {dev_end})"
                )
            ranges.append(("blob table", ext.s_blob_table_offset, ext.s_blob_table_size))
        if ext.s_chunk_table_size:
            ranges.append(("chunk table", ext.s_chunk_table_offset, ext.s_chunk_table_size))
        has_prefetch = ext.s_prefetch_table_offset != 0 and ext.s_prefetch_table_size != 0
        if has_prefetch:
            ranges.append(("prefetch table", ext.s_prefetch_table_offset, ext.s_prefetch_table_size))
        for i, (name, off, size) in enumerate(ranges):
            if off + size > img.size:
                raise FormatError(f"v6 {name} at {off}+{size}: outside the bootstrap ({img.size} bytes)")
            for other, o2, s2 in ranges[:i]:
                if size and s2 and off < o2 + s2 and o2 < off + size:
                    raise FormatError(f"v6 {name} at {off}+{size}: overlaps the {other} at {o2}+{s2}")

        devs = img.parse_array(ErofsDeviceSlot, dev_off, ndev, "device table")
        entries = img.parse_array(RafsV6Blob, ext.s_blob_table_offset, nblob, "blob table")
        seen: set[bytes] = set()
        blobs = []
        for i, (dev, ent) in enumerate(zip(devs, entries)):
            try:
                dev.validate()
                ent.validate(i, self.chunk_size)
            except FormatError as exc:
                raise FormatError(f"blob {i}: {exc}") from None
            if dev.blob_id in seen:
                raise FormatError(f"device slot {i}: duplicate blob id {dev.blob_id.decode()}")
            seen.add(dev.blob_id)
            if ent.blob_id.rstrip(b"\0") != dev.blob_id:
                raise FormatError(
                    f"blob {i}: blob table id {ent.blob_id_str!r} differs from device slot id "
                    f"{dev.blob_id.decode()!r}"
                )
            blobs.append(ent.blob_info(substitute_blob_id(ent.blob_id_str, ent.features, nblob, blob_id_hint)))
        self.blobs = blobs
        self.blob_entries = entries
        self.devices = devs

        prefetch: list[int] = []
        if has_prefetch:
            for nid in Scalar.u32_array(
                img.read(ext.s_prefetch_table_offset, ext.s_prefetch_table_size, "prefetch table"),
                0,
                ext.s_prefetch_table_size // 4,
            ):
                if nid == 0:
                    break
                if nid > self.max_nid:
                    raise FormatError(f"prefetch table: nid {nid} beyond the bootstrap")
                prefetch.append(nid)
        self.prefetch_inos = prefetch
        self._chunk_lock = threading.Lock()
        self._chunk_keys: list[int] | None = None
        self._chunk_pos: list[int] | None = None
        # validate the root eagerly: a bootstrap whose root is not a directory is useless
        if not self.root.is_dir():
            raise FormatError(f"root nid {self.root_ino}: not a directory (mode {self.root.mode:o})")

    # -- inodes ---------------------------------------------------------------------------

    def _load_inode(self, ino: int) -> "InodeV6":
        if ino > self.max_nid:
            raise NotFound(f"nid {ino}: beyond the bootstrap (max {self.max_nid})")
        return InodeV6(self, ino)

    def _node(self, nid: int, where: str) -> "InodeV6":
        """An inode referenced from the image itself (dirent): out of range is a FormatError."""
        if nid > self.max_nid:
            raise FormatError(f"{where}: nid {nid} beyond the bootstrap (max {self.max_nid})")
        return self.inode(nid)  # type: ignore[return-value]

    def _check_parent(self, child: Inode, parent: Inode, path: str) -> None:
        dotdot = child.dotdot_nid  # type: ignore[attr-defined]
        if dotdot is not None and dotdot != parent.ino:
            raise FormatError(f"{path}: '..' points to nid {dotdot}, parent is nid {parent.ino}")

    # -- chunks ---------------------------------------------------------------------------

    @property
    def chunk_table_count(self) -> int:
        return self.ext.s_chunk_table_size // C.RAFSV6_CHUNK_INFO_SIZE

    def _build_chunk_index(self) -> None:
        with self._chunk_lock:
            if self._chunk_keys is not None:
                return
            count = self.chunk_table_count
            off = self.ext.s_chunk_table_offset
            try:  # as columns (no object per entry); a bad entry: the loop below names it
                bidx, idx = self._img.parse_columns(RafsV5ChunkInfo, off, count, "chunk table", "blob_index", "index")
                counts = [b.chunk_count for b in self.blobs]
                ok = not count or (max(bidx) < len(counts) and all(i < counts[b] for b, i in zip(bidx, idx)))
            except FormatError:
                ok = False
            if ok:
                keys = sorted(((b << 24) | i, pos) for pos, (b, i) in enumerate(zip(bidx, idx)))
                self._chunk_pos = [p for _, p in keys]
                self._chunk_keys = [k for k, _ in keys]
                return
            pairs = []
            for start in range(0, count, _CHUNK_BATCH):
                n = min(_CHUNK_BATCH, count - start)
                for j, ent in enumerate(
                    self._img.parse_array(RafsV5ChunkInfo, off + start * 80, n, "chunk table")
                ):
                    if ent.blob_index >= len(self.blobs):
                        raise FormatError(
                            f"chunk table entry {start + j}: blob_index {ent.blob_index} out of range "
                            f"({len(self.blobs)} blobs)"
                        )
                    if ent.index >= self.blobs[ent.blob_index].chunk_count:
                        raise FormatError(
                            f"chunk table entry {start + j}: index {ent.index} >= chunk_count "
                            f"{self.blobs[ent.blob_index].chunk_count} of blob {ent.blob_index}"
                        )
                    pairs.append(((ent.blob_index << 24) | ent.index, start + j))
            pairs.sort()
            self._chunk_keys = [k for k, _ in pairs]
            self._chunk_pos = [p for _, p in pairs]

    def _chunk_entry(self, pos: int, ent: RafsV5ChunkInfo | None = None) -> ChunkInfo:
        if ent is None:
            ent = self._img.parse(RafsV5ChunkInfo, self.ext.s_chunk_table_offset + pos * 80, "chunk table")
        try:
            ent.validate(self.chunk_size, len(self.blobs))
        except FormatError as exc:
            raise FormatError(f"chunk table entry {pos}: {exc}") from None
        return ent.chunk_info()

    def chunk_info(self, blob_index: int, ci_index: int) -> ChunkInfo | None:
        """The chunk-table entry for (blob, ci index); ``None`` if the image has no chunk table."""
        if self.chunk_table_count == 0:
            return None
        if self._chunk_keys is None:
            self._build_chunk_index()
        key = (blob_index << 24) | ci_index
        keys = self._chunk_keys
        i = bisect.bisect_left(keys, key)  # type: ignore[arg-type]
        if i == len(keys) or keys[i] != key:  # type: ignore[arg-type]
            raise FormatError(f"chunk (blob {blob_index}, index {ci_index}) missing from the chunk table")
        return self._chunk_entry(self._chunk_pos[i])  # type: ignore[index]

    def chunk_table(self) -> Iterator[ChunkInfo]:
        count = self.chunk_table_count
        for start in range(0, count, _CHUNK_BATCH):
            n = min(_CHUNK_BATCH, count - start)
            ents = self._img.parse_array(RafsV5ChunkInfo, self.ext.s_chunk_table_offset + start * 80, n, "chunk table")
            for j, ent in enumerate(ents):
                yield self._chunk_entry(start + j, ent)

    def chunk_columns(self) -> ChunkColumns | None:
        count = self.chunk_table_count
        if count == 0:
            return None
        try:
            bidx, idx, flags, usize, uoff = self._img.parse_columns(
                RafsV5ChunkInfo, self.ext.s_chunk_table_offset, count, "chunk table",
                "blob_index", "index", "flags", "uncompressed_size", "uncompressed_offset")
            bad = (max(bidx) >= len(self.blobs) or reduce(or_, flags) & ~BLOB_CHUNK_FLAGS_ALL
                   or min(usize) == 0 or max(usize) > self.chunk_size or max(idx) >= 1 << 24)
        except FormatError:
            bad = True
        if bad:  # the entry-by-entry reader names the first bad entry, as chunk_table() does
            for _ in self.chunk_table():
                pass
            raise FormatError("chunk table: an entry fails its checks")  # not reached
        return ChunkColumns(bidx, idx, uoff, usize, self._chunk_entry)

    def info(self) -> dict:
        sb, ext = self.sb, self.ext
        return {
            "version": 6,
            "block_size": self.block_size,
            "chunk_size": self.chunk_size,
            "flags": self.flags,
            "flag_names": _flag_names(self.flags),
            "root_ino": self.root_ino,
            "inode_count": self.inode_count,
            "meta_blkaddr": sb.s_meta_blkaddr,
            "blocks": sb.s_blocks,
            "build_time": sb.s_build_time,
            "blob_table": [ext.s_blob_table_offset, ext.s_blob_table_size],
            "chunk_table": [ext.s_chunk_table_offset, ext.s_chunk_table_size],
            "prefetch_table": [ext.s_prefetch_table_offset, ext.s_prefetch_table_size],
            "prefetch_inos": list(self.prefetch_inos),
            "devices": [
                {"blob_id": d.blob_id.decode(), "blocks": d.blocks, "mapped_blkaddr": d.mapped_blkaddr}
                for d in self.devices
            ],
        }


def _flag_names(flags: int) -> list[str]:
    return [f.name for f in C.RafsSuperFlags if f.value & flags and f.name]


class InodeV6(Inode):
    """A v6 inode: compact (32 B) or extended (64 B) EROFS inode plus nydus conventions.

    Besides the :class:`Inode` API: ``raw`` is the validated on-disk struct
    (:class:`ErofsInodeCompact` / :class:`ErofsInodeExtended`, e.g. for ``i_reserved2``, where the
    builder marks implicit directories), ``extended``, ``layout`` (data layout), ``offset``.
    """

    def __init__(self, fs: RafsV6, nid: int) -> None:
        super().__init__(fs, nid)
        self.fs: RafsV6 = fs
        img = fs._img
        self.offset = fs.meta_base + nid * C.EROFS_INODE_SLOT_SIZE
        head = img.read(self.offset, 2, f"inode nid {nid}")
        (i_format,) = Scalar.U16.unpack_from(head, 0)
        cls = ErofsInodeExtended if inode_version(i_format) else ErofsInodeCompact
        raw = img.parse(cls, self.offset, f"inode nid {nid}")
        try:
            raw.validate()
        except FormatError as exc:
            raise FormatError(f"inode nid {nid}: {exc}") from None
        self.raw = raw
        self.extended = cls is ErofsInodeExtended
        self.inode_size = cls.SIZE
        self.layout = inode_datalayout(raw.i_format)
        self.xattr_size = xattr_ibody_size(raw.i_xattr_icount)
        if self.offset + self.inode_size + self.xattr_size > img.size:
            raise FormatError(f"inode nid {nid}: xattr area ({self.xattr_size} bytes) beyond the bootstrap")
        mode = raw.i_mode
        fmt = stat.S_IFMT(mode)
        if fmt not in C.EROFS_FT_FROM_MODE:
            raise FormatError(f"inode nid {nid}: i_mode = {mode:o}: unknown file type")
        size = raw.i_size
        if fmt in (stat.S_IFDIR, stat.S_IFLNK):
            if self.layout == C.EROFS_INODE_CHUNK_BASED:
                raise FormatError(f"inode nid {nid}: directory/symlink with CHUNK_BASED layout")
            if size > img.size:
                raise FormatError(f"inode nid {nid}: i_size = {size} larger than the bootstrap")
            if fmt == stat.S_IFLNK and size > C.RAFS_MAX_SYMLINK:
                raise FormatError(f"inode nid {nid}: symlink i_size = {size} above {C.RAFS_MAX_SYMLINK}")
        elif fmt == stat.S_IFREG:
            if self.layout != C.EROFS_INODE_CHUNK_BASED and size:
                raise UnsupportedError(
                    f"inode nid {nid}: regular file with data layout {self.layout} (not CHUNK_BASED)"
                )
            if self.layout == C.EROFS_INODE_CHUNK_BASED:
                decode_chunk_format(raw.i_u, fs.sb.s_blkszbits)
        self._blocks: dict[int, list] = {}

    # -- attributes -----------------------------------------------------------------------

    @property
    def mode(self) -> int:
        return self.raw.i_mode

    @property
    def size(self) -> int:
        return self.raw.i_size

    @property
    def nid(self) -> int:
        return self.ino

    def attr(self) -> InodeAttr:
        r = self.raw
        if self.extended:
            mtime, nsec = r.i_mtime, r.i_mtime_nsec
        else:
            mtime, nsec = self.fs.sb.s_build_time, self.fs.sb.s_build_time_nsec
        fmt = stat.S_IFMT(r.i_mode)
        rdev = r.i_u if fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK) else 0
        return InodeAttr(
            ino=self.ino,
            mode=r.i_mode,
            uid=r.i_uid,
            gid=r.i_gid,
            size=r.i_size,
            nlink=r.i_nlink,
            rdev=rdev,
            mtime=mtime,
            mtime_nsec=nsec,
            blocks=(r.i_size + 511) // 512,
        )

    @property
    def hardlink_key(self) -> int | None:
        if self.is_reg() and self.raw.i_nlink > 1:
            return self.raw.i_ino or self.ino
        return None

    # -- flat data (directories, symlinks) ---------------------------------------------------

    def _data_block(self, k: int) -> bytes:
        """Block ``k`` of a FLAT_PLAIN / FLAT_INLINE inode's data (the last one may be short)."""
        bs = self.fs.block_size
        size = self.size
        nblocks = (size + bs - 1) // bs
        if not 0 <= k < nblocks:
            raise FormatError(f"inode nid {self.ino}: data block {k} out of range")
        length = min(bs, size - k * bs)
        if self.layout == C.EROFS_INODE_FLAT_INLINE and k == nblocks - 1 and size % bs:
            tail = self.offset + self.inode_size + self.xattr_size
            if tail // bs != (tail + length - 1) // bs:
                raise FormatError(f"inode nid {self.ino}: inline tail of {length} bytes crosses a block boundary")
            return self.fs._img.read(tail, length, f"inode nid {self.ino} inline data")
        start = (self.raw.i_u + k) * bs
        return self.fs._img.read(start, length, f"inode nid {self.ino} data block {k}")

    def readlink(self) -> bytes:
        if not self.is_symlink():
            raise FormatError(f"inode nid {self.ino}: readlink on a non-symlink")
        bs = self.fs.block_size
        nblocks = (self.size + bs - 1) // bs
        target = b"".join(self._data_block(k) for k in range(nblocks))
        if not target or b"\0" in target:
            raise FormatError(f"inode nid {self.ino}: invalid symlink target {target!r}")
        return target

    # -- directories --------------------------------------------------------------------------

    @property
    def _nblocks(self) -> int:
        bs = self.fs.block_size
        return (self.size + bs - 1) // bs

    def _dir_block(self, k: int) -> list[tuple[bytes, int, int]]:
        """Parsed dirents of directory block ``k``: [(name, nid, file_type)] sorted by name."""
        cached = self._blocks.get(k)
        if cached is not None:
            return cached
        data = self._data_block(k)
        where = f"directory nid {self.ino} block {k}"
        blen = len(data)
        if blen < ErofsDirent.SIZE:
            raise FormatError(f"{where}: {blen} bytes, too short for a dirent")
        first = ErofsDirent.parse(data, 0)
        nameoff0 = first.e_nameoff
        if nameoff0 < ErofsDirent.SIZE or nameoff0 % ErofsDirent.SIZE or nameoff0 > blen:
            raise FormatError(f"{where}: first e_nameoff = {nameoff0} invalid (block has {blen} bytes)")
        count = nameoff0 // ErofsDirent.SIZE
        dirents = ErofsDirent.parse_array(data, 0, count)
        out: list[tuple[bytes, int, int]] = []
        for i, d in enumerate(dirents):
            start = d.e_nameoff
            end = dirents[i + 1].e_nameoff if i + 1 < count else blen
            if not nameoff0 <= start < end <= blen:
                raise FormatError(f"{where}: dirent {i} e_nameoff = {start} invalid (next {end}, block {blen})")
            name = data[start:end]
            if i + 1 == count:
                name = name.rstrip(b"\0")
            if d.e_file_type >= C.EROFS_FT_MAX:
                raise FormatError(f"{where}: dirent {name!r} e_file_type = {d.e_file_type} unknown")
            if name not in (b".", b".."):
                check_name(name, where)
            if out and not out[-1][0] < name:
                raise FormatError(f"{where}: dirent names not sorted ({out[-1][0]!r} before {name!r})")
            out.append((name, d.e_nid, d.e_file_type))
        if len(self._blocks) < 64:
            self._blocks[k] = out
        return out

    @cached_property
    def _dir_index(self) -> tuple[list[int], int | None]:
        """(start dirent index of each block, '..' nid) — validates the whole directory once."""
        self._need_dir()
        starts = []
        total = 0
        dot = dotdot = None
        prev = None
        for k in range(self._nblocks):
            ents = self._dir_block(k)
            starts.append(total)
            total += len(ents)
            if prev is not None and not prev < ents[0][0]:
                raise FormatError(f"directory nid {self.ino}: block {k} names not sorted after previous block")
            prev = ents[-1][0]
            for name, nid, _ in ents:
                if name == b".":
                    dot = nid
                elif name == b"..":
                    dotdot = nid
        if self.size and dot is not None and dot != self.ino:
            raise FormatError(f"directory nid {self.ino}: '.' points to nid {dot}")
        starts.append(total)
        return starts, dotdot

    @property
    def dotdot_nid(self) -> int | None:
        return self._dir_index[1]

    def lookup(self, name: bytes) -> "InodeV6":
        self._need_dir()
        name = bytes(name)
        if not name or b"/" in name:
            raise NotFound(f"directory nid {self.ino}: invalid name {name!r}")
        lo, hi = 0, self._nblocks - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            ents = self._dir_block(mid)
            if name < ents[0][0]:
                hi = mid - 1
            elif name > ents[-1][0]:
                lo = mid + 1
            else:
                names = [e[0] for e in ents]
                i = bisect.bisect_left(names, name)
                if i < len(ents) and names[i] == name:
                    return self.fs._node(ents[i][1], f"directory nid {self.ino} entry {name!r}")
                break
        raise NotFound(f"directory nid {self.ino}: no entry {name!r}")

    def readdir(self, offset: int = 0) -> Iterator[tuple[int, bytes, "InodeV6"]]:
        self._need_dir()
        starts, _ = self._dir_index
        if offset < 0:
            offset = 0
        k = max(bisect.bisect_right(starts, offset) - 1, 0)
        for blk in range(k, self._nblocks):
            base = starts[blk]
            for i, (name, nid, _ft) in enumerate(self._dir_block(blk)):
                idx = base + i
                if idx < offset or name in (b".", b".."):
                    continue
                yield idx + 1, name, self.fs._node(nid, f"directory nid {self.ino} entry {name!r}")

    def dirent_types(self) -> dict[bytes, int]:
        """name -> dirent file type (for consistency checks)."""
        out = {}
        for k in range(self._nblocks):
            for name, _nid, ft in self._dir_block(k):
                out[name] = ft
        return out

    # -- xattrs ---------------------------------------------------------------------------------

    def xattrs(self) -> dict[bytes, bytes]:
        if not self.xattr_size:
            return {}
        where = f"inode nid {self.ino} xattrs"
        data = self.fs._img.read(self.offset + self.inode_size, self.xattr_size, where)
        hdr = ErofsXattrIbodyHeader.parse(data, 0)
        try:
            hdr.validate()
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        out: dict[bytes, bytes] = {}
        pos = ErofsXattrIbodyHeader.SIZE
        end = len(data)
        while pos + ErofsXattrEntry.SIZE <= end:
            ent = ErofsXattrEntry.parse(data, pos)
            if ent.e_name_len == 0 and ent.e_name_index == 0 and ent.e_value_size == 0:
                break  # zero padding
            try:
                ent.validate()
            except FormatError as exc:
                raise FormatError(f"{where} at +{pos}: {exc}") from None
            nstart = pos + ErofsXattrEntry.SIZE
            vstart = nstart + ent.e_name_len
            vend = vstart + ent.e_value_size
            if vend > end:
                raise FormatError(f"{where} at +{pos}: entry ({ent.e_name_len}+{ent.e_value_size} bytes) overruns")
            name = C.EROFS_XATTR_PREFIXES[ent.e_name_index] + data[nstart:vstart]
            out[name] = data[vstart:vend]
            pos = (vend + 3) & ~3
        return out

    # -- chunks -----------------------------------------------------------------------------------

    @property
    def chunk_count(self) -> int:
        if not self.is_reg() or self.layout != C.EROFS_INODE_CHUNK_BASED:
            return 0
        cs = self.fs.chunk_size
        return (self.size + cs - 1) // cs

    def _chunk_index_offset(self) -> int:
        return self.offset + ((self.inode_size + self.xattr_size + 7) & ~7)

    def chunk_addrs(self, first: int = 0, count: int | None = None) -> list[ErofsInodeChunkIndex]:
        total = self.chunk_count
        if count is None:
            count = total - first
        if first < 0 or count < 0 or first + count > total:
            raise FormatError(f"inode nid {self.ino}: chunk index range {first}+{count} beyond {total}")
        return self.fs._img.parse_array(
            ErofsInodeChunkIndex,
            self._chunk_index_offset() + first * ErofsInodeChunkIndex.SIZE,
            count,
            f"inode nid {self.ino} chunk indexes",
        )

    def chunk_refs(self) -> list[tuple[int, int, int] | None]:
        """``(blob index, ci index, blkaddr)`` of every chunk in file order (``None`` = hole),
        checked against the blob table; cheaper than :meth:`chunks` (no chunk-table lookup)."""
        blobs = self.fs.blobs
        out: list[tuple[int, int, int] | None] = []
        for i, addr in enumerate(self.chunk_addrs()):
            if addr.blkaddr == EROFS_NULL_ADDR:
                out.append(None)
                continue
            where = f"inode nid {self.ino} chunk {i}"
            bi = addr.blob_index
            if bi < 0 or bi >= len(blobs):
                raise FormatError(f"{where}: blob index {bi} out of range ({len(blobs)} blobs)")
            ci = addr.ci_index
            if ci >= blobs[bi].chunk_count:
                raise FormatError(f"{where}: chunk index {ci} >= chunk_count {blobs[bi].chunk_count} of blob {bi}")
            out.append((bi, ci, addr.blkaddr))
        return out

    @cached_property
    def _chunk_list(self) -> tuple[ChunkInfo | None, ...]:
        """Every chunk of the file in order (``None`` = hole), resolved and validated once."""
        fs = self.fs
        fsize = self.size
        cs = fs.chunk_size
        bs = fs.block_size
        out: list[ChunkInfo | None] = []
        for i, ref in enumerate(self.chunk_refs()):
            if ref is None:
                out.append(None)
                continue
            clen = min(cs, fsize - i * cs)
            where = f"inode nid {self.ino} chunk {i}"
            bi, ci, blkaddr = ref
            blob = fs.blobs[bi]
            info = fs.chunk_info(bi, ci)
            if info is None:
                uoff = blkaddr * bs
                if blob.features & BlobFeatures.TARFS:
                    # tarfs: the blob is the uncompressed tar, data sits at the same offset
                    info = ChunkInfo(bi, ci, b"", 0, uoff, clen, uoff, clen)
                else:
                    info = ChunkInfo(bi, ci, b"", 0, 0, 0, uoff, clen)
            else:
                if info.uncompressed_offset != blkaddr * bs:
                    raise FormatError(
                        f"{where}: blkaddr {blkaddr} disagrees with chunk table uncompressed_offset "
                        f"{info.uncompressed_offset}"
                    )
                if info.uncompressed_size < clen:
                    raise FormatError(
                        f"{where}: chunk uncompressed_size {info.uncompressed_size} < {clen} bytes of file data"
                    )
            out.append(info)
        return tuple(out)

    def chunks(self, offset: int, size: int) -> BlobIoVec:
        vec = BlobIoVec()
        if not self.is_reg():
            return vec
        fsize = self.size
        if offset < 0 or size <= 0 or offset >= fsize:
            return vec
        end = min(offset + size, fsize)
        cs = self.fs.chunk_size
        first = offset // cs
        last = (end - 1) // cs
        infos = self._chunk_list
        blobs = self.fs.blobs
        for i in range(first, last + 1):
            cstart = i * cs
            lo = max(offset, cstart) - cstart
            hi = min(end, cstart + cs) - cstart
            info = infos[i]
            if info is None:
                vec.append(BlobIoDesc(None, None, lo, hi - lo))
            else:
                vec.append(BlobIoDesc(blobs[info.blob_index], info, lo, hi - lo))
        return vec
