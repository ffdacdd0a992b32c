"""RAFS on-disk layout: every bootstrap struct, declared once with :class:`storage.structs.Struct`.

* :mod:`rafs.layout.constants` — magics, flags, i_format layouts, file types, xattr prefixes.
* :mod:`rafs.layout.erofs` — kernel EROFS structs (inodes, chunk index, dirent, xattrs, device slot).
* :mod:`rafs.layout.v6` — RAFS v6 superblock, extended superblock, blob table entry.
* :mod:`rafs.layout.v5` — RAFS v5 superblock, inode, extended blob entry, 80-byte chunk info.

The reader (:mod:`rafs.metadata`) and the builder both go through these declarations.
"""

from rafs.layout.constants import *  # noqa: F401,F403
from rafs.layout.erofs import (  # noqa: F401
    ErofsDeviceSlot,
    ErofsDirent,
    ErofsInodeChunkIndex,
    ErofsInodeCompact,
    ErofsInodeExtended,
    ErofsXattrEntry,
    ErofsXattrIbodyHeader,
    decode_chunk_format,
    encode_chunk_format,
    inode_datalayout,
    inode_format,
    inode_version,
    xattr_icount,
    xattr_ibody_size,
    xattr_split_name,
)
from rafs.layout.v5 import (  # noqa: F401
    RafsV5BlobTableEntry,
    RafsV5ChunkInfo,
    RafsV5ExtBlobEntry,
    RafsV5Inode,
    RafsV5SuperBlock,
    pack_v5_blob_table,
    pack_v5_xattrs,
    parse_v5_blob_table,
    parse_v5_xattrs,
    rafsv5_align,
)
from rafs.layout.v6 import (  # noqa: F401
    RafsV6Blob,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
)
