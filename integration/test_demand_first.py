"""Demand reads first, end to end: a real docker-registry behind a throttled loopback link, the
real ``nydusd`` (fusedev and kernel EROFS) with a whole-image prefetch running.

* A read of a file the prefetch has not reached yet gets the link: the running prefetch
  transfers pause, so the bytes crossing the link during the read are the read's own (plus what
  was already queued in socket buffers) and it is not slowed to a share of the link.
* With the default ``amplify_io`` (1 MiB) and ``amplify_neighbours`` 0, reading a small file
  fetches that file only, not the neighbouring files laid out behind it in the blob.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import socket
import time

import pytest

from integration.bench_coldstart import ThrottledProxy
from integration.fs_support import cached_chunks, metric, nydusd, registry_config, require_stack
from rafs import erofs
from storage.records import Compressor

pytestmark = [pytest.mark.root]

RATE = 2 << 20  #: link bytes/s: the 12 MiB image takes 6 s to prefetch


class CountingProxy(ThrottledProxy):
    """The throttled proxy, also logging (time, bytes) of everything sent to the client."""

    def __init__(self, upstream, rate) -> None:
        super().__init__(upstream, rate)
        self.sent: list[tuple[float, int]] = []
        take = self.bucket.take

        def counted(n: int) -> None:
            take(n)
            self.sent.append((time.monotonic(), n))

        self.bucket.take = counted

    @staticmethod
    def _pump(src, dst, bucket) -> None:
        if bucket is not None:
            # a link's queue is small: without this, loopback autotuning lets megabytes that
            # already "crossed the link" sit in the proxy's send buffer of a paused connection
            dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        ThrottledProxy._pump(src, dst, bucket)

    def bytes_between(self, t0: float, t1: float) -> int:
        return sum(n for t, n in list(self.sent) if t0 <= t <= t1)

    def total(self) -> int:
        return sum(n for _, n in list(self.sent))


def _build(tmp_path, content: dict[str, bytes], links: dict[str, str] | None = None, **options):
    """Build ``content`` (path -> bytes, and ``links``: path -> symlink target) into one blob
    under ``tmp_path/blobs``; returns the builder's result and that directory."""
    from rafs.builder.build import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir()
    for rel, data in content.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    for rel, target in (links or {}).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, src / rel)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    return build(str(src), bootstrap_out=str(tmp_path / "boot"), blob_dir=str(blobs),
                 options=BuildOptions(**options)), blobs


