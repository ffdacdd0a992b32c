"""Direct reads of chunk data from local blob files (for check/unpack without a cache).

A tiny, synchronous stand-in for ``storage.device.BlobDevice`` when the data blobs are plain
files on disk (``--blob`` / ``--blob-dir``): it decompresses each chunk and verifies its digest.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable

from rafs.errors import NotFound, RafsError
from storage.compress import decompress
from storage.device import BlobInfo, BlobIoVec, ChunkInfo, Compressor
from storage.digest import digest
from storage.errors import StorageError


class ChunkReadError(RafsError):
    """A chunk could not be read, decompressed or verified from its blob file."""


class BlobFiles:
    """Map blob index -> local file; read and verify chunks."""

    def __init__(self, blobs: list[BlobInfo], *, blob: str | None = None, blob_dir: str | None = None,
                 verify: bool = True, cache_chunks: int = 8) -> None:
        self.blobs = blobs
        self.verify = verify
        self.paths: dict[int, str] = {}
        self.missing: list[BlobInfo] = []
        for info in blobs:
            path = None
            if blob is not None and (len(blobs) == 1 or info.blob_id == os.path.basename(blob)):
                path = blob
            elif blob_dir is not None:
                for name in (info.blob_id, f"{info.blob_id}.blob.data"):
                    cand = os.path.join(blob_dir, name)
                    if os.path.isfile(cand):
                        path = cand
                        break
            if path is None:
                self.missing.append(info)
            else:
                self.paths[info.blob_index] = path
        self._files: dict[int, object] = {}
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cache_max = cache_chunks

    def has(self, blob_index: int) -> bool:
        return blob_index in self.paths

    def _file(self, blob_index: int):
        f = self._files.get(blob_index)
        if f is None:
            path = self.paths.get(blob_index)
            if path is None:
                raise NotFound(f"blob {self.blobs[blob_index].blob_id}: no local file (use --blob/--blob-dir)")
            f = open(path, "rb")
            self._files[blob_index] = f
        return f

    def read_chunk(self, blob: BlobInfo, chunk: ChunkInfo) -> bytes:
        """Uncompressed, verified data of one chunk."""
        key = (blob.blob_index, chunk.index)
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            return data
        where = f"blob {blob.blob_id[:16]}… chunk {chunk.index}"
        if chunk.compressed_size == 0 and not chunk.digest:
            raise ChunkReadError(f"{where}: no compressed location in the bootstrap (needs the blob's CI table)")
        f = self._file(blob.blob_index)
        f.seek(chunk.compressed_offset)
        raw = f.read(chunk.compressed_size)
        if len(raw) != chunk.compressed_size:
            raise ChunkReadError(
                f"{where}: blob file ends before {chunk.compressed_offset}+{chunk.compressed_size}"
            )
        algo = blob.compressor if chunk.is_compressed else Compressor.NONE
        try:
            data = decompress(algo, raw, chunk.uncompressed_size)
        except StorageError as exc:
            raise ChunkReadError(f"{where}: {exc}") from exc
        if self.verify and chunk.digest and digest(blob.digester, data) != chunk.digest:
            raise ChunkReadError(f"{where}: digest mismatch (expected {chunk.digest.hex()[:16]}…)")
        self._cache[key] = data
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return data

    def read(self, vec: BlobIoVec) -> bytes:
        out = bytearray()
        for desc in vec:
            if desc.is_hole:
                out += bytes(desc.size)
            else:
                data = self.read_chunk(desc.blob, desc.chunk)
                if desc.offset + desc.size > len(data):
                    raise ChunkReadError(
                        f"chunk {desc.chunk.index}: range {desc.offset}+{desc.size} beyond its {len(data)} bytes"
                    )
                out += data[desc.offset : desc.offset + desc.size]
        return bytes(out)

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
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files.clear()
        self._cache.clear()

    def __enter__(self) -> "BlobFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
