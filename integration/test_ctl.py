"""nydusctl against a real containerd (CRI pull, ctr run) and registry."""

from __future__ import annotations

import os
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
