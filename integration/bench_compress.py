"""zstd chunk codec benchmark (not a test): ``python3 -m integration.bench_compress``.

Times ``storage.compress`` (zstd contexts reused per thread) against a fresh
``ZstdCompressor``/``ZstdDecompressor`` per call (the baseline), in the same run: best of 9
``timeit`` repeats, microseconds per call, and the ratio.
"""

from __future__ import annotations

import os
import timeit

import zstandard

from storage.compress import ZSTD_LEVEL, compress, decompress
from storage.records import Compressor

ZSTD = Compressor.ZSTD


def _best(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=9)) / number * 1e6


def main() -> None:
    big = (os.urandom(64) * 8 + bytes(512)) * 1024  # 1 MiB, compresses about 2:1
    small = (os.urandom(32) + bytes(96)) * 32  # 4 KiB
    cbig, csmall = compress(ZSTD, big), compress(ZSTD, small)
    rows = [
        ("decompress 1 MiB", lambda: zstandard.ZstdDecompressor().decompress(cbig, max_output_size=len(big)),
         lambda: decompress(ZSTD, cbig, len(big)), 100),
        ("decompress 4 KiB", lambda: zstandard.ZstdDecompressor().decompress(csmall, max_output_size=len(small)),
         lambda: decompress(ZSTD, csmall, len(small)), 2000),
        ("compress 4 KiB", lambda: zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(small),
         lambda: compress(ZSTD, small), 2000),
        ("compress 1 MiB", lambda: zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(big),
         lambda: compress(ZSTD, big), 30),
    ]
    for name, baseline, ours, number in rows:
        b, o = _best(baseline, number), _best(ours, number)
        print(f"{name:17s} context per call {b:8.1f} us   reused per thread {o:8.1f} us   {b / o:5.1f}x")


if __name__ == "__main__":
    main()