@pytest.fixture
def image(tmp_path):
    """12 × 1 MiB random files then small files, built into one blob pushed to a registry."""
    require_stack()
    from integration.harness.registry import Registry

    rnd = random.Random(11)
    content = {}
    for i in range(12):
        content[f"big{i:02d}"] = rnd.randbytes(1 << 20)
    for name in ("small-a", "small-b", "small-c", "zz-last"):
        content[name] = rnd.randbytes(5000)
    res, blobs = _build(tmp_path, content, compressor=Compressor.NONE)
    with Registry() as registry:
        for blob_id in os.listdir(blobs):
            digest = registry.push_blob("test/image", (blobs / blob_id).read_bytes())
            assert digest == "sha256:" + blob_id
        proxy = CountingProxy(("127.0.0.1", registry.port), RATE)
        try:
            yield res.bootstrap, content, registry, proxy
        finally:
            proxy.close()


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_demand_read_does_not_wait_behind_running_prefetch(image, tmp_path, driver):
    bootstrap, content, registry, proxy = image
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    cfg = registry_config(proxy.host, str(tmp_path / "cache"),
                          fs_prefetch={"enable": True, "prefetch_all": True, "threads_count": 6,
                                       "merging_size": 1 << 20})
    with nydusd(tmp_path, bootstrap=bootstrap, config=cfg, fs_driver=driver) as (client, mnt, _):
        deadline = time.monotonic() + 30
        while proxy.total() < (1 << 20):  # the whole-image prefetch streams 6 GETs of 1 MiB
            assert time.monotonic() < deadline, "prefetch did not start"
            time.sleep(0.05)
        t0 = time.monotonic()
        with open(os.path.join(mnt, "big11"), "rb") as f:  # 1 MiB the prefetch reaches last
            assert f.read() == content["big11"]
        t1 = time.monotonic()
        during = proxy.bytes_between(t0, t1)
        print(f"demand read {t1 - t0:.3f} s, {during} bytes on the link meanwhile")
        # sharing the link with 6 running prefetch GETs, the read gets a seventh of it: ~6 MiB
        # cross the link in ~3 s. Yielded to, it takes its own 1 MiB plus what the 6 paused
        # transfers still had in socket buffers (~270 KiB each): ~2.6 MiB in ~1.3 s
        assert during < 5 << 20, f"{during} bytes crossed the link during the demand read"  # 4.1 MiB seen under load
        assert t1 - t0 < 2.2, f"demand read took {t1 - t0:.2f} s behind the prefetch"
        # and the prefetch still completes the image afterwards
        deadline = time.monotonic() + 30
        while proxy.total() < 12 << 20:
            assert time.monotonic() < deadline, f"prefetch stalled at {proxy.total()} bytes"
            time.sleep(0.1)


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_amplification_stays_inside_the_file(image, tmp_path, driver):
    bootstrap, content, registry, proxy = image
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    # amplify_io: default 1 MiB; no neighbours at all (the default lets 128 KiB of them in)
    cfg = registry_config(proxy.host, str(tmp_path / "cache"), amplify_neighbours=0)
    with nydusd(tmp_path, bootstrap=bootstrap, config=cfg, fs_driver=driver) as (client, mnt, _):
        mark = registry.log_mark()
        with open(os.path.join(mnt, "small-b"), "rb") as f:
            assert f.read() == content["small-b"]
        time.sleep(0.3)  # the access log is written after the response
        gets = registry.blob_fetches(since=mark)
        data_gets = [e.size for e in gets if e.size != 4096 or len(gets) == 1]
        # the CI table (loaded at the first read) aside: one GET of small-b's 5000 bytes, not
        # small-c / zz-last behind it (nor 1 MiB of big files)
        assert sum(data_gets) <= 2 * 5000 + 8192, [e.size for e in gets]
        with open(os.path.join(mnt, "big03"), "rb") as f:
            f.seek(4096)
            assert f.read(4096) == content["big03"][4096:8192]
        time.sleep(0.3)
        sizes = [e.size for e in registry.blob_fetches(since=mark)]
        assert max(sizes) <= 1 << 20, sizes  # big03 (one 1 MiB chunk), not big04 behind it
        text = client.metrics() if hasattr(client, "metrics") else ""
        if text:
            assert metric(text, "nydus_storage_backend_read_bytes_total") <= (1 << 20) + 2 * 5000 + 65536


