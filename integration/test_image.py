"""The snapshotter's container image (misc/image/build.sh) serves containerd as its proxy
snapshotter the way the DaemonSet runs it: pushed to a local registry, run by a "host"
containerd as a privileged container with host networking and the DaemonSet's host mounts
(a temp state root with rshared propagation standing in for /var/lib/containerd-nydus, the
socket directory, the config), while a second containerd CRI-pulls a nydus image through it
lazily and runs it with runc, then a plain OCI image.

The restart test runs it as the DaemonSet does in full (host PID namespace, the host's
/sys/fs/cgroup, ``[daemon] cgroup`` set as in the ConfigMap), starts long-running containers of a
nydus image and of a plain OCI image that read files on request, then SIGKILLs and deletes the
snapshotter's container, later stops one with SIGTERM, and starts a new one from the same image
each time: the containers read files they never read before (md5 against the known content)
while no snapshotter runs and after the new one reattached, the daemons keep their PIDs, and new
containers still start. Once per fs driver (erofs, the default, and fusedev).

Slow (marked): building the image runs mmdebstrap (apt's mirror) and installs the wheels, several
minutes; skipped when mmdebstrap cannot reach its package source."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest
import toml

from integration.conftest import HELLO, need_containerd_stack, snapshotter_config_for
from integration.harness.images import busybox_image, generated_files
from integration.harness.util import stop_state_root, wait_until
from integration.test_ctl import nydusctl
from rafs.convert.cli import main as nydusify
from rafs.daemon.cgroup import DaemonCgroup

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
        stop_state_root(state)  # its daemons and fd keepers, the RAFS mounts, the shared bind mount
        shutil.rmtree(base, ignore_errors=True)


def logs(base: str, name: str = "snapshotter") -> str:
    try:
        with open(os.path.join(base, f"{name}.log"), errors="replace") as f:
            return f"\n--- {name} container log:\n" + f.read()[-3000:]
    except OSError as exc:
        return f"\n--- no {name} container log: {exc}"


# the reader: md5sum of the files listed in /io/req, answered in /io/res (both written whole)
READER = ("while :; do if [ -e /io/req ]; then for f in $(cat /io/req); do md5sum \"$f\" 2>&1 || "
          "echo \"FAILED $f\"; done > /io/res.tmp; rm /io/req; mv /io/res.tmp /io/res; fi; sleep 0.1; done")


def ask(io: str, paths: list[str], timeout: float = 60) -> dict[str, str]:
    """Have a reader container md5sum ``paths``; {path: md5 or the error line}."""
    with open(os.path.join(io, "req.tmp"), "w") as f:
        f.write("\n".join(paths) + "\n")
    os.rename(os.path.join(io, "req.tmp"), os.path.join(io, "req"))
    res = os.path.join(io, "res")
    wait_until(lambda: os.path.exists(res), timeout, f"reader answer for {paths}")
    with open(res) as f:
        lines = f.read().splitlines()
    os.unlink(res)
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1] in paths:
            out[parts[1]] = parts[0]
        else:
            out.setdefault(line, "error")
    return out


def daemon_pids(state: str) -> dict[str, int]:
    out = {}
    d = os.path.join(state, "daemons")
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                rec = json.load(f)
            out[rec["daemon_id"]] = rec.get("pid", 0)
    return out


def configmap_daemon_settings() -> dict:
    """The ``[daemon]`` table of the DaemonSet's ConfigMap (misc/k8s/containerd.yaml)."""
    import yaml

    with open(REPO / "misc/k8s/containerd.yaml") as f:
        cm = next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "ConfigMap")
    return toml.loads(cm["data"]["config.toml"])["daemon"]


# erofs with the ConfigMap's daemon settings (recover_policy "restart"), fusedev with the
# snapshotter's defaults (recover_policy "failover": the fd holders die with the old pod)
@pytest.mark.parametrize("fs_driver,daemon", [("erofs", configmap_daemon_settings()), ("fusedev", {})],
                         ids=["erofs-configmap", "fusedev-failover"])
