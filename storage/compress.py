"""Chunk compression: none, lz4_block (raw LZ4 block, no frame), gzip, zstd (standard frame).

zstd contexts are made once per thread and reused: building one costs more than compressing a
4 KiB chunk (figures in docs/storage.md). A context must not be used by two threads at once,
hence one per thread rather than one per process.
"""

from __future__ import annotations

import threading
import zlib

import lz4.block
import zstandard

from storage.errors import DecompressError
from storage.records import Compressor

#: zstd level used by the builder (upstream uses the zstd default, 3)
ZSTD_LEVEL = 3
#: zstd level of an OCI-ref (zran) ref blob's blob.meta and bootstrap: small, written once, stored
#: as the whole "extra" of such an image (any level decodes the same, upstream's reader included)
REF_META_ZSTD_LEVEL = 19

_local = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    try:
        return _local.compressor
    except AttributeError:
        _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return _local.compressor


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    try:
        return _local.decompressor
    except AttributeError:
        _local.decompressor = zstandard.ZstdDecompressor()
        return _local.decompressor


def compress(algo: Compressor, data: bytes, *, zstd_level: int | None = None) -> bytes:
    """Compress ``data`` (zstd at ``zstd_level``, default :data:`ZSTD_LEVEL`); the caller stores
    it raw when the result is not smaller."""
    if algo == Compressor.NONE:
        return bytes(data)
    if algo == Compressor.ZSTD:
        if zstd_level is not None and zstd_level != ZSTD_LEVEL:
            return zstandard.ZstdCompressor(level=zstd_level).compress(data)
        return _zstd_compressor().compress(data)
    if algo == Compressor.LZ4_BLOCK:
        return lz4.block.compress(data, store_size=False)
    if algo == Compressor.GZIP:
        co = zlib.compressobj(6, zlib.DEFLATED, 31)
        return co.compress(data) + co.flush()
    raise DecompressError(f"unknown compressor {algo!r}")


def decompress(algo: Compressor, data: bytes | memoryview, uncompressed_size: int) -> bytes:
    """Decompress one chunk to exactly ``uncompressed_size`` bytes or raise :class:`DecompressError`."""
    try:
        if algo == Compressor.NONE:
            out = bytes(data)
        elif algo == Compressor.ZSTD:
            out = _zstd_decompressor().decompress(data, max_output_size=uncompressed_size)
        elif algo == Compressor.LZ4_BLOCK:
            out = lz4.block.decompress(data, uncompressed_size=uncompressed_size)
        elif algo == Compressor.GZIP:
            d = zlib.decompressobj(31)
            out = d.decompress(bytes(data), uncompressed_size)
        else:
            raise DecompressError(f"unknown compressor {algo!r}")
    except DecompressError:
        raise
    except Exception as exc:  # zstandard.ZstdError, lz4's LZ4BlockError, zlib.error
        raise DecompressError(f"{Compressor(algo).name.lower()}: {exc}") from exc
    if len(out) != uncompressed_size:
        raise DecompressError(
            f"{Compressor(algo).name.lower()}: decompressed to {len(out)} bytes, "
            f"expected {uncompressed_size}"
        )
    return out
