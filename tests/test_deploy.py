"""Deployment files: Kubernetes manifests (schema + consistency with the snapshotter config they
carry), the containerd config patch step they run, the containerd 2.x snippet, the systemd unit."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import toml
import yaml

from snapshotter import config as cfgmod

REPO = pathlib.Path(__file__).resolve().parent.parent
K8S = REPO / "misc" / "k8s"
PATCH = K8S / "nydus-containerd-config"
KUBERNETES_VERSION = "1.37.0"
CRI_V2 = "io.containerd.grpc.v1.cri"
CRI_V3_IMAGES = "io.containerd.cri.v1.images"

# variant -> (directory of containerd's config, containerd socket, host unit restarted, writes a template)
VARIANTS = {
    "containerd": ("/etc/containerd", "/run/containerd/containerd.sock", "containerd", False),
    "k3s": ("/var/lib/rancher/k3s/agent/etc/containerd", "/run/k3s/containerd/containerd.sock", "k3s", True),
    "rke2": ("/var/lib/rancher/rke2/agent/etc/containerd", "/run/k3s/containerd/containerd.sock", "rke2-server",
             True),
}


def load(variant: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((K8S / f"{variant}.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_manifests_pass_kubernetes_validate(variant):
    docs = load(variant)
    assert sorted(docs) == ["ConfigMap", "DaemonSet", "Namespace"]
    for doc in docs.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_rejects_a_broken_daemonset():
    ds = load("containerd")["DaemonSet"]
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPropagaton"] = "Bidirectional"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_manifest_paths_match_the_snapshotter_config(variant, tmp_path):
    conf_dir, containerd_sock, unit, template = VARIANTS[variant]
    docs = load(variant)
    ns = docs["Namespace"]["metadata"]["name"]
    assert docs["ConfigMap"]["metadata"]["namespace"] == docs["DaemonSet"]["metadata"]["namespace"] == ns
    (tmp_path / "config.toml").write_text(docs["ConfigMap"]["data"]["config.toml"])
    cfg = cfgmod.load(tmp_path / "config.toml")  # the snapshotter accepts it
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    (main,) = pod["containers"]
    (init,) = pod["initContainers"]
    assert main["image"] == init["image"]
    assert main["securityContext"]["privileged"] is True and init["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}

    def host_path(mount: dict) -> str:
        return volumes[mount["name"]]["hostPath"]["path"]

    # the snapshotter reads the ConfigMap's config.toml
    cfg_arg = main["command"][main["command"].index("--config") + 1]
    assert volumes[mounts[cfg_arg]["name"]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert mounts[cfg_arg]["subPath"] == "config.toml"
    # state root: the same path on host and in the container, mounts propagate both ways
    assert mounts[cfg.root]["mountPropagation"] == "Bidirectional" and host_path(mounts[cfg.root]) == cfg.root
    # socket directory shared with the host's containerd, at the same path
    sock_dir = os.path.dirname(cfg.address)
    assert host_path(mounts[sock_dir]) == sock_dir
    assert host_path(mounts["/dev/fuse"]) == "/dev/fuse"
    assert host_path(mounts[containerd_sock]) == containerd_sock
    # the daemons leave the pod's cgroup (so they outlive the pod): the host's cgroup tree is there
    assert cfg.daemon.cgroup and host_path(mounts["/sys/fs/cgroup"]) == "/sys/fs/cgroup"
    # registry credentials: the optional dockerconfigjson Secret, where [remote] docker_config points
    cred = mounts[os.path.dirname(cfg.remote.docker_config)]
    assert volumes[cred["name"]]["secret"]["optional"] is True
    # the init step patches this variant's containerd config with the snapshotter's address
    args = init["command"]
    assert args[0] == "/opt/pynydus/bin/nydus-containerd-config"
    assert args[args.index("--address") + 1] == cfg.address
    assert args[args.index("--restart") + 1] == unit
    init_mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    target = args[args.index("--config") + 1]
    assert host_path(init_mounts[os.path.dirname(target)]) == conf_dir
    assert os.path.basename(target) == "config.toml"
    assert ("--template" in args) == template
    if template:
        assert args[args.index("--template") + 1] == os.path.dirname(target) + "/config.toml.tmpl"


def run_patch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PATCH), *args], capture_output=True, text=True, timeout=60)


EXISTING_V2 = """version = 2
root = "/var/lib/containerd"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  disable_snapshot_annotations = true
  default_runtime_name = "runc"
[proxy_plugins.stargz]
  type = "snapshot"
  address = "/run/stargz.sock"