def test_a_snapshotter_container_restart_leaves_running_containers_reading(image_layout, registry, containerd_factory,
                                                                            tmp_path, fs_driver, daemon):
    ref = f"{registry.host}/pynydus/nydus-snapshotter:test"
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{image_layout}:test",
                    f"docker://{ref}"], check=True, timeout=600)
    files = generated_files(8, 300 * 1024, prefix="data")
    want = {"/" + p: hashlib.md5(e.data).hexdigest() for p, e in files.items()}
    paths = sorted(want)
    oci = busybox_image(files).push(registry, "test/data", "v1")
    hello = busybox_image({"etc/hello.txt": HELLO}).push(registry, "test/busybox", "v1")
    targets = {}
    for img in (oci, hello):
        targets[img.repo] = f"{registry.host}/{img.repo}:v1-nydus"
        assert nydusify(["convert", "--source", img.ref, "--target", targets[img.repo], "--source-insecure",
                         "--target-insecure", "--work-dir", str(tmp_path / img.repo), "--no-progress"]) == 0

    base = tempfile.mkdtemp(prefix="pyn-img-")
    state, sockdir, etc = (os.path.join(base, d) for d in ("state", "run", "etc"))
    ios = {kind: os.path.join(base, f"io-{kind}") for kind in ("nydus", "oci")}
    for d in (state, sockdir, etc, *ios.values()):
        os.makedirs(d)
    address = os.path.join(sockdir, "containerd-nydus-grpc.sock")
    cgroup = f"pynydus-test-{uuid.uuid4().hex[:8]}"
    # prefetch off: a file not read before the restart is not in the cache either
    cfg = snapshotter_config_for(registry, prefetch=False) | {"root": state, "address": address}
    cfg["daemon"] = daemon | {"fs_driver": fs_driver, "cgroup": cgroup}
    with open(os.path.join(etc, "config.toml"), "w") as f:
        toml.dump(cfg, f)
    subprocess.run(["mount", "--bind", state, state], check=True)
    subprocess.run(["mount", "--make-rshared", state], check=True)
    host = consumer = None
    running: list[str] = []    # snapshotter containers (host) not yet deleted
    readers: list[str] = []    # reader containers (consumer)

    def start_snapshotter(cid: str) -> None:
        # the DaemonSet's pod: privileged, hostNetwork, hostPID, Bidirectional state root, the
        # host's /sys/fs/cgroup (hostPath)
        host.ctr("-n", host.namespace, "run", "-d", "--privileged", "--net-host", "--rootfs-propagation", "rshared",
                 "--with-ns", f"pid:/proc/{os.getpid()}/ns/pid",  # hostPID (/proc/1's may be unreadable)
                 "--cgroup", f"/{host.cgroup_prefix}/{cid}", "--log-uri", f"file://{base}/{cid}.log",
                 "--mount", f"type=bind,src={state},dst={state},options=rbind:rshared",
                 "--mount", f"type=bind,src={sockdir},dst={sockdir},options=rbind",
                 "--mount", f"type=bind,src={etc},dst=/etc/nydus,options=rbind:ro",
                 "--mount", "type=bind,src=/sys/fs/cgroup,dst=/sys/fs/cgroup,options=rbind:rw",
                 ref, cid)
        running.append(cid)

    def delete_snapshotter(cid: str, sig: str) -> None:
        host.ctr("-n", host.namespace, "task", "kill", "-s", sig, cid, check=False)
        deadline = time.monotonic() + 60
        while host.ctr("-n", host.namespace, "task", "delete", cid, check=False).returncode != 0:
            assert time.monotonic() < deadline, f"snapshotter container {cid} did not stop on {sig}"
            time.sleep(0.5)
        host.ctr("-n", host.namespace, "container", "delete", cid)  # and its rootfs snapshot
        running.remove(cid)

    def all_logs() -> str:
        return "".join(logs(base, cid) for cid in ("snap-1", "snap-2", "snap-3"))

    def check_reads(kind: str, which: list[str]) -> None:
        got = ask(ios[kind], which)
        assert got == {p: want[p] for p in which}, f"{kind} reader: {got}{all_logs()}"

    try:
        host = containerd_factory(registries=[registry])
        host.pull(ref)
        start_snapshotter("snap-1")
        try:
            wait_until(lambda: os.path.exists(address), 120, "snapshotter socket from the container")
        except Exception as exc:
            raise AssertionError(f"{exc}{all_logs()}") from exc
        consumer = containerd_factory(snapshotters={"nydus": address}, cri_snapshotter="nydus",
                                      registries=[registry])
        ns = consumer.use_namespace("k8s.io")
        for image in (targets[oci.repo], oci.ref):
            r = nydusctl("--address", consumer.address, "pull", image)
            assert r.returncode == 0, r.stderr + consumer.log() + all_logs()
        for kind, image in (("nydus", targets[oci.repo]), ("oci", oci.ref)):
            cid = f"reader-{kind}"
            consumer.ctr("-n", ns, "run", "-d", "--snapshotter", "nydus", "--cgroup",
                         f"/{consumer.cgroup_prefix}/{cid}", "--mount",
                         f"type=bind,src={ios[kind]},dst=/io,options=rbind:rw", image, cid, "/bin/sh", "-c", READER)
            readers.append(cid)
        for kind in ios:
            check_reads(kind, paths[:2])
        daemons = daemon_pids(state)
        assert daemons and all(pid > 0 for pid in daemons.values()), daemons
        assert f"shared-{fs_driver}" in daemons, f"no {fs_driver} daemon: {daemons}{all_logs()}"
        for pid in daemons.values():
            assert all(line.endswith(":/" + cgroup) for line in DaemonCgroup.of(pid)), DaemonCgroup.of(pid)

        def new_containers_start(n: int) -> None:
            consumer.wait_snapshotter("nydus", timeout=60)
            for i, (image, cmd, out) in enumerate(((targets[oci.repo], ["/bin/md5sum", paths[-1]], want[paths[-1]]),
                                    (oci.ref, ["/bin/md5sum", paths[-1]], want[paths[-1]]),
                                                   (targets[hello.repo], ["/bin/cat", "/etc/hello.txt"],
                                                    HELLO.decode()))):
                r = nydusctl("--address", consumer.address, "run", "--snapshotter", "nydus",
                             "--cgroup", f"/{consumer.cgroup_prefix}/new{n}-{i}", image, *cmd)
                assert r.returncode == 0 and out in r.stdout, r.stdout + r.stderr + consumer.log() + all_logs()

        # 1. SIGKILL (a node's OOM kill) and delete the container: the daemons serve on alone
        delete_snapshotter("snap-1", "SIGKILL")
        for kind in ios:
            check_reads(kind, paths[2:4])
        start_snapshotter("snap-2")
        new_containers_start(2)  # also a new nydus image, mounted by a daemon the old pod started
        for kind in ios:
            check_reads(kind, paths[4:6] + paths[:1])
        # 2. SIGTERM (kubelet's stop on a rolling update)
        delete_snapshotter("snap-2", "SIGTERM")
        for kind in ios:
            check_reads(kind, paths[6:7])
        start_snapshotter("snap-3")
        new_containers_start(3)
        for kind in ios:
            check_reads(kind, paths)
        assert daemon_pids(state) == daemons, "a daemon was restarted, not kept"
    finally:
        if consumer is not None:
            for cid in readers:
                consumer.ctr("-n", "k8s.io", "task", "kill", "-s", "SIGKILL", cid, check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and consumer.ctr("-n", "k8s.io", "task", "delete", cid,
                                                                   check=False).returncode != 0:
                    time.sleep(0.5)
                consumer.ctr("-n", "k8s.io", "container", "delete", cid, check=False)
            consumer.stop()
        if host is not None:
            for cid in list(running):
                try:
                    delete_snapshotter(cid, "SIGKILL")
                except Exception:  # noqa: BLE001 - host.stop() below kills what is left
                    pass
            host.stop()
        # the daemons and their fd keepers outlive every snapshotter container by design
        stop_state_root(state)
        cg = DaemonCgroup(cgroup)
        deadline = time.monotonic() + 10
        while cg.remove() and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(base, ignore_errors=True)
    assert not DaemonCgroup(cgroup).remove(), "daemon cgroup dirs left behind"
