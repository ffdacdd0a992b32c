"""Build synthetic nydus-like data blobs (chunks back to back) with matching records, for tests."""

from __future__ import annotations

import bisect
import contextlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from storage.compress import compress
from storage.digest import digest
from storage.records import BlobInfo, BlobIoDesc, BlobIoVec, ChunkFlags, ChunkInfo, Compressor, Digester


@dataclass
class SynthBlob:
    blob_id: str
    data: bytes  #: the compressed blob as the backend serves it
    info: BlobInfo
    chunks: list[ChunkInfo]
    plain: bytes  #: the uncompressed content (chunks at their uncompressed offsets)

    def __post_init__(self) -> None:
        self._starts = [c.uncompressed_offset for c in self.chunks]

    def iovec(self, offset: int, size: int) -> BlobIoVec:
        """Descriptors covering ``[offset, offset+size)`` of the uncompressed content."""
        vec = BlobIoVec()
        first = max(0, bisect.bisect_right(self._starts, offset) - 1)
        for c in self.chunks[first:]:
            if c.uncompressed_offset >= offset + size:
                break
            lo = max(offset, c.uncompressed_offset)
            hi = min(offset + size, c.uncompressed_offset + c.uncompressed_size)
            if lo < hi:
                vec.append(BlobIoDesc(self.info, c, lo - c.uncompressed_offset, hi - lo))
        return vec


def make_blob(chunk_count: int, chunk_size: int = 4096, *, compressor: Compressor = Compressor.ZSTD,
              digester: Digester = Digester.BLAKE3, seed: int = 0, blob_index: int = 0,
              compressible: bool = True, blob_id: str | None = None) -> SynthBlob:
    rng = random.Random(seed)
    blob = bytearray()
    plain = bytearray()
    pieces = []
    for i in range(chunk_count):
        if compressible:
            word = rng.randbytes(16)
            payload = (word * (chunk_size // 16 + 1))[:chunk_size]
            payload = rng.randbytes(64) + payload[64:]
        else:
            payload = rng.randbytes(chunk_size)
        comp = compress(compressor, payload) if compressor != Compressor.NONE else payload
        flags = ChunkFlags.COMPRESSED
        if len(comp) >= len(payload):
            comp, flags = payload, 0
        pieces.append((payload, comp, flags))
    chunks = []
    for i, (payload, comp, flags) in enumerate(pieces):
        chunks.append(ChunkInfo(blob_index, i, digest(digester, payload), int(flags), len(blob), len(comp),
                                len(plain), len(payload)))
        blob += comp
        plain += payload
    blob_id = blob_id or digest(Digester.SHA256, bytes(blob)).hex()
    info = BlobInfo(blob_index=blob_index, blob_id=blob_id, chunk_count=chunk_count, chunk_size=chunk_size,
                    compressor=compressor, digester=digester, compressed_size=len(blob),
                    uncompressed_size=len(plain))
    return SynthBlob(blob_id, bytes(blob), info, chunks, bytes(plain))


def random_blob_id() -> str:
    return os.urandom(32).hex()


@contextlib.contextmanager
def blob_held_by_another_process(data_path: str) -> Iterator[subprocess.Popen]:
    """A separate process holding the shared "in use" lock on a blob's ``.blob.data`` file, as a
    daemon with the blob open does (storage/cache/filecache.py); released on exit."""
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_SH)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, data_path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
