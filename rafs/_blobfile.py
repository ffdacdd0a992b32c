"""Chunk data of local blob files for ``check``/``unpack``, through ``storage.device.BlobDevice``.

The blobs are plain files (``--blob FILE`` or ``--blob-dir DIR`` holding ``<blob_id>``); reads go
through a ``BlobDevice`` over the ``localfs`` backend without a cache, so decompression, size and
digest checks are the storage layer's own.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable

from rafs.errors import RafsError
from storage.backend.localfs import LocalFsBackend
from storage.cache.base import CacheConfig
from storage.cache.nocache import NoCacheManager
from storage.device import BlobDevice
from storage.records import BlobInfo, BlobIoDesc, BlobIoVec, ChunkInfo


class ChunkReadError(RafsError):
    """A chunk cannot be located in its blob (no compressed offset recorded)."""


class LocalBlobs:
    """Resolve an image's blobs to local files and read verified chunk data from them."""

    def __init__(self, blobs: list[BlobInfo], *, blob: str | None = None, blob_dir: str | None = None,
                 verify: bool = True, cache_chunks: int = 8) -> None:
        self.blobs = blobs
        present: list[BlobInfo] = []
        self.missing: list[BlobInfo] = []
        for info in blobs:
            if blob is not None:
                ok = os.path.isfile(blob) and (len(blobs) == 1 or info.blob_id == os.path.basename(blob))
            else:
                ok = blob_dir is not None and os.path.isfile(os.path.join(blob_dir, info.blob_id))
            (present if ok else self.missing).append(info)
        self._present = {b.blob_index for b in present}
        backend = LocalFsBackend(blob_file=blob) if blob is not None else LocalFsBackend(dir=blob_dir or ".")
        self._manager = NoCacheManager(None, backend, CacheConfig(validate_digest=verify))
        self.device = BlobDevice(present, self._manager)
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cache_max = cache_chunks

    def has(self, blob_index: int) -> bool:
        return blob_index in self._present

    def read_chunk(self, blob: BlobInfo, chunk: ChunkInfo) -> bytes:
        """Uncompressed, verified data of one chunk (StorageError on a bad chunk)."""
        key = (blob.blob_index, chunk.index)
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            return data
        if chunk.compressed_size == 0 and not chunk.digest:
            raise ChunkReadError(
                f"blob {blob.blob_id[:16]}… chunk {chunk.index}: no compressed location in the bootstrap"
            )
        data = self.device.read(BlobIoVec([BlobIoDesc(blob, chunk, 0, chunk.uncompressed_size)]))
        self._cache[key] = data
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return data

    def read(self, vec: BlobIoVec) -> bytes:
        return self.device.read(vec)

    def iter_file(self, node, window: int = 4 << 20) -> Iterable[bytes]:
        """The content of a regular file in pieces of at most ``window`` bytes."""
        size = node.size
        pos = 0
        while pos < size:
            n = min(window, size - pos)
            data = self.read(node.chunks(pos, n))
            if len(data) != n:
                raise ChunkReadError(f"inode {node.ino}: read {len(data)} bytes at {pos}, expected {n}")
            yield data
            pos += n

    def close(self) -> None:
        self.device.close()
        self._manager.close()
        self._manager.backend.close()
        self._cache.clear()

    def __enter__(self) -> "LocalBlobs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
