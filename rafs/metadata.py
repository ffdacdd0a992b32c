"""The RAFS metadata API: one read-only view of a v5 or v6 bootstrap.

``Rafs.open(path)`` mmaps the bootstrap and validates the superblock and the fixed tables
(device slots, blob table, table bounds); inodes, directories, xattrs and chunk lists are
parsed lazily when touched and cached in bounded caches, so memory grows with what is used,
not with the image.  Every malformation raises :class:`rafs.errors.FormatError` naming the
structure, field and value; nothing else escapes for bad input.

Inode numbers: v6 uses the nid (inode slot number) as ``ino``, v5 the on-disk inode number.

The API types live in :mod:`rafs.base`; this module is where callers get them, because it also
loads both readers (:mod:`rafs._v5`, :mod:`rafs._v6`), which register with ``Rafs.open``.
"""

from __future__ import annotations

from rafs._v5 import RafsV5
from rafs._v6 import InodeV6, RafsV6
from rafs.base import Inode, InodeAttr, Rafs, detect_version

__all__ = ["Rafs", "Inode", "InodeAttr", "detect_version", "RafsV5", "RafsV6", "InodeV6"]
