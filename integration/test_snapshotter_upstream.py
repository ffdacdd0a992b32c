"""Drop-in for upstream operators, end to end through containerd:

* upstream's own ``misc/snapshotter/config.toml`` (kept in tests/data/upstream, only its paths
  rewritten to temp dirs) starts the real snapshotter, warns once per unsupported key, and a
  nydus image is pulled lazily and run;
* a containerd ``hosts.toml`` directory (``[remote.mirrors_config] dir``) names a plain-HTTP
  mirror holding the image while the image's own registry is unreachable: pull + run work
  through the mirror (with upstream's plain-HTTP fallback for an insecure scheme-less host).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import tomllib

import pytest

from integration.conftest import HELLO
from integration.harness.containerd import CRI_PLUGIN
from integration.harness.images import busybox_image
from integration.test_snapshotter_containerd import kill_recorded_daemons
from rafs.convert.cli import main as nydusify

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.timeout(300)]

UPSTREAM = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "upstream"


def nydus_image(reg, tmp_path: pathlib.Path) -> tuple[str, list[str]]:
    """Push a busybox image to ``reg`` and convert it there: (repo:tag, data blob digests)."""
    if not os.path.exists("/bin/busybox"):
        pytest.skip("/bin/busybox missing (Debian package busybox-static)")
    source = busybox_image({"etc/hello.txt": HELLO}).push(reg, "test/busybox", "v1")
    target = f"{reg.host}/test/busybox:v1-nydus"
    assert nydusify(["convert", "--source", source.ref, "--target", target, "--source-insecure",
                     "--target-insecure", "--work-dir", str(tmp_path / "work"), "--no-progress"]) == 0
    manifest = json.loads(reg.get_manifest("test/busybox", "v1-nydus")[0])
    return "test/busybox:v1-nydus", [layer["digest"] for layer in manifest["layers"][:-1]]


def upstream_config(tmp_path: pathlib.Path) -> dict:
    """Upstream's file with its absolute paths moved under ``tmp_path`` (nothing else changed)."""
    with open(UPSTREAM / "snapshotter-config.toml", "rb") as f:
        cfg = tomllib.load(f)
    cfg["system"]["address"] = str(tmp_path / "system.sock")
    cfg["daemon"]["nydusd_config"] = str(UPSTREAM / "nydusd-config.fusedev.json")
    cfg["metrics"]["address"] = "127.0.0.1:0"      # upstream's ":9110" is fixed, tests run in parallel
    return cfg


def system_get(sock: pathlib.Path, path: str) -> object:
    """GET ``path`` from the snapshotter's system controller on ``sock``."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", data
    return json.loads(body)


def closed_port() -> str:
    """``127.0.0.1:PORT`` where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_upstream_config_toml_runs_lazy_pull(registry_factory, snapshotter_factory, containerd_factory, tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("upstream's file uses fs_driver = fusedev: /dev/fuse missing")
    reg = registry_factory()
    name, blobs = nydus_image(reg, tmp_path)
    cfg = upstream_config(tmp_path)
    # upstream reaches a plain-HTTP registry through a hosts.toml directory: its own key
    hosts = tmp_path / "certs.d"
    (hosts / reg.host).mkdir(parents=True)
    (hosts / reg.host / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
    cfg["remote"]["mirrors_config"]["dir"] = str(hosts)
    sn = snapshotter_factory(config=cfg)
    cd = containerd_factory(snapshotters={"nydus": sn.address}, cri_snapshotter="nydus", registries=[reg])
    try:
        mark = reg.log_mark()
        ref = f"{reg.host}/{name}"
        cd.cri.pull_image(ref)
        for digest in blobs:
            assert not [e for e in reg.blob_fetches(digest, since=mark) if e.status == 200], \
                "a nydus data blob was downloaded whole at pull time"
        out = cd.run(ref, ["/bin/cat", "/etc/hello.txt"], snapshotter="nydus", namespace="k8s.io").stdout
        assert out == HELLO.decode()
        assert any(reg.blob_fetches(d, since=mark) for d in blobs), "no lazy read from the registry"
        log = sn.log()
        for key in ("cgroup.enable", "system.debug.pprof_address", "experimental.tarfs.export_mode",
                    "remote.auth.enable_cri_keychain"):
            assert log.count(f"configuration key {key} is accepted but not supported") == 1, key
        assert "daemon.failover_policy" not in log and 'served as "restart"' not in log
        assert "Traceback" not in log
        # [system] address: upstream's system controller answers there, with the daemon it runs
        assert "configuration key system.address" not in log
        daemons = system_get(tmp_path / "system.sock", "/api/v1/daemons")
        assert [d["fs_driver"] for d in daemons] == ["fusedev"] and daemons[0]["pid"] > 0
    finally:
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)


def test_hosts_toml_http_mirror_with_origin_unreachable(registry_factory, snapshotter_factory,
                                                        containerd_factory, tmp_path):
    mirror = registry_factory()
    name, blobs = nydus_image(mirror, tmp_path)
    origin = closed_port()
    hosts = tmp_path / "certs.d"
    # containerd's directory name for a port ("host_port_"); a scheme-less insecure host: https is
    # tried first and, as upstream does for insecure hosts, plain http after it fails
    (hosts / f"{origin.replace(':', '_')}_").mkdir(parents=True)
    (hosts / f"{origin.replace(':', '_')}_" / "hosts.toml").write_text(
        f'server = "https://{origin}"\n\n[host."{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n'
        f'  skip_verify = true\n')
    cfg = {"version": 1, "remote": {"mirrors_config": {"dir": str(hosts)}}}
    sn = snapshotter_factory(config=cfg)
    # containerd itself pulls the manifest and bootstrap from the mirror too
    cd = containerd_factory(snapshotters={"nydus": sn.address}, cri_snapshotter="nydus", registries=[mirror],
                            extra_config={"plugins": {CRI_PLUGIN: {"registry": {"mirrors": {
                                origin: {"endpoint": [f"http://{mirror.host}"]}}}}}})
    try:
        ref = f"{origin}/{name}"
        mark = mirror.log_mark()
        cd.cri.pull_image(ref)
        out = cd.run(ref, ["/bin/cat", "/etc/hello.txt"], snapshotter="nydus", namespace="k8s.io").stdout
        assert out == HELLO.decode()
        assert any(mirror.blob_fetches(d, since=mark) for d in blobs), "no lazy read through the mirror"
        assert "retrying with plain http" in sn.log()
    finally:
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)