def test_erofs_read_ahead_follows_files_not_the_blob(tmp_path):
    """Kernel EROFS reads blob files, which carry no file: the daemon's sequential read-ahead
    must still stop at the end of the image file being read (``BlobFiles.same_file``), not ramp
    up over the blob into the file laid out behind it. The blob files are read with direct I/O,
    so the kernel reads ahead only within the image file (EROFS's own read-ahead), never past its
    end into the next file of the blob, as the FUSE page cache of the blob file did."""
    require_stack()
    if not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    from integration.harness.registry import Registry
    from rafs.metadata import Rafs

    rnd = random.Random(5)
    # a: 24 full 64 KiB chunks and a short one; b right behind it in the same blob
    content = {"a": rnd.randbytes(24 * 65536 + 1000), "b": rnd.randbytes(32 * 65536 + 1000)}
    res, blobs = _build(tmp_path, content, chunk_size=65536, compressor=Compressor.NONE)
    with Rafs.open(res.bootstrap) as rafs:
        assert len(rafs.blobs) == 1
        blob = rafs.blobs[0]
        idx = {n: {d.chunk.index for d in rafs.lookup_path("/" + n).chunks(0, len(c))} for n, c in content.items()}
    assert max(idx["a"]) + 1 == min(idx["b"])  # adjacent in the blob
    cache_dir = tmp_path / "cache"
    with Registry() as registry:
        registry.push_blob("test/image", (blobs / blob.blob_id).read_bytes())
        cfg = registry_config(f"127.0.0.1:{registry.port}", str(cache_dir))
        with nydusd(tmp_path, bootstrap=res.bootstrap, config=cfg, fs_driver="erofs") as (client, mnt, _):
            with open(os.path.join(mnt, "a"), "rb") as f:  # sequentially, in 64 KiB reads
                got = b"".join(iter(lambda: f.read(65536), b""))
            assert got == content["a"]
            time.sleep(1.0)  # read-ahead queued by the last reads lands
            fetched = metric(client.metrics(), "nydus_storage_backend_read_bytes_total")
    ready = cached_chunks(cache_dir, blob)
    assert idx["a"] <= ready
    # nothing of b: no read past a's end reaches the daemon (with the blob file's page cache the
    # kernel's 128 KiB read-ahead did, amplified to 1 MiB), and the daemon's own read-ahead stops
    # at a's last chunk (without the file map it ramps over all 32 chunks of b)
    in_b = ready & idx["b"]
    assert not in_b, f"{len(in_b)} chunks of b fetched reading a"
    # a's bytes and the CI table
    assert fetched <= len(content["a"]) + (256 << 10), fetched


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_the_user_db_loader_and_libc_are_fetched_at_mount_before_any_read(tmp_path, driver):
    """With prefetch on and no start-up set in the image (the snapshotter's default), mounting
    fetches ``/etc/group``, ``/etc/passwd``, the dynamic loader, ``/etc/ld.so.cache`` and the C
    library beside the loader — found through Debian's usrmerge symlinks — and nothing else (not
    the 1 MiB of neighbours the default ``amplify_io`` would add); reads of them are then served
    from the cache. ``runtime_files = false`` fetches nothing before a read."""
    require_stack()
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    from integration.harness.registry import Registry
    from rafs.metadata import Rafs

    multi = "usr/lib/x86_64-linux-gnu"
    rnd = random.Random(13)
    content = {f"{multi}/ld-linux-x86-64.so.2": rnd.randbytes(200 << 10),
               f"{multi}/libc.so.6": rnd.randbytes(3 * 65536 + 500), "etc/ld.so.cache": rnd.randbytes(20000),
               f"{multi}/libm.so.6": rnd.randbytes(4 * 65536), "usr/bin/python3": rnd.randbytes(6 * 65536),
               "etc/passwd": b"root:x:0:0::/root:/bin/sh\n", "etc/group": b"root:x:0:\n",
               "etc/hostname": b"not read at start\n"}
    usrmerge = {"usr/lib64/ld-linux-x86-64.so.2": "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "lib": "usr/lib", "lib64": "usr/lib64"}
    res, blobs = _build(tmp_path, content, usrmerge, chunk_size=65536, compressor=Compressor.NONE)
    with Rafs.open(res.bootstrap) as rafs:
        [blob] = rafs.blobs
        idx = {rel: {d.chunk.index for d in rafs.lookup_path("/" + rel).chunks(0, len(data))}
               for rel, data in content.items()}
    runtime = (idx[f"{multi}/ld-linux-x86-64.so.2"] | idx[f"{multi}/libc.so.6"] | idx["etc/ld.so.cache"]
               | idx["etc/passwd"] | idx["etc/group"])
    ready = functools.partial(cached_chunks, blob=blob)

    with Registry() as registry:
        registry.push_blob("test/image", (blobs / blob.blob_id).read_bytes())
        for on in (True, False):
            cache_dir = tmp_path / f"cache-{on}"
            (tmp_path / f"d-{on}").mkdir()
            cfg = registry_config(f"127.0.0.1:{registry.port}", str(cache_dir),
                                  fs_prefetch={"enable": True, "prefetch_all": False, "runtime_files": on})
            with nydusd(tmp_path / f"d-{on}", bootstrap=res.bootstrap, config=cfg, fs_driver=driver) \
                    as (client, mnt, _):
                deadline = time.monotonic() + (10 if on else 1.5)
                while time.monotonic() < deadline and not runtime <= ready(cache_dir):
                    time.sleep(0.05)
                fetched = ready(cache_dir)
                if not on:
                    assert fetched == set(), "fetched before any read with runtime_files off"
                    continue
                assert fetched == runtime, f"fetched at mount: {sorted(fetched)}, want {sorted(runtime)}"
                mark = registry.log_mark()
                # what containerd and runc look up, then what the loader does: opened through
                # the /lib64 link, then libc beside it
                for path, rel in (("etc/group", "etc/group"), ("etc/passwd", "etc/passwd"),
                                  ("lib64/ld-linux-x86-64.so.2", f"{multi}/ld-linux-x86-64.so.2"),
                                  ("lib/x86_64-linux-gnu/libc.so.6", f"{multi}/libc.so.6")):
                    with open(os.path.join(mnt, path), "rb") as f:
                        assert f.read() == content[rel]
                time.sleep(0.3)  # the access log is written after the response
                assert registry.blob_fetches(since=mark) == [], "a read of a prefetched file went to the registry"


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_ci_tables_beside_the_bootstrap_spare_the_mount_its_gets(tmp_path, driver):
    """``nydusify convert`` puts each blob's ``<blob id>.blob.meta`` (its CI table) in the
    bootstrap layer beside ``image.boot``: nydusd seeds its cache with them at mount, so the
    mount fetches nothing (the chunk tables load from disk) and a read makes one GET, its data.
    The same image without them beside the bootstrap fetches each blob's table at mount."""
    require_stack()
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    from integration.harness.registry import Registry
    from rafs.convert.layer import write_blob_meta
    from rafs.metadata import Rafs
    from storage.meta.header import BLOB_CCT_HEADER_SIZE

    rnd = random.Random(17)
    content = {"etc/a": rnd.randbytes(100 << 10), "etc/b": rnd.randbytes(3 * 65536 + 7)}
    res, blobs = _build(tmp_path, content, chunk_size=65536)
    with Rafs.open(res.bootstrap) as rafs:
        [blob] = rafs.blobs
    assert blob.ci_compressed_size > 0
    ci_get = blob.ci_compressed_size + BLOB_CCT_HEADER_SIZE  # the range storage asks for

    with Registry() as registry:
        registry.push_blob("test/image", (blobs / blob.blob_id).read_bytes())
        for seeded in (True, False):
            layer = tmp_path / f"layer-{seeded}" / "image"   # the unpacked bootstrap layer
            layer.mkdir(parents=True)
            boot = layer / "image.boot"
            shutil.copyfile(res.bootstrap, boot)
            if seeded:
                write_blob_meta(str(blobs / blob.blob_id), blob, str(layer / f"{blob.blob_id}.blob.meta"))
            cache_dir = tmp_path / f"cache-{seeded}"
            (tmp_path / f"d-{seeded}").mkdir()
            cfg = registry_config(f"127.0.0.1:{registry.port}", str(cache_dir), fs_prefetch={"enable": False})
            mark = registry.log_mark()
            with nydusd(tmp_path / f"d-{seeded}", bootstrap=str(boot), config=cfg, fs_driver=driver) \
                    as (client, mnt, _):
                time.sleep(1.0)  # the chunk tables load in the background after the mount
                at_mount = registry.blob_fetches(since=mark)
                if not seeded:
                    assert [e.size for e in at_mount] == [ci_get], f"want the CI table's GET, got {at_mount}"
                    continue
                assert at_mount == [], f"the mount fetched {at_mount} with the CI table beside the bootstrap"
                assert (cache_dir / f"{blob.blob_id}.blob.meta").is_file()
                with open(os.path.join(mnt, "etc/b"), "rb") as f:
                    assert f.read() == content["etc/b"]
                time.sleep(0.3)  # the access log is written after the response
                sizes = [e.size for e in registry.blob_fetches(since=mark)]
                assert sizes and ci_get not in sizes, f"GETs {sizes}: want data only ({ci_get}: CI table)"
