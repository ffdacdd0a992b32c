"""``[cache_manager] size_limit`` end to end: snapshotter config → nydusd ``limit_size`` → the
storage cache's LRU eviction of whole blobs no instance uses, through real containerd + CRI."""

from __future__ import annotations

import hashlib
import os
import pathlib

import pytest

from integration.conftest import need_containerd_stack, snapshotter_config_for
from integration.harness.images import generated_files, nydus_image
from integration.snapshotter_support import daemon_instance_count, wait_for
from integration.test_snapshotter_restart import build_image

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.timeout(180)]

LIMIT = 7 << 20


def cache_usage(cache: pathlib.Path) -> dict[str, int]:
    """Allocated bytes per blob id in the cache dir."""
    out: dict[str, int] = {}
    for p in cache.iterdir():
        out[p.name[:64]] = out.get(p.name[:64], 0) + os.stat(p).st_blocks * 512
    return out


def test_cache_stays_under_size_limit_after_reading_two_images(registry, snapshotter_factory,
                                                               containerd_factory, tmp_path):
    need_containerd_stack()
    cfg = snapshotter_config_for(registry, prefetch=False)
    cfg["cache_manager"] = {"size_limit": LIMIT}
    sn = snapshotter_factory(config=cfg)
    cd = containerd_factory(snapshotters={"nydus": sn.address}, cri_snapshotter="nydus", registries=[registry])
    cache = pathlib.Path(sn.root, "cache")
    blob_ids = []
    for n, name in enumerate(("a", "b")):
        # each image: busybox (1.9 MB) + 3 MiB of incompressible files ≈ 5 MB in the cache
        files = {k: e.data for k, e in generated_files(3, 1 << 20, seed=40 + n).items()}
        boot, blob = build_image(tmp_path, name, files)
        blob_ids.append(hashlib.sha256(blob).hexdigest())
        image = nydus_image(boot, [blob]).push(registry, "test/limit", name)
        cd.cri.pull_image(image.ref)
        out = cd.run(image.ref, ["/bin/sh", "-c", "cat /bin/busybox /data/* | md5sum"], snapshotter="nydus",
                     namespace="k8s.io").stdout
        want = hashlib.md5(pathlib.Path("/bin/busybox").read_bytes() + b"".join(
            files[k] for k in sorted(files))).hexdigest()
        assert want in out
        assert blob_ids[-1] in cache_usage(cache), "the image's blob is not in the cache"
        if n == 0:
            first = sum(cache_usage(cache).values())
            assert 4 << 20 < first <= LIMIT, first  # one image fits; two do not
        wait_for(lambda: daemon_instance_count(sn.root) == 0, 20, "the instance unmounted (--rm)")
    # both images are still pulled (Cleanup's GC keeps their blobs), but the limit evicted the
    # least recently used blob no instance had open: image A's
    try:
        wait_for(lambda: sum(cache_usage(cache).values()) <= LIMIT, 20, "cache under the size limit")
    except AssertionError:
        raise AssertionError(f"cache {cache_usage(cache)} over {LIMIT}\n{sn.log()[-2000:]}") from None
    usage = cache_usage(cache)
    assert blob_ids[0] not in usage and blob_ids[1] in usage, usage
    # the evicted image still runs: its blob is fetched again
    out = cd.run(f"{registry.host}/test/limit:a", ["/bin/sh", "-c", "md5sum /data/file0000.bin"], snapshotter="nydus",
                 namespace="k8s.io").stdout
    assert hashlib.md5(generated_files(3, 1 << 20, seed=40)["data/file0000.bin"].data).hexdigest() in out
    wait_for(lambda: sum(cache_usage(cache).values()) <= LIMIT, 20, "cache under the size limit again")
