"""RAFS v5 (legacy) reader behind :class:`rafs.base.Rafs` (registered by its ``version``)."""

from __future__ import annotations

import stat
from functools import cached_property
from typing import Iterator

from rafs.errors import FormatError, NotFound
from rafs.layout import constants as C
from rafs.layout.v5 import (
    RafsV5ChunkInfo,
    RafsV5ExtBlobEntry,
    RafsV5Inode,
    RafsV5SuperBlock,
    parse_v5_blob_table,
    parse_v5_xattrs,
    rafsv5_align,
)
from rafs.base import LRU, BootstrapImage, Inode, InodeAttr, Rafs, check_name, substitute_blob_id
from storage.records import BlobIoDesc, BlobIoVec, ChunkInfo
from storage.structs import Scalar


class RafsV5(Rafs):
    version = 5
    root_ino = C.RAFSV5_ROOT_INODE

    def __init__(self, img: BootstrapImage, *, blob_id_hint: str | None = None) -> None:
        super().__init__(img)
        sb = img.parse(RafsV5SuperBlock, 0, "v5 superblock")
        sb.validate(img.size)
        self.sb = sb
        self.flags = sb.s_flags
        self.chunk_size = sb.s_block_size
        self.inode_count = sb.s_inodes_count
        self.compressor = C.compressor_from_flags(sb.s_flags)
        self.digester = C.digester_from_flags(sb.s_flags)
        self.inode_table_entries = sb.s_inode_table_entries

        ext_entries = img.parse_array(
            RafsV5ExtBlobEntry, sb.s_extended_blob_table_offset, sb.s_extended_blob_table_entries,
            "v5 extended blob table",
        ) if sb.s_extended_blob_table_entries else []
        table = parse_v5_blob_table(img.read(sb.s_blob_table_offset, sb.s_blob_table_size, "v5 blob table"))
        if len(table) > C.RAFS_MAX_BLOBS:
            raise FormatError(f"v5 blob table: {len(table)} blobs, more than {C.RAFS_MAX_BLOBS}")
        if ext_entries and len(ext_entries) < len(table):
            raise FormatError(
                f"v5 extended blob table: {len(ext_entries)} entries for {len(table)} blobs"
            )
        blobs = []
        for i, ent in enumerate(table):
            ext = ext_entries[i] if ext_entries else None
            if ext is not None:
                try:
                    ext.validate()
                except FormatError as exc:
                    raise FormatError(f"v5 extended blob table entry {i}: {exc}") from None
            blobs.append(ent.blob_info(
                i, ext, chunk_size=self.chunk_size, compressor=self.compressor, digester=self.digester,
                blob_id=substitute_blob_id(ent.blob_id, 0, len(table), blob_id_hint)))
        self.blobs = blobs
        self.blob_table = table
        self.has_ext_blob_table = bool(ext_entries)

        prefetch = []
        if sb.s_prefetch_table_entries:
            for ino in Scalar.u32_array(
                img.read(sb.s_prefetch_table_offset, sb.s_prefetch_table_entries * 4, "v5 prefetch table"),
                0,
                sb.s_prefetch_table_entries,
            ):
                if ino == 0:
                    break
                if ino > self.inode_table_entries:
                    raise FormatError(f"v5 prefetch table: inode {ino} beyond the inode table")
                prefetch.append(ino)
        self.prefetch_inos = prefetch
        if self.inode_table_entries == 0:
            raise FormatError("v5 superblock: empty inode table")
        if not self.root.is_dir():
            raise FormatError(f"v5 root inode: not a directory (mode {self.root.mode:o})")

    # -- inodes -----------------------------------------------------------------------------

    def _offset_of(self, index: int, where: str, exc=FormatError) -> int:
        """Bootstrap offset of inode-table entry ``index`` (1-based)."""
        if not 1 <= index <= self.inode_table_entries:
            raise exc(f"{where}: inode {index} outside the inode table (1..{self.inode_table_entries})")
        (raw,) = Scalar.u32_array(
            self._img.read(self.sb.s_inode_table_offset + (index - 1) * 4, 4, "v5 inode table"), 0, 1
        )
        off = raw << 3
        if raw == 0:
            raise exc(f"{where}: inode {index} has no inode table entry")
        if off < C.RAFSV5_SUPERBLOCK_SIZE or off + C.RAFSV5_INODE_SIZE > self._img.size:
            raise FormatError(f"{where}: inode {index} offset {off} outside the bootstrap")
        return off

    def _load_inode(self, ino: int) -> "InodeV5":
        off = self._offset_of(ino, "v5 inode", NotFound)
        node = InodeV5(self, off)
        if node.raw.i_ino != ino:
            raise FormatError(f"v5 inode table entry {ino} holds an inode numbered {node.raw.i_ino}")
        return node

    def _child(self, index: int, where: str) -> "InodeV5":
        """The inode at inode-table index ``index`` as a directory child (may be a hard link)."""
        return self._children.get_or_make(index, lambda: InodeV5(self, self._offset_of(index, where)))

    @cached_property
    def _children(self):
        return LRU(16384)

    def _check_parent(self, child: Inode, parent: Inode, path: str) -> None:
        if child.raw.i_parent != parent.ino:  # type: ignore[attr-defined]
            raise FormatError(
                f"{path}: i_parent = {child.raw.i_parent}, but it is listed under inode {parent.ino}"  # type: ignore[attr-defined]
            )

    def chunk_table(self) -> Iterator[ChunkInfo]:
        seen = set()
        for _path, node in self.walk():
            if node.is_reg():
                for info, _foff in node.chunk_infos():
                    key = (info.blob_index, info.index, info.digest)
                    if key not in seen:
                        seen.add(key)
                        yield info

    def info(self) -> dict:
        sb = self.sb
        return {
            "version": 5,
            "block_size": sb.s_block_size,
            "chunk_size": self.chunk_size,
            "flags": self.flags,
            "flag_names": [f.name for f in C.RafsSuperFlags if f.value & self.flags and f.name],
            "root_ino": self.root_ino,
            "inode_count": self.inode_count,
            "inode_table": [sb.s_inode_table_offset, sb.s_inode_table_entries],
            "blob_table": [sb.s_blob_table_offset, sb.s_blob_table_size],
            "extended_blob_table": [sb.s_extended_blob_table_offset, sb.s_extended_blob_table_entries],
            "prefetch_table": [sb.s_prefetch_table_offset, sb.s_prefetch_table_entries],
            "prefetch_inos": list(self.prefetch_inos),
        }


