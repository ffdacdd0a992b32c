"""The harness itself: real registry, containerd, images; nothing left behind."""

from __future__ import annotations

import json
import os

import pytest
import requests

from integration.harness.registry import Registry, sha256_digest
from integration.harness.util import pid_alive

pytestmark = pytest.mark.containerd


def test_registry_push_pull_blob_and_access_log(registry: Registry) -> None:
    assert registry.port != 5000
    data = os.urandom(3000)
    digest = registry.push_blob("test/blob", data)
    assert digest == sha256_digest(data)
    mark = registry.log_mark()
    assert registry.get_blob("test/blob", digest) == data
    fetches = registry.blob_fetches(digest, since=mark)
    assert len(fetches) == 1 and fetches[0].size == len(data) and fetches[0].repo == "test/blob"
    assert registry.bytes_fetched(since=mark) == len(data)
    assert registry.blob_fetches(sha256_digest(b"other")) == []


def test_registry_manifest_roundtrip(registry: Registry) -> None:
    cfg = registry.push_blob("test/m", b"{}")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cfg, "size": 2},
                "layers": []}
    d = registry.put_manifest("test/m", "v1", manifest)
    body, mt = registry.get_manifest("test/m", "v1")
    assert mt == "application/vnd.oci.image.manifest.v1+json"
    assert sha256_digest(body) == d and json.loads(body) == manifest
    assert registry.get_manifest("test/m", d)[0] == body
    assert registry.ref("test/m", "v1") == f"127.0.0.1:{registry.port}/test/m:v1"


def test_registry_stops_and_cleans_up() -> None:
    with Registry() as reg:
        pid, d = reg.pid, reg.dir
        assert pid is not None and pid_alive(pid) and os.path.isdir(d)
        requests.get(f"{reg.url}/v2/", timeout=5)
    assert not pid_alive(pid)
    assert not os.path.exists(d)
    assert any(e.path == "/v2/" for e in reg.access_log())   # log survives stop


def test_registry_two_at_once_distinct_ports(registry_factory) -> None:
    a, b = registry_factory(), registry_factory()
    assert a.port != b.port
    da = a.push_blob("x/y", b"a")
    assert a.has_blob("x/y", da) and not b.has_blob("x/y", da)


def test_registry_htpasswd_auth(registry_factory) -> None:
    reg = registry_factory(users={"alice": "s3cret"})
    r = requests.get(f"{reg.url}/v2/", timeout=5)
    assert r.status_code == 401 and "Basic" in r.headers.get("WWW-Authenticate", "")
    assert requests.get(f"{reg.url}/v2/", auth=("alice", "wrong"), timeout=5).status_code == 401
    assert requests.get(f"{reg.url}/v2/", auth=("alice", "s3cret"), timeout=5).status_code == 200
    d = reg.push_blob("priv/a", b"secret data")          # uses reg.auth
    assert reg.get_blob("priv/a", d) == b"secret data"


def test_registry_extra_config_and_hook(registry_factory) -> None:
    seen = {}

    def hook(reg: Registry, cfg: dict) -> None:
        seen["host"] = reg.host
        cfg["http"]["headers"] = {"X-Pynydus": ["yes"]}

    reg = registry_factory(extra_config={"log": {"level": "debug"}}, config_hook=hook)
    assert reg.config["log"] == {"level": "debug", "accesslog": {"disabled": False}}
    assert seen["host"] == reg.host
    assert requests.get(f"{reg.url}/v2/", timeout=5).headers.get("X-Pynydus") == "yes"


