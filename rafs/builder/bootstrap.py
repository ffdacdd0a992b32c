"""RAFS v6 bootstrap writer (an EROFS image whose regular files are chunk-based).

Layout (``Bootstrap::v6_dump``)::

    0..1024 zeros | SB @1024 | ext SB @1152 | device slots @1408 (128 B/blob)
    | blob table @align4k (256 B/blob) | prefetch table (u32 nids) | pad to 4K = meta_addr
    | meta_addr+0..4095 unused | root inode at meta_addr+4096 (nid 128) | inodes, xattrs,
    | dirent blocks, tails, chunk indexes ... | pad 4K | chunk table (80 B, digest order) | pad 4K

Inodes are placed breadth-first (children sorted by name); small inodes and inline tails
reuse the free tail of partly used blocks.  Directories and symlinks use FLAT_INLINE when the
inode + xattrs + tail fit one block, else FLAT_PLAIN; regular files are CHUNK_BASED with
one 8-byte chunk index per chunk (``blob_index + 1`` in the device byte).  Every inode is
written extended (64 B: mtime, 32-bit ids), as upstream's tar and merge builders do.
All structs come from :mod:`rafs.layout`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from rafs.builder.blob import BlobRecord, ChunkStore, round_up
from rafs.builder.tree import ChunkRef, Inode, Tree
from rafs.errors import BuildError, FormatError
from rafs.layout import (
    EROFS_FT_FROM_MODE,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_INODE_LAYOUT_COMPACT,
    EROFS_INODE_LAYOUT_EXTENDED,
    ErofsDeviceSlot,
    ErofsDirent,
    ErofsInodeChunkIndex,
    ErofsInodeCompact,
    ErofsInodeExtended,
    ErofsXattrEntry,
    ErofsXattrIbodyHeader,
    RafsSuperFlags,
    RafsV5ChunkInfo,
    RafsV6Blob,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
    encode_chunk_format,
    flags_from_algorithms,
    inode_format,
    xattr_split_name,
)
from rafs.layout.constants import (
    EROFS_DEVT_SLOT_OFFSET,
    EROFS_FEATURE_COMPAT_RAFS_V6,
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
    RAFS_MAX_SYMLINK,
    RAFSV6_DEVSLOT_OFFSET,
    RAFSV6_EXT_SUPER_OFFSET,
    RAFSV6_FEATURE_INCOMPAT,
    V6_BLOCK_SEG_ALIGNMENT,
)
from storage.records import BlobFeatures, Compressor, Digester

BLOCK_SIZE = 4096
BLOCK_BITS = 12
DIRENT_SIZE = ErofsDirent.SIZE
_FRAGMENT_MIN = 64
_U64 = (1 << 64) - 1  # i_mtime is a signed time64 stored as __le64
#: first bytes of ``i_reserved2`` of an implicit directory (see :attr:`Inode.implicit`): a
#: builder-private mark that readers and the kernel ignore; ``merge`` reads it back so a
#: layer's implicit directories never override a lower layer's attributes
IMPLICIT_DIR_MARK = b"nyI\x01"


# positional packers of the hot structs (a changed field order in rafs.layout fails at import)
_INODE = ErofsInodeExtended.packer("i_format", "i_xattr_icount", "i_mode", "i_reserved", "i_size", "i_u",
                                   "i_ino", "i_uid", "i_gid", "i_mtime", "i_mtime_nsec", "i_nlink", "i_reserved2")
_CHUNK_INDEX = ErofsInodeChunkIndex.packer("advise", "device_id", "blkaddr")
_INODE_COMPACT = ErofsInodeCompact.packer("i_format", "i_xattr_icount", "i_mode", "i_nlink", "i_size",
                                          "i_reserved", "i_u", "i_ino", "i_uid", "i_gid", "i_reserved2")
_DIRENT = ErofsDirent.packer("e_nid", "e_nameoff", "e_file_type", "e_reserved")
_CHUNK_INFO = RafsV5ChunkInfo.packer("block_id", "blob_index", "flags", "compressed_size", "uncompressed_size",
                                     "compressed_offset", "uncompressed_offset", "file_offset", "index", "crc32")


@dataclass(slots=True)
class BootstrapOptions:
    """Superblock-level choices. Defaults: 1 MiB chunks, zstd, blake3, explicit uid/gid."""

    chunk_size: int = 0x100000
    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    explicit_uidgid: bool = True
    #: paths (``/usr/bin``) whose inodes go to the prefetch table
    prefetch: list[str] = field(default_factory=list)
    #: upstream's directory-builder rule: 32-byte compact inodes unless uid/gid/nlink > 0xFFFF,
    #: size > 4 GiB, rdev != 0 or a ``.pyc`` name (compact inodes carry no mtime).  Off by
    #: default: every inode is extended, as upstream's tar builders and merge write them.
    compact_inodes: bool = False
    #: chunks listed in the chunk table although no file points at them, with the file offset
    #: they had: ``nydusify optimize`` keeps each reused blob's table whole (every chunk
    #: ``0..n-1``), so that readers take the blob's layout from the table instead of a walk
    #: of every file (an erofs mount, :func:`rafs.fs.instance.blob_chunk_tables`)
    table_extra: list[tuple[ChunkRef, int]] = field(default_factory=list)


def new_encode_dev(rdev: int) -> int:
    """Kernel ``new_encode_dev`` of a dev_t (what EROFS stores in ``i_u``)."""
    import os

    major, minor = os.major(rdev), os.minor(rdev)
    if major > 0xFFF or minor > 0xF_FFFF:
        raise BuildError(f"device number {major}:{minor} does not fit EROFS's 32-bit rdev")
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)


def encode_xattrs(xattrs: dict[bytes, bytes]) -> bytes:
    """Inline xattr region (header + entries, each 4-aligned); b"" when there are none."""
    if not xattrs:
        return b""
    out = bytearray(ErofsXattrIbodyHeader().pack())
    for name in sorted(xattrs):
        value = xattrs[name]
        try:
            index, suffix = xattr_split_name(name)
        except FormatError as exc:
            raise BuildError(f"xattr {name!r}: unsupported name prefix") from exc
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise BuildError(f"xattr {name!r} too large")
        out += ErofsXattrEntry(e_name_len=len(suffix), e_name_index=index, e_value_size=len(value)).pack()
        out += suffix + value
        out += bytes(-len(out) % 4)
    return bytes(out)


def _dirent_names(node: Inode) -> list[bytes]:
    assert node.entries is not None
    return sorted([b".", b"..", *node.entries])


def dir_size(names: list[bytes], bs: int = BLOCK_SIZE) -> int:
    """Directory ``i_size``: dirents + names, a new block whenever one would cross."""
    size = 0
    used = 0
    for name in names:
        need = DIRENT_SIZE + len(name)
        if used + need > bs:
            size += bs - used
            used = 0
        used += need
        size += need
    return size


@dataclass(slots=True)
class _Slot:
    inode: Inode
    ino: int
    nlink: int = 0
    offset: int = 0
    layout: int = EROFS_INODE_FLAT_PLAIN
    data_offset: int = 0  # first full data block (dir/symlink), absolute
    xattr_bytes: bytes = b""
    data_size: int = 0   # dir i_size / symlink length
    name: bytes = b""    # first name (for the .pyc rule)
    isize: int = ErofsInodeExtended.SIZE


class _Allocator:
    """Bump allocator with first-fit reuse of partly used blocks."""

    def __init__(self, start: int, bs: int) -> None:
        self.pos = start
        self.bs = bs
        self.free: list[list[int]] = []  # [offset, size] within one block

    def _retire_block(self) -> None:
        rem = -self.pos % self.bs
        if rem >= _FRAGMENT_MIN:
            self.free.append([self.pos, rem])
        self.pos += rem

    def from_fragments(self, size: int) -> int:
        for frag in self.free:
            if frag[1] >= size:
                off = frag[0]
                used = round_up(size, 32)
                frag[0] += used
                frag[1] -= used
                if frag[1] < _FRAGMENT_MIN:
                    self.free.remove(frag)
                return off
        return 0

    def sequential(self, size: int) -> int:
        off = self.pos
        self.pos = round_up(self.pos + size, 32)
        return off

    def in_one_block(self, size: int) -> int:
        """``size`` bytes (≤ bs) that must not cross a block boundary."""
        off = self.from_fragments(size)
        if off:
            return off
        if self.pos % self.bs + size > self.bs:
            self._retire_block()
        return self.sequential(size)

    def blocks(self, size: int) -> int:
        self._retire_block()
        off = self.pos
        self.pos += round_up(size, self.bs)
        return off


def write_bootstrap(tree: Tree, store: ChunkStore, opts: BootstrapOptions) -> bytes:
    """Serialize ``tree`` (whose files reference chunks in ``store``) as a v6 bootstrap."""
    bs = BLOCK_SIZE
    # -- which blobs are referenced, in table order --------------------------------------
    slots: list[_Slot] = []
    by_id: dict[int, _Slot] = {}
    order: list[tuple[bytes, Inode]] = tree.bfs()
    parents: dict[int, Inode] = {id(tree.root): tree.root}
    for path, node in order:
        if node.is_dir and node.entries:
            for child in node.entries.values():
                if child.is_dir:
                    parents[id(child)] = node
        slot = by_id.get(id(node))
        if slot is None:
            slot = _Slot(node, len(slots) + 1, name=path.rsplit(b"/", 1)[-1])
            by_id[id(node)] = slot
            slots.append(slot)
        slot.nlink += 1
    # only blobs holding chunks of this tree (a blob without chunks cannot be an EROFS device)
    used_blobs = sorted({ref.blob_index for s in slots if s.inode.is_reg for ref in s.inode.chunks})
    remap = {old: new for new, old in enumerate(used_blobs)}
    blobs: list[BlobRecord] = [store.blobs[i] for i in used_blobs]
    if len(blobs) > 254:
        raise BuildError(f"image references {len(blobs)} blobs, at most 254 are possible")

    # -- fixed tables ---------------------------------------------------------------------
    devslot_end = RAFSV6_DEVSLOT_OFFSET + ErofsDeviceSlot.SIZE * len(blobs)
    blob_table_offset = round_up(devslot_end, bs)
    blob_table_size = RafsV6Blob.SIZE * len(blobs)
    prefetch_slots = _prefetch_slots(tree, opts.prefetch, by_id)
    prefetch_offset = blob_table_offset + blob_table_size
    prefetch_size = 4 * len(prefetch_slots)
    meta_addr = round_up(prefetch_offset + prefetch_size, bs)

    # -- layout ---------------------------------------------------------------------------
    alloc = _Allocator(meta_addr + bs, bs)
    for slot in slots:
        node = slot.inode
        slot.xattr_bytes = encode_xattrs(node.xattrs)
        if node.is_dir:
            # dirs: nlink = 2 + subdirectories
            slot.nlink = 2 + sum(1 for c in node.entries.values() if c.is_dir)  # type: ignore[union-attr]
            slot.data_size = dir_size(_dirent_names(node), bs)
        elif node.is_symlink:
            if len(node.symlink) >= RAFS_MAX_SYMLINK or not node.symlink:
                raise BuildError(f"symlink target of {len(node.symlink)} bytes is not supported")
            slot.data_size = len(node.symlink)
        if opts.compact_inodes and _compact_ok(slot):
            slot.isize = ErofsInodeCompact.SIZE
        isize = slot.isize + len(slot.xattr_bytes)
        if node.is_dir or node.is_symlink:
            tail = slot.data_size % bs
            if tail and isize + tail <= bs:
                slot.layout = EROFS_INODE_FLAT_INLINE
                slot.offset = alloc.in_one_block(isize + tail)
                full = slot.data_size - tail
                slot.data_offset = alloc.blocks(full) if full else 0
            else:
                slot.layout = EROFS_INODE_FLAT_PLAIN
                slot.offset = alloc.from_fragments(isize) or alloc.sequential(isize)
                slot.data_offset = alloc.blocks(slot.data_size)
        elif node.is_reg:
            slot.layout = EROFS_INODE_CHUNK_BASED
            expect = -(-node.size // opts.chunk_size)
            if len(node.chunks) != expect:
                raise BuildError(f"file of {node.size} bytes has {len(node.chunks)} chunks, expected {expect}")
            total = round_up(isize, 8) + 8 * len(node.chunks)
            slot.offset = alloc.from_fragments(total) or alloc.sequential(total)
        else:
            slot.layout = EROFS_INODE_FLAT_PLAIN
            slot.offset = alloc.from_fragments(isize) or alloc.sequential(isize)
        if (slot.offset - meta_addr) % 32:
            raise AssertionError("inode not slot aligned")
    meta_end = round_up(alloc.pos, bs)

    # -- chunk table ----------------------------------------------------------------------
    table: dict[tuple[bytes, int], tuple[ChunkRef, int]] = {}
    for slot in slots:
        if slot.inode.is_reg:
            for i, ref in enumerate(slot.inode.chunks):
                c = store.chunk(ref)
                table.setdefault((c.digest, remap[ref.blob_index]), (ref, i * opts.chunk_size))
    for ref, file_offset in opts.table_extra:
        if ref.blob_index in remap:  # a blob no file uses any more is not in the image
            table.setdefault((store.chunk(ref).digest, remap[ref.blob_index]), (ref, file_offset))
    chunk_table_offset = meta_end if table else 0
    chunk_table_size = RafsV5ChunkInfo.SIZE * len(table)
    total_size = round_up(meta_end + chunk_table_size, bs)
    buf = bytearray(total_size)

    # -- inodes, xattrs, data -------------------------------------------------------------
    def nid(s: _Slot) -> int:
        return (s.offset - meta_addr) // 32

    has_xattr = False
    for slot in slots:
        node = slot.inode
        icount = (len(slot.xattr_bytes) - 12) // 4 + 1 if slot.xattr_bytes else 0
        has_xattr |= bool(slot.xattr_bytes)
        i_u = 0
        size = 0
        ftype = stat.S_IFMT(node.mode)
        if node.is_dir or node.is_symlink:
            size = slot.data_size
            data = _dir_bytes(node, slot, nid(by_id[id(parents[id(node)])]), by_id, nid, bs) if node.is_dir else node.symlink
            tail = size % bs if slot.layout == EROFS_INODE_FLAT_INLINE else 0
            full = size - tail
            if full:
                buf[slot.data_offset:slot.data_offset + full] = data[:full]
            i_u = slot.data_offset // bs if full else 0
            if tail:
                t = slot.offset + slot.isize + len(slot.xattr_bytes)
                buf[t:t + tail] = data[full:]
        elif node.is_reg:
            size = node.size
            i_u = _chunk_format(node, store, opts.chunk_size)
            pos = slot.offset + round_up(slot.isize + len(slot.xattr_bytes), 8)
            for ref in node.chunks:
                c = store.chunk(ref)
                blob_index, ci, blkaddr = remap[ref.blob_index], c.index, c.uncompressed_offset // bs
                if blob_index >= 255 or ci >= 1 << 24 or blkaddr >= 1 << 32:
                    try:
                        ErofsInodeChunkIndex.encode(blob_index, ci, blkaddr)
                    except FormatError as exc:
                        raise BuildError(f"chunk of a {node.size}-byte file cannot be addressed: {exc}") from exc
                _CHUNK_INDEX.pack_into(buf, pos, ci & 0xFFFF, ((ci >> 16) << 8) | (blob_index + 1), blkaddr)
                pos += 8
        elif ftype in (stat.S_IFCHR, stat.S_IFBLK):
            i_u = new_encode_dev(node.rdev)
        if slot.nlink > 0xFFFFFFFF:
            raise BuildError("too many links")
        mark = IMPLICIT_DIR_MARK if node.implicit and node.is_dir else b""
        if slot.isize == ErofsInodeCompact.SIZE:
            _INODE_COMPACT.pack_into(buf, slot.offset, inode_format(EROFS_INODE_LAYOUT_COMPACT, slot.layout), icount,
                                     node.mode & 0xFFFF, slot.nlink, size, 0, i_u, slot.ino, node.uid, node.gid, mark)
        else:
            _INODE.pack_into(buf, slot.offset, inode_format(EROFS_INODE_LAYOUT_EXTENDED, slot.layout), icount,
                             node.mode & 0xFFFF, 0, size, i_u, slot.ino, node.uid, node.gid, node.mtime & _U64,
                             node.mtime_nsec, slot.nlink, mark)
        if slot.xattr_bytes:
            x = slot.offset + slot.isize
            buf[x:x + len(slot.xattr_bytes)] = slot.xattr_bytes

    # -- chunk table (digest order) ----------------------------------------------------------
    pos = chunk_table_offset
    for (digest, blob_index), (ref, file_offset) in sorted(table.items()):
        c = store.chunk(ref)
        _CHUNK_INFO.pack_into(buf, pos, c.digest, blob_index, c.flags, c.compressed_size, c.uncompressed_size,
                              c.compressed_offset, c.uncompressed_offset, file_offset, c.index, 0)
        pos += RafsV5ChunkInfo.SIZE

    # -- devices, blob table, prefetch ----------------------------------------------------------
    mapped = round_up(total_size, V6_BLOCK_SEG_ALIGNMENT)
    s_blocks = 0
    inline_digest = bool(blobs)
    for i, rec in enumerate(blobs):
        info = rec.info
        blob_id = info.blob_id.encode()
        if len(blob_id) != 64:
            raise BuildError(f"blob id {info.blob_id!r} is not 64 hex characters")
        blocks = -(-info.uncompressed_size // bs)
        ErofsDeviceSlot(blob_id=blob_id, blocks=blocks, mapped_blkaddr=mapped // bs).pack_into(
            buf, RAFSV6_DEVSLOT_OFFSET + i * ErofsDeviceSlot.SIZE)
        mapped = round_up(mapped + blocks * bs, V6_BLOCK_SEG_ALIGNMENT)
        s_blocks += blocks
        inline_digest &= bool(info.features & BlobFeatures.INLINED_CHUNK_DIGEST)
        RafsV6Blob(
            blob_id=blob_id, blob_index=i, chunk_size=info.chunk_size, chunk_count=info.chunk_count,
            compression_algo=int(info.compressor), digest_algo=int(info.digester), features=info.features,
            compressed_size=info.compressed_size, uncompressed_size=info.uncompressed_size,
            blob_toc_size=info.blob_toc_size, ci_compressor=int(info.ci_compressor), ci_offset=info.ci_offset,
            ci_compressed_size=info.ci_compressed_size, ci_uncompressed_size=info.ci_uncompressed_size,
            blob_toc_digest=info.blob_toc_digest or bytes(32),
            blob_meta_digest=info.blob_meta_digest or bytes(32), blob_meta_size=info.blob_meta_size,
        ).pack_into(buf, blob_table_offset + i * RafsV6Blob.SIZE)
    for i, slot in enumerate(prefetch_slots):
        buf[prefetch_offset + 4 * i:prefetch_offset + 4 * i + 4] = nid(slot).to_bytes(4, "little")

    root = by_id[id(tree.root)]
    flags = flags_from_algorithms(opts.compressor, opts.digester)
    if opts.explicit_uidgid:
        flags |= RafsSuperFlags.EXPLICIT_UID_GID
    if has_xattr:
        flags |= RafsSuperFlags.HAS_XATTR
    if inline_digest:
        flags |= RafsSuperFlags.INLINED_CHUNK_DIGEST
    RafsV6SuperBlock(
        s_magic=EROFS_SUPER_MAGIC_V1, s_feature_compat=EROFS_FEATURE_COMPAT_RAFS_V6, s_blkszbits=BLOCK_BITS,
        s_root_nid=nid(root), s_inos=len(slots), s_blocks=s_blocks, s_meta_blkaddr=meta_addr // bs,
        s_feature_incompat=RAFSV6_FEATURE_INCOMPAT, s_extra_devices=len(blobs),
        s_devt_slotoff=EROFS_DEVT_SLOT_OFFSET,
    ).pack_into(buf, EROFS_SUPER_OFFSET)
    RafsV6SuperBlockExt(
        s_flags=int(flags), s_blob_table_offset=blob_table_offset, s_blob_table_size=blob_table_size,
        s_chunk_size=opts.chunk_size, s_chunk_table_offset=chunk_table_offset,
        s_chunk_table_size=chunk_table_size,
        s_prefetch_table_offset=prefetch_offset if prefetch_size else 0, s_prefetch_table_size=prefetch_size,
    ).pack_into(buf, RAFSV6_EXT_SUPER_OFFSET)
    if nid(root) > 0xFFFF:
        raise BuildError("root nid does not fit the superblock")
    return bytes(buf)


def _compact_ok(slot: _Slot) -> bool:
    node = slot.inode
    size = node.size if node.is_reg else slot.data_size
    return not (node.force_extended or node.uid > 0xFFFF or node.gid > 0xFFFF or slot.nlink > 0xFFFF
                or size > 0xFFFF_FFFF or node.rdev or slot.name.endswith(b".pyc"))


def _chunk_format(node: Inode, store: ChunkStore, chunk_size: int) -> int:
    """Chunk header; advertises one extent when every chunk is contiguous in one blob."""
    chunks = node.chunks
    if len(chunks) > 1:
        first = store.chunk(chunks[0])
        contiguous = True
        for i, ref in enumerate(chunks[1:], 1):
            c = store.chunk(ref)
            if ref.blob_index != chunks[0].blob_index or c.uncompressed_offset != first.uncompressed_offset + i * chunk_size:
                contiguous = False
                break
        if contiguous:
            return encode_chunk_format(1 << (node.size - 1).bit_length(), BLOCK_BITS)
    return encode_chunk_format(chunk_size, BLOCK_BITS)


def _dir_bytes(node: Inode, slot: _Slot, parent_nid: int, by_id: dict[int, _Slot], nid, bs: int) -> bytes:
    assert node.entries is not None
    entries: list[tuple[bytes, int, int]] = []
    for name in _dirent_names(node):
        if name == b".":
            entries.append((name, nid(slot), EROFS_FT_FROM_MODE[stat.S_IFDIR]))
        elif name == b"..":
            entries.append((name, parent_nid, EROFS_FT_FROM_MODE[stat.S_IFDIR]))
        else:
            child = node.entries[name]
            entries.append((name, nid(by_id[id(child)]), EROFS_FT_FROM_MODE.get(stat.S_IFMT(child.mode), 0)))
    out = bytearray()
    block: list[tuple[bytes, int, int]] = []
    used = 0

    def flush(final: bool) -> None:
        nonlocal out
        start = len(out)
        nameoff = DIRENT_SIZE * len(block)
        heads = bytearray()
        names = bytearray()
        for name, n, ft in block:
            heads += _DIRENT.pack(n, nameoff, ft, 0)
            names += name
            nameoff += len(name)
        out += heads + names
        if not final:
            out += bytes(bs - (len(out) - start))

    for e in entries:
        need = DIRENT_SIZE + len(e[0])
        if used + need > bs:
            flush(False)
            block = []
            used = 0
        block.append(e)
        used += need
    flush(True)
    assert len(out) == slot.data_size, (len(out), slot.data_size)
    return bytes(out)


def _prefetch_slots(tree: Tree, patterns: list[str], by_id: dict[int, _Slot]) -> list[_Slot]:
    out: list[_Slot] = []
    seen: set[int] = set()
    for node in tree.prefetch_matches(patterns):
        slot = by_id[id(node)]
        if id(slot) not in seen:
            seen.add(id(slot))
            out.append(slot)
    return out
