"""Mount the upstream vectors with the real nydusd (FUSE and kernel EROFS) and compare content.

v5: ``repeatable/sha256-nocompress-repeatable`` + blob ``7334…``, oracle ``.result`` (tree + md5).
v6: ``bootstrap/rafs-v6-2.2.boot`` + blob ``be7d77…`` (two zstd chunks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading

import pytest

from integration.fs_support import (BlobServer, localfs_config, md5, metric, nydusd, registry_config,
                                    require_stack, result_oracle, settled_metric, walk_types)
from rafs import erofs

pytestmark = [pytest.mark.fuse, pytest.mark.root]

V6_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


@pytest.fixture
def tex(vectors_dir):
    return vectors_dir / "dragonflyoss-nydus/tests/texture"


@pytest.fixture
def v5(tex, tmp_path):
    """(bootstrap, blob dir with the v5 blob, oracle)."""
    blob_dir = tmp_path / "blobs5"
    blob_dir.mkdir()
    for f in (tex / "repeatable/blobs").iterdir():
        if f.name.startswith("7334"):
            os.symlink(f, blob_dir / f.name)
    oracle = result_oracle(str(tex / "repeatable/sha256-nocompress-repeatable.result"))
    return str(tex / "repeatable/sha256-nocompress-repeatable"), str(blob_dir), oracle


@pytest.fixture
def v6(tex, tmp_path):
    blob_dir = tmp_path / "blobs6"
    blob_dir.mkdir()
    os.symlink(tex / "blobs" / V6_BLOB, blob_dir / V6_BLOB)
    return str(tex / "bootstrap/rafs-v6-2.2.boot"), str(blob_dir)


def _check_v5_tree(mnt: str, oracle) -> None:
    types, sums, targets = oracle
    assert walk_types(mnt) == types
    for path, target in targets.items():
        assert os.readlink(mnt + path) == target
    for path, digest in sums.items():
        assert md5(mnt + path) == digest, path


def test_v5_vector_fusedev_content_and_lazy(v5, tmp_path):
    require_stack()
    boot, blob_dir, oracle = v5
    cache = tmp_path / "cache"
    with nydusd(tmp_path, bootstrap=boot, config=localfs_config(blob_dir, str(cache))) as (client, mnt, _):
        walk_types(mnt)  # full metadata walk: readdir + lstat everywhere
        m = client.metrics()
        assert metric(m, "nydus_storage_backend_read_requests_total") == 0, "metadata must not touch the blob"
        assert metric(m, "nydusd_read_count") == 0
        one = "/normal-file-test/busybox/1f777dbdd68d1c4d554bc0d20e027bfef9ed2dfe2d8d5f029e958552a0e12475/VERSION"
        assert md5(mnt + one) == oracle[1][one]
        m = client.metrics()
        assert 1 <= metric(m, "nydus_storage_backend_read_requests_total") <= 2
        backend = client.request("GET", "/api/v1/metrics/backend", raw=True)
        assert metric(backend, "nydus_storage_backend_read_requests_total") >= 1 and "cache_hits" not in backend
        cache = client.request("GET", "/api/v1/metrics/blobcache?id=/", raw=True)
        assert "nydus_storage_cache_misses_total" in cache and "backend_read" not in cache
        _check_v5_tree(mnt, oracle)
        # hardlinks share an inode
        hl = [p for p, t in oracle[0].items() if p.startswith("/hardlink-test/") and t == "file"]
        assert len({os.stat(mnt + p).st_ino for p in hl}) < len(hl) or len(hl) < 2


def test_v5_sixteen_concurrent_readers(v5, tmp_path):
    require_stack()
    boot, blob_dir, oracle = v5
    sums = oracle[1]
    with nydusd(tmp_path, bootstrap=boot, config=localfs_config(blob_dir, str(tmp_path / "c"))) as (_, mnt, _):
        errors = []
        paths = sorted(sums)

        def reader(i: int) -> None:
            try:
                for p in paths[i % len(paths):] + paths[:i % len(paths)]:
                    assert md5(mnt + p) == sums[p], p
            except Exception as exc:  # collected, asserted below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]


def _v6_expect(tex) -> dict[str, int]:
    return {"lib.rs": 16931, "sync_io.rs": 13400}


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_v6_vector_both_drivers(v6, tex, tmp_path, driver):
    require_stack()
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    boot, blob_dir = v6
    with nydusd(tmp_path, bootstrap=boot, config=localfs_config(blob_dir, str(tmp_path / "c")),
                fs_driver=driver) as (client, mnt, _):
        assert erofs.mounted_fstype(mnt) == ("erofs" if driver == "erofs" else "fuse.rafs")
        # the mount fetches the blob's CI table (one request), nothing else
        tables = settled_metric(client, "nydus_storage_backend_read_requests_total")
        assert tables <= 1
        assert sorted(os.listdir(mnt)) == ["lib.rs", "sync_io.rs"]
        assert metric(client.metrics(), "nydus_storage_backend_read_requests_total") == tables  # lazy
        data = open(os.path.join(mnt, "sync_io.rs"), "rb").read()
        assert len(data) == 13400 and b"fn " in data
        lib = open(os.path.join(mnt, "lib.rs"), "rb").read()
        assert len(lib) == 16931 and lib.count(b"\n") > 100
        assert metric(client.metrics(), "nydus_storage_backend_read_requests_total") > tables


def test_shared_daemon_v5_and_v6_instances(v5, v6, tmp_path):
    require_stack()
    boot5, blobs5, oracle = v5
    boot6, blobs6 = v6
    with nydusd(tmp_path, bootstrap=None, config=None) as (client, mnt, _):
        client.mount("/v5", boot5, localfs_config(blobs5, str(tmp_path / "c5")))
        client.mount("/v6", boot6, localfs_config(blobs6, str(tmp_path / "c6")))
        assert sorted(os.listdir(mnt)) == ["v5", "v6"]
        _check_v5_tree(os.path.join(mnt, "v5"), oracle)
        client.umount("/v5")
        assert os.listdir(mnt) == ["v6"]
        assert len(open(os.path.join(mnt, "v6/lib.rs"), "rb").read()) == 16931
        client.mount("/v5", boot5, localfs_config(blobs5, str(tmp_path / "c5")))
        _check_v5_tree(os.path.join(mnt, "v5"), oracle)


@contextlib.contextmanager
def _v5_over_blob_server(v5, tmp_path):
    """nydusd on the v5 vector, its blob served over HTTP by a BlobServer that tests can take down
    (no read amplification); yields ``(server, client, mountpoint, process, file sizes)``."""
    boot, blob_dir, oracle = v5
    server = BlobServer(blob_dir)
    try:
        cfg = registry_config(server.host, str(tmp_path / "c"), amplify_io=0)
        with nydusd(tmp_path, bootstrap=boot, config=cfg) as (client, mnt, proc):
            yield server, client, mnt, proc, {p: os.stat(mnt + p).st_size for p in oracle[1]}
    finally:
        server.stop()


def test_backend_down_mid_read_eio_then_recovers(v5, tmp_path, capfd):
    require_stack()
    oracle = v5[2]
    with _v5_over_blob_server(v5, tmp_path) as (server, client, mnt, proc, sizes):
        paths = sorted((p for p in sizes if sizes[p] > 0), key=lambda p: sizes[p])
        first, second = paths[0], paths[-1]
        assert md5(mnt + first) == oracle[1][first]
        server.down = True
        asked = len(server.requests)
        with pytest.raises(OSError) as ei:
            md5(mnt + second)
        assert ei.value.errno == errno.EIO
        assert len(server.requests) > asked  # the failure came from the backend
        assert md5(mnt + first) == oracle[1][first]  # already read data keeps serving
        server.down = False
        assert md5(mnt + second) == oracle[1][second]
        assert proc.poll() is None
        assert metric(client.metrics(), "nydusd_read_errors") >= 1
    log = (tmp_path / "n.log").read_text()
    assert "read failed" in log and "blob " in log and "chunk " in log


def test_prefetch_fills_cache_before_reads(v5, tmp_path):
    require_stack()
    import time

    boot, blob_dir, oracle = v5
    cfg = localfs_config(blob_dir, str(tmp_path / "c"), fs_prefetch={"enable": True, "prefetch_all": True})
    with nydusd(tmp_path, bootstrap=boot, config=cfg) as (client, mnt, _):
        deadline = time.monotonic() + 30
        while metric(client.metrics(), "nydus_storage_prefetch_pending") > 0 or \
                metric(client.metrics(), "nydus_storage_prefetch_requests_total") == 0:
            assert time.monotonic() < deadline, client.metrics()
            time.sleep(0.1)
        before = metric(client.metrics(), "nydus_storage_backend_read_requests_total")
        assert before >= 1  # prefetch read the blob without any file being opened
        assert metric(client.metrics(), "nydusd_read_count") == 0
        for path, digest in oracle[1].items():
            assert md5(mnt + path) == digest
        assert metric(client.metrics(), "nydus_storage_backend_read_requests_total") == before


def test_partly_cached_blob_serves_cached_chunks_with_backend_down(v5, tmp_path):
    """Chunks already in a partly cached blob are served locally (on the daemon's event loop,
    see Instance.read_ready): the page cache dropped and the backend down, a file read before
    still reads, one never read answers EIO."""
    require_stack()
    oracle = v5[2]
    with _v5_over_blob_server(v5, tmp_path) as (server, client, mnt, proc, sizes):
        paths = sorted((p for p in sizes if sizes[p] > 8192), key=lambda p: sizes[p])
        read_before, never_read = paths[-1], paths[0]
        assert md5(mnt + read_before) == oracle[1][read_before]
        server.down = True
        asked = len(server.requests)
        fd = os.open(mnt + read_before, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the next read reaches the daemon
        finally:
            os.close(fd)
        reads = metric(client.metrics(), "nydusd_read_count")
        assert md5(mnt + read_before) == oracle[1][read_before]
        assert metric(client.metrics(), "nydusd_read_count") > reads
        assert len(server.requests) == asked  # nothing went to the (down) backend
        with pytest.raises(OSError) as ei:
            md5(mnt + never_read)
        assert ei.value.errno == errno.EIO
        assert proc.poll() is None
