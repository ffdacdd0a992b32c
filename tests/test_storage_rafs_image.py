"""The storage stack under real RAFS v6 images from the builder: CI-table path, .blob.meta cache."""

from __future__ import annotations

import os
import random

import pytest

from rafs.builder.build import BuildOptions, build
from rafs.metadata import Rafs
from storage.backend.localfs import LocalFsBackend
from storage.cache.base import CacheConfig
from storage.cache.filecache import FileCacheManager
from storage.device import BlobDevice
from storage.records import ChunkInfo, Compressor


def _tree(root):
    rnd = random.Random(3)
    os.makedirs(os.path.join(root, "d"))
    files = {"small": rnd.randbytes(100), "d/multi": rnd.randbytes(5 * 65536 + 77),
             "text": b"hello nydus\n" * 30000, "d/dup": b"hello nydus\n" * 30000}
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return files


@pytest.fixture(params=[Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE], ids=lambda c: c.name)
def image(tmp_path, request):
    src = str(tmp_path / "src")
    files = _tree(src)
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    res = build(src, bootstrap_out=str(tmp_path / "boot"), blob_dir=str(blob_dir),
                options=BuildOptions(chunk_size=65536, compressor=request.param))
    return res, files, str(blob_dir)


def _read_files(rafs, dev, files):
    for name, data in files.items():
        ino = rafs.lookup_path("/" + name)
        assert dev.read(ino.chunks(0, len(data) + 10)) == data, name
        assert dev.read(ino.chunks(65530, 20)) == data[65530:65550], name


def test_read_files_of_a_built_image_via_ci_table(tmp_path, image):
    res, files, blob_dir = image
    rafs = Rafs.open(res.bootstrap)
    assert rafs.blobs and rafs.blobs[0].ci_compressed_size > 0
    cache_dir = str(tmp_path / "cache")
    backend = LocalFsBackend(dir=blob_dir)
    mgr = FileCacheManager(cache_dir, backend)
    dev = BlobDevice(rafs.blobs, mgr)
    _read_files(rafs, dev, files)
    blob_id = rafs.blobs[0].blob_id
    assert os.path.exists(os.path.join(cache_dir, blob_id + ".blob.meta"))
    # whole-blob prefetch knows every chunk from the CI table; then the blob file is complete
    assert dev.prefetch_blob(0)
    assert dev.prefetcher.wait(20)
    path = dev.blob_data_path(0)
    assert path is not None
    dev.close()
    mgr.close()
    # a restart reads the cached .blob.meta instead of the blob's CI section
    backend2 = LocalFsBackend(dir=blob_dir)
    mgr2 = FileCacheManager(cache_dir, backend2)
    dev2 = BlobDevice(rafs.blobs, mgr2)
    _read_files(rafs, dev2, files)
    assert mgr2.metrics.backend_read_count.value == 0
    dev2.close()


def test_ci_table_offsets_are_authoritative(tmp_path, image):
    res, files, blob_dir = image
    rafs = Rafs.open(res.bootstrap)
    mgr = FileCacheManager(str(tmp_path / "cache"), LocalFsBackend(dir=blob_dir))
    dev = BlobDevice(rafs.blobs, mgr)
    vec = rafs.lookup_path("/d/multi").chunks(0, len(files["d/multi"]))
    # a bootstrap whose chunk offsets are wrong: the CI table still finds the data
    bent = type(vec)(d.__class__(d.blob, ChunkInfo(d.chunk.blob_index, d.chunk.index, d.chunk.digest,
                                                   d.chunk.flags, d.chunk.compressed_offset + 1,
                                                   d.chunk.compressed_size, d.chunk.uncompressed_offset,
                                                   d.chunk.uncompressed_size), d.offset, d.size) for d in vec)
    assert dev.read(bent) == files["d/multi"]
    dev.close()