class InodeV5(Inode):
    """A v5 inode: 128-byte record followed by name, symlink, xattrs and chunk infos."""

    def __init__(self, fs: RafsV5, offset: int) -> None:
        raw = fs._img.parse(RafsV5Inode, offset, "v5 inode")
        where = f"v5 inode at {offset}"
        try:
            raw.validate()
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        super().__init__(fs, raw.i_ino)
        self.fs: RafsV5 = fs
        self.raw = raw
        self.offset = offset
        if raw.i_ino == 0 or raw.i_ino > fs.inode_table_entries:
            raise FormatError(f"{where}: i_ino = {raw.i_ino} outside the inode table")
        fmt = stat.S_IFMT(raw.i_mode)
        if fmt not in C.EROFS_FT_FROM_MODE:
            raise FormatError(f"{where}: i_mode = {raw.i_mode:o}: unknown file type")
        self.name_offset = offset + C.RAFSV5_INODE_SIZE
        self.symlink_offset = self.name_offset + rafsv5_align(raw.i_name_size)
        self.xattr_offset = self.symlink_offset + rafsv5_align(raw.i_symlink_size)
        if self.xattr_offset > fs._img.size:
            raise FormatError(f"{where}: name/symlink beyond the bootstrap")
        if fmt == stat.S_IFLNK and not raw.i_flags & C.RafsV5InodeFlags.SYMLINK and raw.i_symlink_size == 0:
            raise FormatError(f"{where}: symlink without a target")
        if fmt == stat.S_IFREG:
            if raw.i_child_count > fs._img.size // C.RAFSV5_CHUNK_INFO_SIZE:
                raise FormatError(f"{where}: i_child_count = {raw.i_child_count} chunks exceeds the bootstrap")
        elif fmt == stat.S_IFDIR:
            if raw.i_child_count > fs.inode_table_entries:
                raise FormatError(f"{where}: i_child_count = {raw.i_child_count} exceeds the inode table")
            if raw.i_child_count and (
                raw.i_child_index == 0 or raw.i_child_index + raw.i_child_count - 1 > fs.inode_table_entries
            ):
                raise FormatError(
                    f"{where}: children {raw.i_child_index}+{raw.i_child_count} outside the inode table"
                )

    @property
    def mode(self) -> int:
        return self.raw.i_mode

    @property
    def size(self) -> int:
        return self.raw.i_size

    @cached_property
    def name(self) -> bytes:
        return self.fs._img.read(self.name_offset, self.raw.i_name_size, f"v5 inode {self.ino} name")

    def attr(self) -> InodeAttr:
        r = self.raw
        return InodeAttr(
            ino=self.ino,
            mode=r.i_mode,
            uid=r.i_uid,
            gid=r.i_gid,
            size=r.i_size,
            nlink=r.i_nlink,
            rdev=r.i_rdev,
            mtime=r.i_mtime,
            mtime_nsec=r.i_mtime_nsec,
            blocks=r.i_blocks,
        )

    @property
    def hardlink_key(self) -> int | None:
        if self.is_reg() and self.raw.i_nlink > 1:
            return self.ino
        return None

    def readlink(self) -> bytes:
        if not self.is_symlink():
            raise FormatError(f"v5 inode {self.ino}: readlink on a non-symlink")
        target = self.fs._img.read(self.symlink_offset, self.raw.i_symlink_size, f"v5 inode {self.ino} symlink")
        if not target or b"\0" in target:
            raise FormatError(f"v5 inode {self.ino}: invalid symlink target {target!r}")
        return target

    @cached_property
    def _xattr_table(self) -> tuple[dict[bytes, bytes], int]:
        if not self.raw.i_flags & C.RafsV5InodeFlags.XATTR:
            return {}, 0
        return parse_v5_xattrs(self.fs._img.buffer(), self.xattr_offset, self.fs._img.size)

    def xattrs(self) -> dict[bytes, bytes]:
        return dict(self._xattr_table[0])

    # -- directories ------------------------------------------------------------------------

    def _child_at(self, i: int) -> "InodeV5":
        node = self.fs._child(self.raw.i_child_index + i, f"v5 directory {self.ino} child {i}")
        check_name(node.name, f"v5 directory {self.ino} child {i}")
        return node

    def lookup(self, name: bytes) -> "InodeV5":
        self._need_dir()
        name = bytes(name)
        if name == b".":
            return self
        if name == b"..":
            return self.fs.inode(self.raw.i_parent or self.ino)  # type: ignore[return-value]
        lo, hi = 0, self.raw.i_child_count - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            node = self._child_at(mid)
            if node.name == name:
                return node
            if node.name < name:
                lo = mid + 1
            else:
                hi = mid - 1
        raise NotFound(f"v5 directory {self.ino}: no entry {name!r}")

    def readdir(self, offset: int = 0) -> Iterator[tuple[int, bytes, "InodeV5"]]:
        self._need_dir()
        prev = None
        for i in range(max(offset, 0), self.raw.i_child_count):
            node = self._child_at(i)
            if prev is not None and not prev < node.name:
                raise FormatError(f"v5 directory {self.ino}: children not sorted ({prev!r} before {node.name!r})")
            prev = node.name
            yield i + 1, node.name, node

    # -- chunks -----------------------------------------------------------------------------

    @cached_property
    def _chunk_offset(self) -> int:
        return self.xattr_offset + self._xattr_table[1]

    def chunk_infos(self) -> list[tuple[ChunkInfo, int]]:
        """All (chunk, file_offset) of a regular file, validated, in file order."""
        return list(self._chunk_list)

    @cached_property
    def _chunk_list(self) -> tuple[tuple[ChunkInfo, int], ...]:
        if not self.is_reg():
            return []
        fs = self.fs
        where = f"v5 inode {self.ino}"
        ents = fs._img.parse_array(
            RafsV5ChunkInfo, self._chunk_offset, self.raw.i_child_count, f"{where} chunk infos"
        )
        out = []
        pos = 0
        for i, e in enumerate(ents):
            try:
                e.validate(fs.chunk_size, len(fs.blobs))
            except FormatError as exc:
                raise FormatError(f"{where} chunk {i}: {exc}") from None
            blob = fs.blobs[e.blob_index]
            if fs.has_ext_blob_table and e.index >= blob.chunk_count:
                raise FormatError(f"{where} chunk {i}: index {e.index} >= chunk_count {blob.chunk_count}")
            if e.file_offset < pos or e.file_offset + e.uncompressed_size > self.size:
                raise FormatError(
                    f"{where} chunk {i}: file_offset {e.file_offset}+{e.uncompressed_size} overlaps or "
                    f"exceeds the file (size {self.size}, previous end {pos})"
                )
            pos = e.file_offset + e.uncompressed_size
            out.append(
                (
                    e.chunk_info(),
                    e.file_offset,
                )
            )
        return tuple(out)

    def chunks(self, offset: int, size: int) -> BlobIoVec:
        vec = BlobIoVec()
        if not self.is_reg():
            return vec
        fsize = self.size
        if offset < 0 or size <= 0 or offset >= fsize:
            return vec
        end = min(offset + size, fsize)
        pos = offset
        lst = self._chunk_list
        # first chunk that may overlap: chunks are sorted by file offset and non-overlapping
        lo, hi = 0, len(lst)
        while lo < hi:
            mid = (lo + hi) // 2
            if lst[mid][1] + lst[mid][0].uncompressed_size <= offset:
                lo = mid + 1
            else:
                hi = mid
        for info, foff in lst[lo:]:
            cend = foff + info.uncompressed_size
            if cend <= pos:
                continue
            if foff >= end:
                break
            if foff > pos:
                vec.append(BlobIoDesc(None, None, 0, foff - pos))
                pos = foff
            hi = min(end, cend)
            vec.append(BlobIoDesc(self.fs.blobs[info.blob_index], info, pos - foff, hi - pos))
            pos = hi
            if pos >= end:
                break
        if pos < end:
            vec.append(BlobIoDesc(None, None, 0, end - pos))
        return vec
