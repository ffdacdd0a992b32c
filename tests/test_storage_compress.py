"""storage.compress: round trips, exact sizes, and the per-thread zstd contexts."""

from __future__ import annotations

import os
import threading

import pytest
import zstandard

from storage.compress import REF_META_ZSTD_LEVEL, ZSTD_LEVEL, compress, decompress
from storage.errors import DecompressError
from storage.records import Compressor


@pytest.mark.parametrize("algo", list(Compressor))
def test_round_trip(algo):
    data = (os.urandom(64) + bytes(448)) * 64
    packed = compress(algo, data)
    assert decompress(algo, packed, len(data)) == data
    if algo != Compressor.GZIP:  # gzip stops at the size asked for (zlib max_length)
        with pytest.raises(DecompressError):
            decompress(algo, packed, len(data) - 1)


def test_zstd_level_of_ref_blob_meta_decodes_the_same_and_is_smaller():
    # text-like data, as the 32 KiB windows of a ZRAN blob.meta are
    rng = __import__("random").Random(1)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    data = b" ".join(rng.choice(words) for _ in range(60_000))
    high = compress(Compressor.ZSTD, data, zstd_level=REF_META_ZSTD_LEVEL)
    default = compress(Compressor.ZSTD, data)
    assert REF_META_ZSTD_LEVEL > ZSTD_LEVEL
    assert decompress(Compressor.ZSTD, high, len(data)) == data
    assert len(high) < len(default)
    assert compress(Compressor.ZSTD, data, zstd_level=ZSTD_LEVEL) == default


def test_zstd_output_is_a_standard_frame_with_its_size():
    data = bytes(range(256)) * 64
    packed = compress(Compressor.ZSTD, data)
    assert zstandard.get_frame_parameters(packed).content_size == len(data)
    assert compress(Compressor.ZSTD, data) == packed  # a reused context gives the same bytes


def test_zstd_context_survives_a_corrupt_chunk():
    data = os.urandom(1000) * 4
    packed = compress(Compressor.ZSTD, data)
    with pytest.raises(DecompressError):
        decompress(Compressor.ZSTD, packed[:-8] + b"\xff" * 8, len(data))
    with pytest.raises(DecompressError):
        decompress(Compressor.ZSTD, b"not zstd at all", len(data))
    assert decompress(Compressor.ZSTD, packed, len(data)) == data


def test_zstd_contexts_are_per_thread():
    """Threads compressing and decompressing at once each get their own bytes back."""
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(50):
                data = bytes([seed, i]) * (2048 + 37 * i) + os.urandom(64)
                assert decompress(Compressor.ZSTD, compress(Compressor.ZSTD, data), len(data)) == data
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
