"""The snapshotter's container image (misc/image/build.sh) serves containerd as its proxy
snapshotter the way the DaemonSet runs it: pushed to a local registry, run by a "host"
containerd as a privileged container with host networking and the DaemonSet's host mounts
(a temp state root with rshared propagation standing in for /var/lib/containerd-nydus, the
socket directory, the config), while a second containerd CRI-pulls a nydus image through it
lazily and runs it with runc, then a plain OCI image.

Slow (marked): building the image runs mmdebstrap (apt's mirror) and installs the wheels, several
minutes; skipped when mmdebstrap cannot reach its package source."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import pytest
import toml

from integration.conftest import HELLO, need_containerd_stack, snapshotter_config_for
from integration.harness.util import unmount_all, wait_until
from integration.test_ctl import nydusctl
from rafs.convert.cli import main as nydusify

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(3600)]
UNREACHABLE = ("Could not resolve", "Temporary failure resolving", "Failed to fetch", "Unable to connect",
               "Network is unreachable", "Connection refused", "Release file")


@pytest.fixture(scope="module")
def image_layout(tmp_path_factory) -> pathlib.Path:
    need_containerd_stack()
    for tool in ("mmdebstrap", "umoci", "skopeo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing")
    out = tmp_path_factory.mktemp("image") / "oci"
    r = subprocess.run([str(REPO / "misc/image/build.sh"), "--out", str(out), "--tag", "test"],
                       capture_output=True, text=True, timeout=3000)
    if r.returncode != 0 and any(m in r.stderr for m in UNREACHABLE):
        pytest.skip(f"mmdebstrap cannot reach its package source: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_image_runs_as_the_proxy_snapshotter(image_layout, registry, busybox_image, containerd_factory,
                                             tmp_path):
    ref = f"{registry.host}/pynydus/nydus-snapshotter:test"
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{image_layout}:test",
                    f"docker://{ref}"], check=True, timeout=600)
    target = f"{registry.host}/test/busybox:v1-nydus"
    assert nydusify(["convert", "--source", busybox_image.ref, "--target", target, "--source-insecure",
                     "--target-insecure", "--work-dir", str(tmp_path / "work"), "--no-progress"]) == 0

    base = tempfile.mkdtemp(prefix="pyn-img-")
    state, sockdir, etc = (os.path.join(base, d) for d in ("state", "run", "etc"))
    for d in (state, sockdir, etc):
        os.makedirs(d)
    address = os.path.join(sockdir, "containerd-nydus-grpc.sock")
    cfg = snapshotter_config_for(registry) | {"root": state, "address": address}
    with open(os.path.join(etc, "config.toml"), "w") as f:
        toml.dump(cfg, f)
    # the host side of a Bidirectional mount: a shared mount point
    subprocess.run(["mount", "--bind", state, state], check=True)
    subprocess.run(["mount", "--make-rshared", state], check=True)
    host = consumer = None
    cid = "pyn-snapshotter"
    try:
        host = containerd_factory(registries=[registry])
        host.pull(ref)
        # CRI sets rootfsPropagation rshared for a Bidirectional mount; ctr needs it said
        host.ctr("-n", host.namespace, "run", "-d", "--privileged", "--net-host", "--rootfs-propagation", "rshared",
                 "--cgroup", f"/{host.cgroup_prefix}/{cid}", "--log-uri", f"file://{base}/snapshotter.log",
                 "--mount", f"type=bind,src={state},dst={state},options=rbind:rshared",
                 "--mount", f"type=bind,src={sockdir},dst={sockdir},options=rbind",
                 "--mount", f"type=bind,src={etc},dst=/etc/nydus,options=rbind:ro",
                 ref, cid)  # the image's entrypoint: nydus-snapshotter --config /etc/nydus/config.toml
        try:
            wait_until(lambda: os.path.exists(address), 120, "snapshotter socket from the container")
        except Exception as exc:
            raise AssertionError(f"{exc}{logs(base)}") from exc
        consumer = containerd_factory(snapshotters={"nydus": address}, cri_snapshotter="nydus",
                                      registries=[registry])
        manifest = json.loads(registry.get_manifest("test/busybox", "v1-nydus")[0])
        blobs = [layer["digest"] for layer in manifest["layers"][:-1]]
        mark = registry.log_mark()
        r = nydusctl("--address", consumer.address, "pull", target)
        assert r.returncode == 0, r.stderr + consumer.log() + logs(base)
        for digest in blobs:
            assert not [e for e in registry.blob_fetches(digest, since=mark) if e.status == 200], \
                "a nydus data blob was downloaded whole at pull time"
        r = nydusctl("--address", consumer.address, "run", "--snapshotter", "nydus",
                     "--cgroup", f"/{consumer.cgroup_prefix}/img1", target, "/bin/cat", "/etc/hello.txt")
        assert r.returncode == 0, r.stderr + consumer.log() + logs(base)
        assert r.stdout == HELLO.decode()
        assert any(registry.blob_fetches(d, since=mark) for d in blobs), "no lazy read reached the registry"
        # the RAFS mounts made inside the container are visible on the host (rshared)
        with open("/proc/self/mounts") as f:
            assert any(line.split()[1].startswith(state + "/") for line in f)
        # a plain OCI image through the same containerized snapshotter
        r = nydusctl("--address", consumer.address, "run", "--snapshotter", "nydus",
                     "--cgroup", f"/{consumer.cgroup_prefix}/img2", busybox_image.ref, "/bin/cat", "/etc/hello.txt")
        assert r.returncode == 0, r.stderr + consumer.log() + logs(base)
        assert r.stdout == HELLO.decode()
    finally:
        if consumer is not None:
            consumer.stop()
        if host is not None:
            host.ctr("-n", host.namespace, "task", "kill", "-s", "SIGKILL", cid, check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and host.ctr("-n", host.namespace, "task", "delete", cid,
                                                           check=False).returncode != 0:
                time.sleep(0.5)
            host.stop()
        unmount_all(state)  # the RAFS mounts and the shared bind mount itself
        shutil.rmtree(base, ignore_errors=True)


def logs(base: str) -> str:
    try:
        with open(os.path.join(base, "snapshotter.log"), errors="replace") as f:
            return "\n--- snapshotter container log:\n" + f.read()[-3000:]
    except OSError as exc:
        return f"\n--- no snapshotter container log: {exc}"