# --- images -----------------------------------------------------------------------------------
def test_image_builder_layers_whiteouts_and_layout(tmp_path) -> None:
    from integration.harness.images import (OPAQUE, WHITEOUT, File, Hardlink, Layer, Symlink,
                                             busybox_image)
    upper = Layer.from_tree({"etc/passwd": WHITEOUT, "tmp": OPAQUE, "a/link": Symlink("/etc/x"),
                             "a/hard": Hardlink("etc/x"), "etc/x": File(b"x\n", 0o600)},
                            compression="zstd")
    img = busybox_image({"tmp/gone": b"lower"}, [upper])
    assert len(img.layers) == 3 and upper.media_type.endswith("+zstd")
    assert json.loads(img.config_json())["rootfs"]["diff_ids"] == [la.diff_id for la in img.layers]
    again = busybox_image({"tmp/gone": b"lower"}, [upper])
    assert again.manifest_bytes() == img.manifest_bytes()          # deterministic
    root = tmp_path / "rootfs"
    img.unpack(str(root))
    assert (root / "bin/busybox").stat().st_size > 100_000
    assert os.readlink(root / "bin/sh") == "busybox"
    assert not (root / "etc/passwd").exists() and (root / "etc/group").exists()
    assert not (root / "tmp/gone").exists()
    assert (root / "a/hard").read_bytes() == b"x\n" and (root / "a/hard").stat().st_nlink == 2
    layout = img.write_oci_layout(str(tmp_path / "oci"), "v1")
    index = json.loads((tmp_path / "oci/index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    for la in img.layers:
        assert (tmp_path / "oci/blobs/sha256" / la.digest.split(":")[1]).read_bytes() == la.data
    assert layout == str(tmp_path / "oci")


def test_image_push_is_pullable_by_skopeo(registry: Registry, tmp_path) -> None:
    import shutil
    import subprocess

    from integration.harness.images import busybox_image
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed")
    pushed = busybox_image({"etc/hello.txt": b"hi\n"}).push(registry, "test/bb", "v1")
    assert pushed.ref == f"{registry.host}/test/bb:v1"
    r = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{pushed.ref}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["Digest"] == pushed.digest
    assert info["Layers"] == [la.digest for la in pushed.layers]


# --- containerd ------------------------------------------------------------------------------
def _assert_nothing_left(ctd_dir: str, pids: list[int], cgroup_dirs: list[str]) -> None:
    from integration.harness.util import mounts_under
    assert not os.path.exists(ctd_dir)
    assert mounts_under(ctd_dir) == []
    assert [p for p in pids if pid_alive(p)] == []
    assert [d for d in cgroup_dirs if os.path.exists(d)] == []


def test_containerd_ctr_run_overlayfs_and_cleanup(registry: Registry, busybox_image) -> None:
    from integration.conftest import HELLO, need_containerd_stack
    from integration.harness.containerd import Containerd
    need_containerd_stack()
    with Containerd(registries=[registry]) as ctd:
        pids = [ctd.pid]
        ctd.pull(busybox_image.ref)
        assert registry.blob_fetches(busybox_image.layers[0].digest)
        r = ctd.run(busybox_image.ref, ["/bin/sh", "-c", "cat /etc/hello.txt; echo rc-ok"])
        assert r.stdout == HELLO.decode() + "rc-ok\n"
        r = ctd.run(busybox_image.ref, ["/bin/sh", "-c", "exit 3"], check=False)
        assert r.returncode == 3
        # a long-running task that stop() must kill
        ctd.ctr("-n", ctd.namespace, "run", "-d", "--cgroup", f"/{ctd.cgroup_prefix}/bg",
                busybox_image.ref, "bg", "/bin/sleep", "300")
        pids += ctd.shim_pids()
        assert len(pids) == 2
        cgroups = ctd.cgroup_dirs()
        assert cgroups
        d = ctd.dir
    _assert_nothing_left(d, pids, cgroups)


def test_containerd_cri_pull_and_remove(containerd, busybox_image) -> None:
    from integration.conftest import HELLO
    image_id = containerd.cri.pull_image(busybox_image.ref)
    assert image_id.startswith("sha256:")
    st = containerd.cri.image_status(busybox_image.ref)
    assert st is not None and busybox_image.ref in st.repo_tags
    r = containerd.run(busybox_image.ref, ["/bin/cat", "/etc/hello.txt"], namespace="k8s.io")
    assert r.stdout == HELLO.decode()
    containerd.cri.remove_image(busybox_image.ref)
    assert containerd.cri.image_status(busybox_image.ref) is None


def test_containerd_cri_pull_with_registry_auth(registry_factory, containerd_factory) -> None:
    from integration.harness.images import busybox_image
    reg = registry_factory(users={"bob": "pw"})
    pushed = busybox_image().push(reg, "priv/bb", "v1")
    ctd = containerd_factory(registries=[reg])
    assert ctd.cri.pull_image(pushed.ref).startswith("sha256:")


def test_containerd_proxy_plugin_with_our_snapshotter(registry: Registry, busybox_image,
                                                     snapshotter_factory, containerd_factory) -> None:
    """containerd reaches our snapshotter as proxy plugin ``nydus``: a CRI pull hands it the
    layer labels, a container runs on it, and after kill -9 + restart containerd reconnects."""
    import grpc

    from integration.conftest import HELLO
    from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
    from protos.containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
    snap = snapshotter_factory()
    ctd = containerd_factory(snapshotters={"nydus": snap.address}, cri_snapshotter="nydus",
                             registries=[registry])
    plugins = ctd.ctr("plugins", "ls").stdout
    assert any(line.split()[:2] == ["io.containerd.snapshotter.v1", "nydus"] and line.split()[-1] == "ok"
               for line in plugins.splitlines()), plugins
    ctd.cri.pull_image(busybox_image.ref)
    with grpc.insecure_channel(f"unix:{snap.address}") as ch:
        infos = [i for r in pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest(snapshotter="nydus"))
                 for i in r.info]
    labels = [dict(i.labels) for i in infos if i.kind == pb.COMMITTED]
    assert len(labels) == len(busybox_image.layers), infos
    assert {la.get("containerd.io/snapshot/cri.image-ref") for la in labels} == {busybox_image.ref}, infos
    assert (sorted(la.get("containerd.io/snapshot/cri.layer-digest") for la in labels)
            == sorted(layer.digest for layer in busybox_image.layers)), infos
    r = ctd.run(busybox_image.ref, ["/bin/cat", "/etc/hello.txt"], snapshotter="nydus",
                namespace="k8s.io")
    assert r.stdout == HELLO.decode()
    snap.restart(kill=True)
    ctd.wait_snapshotter("nydus")
    r = ctd.run(busybox_image.ref, ["/bin/echo", "again"], snapshotter="nydus", namespace="k8s.io")
    assert r.stdout == "again\n"


def test_real_containerd_accepts_misc_config_snippet(containerd_factory, tmp_path) -> None:
    """misc/containerd-config.toml parsed by a real containerd: proxy plugin + CRI settings."""
    import pathlib

    import toml

    from integration.harness.containerd import cri_runtime_config
    snippet = toml.loads((pathlib.Path(__file__).parent.parent / "misc" /
                          "containerd-config.toml").read_text())
    snippet["proxy_plugins"]["nydus"]["address"] = str(tmp_path / "nydus.sock")  # dialed lazily
    ctd = containerd_factory(extra_config=snippet)
    plugins = ctd.ctr("plugins", "ls").stdout
    assert any(line.split()[:2] == ["io.containerd.snapshotter.v1", "nydus"]
               for line in plugins.splitlines()), plugins
    cfg = cri_runtime_config(ctd.address)
    assert cfg["containerd"]["snapshotter"] == "nydus"
    assert cfg["containerd"]["disableSnapshotAnnotations"] is False
    assert cfg["containerd"]["discardUnpackedLayers"] is False


def test_demo_runs_end_to_end_and_cleans_up() -> None:
    """``python3 -m integration.demo`` (small image): every step works, the upstream-built vector
    image included, the nydus run fetches less than the OCI run, and nothing is left behind."""
    import re
    import subprocess
    import sys

    from integration.conftest import need_containerd_stack
    from integration.harness.snapshotter import REPO_ROOT
    import shutil
    import tempfile
    need_containerd_stack()
    tmp = tempfile.mkdtemp(prefix="pyn-t-")     # short: unix socket paths live below it
    try:
        r = subprocess.run([sys.executable, "-m", "integration.demo", "--files", "8",
                            "--file-kb", "512"], capture_output=True, text=True, timeout=600,
                           cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT, TMPDIR=tmp))
        left = os.listdir(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = r.stdout
    assert "| first-output" in out and "| hello from the pynydus demo image" in out, out + r.stderr
    assert re.search(r"OCI image, containerd overlayfs +\d+\.\d+s +\d+\.\d+s", out), out
    assert "cleaned up" in out
    steps = out[out.index("\nsteps:"):].splitlines()[1:]
    statuses = [line.split()[1] for line in steps if re.match(r"^ +\d+\.\d+s ", line)]
    assert statuses and set(statuses) == {"ok"}, steps
    assert any("upstream-built nydus image" in line for line in steps), steps
    assert r.returncode == 0, out + r.stderr
    assert left == []
    # the nydus run fetched less than the OCI image (prefetch is off)
    rows = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(
        r"^  (\S.{40}) +[\d.]+s +[\d.]+s +[\d.]+s +([\d.]+) MB", out, re.M)}
    lazy = [v for k, v in rows.items() if k.startswith("nydus image")]
    assert lazy and lazy[0] < rows["OCI image, containerd overlayfs"], rows


