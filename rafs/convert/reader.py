"""Read a nydus image (bootstrap + local blob files) into path records, for ``check``.

File data is assembled straight from the blob files: each chunk of a file's
:class:`~storage.device.BlobIoVec` is read at its compressed offset, decompressed and sliced
(holes read as zeros). This is an independent path from the cache/FUSE read path, which is
what a checker wants.
"""

from __future__ import annotations

import hashlib
import os
import stat

from storage.compress import decompress
from storage.device import BlobInfo, ChunkInfo

from .errors import SourceError
from .tree import FileEntry


class _BlobFiles:
    """Chunk reads from ``<blob_dir>/<blob_id>`` files, with a one-chunk cache."""

    def __init__(self, blob_dir: str) -> None:
        self.blob_dir = blob_dir
        self._files: dict[str, object] = {}
        self._last: tuple[str, int, bytes] | None = None

    def chunk(self, blob: BlobInfo, chunk: ChunkInfo) -> bytes:
        key = (blob.blob_id, chunk.compressed_offset)
        if self._last and self._last[:2] == key:
            return self._last[2]
        fh = self._files.get(blob.blob_id)
        if fh is None:
            path = os.path.join(self.blob_dir, blob.blob_id)
            try:
                fh = open(path, "rb")  # noqa: SIM115
            except OSError as exc:
                raise SourceError(f"blob {blob.blob_id} not available: {exc}") from exc
            self._files[blob.blob_id] = fh
        fh.seek(chunk.compressed_offset)  # type: ignore[attr-defined]
        raw = fh.read(chunk.compressed_size)  # type: ignore[attr-defined]
        if chunk.is_compressed():
            data = decompress(blob.compressor, raw, chunk.uncompressed_size)
        else:
            data = raw[: chunk.uncompressed_size]
        self._last = (*key, data)
        return data

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()  # type: ignore[attr-defined]


def read_nydus_image(bootstrap: str, blob_dir: str) -> tuple[dict[str, FileEntry], list[str]]:
    """(path → entry, blob ids of the blob table) for a bootstrap whose blobs are in ``blob_dir``."""
    from rafs.metadata import Rafs

    out: dict[str, FileEntry] = {}
    blobs = _BlobFiles(blob_dir)
    try:
        with Rafs.open(bootstrap) as rafs:
            blob_ids = [b.blob_id for b in rafs.blobs]
            for path, inode in rafs.walk():
                attr = inode.attr()
                path = "/" + path.strip("/") if path not in ("", "/") else "/"
                size, digest, target = 0, "", ""
                if inode.is_reg():
                    h = hashlib.sha256()
                    for desc in inode.chunks(0, attr.size):
                        if desc.blob is None or desc.chunk is None:
                            h.update(bytes(desc.size))
                        else:
                            data = blobs.chunk(desc.blob, desc.chunk)
                            h.update(data[desc.offset: desc.offset + desc.size])
                        size += desc.size
                    digest = h.hexdigest()
                elif inode.is_symlink():
                    target = inode.readlink().decode("utf-8", "surrogateescape")
                xattrs = tuple(sorted(inode.xattrs().items()))
                rdev = attr.rdev if stat.S_ISCHR(attr.mode) or stat.S_ISBLK(attr.mode) else 0
                out[path] = FileEntry(path, attr.mode, attr.uid, attr.gid, int(attr.mtime), size, digest,
                                      target, rdev, xattrs)
    finally:
        blobs.close()
    return out, blob_ids
