"""Crash safety: a process filling the file cache is SIGKILLed mid-write; after a restart no
chunk marked ready holds wrong data, and the cache is reused."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

from storage.backend.localfs import LocalFsBackend
from storage.cache.base import CacheConfig
from storage.cache.filecache import FileCacheManager
from storage.cache.state import IndexedChunkMap
from storage.device import BlobDevice
from storage.records import Compressor
from tests.storage_blobs import make_blob

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CHUNKS, CHUNK_SIZE = 384, 65536

CHILD = f"""
import random, sys
from storage.backend.localfs import LocalFsBackend
from storage.cache.base import CacheConfig
from storage.cache.filecache import FileCacheManager
from storage.device import BlobDevice
from storage.records import Compressor
from tests.storage_blobs import make_blob
blob_dir, cache_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
b = make_blob({CHUNKS}, chunk_size={CHUNK_SIZE}, seed=1, compressor=Compressor.ZSTD)
mgr = FileCacheManager(cache_dir, LocalFsBackend(dir=blob_dir), CacheConfig(merging_size=3 * {CHUNK_SIZE}))
dev = BlobDevice([b.info], mgr)
order = list(range({CHUNKS}))
random.Random(seed).shuffle(order)
print("ready", flush=True)
for i in order:
    dev.read(b.iovec(i * {CHUNK_SIZE}, 2 * {CHUNK_SIZE}))
print("done", flush=True)
"""


def _check_ready_chunks(cache_dir: str, blob) -> int:
    path = os.path.join(cache_dir, blob.blob_id + ".chunk_map")
    if not os.path.exists(path):
        return 0
    m = IndexedChunkMap(path, blob.info.chunk_count)
    try:
        with open(os.path.join(cache_dir, blob.blob_id + ".blob.data"), "rb") as f:
            for i in m.ready_indices():
                c = blob.chunks[i]
                f.seek(c.uncompressed_offset)
                assert f.read(c.uncompressed_size) == blob.plain[c.uncompressed_offset:][: c.uncompressed_size], \
                    f"chunk {i} marked ready holds wrong data"
        return m.ready_count()
    finally:
        m.close()


def test_sigkill_mid_write_leaves_no_wrong_ready_chunk(tmp_path):
    blob = make_blob(CHUNKS, chunk_size=CHUNK_SIZE, seed=1, compressor=Compressor.ZSTD)
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    (blob_dir / blob.blob_id).write_bytes(blob.data)
    cache_dir = str(tmp_path / "cache")
    rng = random.Random(42)
    ready_counts = []
    for round_ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(blob_dir), cache_dir, str(round_)],
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = proc.stdout.readline()
            assert line == b"ready\n", proc.stderr.read().decode()[-2000:]
            time.sleep(rng.uniform(0.005, 0.06))
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
        ready_counts.append(_check_ready_chunks(cache_dir, blob))
    print("ready chunks after each kill:", ready_counts)
    assert ready_counts[-1] > 0
    assert ready_counts == sorted(ready_counts), "a restart must keep what was cached"
    # restart in-process: everything ready is reused, the rest is fetched, all correct
    backend = LocalFsBackend(dir=str(blob_dir))
    mgr = FileCacheManager(cache_dir, backend)
    dev = BlobDevice([blob.info], mgr)
    before = mgr.metrics.backend_read_bytes.value
    assert dev.read(blob.iovec(0, len(blob.plain))) == blob.plain
    fetched = mgr.metrics.backend_read_bytes.value - before
    assert fetched < len(blob.data) or ready_counts[-1] == 0
    assert dev.blob_data_path(0)
    dev.close()