"""


def test_patch_containerd_v2_config_idempotent_and_restorable(tmp_path):
    conf = tmp_path / "config.toml"
    conf.write_text(EXISTING_V2)
    r = run_patch("--config", str(conf), "--address", "/run/n/s.sock")
    assert r.returncode == 0 and r.stdout.startswith("changed"), r.stderr
    new = toml.loads(conf.read_text())
    cri = new["plugins"][CRI_V2]["containerd"]
    assert cri == {"snapshotter": "nydus", "disable_snapshot_annotations": False,
                   "discard_unpacked_layers": False, "default_runtime_name": "runc"}
    assert new["proxy_plugins"] == {"stargz": {"type": "snapshot", "address": "/run/stargz.sock"},
                                    "nydus": {"type": "snapshot", "address": "/run/n/s.sock"}}
    assert new["root"] == "/var/lib/containerd"
    assert (tmp_path / "config.toml.bak.nydus").read_text() == EXISTING_V2
    again = run_patch("--config", str(conf), "--address", "/run/n/s.sock")
    assert again.stdout.strip() == "unchanged"
    if shutil.which("containerd"):  # the real containerd accepts the patched file
        dump = subprocess.run(["containerd", "--config", str(conf), "config", "dump"], capture_output=True,
                              text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert toml.loads(dump.stdout)["proxy_plugins"]["nydus"]["address"] == "/run/n/s.sock"
    assert run_patch("--config", str(conf), "--restore").returncode == 0
    assert conf.read_text() == EXISTING_V2 and not (tmp_path / "config.toml.bak.nydus").exists()


def test_patch_containerd_v3_and_missing_config(tmp_path):
    conf = tmp_path / "config.toml"
    conf.write_text('version = 3\n[plugins."io.containerd.cri.v1.images"]\n  snapshotter = "overlayfs"\n')
    assert run_patch("--config", str(conf)).returncode == 0
    snippet = toml.loads((REPO / "misc" / "containerd-config-v3.toml").read_text())
    assert toml.loads(conf.read_text().split("\n", 1)[1]) == snippet
    # no config yet (containerd runs on its defaults): a version 2 file with just our settings
    fresh = tmp_path / "new" / "config.toml"
    assert run_patch("--config", str(fresh)).returncode == 0
    assert toml.loads(fresh.read_text()) == toml.loads((REPO / "misc" / "containerd-config.toml").read_text())


def test_patch_k3s_writes_the_template_from_the_rendered_config(tmp_path):
    rendered = tmp_path / "config.toml"
    rendered.write_text(EXISTING_V2)
    tmpl = tmp_path / "config.toml.tmpl"
    assert run_patch("--config", str(rendered), "--template", str(tmpl)).returncode == 0
    assert rendered.read_text() == EXISTING_V2
    assert toml.loads(tmpl.read_text())["proxy_plugins"]["nydus"]["type"] == "snapshot"
    rendered.write_text(tmpl.read_text())  # what k3s renders from it on restart
    assert run_patch("--config", str(rendered), "--template", str(tmpl)).stdout.strip() == "unchanged"
    assert run_patch("--config", str(rendered), "--template", str(tmpl), "--restore").returncode == 0
    assert not tmpl.exists()  # k3s goes back to its built-in template


@pytest.mark.parametrize("text, why", [('version = 1\n', "version 1"), ("version = 2\n[x\n", "cannot read")])
def test_patch_refuses_unsupported_configs_and_writes_nothing(tmp_path, text, why):
    conf = tmp_path / "config.toml"
    conf.write_text(text)
    r = run_patch("--config", str(conf))
    assert r.returncode == 1 and why in r.stderr and r.stderr.count("\n") == 1
    assert conf.read_text() == text and sorted(os.listdir(tmp_path)) == ["config.toml"]
    assert run_patch("--config", str(tmp_path / "none.toml"), "--template", str(tmp_path / "t")).returncode == 1


def test_containerd_v3_snippet_says_what_the_v2_one_says():
    v2 = toml.loads((REPO / "misc" / "containerd-config.toml").read_text())
    v3 = toml.loads((REPO / "misc" / "containerd-config-v3.toml").read_text())
    assert v3["version"] == 3 and v3["proxy_plugins"] == v2["proxy_plugins"]
    assert v3["plugins"][CRI_V3_IMAGES] == v2["plugins"][CRI_V2]["containerd"]
    assert "UNTESTED" in (REPO / "misc" / "containerd-config-v3.toml").read_text()


def test_systemd_unit():
    text = (REPO / "misc" / "nydus-snapshotter.service").read_text()
    keys = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            keys.setdefault(k, v)
    assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main"
    assert keys["ExecStart"].startswith("@PREFIX@/bin/nydus-snapshotter ")
    assert keys["Documentation"] == "file:@PREFIX@/share/doc/pynydus/operators.md"
    assert keys["ExecStartPre"] == "-/sbin/modprobe fuse"
    assert int(keys["OOMScoreAdjust"]) < 0 and keys["KillMode"] == "process"
