"""Wrong bytes from a mirror against a REAL docker-registry: the chunk is read once more from the
next source (the next mirror, then the origin) and served right; wrong everywhere = an error."""

from __future__ import annotations

import logging

import pytest

from integration.storage_registry import REGISTRY_BIN, FaultProxy, LocalRegistry
from storage.backend.config import backend_from_config
from storage.cache.base import CacheConfig
from storage.cache.filecache import FileCacheManager
from storage.device import BlobDevice
from storage.records import Compressor
from storage.errors import ChunkDigestMismatch
from tests.storage_blobs import make_blob

pytestmark = pytest.mark.skipif(REGISTRY_BIN is None, reason="docker-registry (Debian package) not installed")

REPO = "integrity/test"


@pytest.fixture(scope="module")
def blob():
    return make_blob(16, chunk_size=16384, seed=11, compressor=Compressor.ZSTD, compressible=False)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, blob):
    reg = LocalRegistry(str(tmp_path_factory.mktemp("reg")))  # with its access log
    try:
        reg.push_blob(REPO, blob.data)
        yield reg
    finally:
        reg.stop()


def _device(tmp_path, registry, mirrors, blob):
    backend = backend_from_config({"type": "registry", "config": {
        "scheme": "http", "host": registry.host, "repo": REPO, "retry_limit": 0, "timeout": 5,
        "docker_config": "/nonexistent", "mirrors": [{"host": f"http://{m.host}"} for m in mirrors]}})
    mgr = FileCacheManager(str(tmp_path / "cache"), backend, CacheConfig(merging_size=16384))
    return mgr, BlobDevice([blob.info], mgr)


def test_wrong_bytes_from_a_mirror_are_read_again_from_the_next_one(tmp_path, registry, blob, caplog):
    bad, good = FaultProxy(registry.host), FaultProxy(registry.host)
    try:
        bad.faults.extend(["corrupt"] * 100)
        mgr, dev = _device(tmp_path, registry, [bad, good], blob)
        with caplog.at_level(logging.WARNING):
            assert dev.read(blob.iovec(0, 16384)) == blob.plain[:16384]
        assert len(bad.blob_gets()) == 1 and len(good.blob_gets()) == 1  # the reread went to the next mirror
        assert mgr.metrics.cache_digest_mismatches.value == 1
        lines = [r.getMessage() for r in caplog.records if "wrong data" in r.getMessage()]
        assert len(lines) == 1 and f"mirror http://{bad.host}" in lines[0] and "chunk 0" in lines[0]
        dev.close()
    finally:
        bad.close()
        good.close()


def test_last_mirror_wrong_is_read_again_from_the_origin(tmp_path, registry, blob):
    bad = FaultProxy(registry.host)
    try:
        bad.faults.extend(["corrupt"] * 100)
        mgr, dev = _device(tmp_path, registry, [bad], blob)
        mark = registry.registry.log_mark()
        assert dev.read(blob.iovec(16384, 100)) == blob.plain[16384:16484]
        assert len(bad.blob_gets()) == 1
        # two GETs reached the registry: through the mirror, then the reread straight from the origin
        assert len(registry.registry.blob_fetches(since=mark)) == 2
        dev.close()
    finally:
        bad.close()


def test_wrong_from_every_source_is_an_error_and_nothing_cached(tmp_path, registry, blob):
    proxy = FaultProxy(registry.host)
    try:
        proxy.faults.extend(["corrupt"] * 100)
        backend = backend_from_config({"type": "registry", "config": {
            "scheme": "http", "host": proxy.host, "repo": REPO, "retry_limit": 0, "docker_config": "/nonexistent"}})
        mgr = FileCacheManager(str(tmp_path / "cache"), backend, CacheConfig(merging_size=16384))
        dev = BlobDevice([blob.info], mgr)
        with pytest.raises(ChunkDigestMismatch):
            dev.read(blob.iovec(0, 100))
        assert mgr.get_blob_cache(blob.info).chunk_map.ready_count() == 0
        dev.close()
    finally:
        proxy.close()
