"""nydusctl against a real containerd (CRI pull, ctr run) and registry."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from integration.conftest import HELLO
from integration.harness.snapshotter import REPO_ROOT

pytestmark = pytest.mark.containerd


def nydusctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "snapshotter.ctl", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


def test_nydusctl_pull_and_run_overlayfs(containerd, busybox_image, registry) -> None:
    a = ["--address", containerd.address]
    mark = registry.log_mark()
    r = nydusctl(*a, "pull", busybox_image.ref)
    assert r.returncode == 0, r.stderr
    image_id = r.stdout.strip()
    assert image_id.startswith("sha256:")
    assert registry.blob_fetches(busybox_image.layers[0].digest, since=mark)
    assert containerd.cri.image_status(busybox_image.ref).id == image_id

    r = nydusctl(*a, "images")
    assert r.returncode == 0 and busybox_image.ref in r.stdout

    cg = f"/{containerd.cgroup_prefix}/ctl1"
    r = nydusctl(*a, "run", "--snapshotter", "overlayfs", "--cgroup", cg, "-e", "X=42",
                 busybox_image.ref, "/bin/sh", "-c", "cat /etc/hello.txt; echo x=$X; exit 7")
    assert r.stdout == HELLO.decode() + "x=42\n", r.stderr
    assert r.returncode == 7                       # the container's exit status

    r = nydusctl(*a, "rmi", busybox_image.ref)
    assert r.returncode == 0, r.stderr
    assert containerd.cri.image_status(busybox_image.ref) is None
    assert nydusctl(*a, "rmi", busybox_image.ref).returncode == 1


def test_nydusctl_run_pulls_missing_image(containerd, busybox_image) -> None:
    assert containerd.cri.image_status(busybox_image.ref) is None
    r = nydusctl("--address", containerd.address, "run", "--snapshotter", "overlayfs",
                 "--cgroup", f"/{containerd.cgroup_prefix}/ctl2", busybox_image.ref,
                 "/bin/cat", "/etc/hello.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == HELLO.decode()
    assert "pulled" in r.stderr
    assert containerd.cri.image_status(busybox_image.ref) is not None


def test_nydusctl_errors_against_real_containerd(containerd, registry) -> None:
    a = ["--address", containerd.address]
    r = nydusctl(*a, "pull", f"{registry.host}/no/such:image")
    assert r.returncode == 1 and "nydusctl: pull" in r.stderr
    r = nydusctl(*a, "run", "--pull", "never", f"{registry.host}/no/such:image", "true")
    assert r.returncode == 1 and "not present" in r.stderr


def test_nydusctl_pull_run_through_nydus_snapshotter(nydus_containerd, busybox_image) -> None:
    """A plain OCI image through our snapshotter (CRI snapshotter = nydus)."""
    a = ["--address", nydus_containerd.address]
    r = nydusctl(*a, "pull", busybox_image.ref)
    assert r.returncode == 0, r.stderr
    r = nydusctl(*a, "run", "--cgroup", f"/{nydus_containerd.cgroup_prefix}/ctl3",
                 busybox_image.ref, "/bin/cat", "/etc/hello.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == HELLO.decode()


def test_upstream_nydus_image_is_pulled_lazily(registry, vectors_dir, lazy_containerd,
                                               tmp_path) -> None:
    """An upstream-built nydus image (RAFS v5 vector) via nydusctl pull: the data blob is not
    downloaded at pull time, and a view of the image reads back the right file contents."""
    import hashlib
    import json as _json

    from integration.harness.containerd import mount_all
    from integration.harness.images import chain_ids, nydus_image
    from integration.harness.util import unmount_all
    rep = vectors_dir / "dragonflyoss-nydus/tests/texture/repeatable"
    blob_path = next((rep / "blobs").glob("7334a259*"))
    img = nydus_image((rep / "sha256-nocompress-repeatable").read_bytes(),
                      [blob_path.read_bytes()], fs_version="5")
    pushed = img.push(registry, "vec/v5", "nydus")
    blob_digest = "sha256:" + blob_path.name
    mark = registry.log_mark()
    ctd = lazy_containerd
    r = nydusctl("--address", ctd.address, "pull", pushed.ref)
    assert r.returncode == 0, r.stderr + ctd.log()
    full = [e for e in registry.blob_fetches(blob_digest, since=mark) if e.status == 200]
    assert full == [], "the nydus data blob was downloaded whole at pull time"

    expected = {}
    for line in (rep / "sha256-nocompress-repeatable.result").read_text().splitlines():
        parts = line.split("  ", 1)
        if len(parts) == 2 and len(parts[0]) == 32 and parts[1].startswith("/"):
            expected[parts[1]] = parts[0]
    top = chain_ids(_json.loads(img.config_json())["rootfs"]["diff_ids"])[-1]
    mounts = ctd.view_mounts("pyn-view-1", top, snapshotter="nydus")
    target = tmp_path / "view"
    target.mkdir()
    mount_all(mounts, str(target))
    try:
        for path in ("/normal-file-test/test.sh", "/normal-file-test/holefiles/mid-non-hole-4096"):
            data = (target / path.lstrip("/")).read_bytes()
            assert hashlib.md5(data).hexdigest() == expected[path], path
    finally:
        unmount_all(str(target))
    # nydusctl info/metrics against the real nydusd the snapshotter started for this image
    api_socks = sorted(pathlib.Path(ctd.snapshotter.root).rglob("api.sock"))
    assert api_socks, "no nydusd API socket under the snapshotter root"
    r = nydusctl("info", "--api-sock", str(api_socks[0]))
    assert r.returncode == 0, r.stderr
    assert _json.loads(r.stdout).get("state") == "RUNNING", r.stdout
    r = nydusctl("metrics", "--api-sock", str(api_socks[0]))
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    blob_gets = registry.blob_fetches(blob_digest, since=mark)
    fetched = sum(e.size for e in blob_gets)
    print(f"data blob: {len(blob_gets)} GETs, {fetched} of {len(img.layers[0].data)} bytes")
    assert 0 < fetched < len(img.layers[0].data)   # only what the two reads needed


def test_nydusctl_runs_converted_image_lazily(registry, lazy_containerd, tmp_path) -> None:
    """OCI image -> nydusify convert -> nydusctl run: right output, fewer bytes than the OCI
    image (the container reads one of several large files; background prefetch is off)."""
    from integration.harness.images import Layer, busybox_image, generated_files
    img = busybox_image({"etc/hello.txt": HELLO},
                        [Layer.from_tree(generated_files(6, 512 * 1024, prefix="data"))])
    pushed = img.push(registry, "conv/app", "oci")
    target = f"{registry.host}/conv/app:nydus"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    r = subprocess.run([sys.executable, "-c", "import sys; from rafs.convert.cli import main; "
                        "sys.exit(main())", "convert", "--source", pushed.ref, "--target", target,
                        "--source-insecure", "--target-insecure", "--no-progress",
                        "--work-dir", str(tmp_path / "convert")],
                       capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    mark = registry.log_mark()
    r = nydusctl("--address", lazy_containerd.address, "run",
                 "--cgroup", f"/{lazy_containerd.cgroup_prefix}/conv1", target,
                 "/bin/sh", "-c", "cat /etc/hello.txt; wc -c < /data/file0002.bin")
    assert r.returncode == 0, r.stderr + lazy_containerd.log()
    assert r.stdout == HELLO.decode() + f"{512 * 1024}\n"
    fetched = registry.bytes_fetched(since=mark, repo="conv/app")
    oci_size = sum(la.size for la in pushed.layers)
    assert 0 < fetched < oci_size * 0.8, (fetched, oci_size)
