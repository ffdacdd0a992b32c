"""The peer stargz-snapshotter, end to end: busybox image -> eStargz (ctr-remote) in a local
registry -> containerd CRI-pulls it through the stargz snapshotter and runs a container that
reads two files; the registry serves less than the image (lazy).

The first run builds the snapshotter with Go (about 2 minutes on the loaded 2-core VM, cached in
.cache/stargz afterwards), hence ``slow``. Skips with the reason when it cannot be built; the
``ctr-remote image optimize`` test needs only ctr-remote.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile

import pytest

from integration.conftest import HELLO, need_containerd_stack
from integration.harness import HarnessError
from integration.harness.images import Layer, busybox_image, generated_files
from integration.harness.stargz import (StargzSnapshotter, build_stargz_snapshotter,
                                        convert_to_estargz)
from integration.harness.util import mounts_under

pytestmark = [pytest.mark.root, pytest.mark.containerd]


@pytest.fixture(scope="module")
def stargz_binary() -> str:
    need_containerd_stack()
    if shutil.which("ctr-remote") is None:
        pytest.skip("ctr-remote not installed (Debian package stargz-snapshotter)")
    try:
        return build_stargz_snapshotter()
    except HarnessError as e:
        pytest.skip(f"the stargz-snapshotter peer cannot be built here: {e}")


def _fuse_mounts(prefix: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        types = {line.split()[1]: line.split()[2] for line in f}
    return [m for m in mounts_under(prefix) if types.get(m, "").startswith("fuse")]


@pytest.mark.slow
@pytest.mark.fuse
@pytest.mark.timeout(1500)   # a cold Go build takes minutes under load (107 s measured)
def test_estargz_image_runs_lazily_through_stargz_snapshotter(stargz_binary, registry,
                                                              containerd_factory) -> None:
    img = busybox_image({"etc/hello.txt": HELLO},
                        [Layer.from_tree(generated_files(6, 512 * 1024, prefix="data"))])
    pushed = img.push(registry, "peer/app", "oci")
    esgz_ref = registry.ref("peer/app", "esgz")
    convert_to_estargz(pushed.ref, esgz_ref)
    manifest = registry.get_manifest("peer/app", "esgz")[0]
    assert b"containerd.io/snapshot/stargz/toc.digest" in manifest   # really eStargz layers
    esgz_size = sum(la["size"] for la in json.loads(manifest)["layers"])

    with StargzSnapshotter(registries=[registry], binary=stargz_binary,
                           config={"no_background_fetch": True}) as sz:
        ctd = containerd_factory(snapshotters={"stargz": sz.address}, cri_snapshotter="stargz",
                                 registries=[registry])
        mark = registry.log_mark()
        ctd.cri.pull_image(esgz_ref)
        r = ctd.run(esgz_ref, ["/bin/sh", "-c", "cat /etc/hello.txt; wc -c < /data/file0002.bin"],
                    snapshotter="stargz", namespace="k8s.io", check=False)
        assert r.returncode == 0, r.stderr + ctd.log() + sz.log()
        assert r.stdout == HELLO.decode() + f"{512 * 1024}\n"
        assert len(_fuse_mounts(sz.root)) == len(img.layers), sz.log()   # one lazy mount per layer
        fetched = registry.bytes_fetched(since=mark, repo="peer/app")
        print(f"eStargz image {esgz_size} bytes, registry served {fetched} bytes")
        assert 0 < fetched < esgz_size * 0.8, (fetched, esgz_size)
        ctd.stop()
    assert not mounts_under(sz.dir)   # stop() left nothing mounted


def _layer_entries(registry, repo: str, digest: str) -> list[str]:
    data = registry.get_blob(repo, digest)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        return tar.getnames()


def test_ctr_remote_optimize_puts_the_workload_files_first(registry) -> None:
    """``ctr-remote image optimize`` runs the workload under runc and records what it reads: in
    each layer those files come before the prefetch landmark, the others after it."""
    need_containerd_stack()
    if shutil.which("ctr-remote") is None:
        pytest.skip("ctr-remote not installed (Debian package stargz-snapshotter)")
    img = busybox_image({"etc/hello.txt": HELLO},
                        [Layer.from_tree(generated_files(3, 64 * 1024, prefix="data"))])
    pushed = img.push(registry, "peer/opt", "oci")
    convert_to_estargz(pushed.ref, registry.ref("peer/opt", "esgz-opt"), optimize=True,
                       workload_argv=["/bin/cat", "/etc/hello.txt", "/data/file0001.bin"])
    manifest = json.loads(registry.get_manifest("peer/opt", "esgz-opt")[0])
    firsts = []
    for layer in manifest["layers"]:
        names = _layer_entries(registry, "peer/opt", layer["digest"])
        assert ".prefetch.landmark" in names, names
        firsts += names[:names.index(".prefetch.landmark")]
    for path in ("bin/busybox", "etc/hello.txt", "data/file0001.bin"):
        assert path in firsts, firsts
    assert "data/file0000.bin" not in firsts
