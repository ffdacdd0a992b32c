"""Data fuzzing: images whose *data* is corrupted, in the blob (what the backend serves) or in the
local cache (between two daemon runs), read through the daemon's own device with its default
config. Every file read returns the right bytes or raises; 0 wrong bytes are served.

Seeded (``NYDUS_FUZZ_SEED``); ``NYDUS_SLOW=1`` runs 5x more cases.
"""

from __future__ import annotations

import os
import random

import pytest

from rafs.daemon.config import DaemonConfig
from rafs.daemon.device import build_device
from rafs.errors import RafsError
from rafs.metadata import Rafs
from storage.records import Compressor, Digester
from storage.errors import StorageError

SLOW = os.environ.get("NYDUS_SLOW") == "1"
SEED = int(os.environ.get("NYDUS_FUZZ_SEED", "1313"))

#: (compressor, digester, chunk size): incompressible files are stored uncompressed even with
#: lz4/zstd, so a flipped byte there decompresses fine and only the digest can catch it
VARIANTS = [(Compressor.NONE, Digester.BLAKE3, 0x1000), (Compressor.ZSTD, Digester.BLAKE3, 0x10000),
            (Compressor.LZ4_BLOCK, Digester.SHA256, 0x4000), (Compressor.NONE, Digester.SHA256, 0x100000)]


def _image(tmp_path, rnd: random.Random, variant):
    from rafs.builder import BuildOptions, build

    compressor, digester, chunk_size = variant
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for i in range(12):
        kind = rnd.choice(["random", "text", "zeros", "mixed"])
        n = rnd.choice([1, 100, 4096, 5000, 70_000, 300_000])
        if kind == "random":
            data = rnd.randbytes(n)
        elif kind == "text":
            data = (b"line %d of some text\n" % i) * (n // 20 + 1)
        elif kind == "zeros":
            data = bytes(n)
        else:
            data = rnd.randbytes(n // 2) + bytes(n - n // 2)
        files[f"f{i:02d}"] = data[:n]
        (src / f"f{i:02d}").write_bytes(data[:n])
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    res = build(str(src), bootstrap_out=str(tmp_path / "img.boot"), blob_dir=str(blobs),
                options=BuildOptions(compressor=compressor, digester=digester, chunk_size=chunk_size))
    return res.bootstrap, blobs / res.blob_ids[0], files


def _config(blob_dir, cache_dir) -> DaemonConfig:
    # the daemon's defaults: digest_validate false
    return DaemonConfig.parse({"device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                                          "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}}})


def _read_all(boot: str, cfg: DaemonConfig, files: dict[str, bytes], stats: dict) -> None:
    with Rafs.open(boot) as fs:
        dev = build_device(list(fs.blobs), cfg)
        dev.set_chunk_source(fs.chunk_table)
        try:
            for name, want in files.items():
                node = fs.lookup_path("/" + name)
                try:
                    got = dev.read(node.chunks(0, len(want)))
                except (StorageError, RafsError):
                    stats["errors"] += 1
                    continue
                stats["reads"] += 1
                if got != want:
                    stats["wrong"] += sum(a != b for a, b in zip(got, want)) or 1
            for i in range(len(fs.blobs)):  # what the erofs driver would hand the kernel
                path = dev.blob_data_path(i, verify=True)
                if path:
                    with open(path, "rb") as f:
                        data = f.read()
                    for name, want in files.items():
                        node = fs.lookup_path("/" + name)
                        got = b"".join(b"\0" * d.size if d.chunk is None else
                                       data[d.chunk.uncompressed_offset + d.offset:][: d.size]
                                       for d in node.chunks(0, len(want)))
                        if got != want:
                            stats["wrong"] += 1
        finally:
            dev.close()


def _flip(path, rnd: random.Random, lo: int, hi: int, n: int) -> None:
    with open(path, "r+b") as f:
        for _ in range(n):
            off = rnd.randrange(lo, hi)
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ (1 << rnd.randrange(8))]))


def _data_end(boot: str) -> int:
    with Rafs.open(boot) as fs:
        return max((c.compressed_offset + c.compressed_size for c in fs.chunk_table()), default=0)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0].name}-{v[1].name}-{v[2]:#x}")
def test_corrupted_blob_data_never_served(tmp_path, variant):
    rnd = random.Random(SEED + VARIANTS.index(variant))
    boot, blob, files = _image(tmp_path, rnd, variant)
    pristine = blob.read_bytes()
    end = _data_end(boot)
    stats = {"reads": 0, "errors": 0, "wrong": 0}
    for case in range(40 if SLOW else 8):
        blob.write_bytes(pristine)
        _flip(blob, rnd, 0, end, rnd.choice([1, 1, 3, 20]))
        _read_all(boot, _config(blob.parent, tmp_path / f"cache{case}"), files, stats)
    assert stats["wrong"] == 0, stats
    assert stats["errors"] > 0, stats  # the corruption was seen


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0].name}-{v[1].name}-{v[2]:#x}")
def test_corrupted_cache_data_never_served(tmp_path, variant):
    rnd = random.Random(SEED * 7 + VARIANTS.index(variant))
    boot, blob, files = _image(tmp_path, rnd, variant)
    stats = {"reads": 0, "errors": 0, "wrong": 0}
    for case in range(40 if SLOW else 8):
        cache = tmp_path / f"cache{case}"
        _read_all(boot, _config(blob.parent, cache), files, stats)  # first run fills the cache
        (data,) = [p for p in cache.iterdir() if p.name.endswith(".blob.data")]
        size = data.stat().st_size
        if rnd.random() < 0.25:
            os.truncate(data, rnd.randrange(size))
        else:
            _flip(data, rnd, 0, size, rnd.choice([1, 2, 30]))
        _read_all(boot, _config(blob.parent, cache), files, stats)  # second run: checked, refetched
    assert stats["wrong"] == 0 and stats["errors"] == 0, stats  # the blob is intact: all served right