def test_nydus_image_from_upstream_vector(registry: Registry, vectors_dir) -> None:
    """An upstream-built RAFS v5 image (vector) pushed in nydus layout, no converter needed."""
    import gzip
    import io
    import tarfile

    from integration.harness.images import (ANN_NYDUS_BLOB, ANN_NYDUS_BOOTSTRAP, MT_NYDUS_BLOB,
                                             chain_ids, nydus_image)
    rep = vectors_dir / "dragonflyoss-nydus/tests/texture/repeatable"
    boot = (rep / "sha256-nocompress-repeatable").read_bytes()
    blob_path = next((rep / "blobs").glob("7334a259*"))
    blob = blob_path.read_bytes()
    img = nydus_image(boot, [blob], fs_version="5")
    pushed = img.push(registry, "vec/v5", "nydus")
    m = pushed.manifest
    assert m["layers"][0] == {"mediaType": MT_NYDUS_BLOB, "digest": "sha256:" + blob_path.name,
                              "size": len(blob), "annotations": {ANN_NYDUS_BLOB: "true"}}
    assert m["layers"][1]["annotations"][ANN_NYDUS_BOOTSTRAP] == "true"
    tar = gzip.decompress(registry.get_blob("vec/v5", m["layers"][1]["digest"]))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        member = tf.getmember("image/image.boot")
        assert member.mode == 0o444 and tf.extractfile(member).read() == boot
        assert tf.getmember("image").isdir()
    diff_ids = json.loads(img.config_json())["rootfs"]["diff_ids"]
    assert diff_ids[0] == "sha256:" + blob_path.name
    assert diff_ids[1] == sha256_digest(tar)
    chains = chain_ids(diff_ids)
    assert chains[0] == diff_ids[0]
    assert chains[1] == sha256_digest(f"{chains[0]} {diff_ids[1]}".encode())


