"""An OCI-ref (zran) image through real containerd: CRI pull of the converted reference, runc
runs it lazily, and the registry serves only the bootstrap layer, the config and byte ranges
of the original gzip layers."""

from __future__ import annotations

import pytest

from integration.harness.images import File, Image, Layer, busybox_image, generated_files
from integration.test_snapshotter_containerd import SNAPSHOTTER, kill_recorded_daemons
from rafs.convert.cli import main as nydusify

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture
def stack(registry, nydus_snapshotter, nydus_containerd):
    yield registry, nydus_snapshotter, nydus_containerd
    nydus_containerd.stop()
    nydus_snapshotter.terminate()
    kill_recorded_daemons(nydus_snapshotter.root)


def test_cri_pull_and_lazy_run_of_an_oci_ref_image(stack, tmp_path):
    reg, sn, cd = stack
    big = Layer.from_tree(generated_files(24, 256 << 10, prefix="data"), "gzip")
    src = busybox_image({"etc/probe.txt": File(b"hello from a zran image\n")}, [big]).push(reg, "test/zran", "v1")
    target = f"{reg.host}/test/zran:oci-ref"
    prefetch = tmp_path / "prefetch"
    prefetch.write_text("/etc\n")  # prefetch only /etc: the data layer is read on demand alone
    assert nydusify(["convert", "--source", src.ref, "--target", target, "--source-insecure", "--target-insecure",
                     "--work-dir", str(tmp_path / "w"), "--no-progress", "--oci-ref",
                     "--prefetch-patterns", str(prefetch)]) == 0
    layers = {la["digest"]: la["size"] for la in src.manifest["layers"]}
    mark = reg.log_mark()
    cd.cri.pull_image(target)
    pulled = {e.blob_digest for e in reg.blob_fetches(since=mark)}
    assert not pulled & set(layers), "containerd downloaded an original layer"
    out = cd.run(target, ["/bin/sh", "-c", "cat /etc/probe.txt; head -c 100 /data/file0003.bin | wc -c"],
                 snapshotter=SNAPSHOTTER, namespace="k8s.io").stdout
    assert "hello from a zran image" in out and "100" in out
    fetches = reg.blob_fetches(since=mark)
    layer_reads = [e for e in fetches if e.blob_digest in layers]
    assert layer_reads, "no lazy read reached the original layers"
    assert all(e.status == 206 for e in layer_reads), "layer reads must be ranges"
    others = {e.blob_digest for e in fetches} - set(layers)
    assert len(others) <= 2  # the bootstrap layer and the config
    big_digest = "sha256:" + __import__("hashlib").sha256(big.data).hexdigest()
    big_read = sum(e.size for e in layer_reads if e.blob_digest == big_digest)
    assert big_read < layers[big_digest] / 2, f"read {big_read} of {layers[big_digest]} bytes of the data layer"
    print(f"zran lazy run: {sum(e.size for e in layer_reads)} B of {sum(layers.values())} B layers read")


def test_referrer_detection_serves_the_plain_oci_reference_lazily(registry, snapshotter_factory,
                                                                   containerd_factory, tmp_path):
    from integration.conftest import snapshotter_config_for

    reg = registry
    big = Layer.from_tree(generated_files(24, 256 << 10, prefix="data"), "gzip")
    src = busybox_image({"etc/probe.txt": File(b"hello via a referrer\n")}, [big]).push(reg, "test/ref", "v1")
    prefetch = tmp_path / "prefetch"
    prefetch.write_text("/etc\n")
    assert nydusify(["convert", "--source", src.ref, "--target", f"{reg.host}/test/ref:nydus", "--source-insecure",
                     "--target-insecure", "--work-dir", str(tmp_path / "w"), "--no-progress", "--oci-ref",
                     "--with-referrer", "--prefetch-patterns", str(prefetch)]) == 0
    cfg = snapshotter_config_for(reg)
    cfg["experimental"] = {"enable_referrer_detect": True}
    sn = snapshotter_factory(config=cfg)
    cd = containerd_factory(snapshotters={"nydus": sn.address}, cri_snapshotter="nydus", registries=[reg])
    try:
        layers = {la["digest"]: la["size"] for la in src.manifest["layers"]}
        mark = reg.log_mark()
        cd.cri.pull_image(src.ref)  # the plain OCI reference
        assert not {e.blob_digest for e in reg.blob_fetches(since=mark)} & set(layers), \
            "containerd downloaded an OCI layer although a nydus referrer exists"
        out = cd.run(src.ref, ["/bin/sh", "-c", "cat /etc/probe.txt; head -c 10 /data/file0001.bin | wc -c"],
                     snapshotter=SNAPSHOTTER, namespace="k8s.io").stdout
        assert "hello via a referrer" in out and "10" in out
        reads = [e for e in reg.blob_fetches(since=mark) if e.blob_digest in layers]
        assert reads and all(e.status == 206 for e in reads)
        big_digest = "sha256:" + __import__("hashlib").sha256(big.data).hexdigest()
        assert sum(e.size for e in reads if e.blob_digest == big_digest) < layers[big_digest] / 2
        # an image without a referrer (sharing no layer with the one above) is pulled normally
        plain = Image(layers=(Layer.from_tree(generated_files(2, 1000, prefix="x", seed=5), "gzip"),))
        pushed = plain.push(reg, "test/plain", "v1")
        mark = reg.log_mark()
        cd.cri.pull_image(pushed.ref)
        assert pushed.manifest["layers"][0]["digest"] in {e.blob_digest for e in reg.blob_fetches(since=mark)}
    finally:
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)
