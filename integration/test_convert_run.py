"""Lazy containers end to end: a plain OCI image -> ``nydusify convert`` -> containerd pulls it
through our snapshotter (data blobs never downloaded at pull) -> the container runs."""

from __future__ import annotations

import json

import pytest

from integration.conftest import HELLO
from integration.test_ctl import nydusctl
from rafs.convert.cli import main as nydusify

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.timeout(300)]


def test_converted_image_runs_lazily(registry, busybox_image, nydus_containerd, tmp_path) -> None:
    target = f"{registry.host}/test/busybox:v1-nydus"
    assert nydusify(["convert", "--source", busybox_image.ref, "--target", target, "--source-insecure",
                     "--target-insecure", "--work-dir", str(tmp_path / "work"), "--no-progress"]) == 0
    assert nydusify(["check", "--source", busybox_image.ref, "--target", target, "--source-insecure",
                     "--target-insecure"]) == 0
    manifest = json.loads(registry.get_manifest("test/busybox", "v1-nydus")[0])
    blobs = [layer["digest"] for layer in manifest["layers"][:-1]]
    mark = registry.log_mark()
    r = nydusctl("--address", nydus_containerd.address, "pull", target)
    assert r.returncode == 0, r.stderr + nydus_containerd.log()
    for digest in blobs:
        full = [e for e in registry.blob_fetches(digest, since=mark) if e.status == 200]
        assert full == [], "a nydus data blob was downloaded whole at pull time"
    r = nydusctl("--address", nydus_containerd.address, "run", "--snapshotter", "nydus",
                 "--cgroup", f"/{nydus_containerd.cgroup_prefix}/conv1", target, "/bin/cat", "/etc/hello.txt")
    assert r.returncode == 0, r.stderr + nydus_containerd.log()
    assert r.stdout == HELLO.decode()
    assert any(registry.blob_fetches(d, since=mark) for d in blobs), "no lazy read reached the registry"
