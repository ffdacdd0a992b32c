"""Cross-checks from the RAFS-format audit: the v5 and v6 bootstraps upstream built from the
same image must describe the same tree and the same chunks (v5 through its inode table,
extended blob table and chunk infos; v6 through dirents, inodes, chunk indexes and the chunk
table)."""

from __future__ import annotations

import stat

import pytest

from rafs.metadata import Rafs
from tests._rafs_util import extract_boot

V5 = "v5-bootstrap-file-size-736032"
V6 = "v6-bootstrap-chunk-pos-438272"


@pytest.fixture(scope="module")
def pair(vectors_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    return extract_boot(vectors_dir, V5, d), extract_boot(vectors_dir, V6, d)


def _describe(path) -> tuple[dict, dict]:
    tree, chunks = {}, {}
    with Rafs.open(path) as fs:
        for p, node in fs.walk():
            a = node.attr()
            is_dir = stat.S_ISDIR(a.mode)
            tree[p] = (a.mode, a.uid, a.gid, 0 if is_dir else a.size, a.mtime, 0 if is_dir else a.nlink,
                       node.readlink() if stat.S_ISLNK(a.mode) else None, node.xattrs())
            if stat.S_ISREG(a.mode):
                chunks[p] = [(d.chunk.digest, d.chunk.uncompressed_size, d.offset, d.size)
                             for d in node.chunks(0, a.size)]
    return tree, chunks


def test_v5_ext_blob_table(pair):
    v5, _ = pair
    with Rafs.open(v5) as fs:
        assert fs.version == 5
        (blob,) = fs.blobs
        # chunk count and sizes come from the v5 extended blob table
        assert blob.blob_id.startswith("02fef4a1") and blob.chunk_count == 2515
        assert (blob.compressed_size, blob.uncompressed_size) == (43_090_887, 77_298_891)
        refs = set()
        for _, node in fs.walk():
            a = node.attr()
            if stat.S_ISREG(a.mode):
                for d in node.chunks(0, a.size):
                    assert d.blob.blob_index == 0 and d.chunk.index < blob.chunk_count
                    refs.add(d.chunk.index)
        assert len(refs) == 2515  # every chunk of the blob is used by some file


def test_v5_and_v6_of_one_image_agree(pair):
    v5, v6 = pair
    t5, c5 = _describe(v5)
    t6, c6 = _describe(v6)
    assert len(t5) == len(t6) == 3517
    assert t5 == t6
    assert c5.keys() == c6.keys()
    assert c5 == c6  # same chunk digests, sizes and file ranges for every file


# --- out-of-range references in the v6 2.2 bootstrap: precise FormatErrors, never a crash -----

V62 = "dragonflyoss-nydus/tests/texture/bootstrap/rafs-v6-2.2.boot"
_META = 2 * 4096          # s_meta_blkaddr 2
_ROOT = _META + 128 * 32  # root nid 128, extended inode, FLAT_INLINE dirents follow
_LIB = _META + 133 * 32   # /lib.rs, extended inode without xattrs: chunk index at +64


def _patched(vectors_dir, tmp_path, patch):
    from storage.structs import Scalar

    raw = bytearray((vectors_dir / V62).read_bytes())
    for off, kind, value in patch:
        getattr(Scalar, kind).pack_into(raw, off, value)
    out = tmp_path / "patched.boot"
    out.write_bytes(bytes(raw))
    return out


def _lib_chunks(path):
    with Rafs.open(path) as fs:
        node = fs.lookup_path("/lib.rs")
        return list(node.chunks(0, node.attr().size))


@pytest.mark.parametrize("patch,match", [
    ([(_ROOT + 64 + 24, "U64", 10**9)], "nid"),                    # dirent nid beyond the file
    ([(_LIB + 64 + 2, "U16", 9)], "blob"),                          # chunk index: blob 8 of 1
    ([(_LIB + 64 + 2, "U16", 0)], "blob"),                          # chunk index: blob byte 0
    ([(_LIB + 64, "U16", 5)], "ci|chunk"),                          # ci index 5 of 2 chunks
])
def test_out_of_range_references_rejected(vectors_dir, tmp_path, patch, match):
    from rafs.errors import FormatError

    assert len(_lib_chunks(vectors_dir / V62)) == 1  # the unpatched image is fine
    path = _patched(vectors_dir, tmp_path, patch)
    with pytest.raises(FormatError, match=match):
        _lib_chunks(path)


# --- v5 xattrs: no upstream v5 vector carries any, so give one inode an xattr table ------------

V5R = "dragonflyoss-nydus/tests/texture/repeatable/sha256-nocompress-repeatable"


def test_v5_inode_with_xattr_table(vectors_dir, tmp_path):
    """Relocate a v5 file inode to the end of the bootstrap with XATTR set and an xattr table
    between symlink and chunk infos: the reader returns the xattrs and the same chunks."""
    from rafs.layout import RafsV5Inode, RafsV5SuperBlock, pack_v5_xattrs, rafsv5_align
    from rafs.layout.constants import RafsV5InodeFlags
    from storage.structs import Scalar

    raw = bytearray((vectors_dir / V5R).read_bytes())
    with Rafs.open(vectors_dir / V5R) as fs:
        path, node = next((p, n) for p, n in fs.walk() if n.is_reg() and n.attr().size > 0 and not n.xattrs())
        want_chunks = [(d.chunk.digest, d.offset, d.size) for d in node.chunks(0, node.attr().size)]
        ino = node.ino
    sb = RafsV5SuperBlock.parse(raw, 0)
    slot = sb.s_inode_table_offset + (ino - 1) * 4
    off = Scalar.U32.unpack_from(raw, slot)[0] << 3
    inode = RafsV5Inode.parse(raw, off)
    assert inode.i_ino == ino and not inode.i_flags & RafsV5InodeFlags.XATTR
    head = 128 + rafsv5_align(inode.i_name_size) + rafsv5_align(inode.i_symlink_size)
    chunk_infos = bytes(raw[off + head:off + head + 80 * inode.i_child_count])
    pairs = {b"user.audit": b"v5 xattr", b"security.capability": b"\x01\x00\x00\x02" + bytes(16), b"user.empty": b""}
    patched = bytearray(raw[off:off + head])
    patched[:128] = inode.replace(i_flags=inode.i_flags | RafsV5InodeFlags.XATTR).pack()
    new_off = rafsv5_align(len(raw))
    raw += bytes(new_off - len(raw)) + patched + pack_v5_xattrs(pairs) + chunk_infos
    Scalar.U32.pack_into(raw, slot, new_off >> 3)
    out = tmp_path / "xattr.v5"
    out.write_bytes(bytes(raw))
    with Rafs.open(out) as fs:
        node = fs.lookup_path(path)
        assert node.xattrs() == pairs
        assert [(d.chunk.digest, d.offset, d.size) for d in node.chunks(0, node.attr().size)] == want_chunks