def test_snapshotter_with_nydus_image_leaves_nothing_behind(registry, vectors_dir) -> None:
    """Our snapshotter serving a lazily mounted nydus image: after stop() no daemon, mount or
    dir of it is left (its nydusd outlives the snapshotter by design; the harness stops it)."""
    import json as _json

    from integration.conftest import need_containerd_stack, snapshotter_config_for
    from integration.harness.containerd import Containerd
    from integration.harness.images import chain_ids, nydus_image
    from integration.harness.snapshotter import SnapshotterProcess
    from integration.harness.util import mounts_under, pids_mentioning
    need_containerd_stack()
    rep = vectors_dir / "dragonflyoss-nydus/tests/texture/repeatable"
    img = nydus_image((rep / "sha256-nocompress-repeatable").read_bytes(),
                      [next((rep / "blobs").glob("7334a259*")).read_bytes()], fs_version="5")
    pushed = img.push(registry, "vec/left", "nydus")
    with SnapshotterProcess(config=snapshotter_config_for(registry)) as snap:
        with Containerd(snapshotters={"nydus": snap.address}, cri_snapshotter="nydus",
                        registries=[registry]) as ctd:
            ctd.cri.pull_image(pushed.ref)
            top = chain_ids(_json.loads(img.config_json())["rootfs"]["diff_ids"])[-1]
            ctd.view_mounts("left-view", top, snapshotter="nydus")
            assert snap.daemon_pids(), "a mounted nydus image should have a daemon"
        snap_dir = snap.dir
        snap_pid = snap.pid
    assert not pid_alive(snap_pid)
    assert pids_mentioning(snap_dir) == []
    assert mounts_under(snap_dir) == []
    assert not os.path.exists(snap_dir)


def test_registry_token_auth_via_config_hook(registry_factory) -> None:
    """A token-auth registry (what a token-issuer fixture plugs in): 401 with a Bearer challenge."""
    import shutil
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")

    def hook(reg: Registry, cfg: dict) -> None:
        key, crt = os.path.join(reg.dir, "token.key"), os.path.join(reg.dir, "token.crt")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", crt, "-days", "1", "-subj", "/CN=token-issuer"],
                       check=True, capture_output=True)
        cfg["auth"] = {"token": {"realm": "http://127.0.0.1:1/token", "service": reg.host,
                                 "issuer": "pynydus-test", "rootcertbundle": crt}}

    reg = registry_factory(config_hook=hook)
    r = requests.get(f"{reg.url}/v2/", timeout=5)
    assert r.status_code == 401
    challenge = r.headers.get("WWW-Authenticate", "")
    assert challenge.startswith("Bearer ") and f'service="{reg.host}"' in challenge


def test_real_snapshotter_kill9_and_restart(registry, busybox_image, nydus_snapshotter,
                                            nydus_containerd) -> None:
    """kill9()/restart() on our snapshotter: containerd reconnects and the pulled image runs."""
    from integration.conftest import HELLO
    ctd = nydus_containerd
    ctd.cri.pull_image(busybox_image.ref)
    old_pid = nydus_snapshotter.pid
    nydus_snapshotter.kill9()
    assert not pid_alive(old_pid)
    r = ctd.run(busybox_image.ref, ["/bin/true"], snapshotter="nydus", namespace="k8s.io",
                check=False)
    assert r.returncode != 0                      # nobody serves the socket now
    nydus_snapshotter.restart()
    assert nydus_snapshotter.pid != old_pid
    ctd.wait_snapshotter("nydus")
    r = ctd.run(busybox_image.ref, ["/bin/cat", "/etc/hello.txt"], snapshotter="nydus",
                namespace="k8s.io")
    assert r.stdout == HELLO.decode()
