"""Read a nydus image (bootstrap + local blob files) into path records, for ``check``.

File data goes through :class:`storage.device.BlobDevice` over a ``localfs`` backend without a
cache (v6 chunk offsets come from each blob's chunk-info table, which storage loads), and
every file's content is hashed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile

from storage.backend.localfs import LocalFsBackend
from storage.cache import NoCacheManager
from storage.cache.base import CacheConfig
from storage.cache.filecache import FileCacheManager
from storage.records import BlobFeatures
from storage.device import BlobDevice

from .tree import FileEntry

READ_SIZE = 4 << 20


def read_nydus_image(bootstrap: str, blob_dir: str) -> tuple[dict[str, FileEntry], list[str]]:
    """(path → entry, blob ids of the blob table) for a bootstrap whose blobs are in ``blob_dir``
    as files named by blob id."""
    from rafs.metadata import Rafs

    out: dict[str, FileEntry] = {}
    backend = LocalFsBackend(dir=blob_dir)
    with Rafs.open(bootstrap) as rafs, tempfile.TemporaryDirectory(prefix="nydus-check-") as cache_dir:
        blob_ids = [b.blob_id for b in rafs.blobs]
        if any(b.has(BlobFeatures.ZRAN) for b in rafs.blobs):
            # ZRAN (OCI-ref) blobs are read through a file cache holding their blob.meta files
            for b in rafs.blobs:
                meta = os.path.join(blob_dir, f"{b.blob_id}.blob.meta")
                if b.has(BlobFeatures.ZRAN) and os.path.exists(meta):
                    shutil.copyfile(meta, os.path.join(cache_dir, f"{b.blob_id}.blob.meta"))
            manager = FileCacheManager(cache_dir, backend, CacheConfig(sync_data=False))
        else:
            manager = NoCacheManager(None, backend)
        device = BlobDevice(rafs.blobs, manager)
        try:
            for path, inode in rafs.walk():
                attr = inode.attr()
                path = "/" + path.strip("/") if path not in ("", "/") else "/"
                size, digest, target = 0, "", ""
                if inode.is_reg():
                    h = hashlib.sha256()
                    while size < attr.size:
                        data = device.read(inode.chunks(size, min(READ_SIZE, attr.size - size)))
                        if not data:
                            break
                        h.update(data)
                        size += len(data)
                    digest = h.hexdigest()
                elif inode.is_symlink():
                    target = inode.readlink().decode("utf-8", "surrogateescape")
                xattrs = tuple(sorted(inode.xattrs().items()))
                rdev = attr.rdev if stat.S_ISCHR(attr.mode) or stat.S_ISBLK(attr.mode) else 0
                out[path] = FileEntry(path, attr.mode, attr.uid, attr.gid, int(attr.mtime), size, digest,
                                      target, rdev, xattrs)
        finally:
            device.close()
            manager.close()
            backend.close()
    return out, blob_ids
