"""Nydus layers through the gRPC service, with a fake RAFS instance manager."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import threading

import grpc
import pytest

from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter import labels as L
from snapshotter.config import RegistryAuth, RemoteConfig
from tests.snapshotter_helpers import FakeManager, Harness, code_of
from tests.storage_blobs import blob_held_by_another_process

IMAGE = "127.0.0.1:5000/foo/bar:v1"
BLOB1 = "a" * 64
BLOB2 = "b" * 64


@pytest.fixture
def bootstrap(vectors_dir):
    return vectors_dir / "dragonflyoss-nydus" / "tests" / "texture" / "bootstrap" / "rafs-v6-2.2.boot"


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path, manager=FakeManager())
    yield harness
    harness.stop()


def data_labels(chain: str, blob: str, **extra: str) -> dict[str, str]:
    return {L.TARGET_SNAPSHOT_REF: chain, L.NYDUS_DATA_LAYER: "true", L.CRI_LAYER_DIGEST: f"sha256:{blob}",
            L.CRI_IMAGE_REF: IMAGE, **extra}


def meta_labels(chain: str, **extra: str) -> dict[str, str]:
    return {L.TARGET_SNAPSHOT_REF: chain, L.NYDUS_META_LAYER: "true", L.CRI_IMAGE_REF: IMAGE,
            L.CRI_LAYER_DIGEST: "sha256:" + "c" * 64, **extra}


def pull_image(h: Harness, bootstrap, *, legacy: bool = False, meta_extra: dict | None = None) -> str:
    """What containerd's unpacker does for a nydus image: 2 data layers + the bootstrap layer."""
    for i, (chain, parent, blob) in enumerate((("sha256:c1", "", BLOB1), ("sha256:c2", "sha256:c1", BLOB2))):
        code, msg = code_of(h.prepare, f"k8s.io/{i}/extract-{i} {chain}", parent, data_labels(chain, blob))
        assert code == grpc.StatusCode.ALREADY_EXISTS, msg
        assert f'target snapshot "{chain}"' in msg
        # containerd's metadata adopts it through this exact filter
        assert h.list(f'labels."containerd.io/snapshot.ref"=={chain},parent=="{parent}"') == [chain]
        assert h.stat(chain).kind == pb.COMMITTED
    labels = {k: v for k, v in meta_labels("sha256:c3", **(meta_extra or {})).items() if v is not None}
    mounts = h.prepare("k8s.io/5/extract-5 sha256:c3", "sha256:c2", labels)
    (m,) = mounts
    assert m.type == "overlay"  # native mounts: containerd applies the bootstrap tar.gz
    upper = [o.split("=", 1)[1] for o in m.options if o.startswith("upperdir=")][0]
    dest = os.path.join(upper, "image.boot") if legacy else os.path.join(upper, "image", "image.boot")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(bootstrap, dest)
    h.commit("sha256:c3", "k8s.io/5/extract-5 sha256:c3", labels)
    return "sha256:c3"


def test_data_layer_is_committed_remotely_with_labels(h):
    code, _ = code_of(h.prepare, "k8s.io/1/extract-1 sha256:c1", "", data_labels("sha256:c1", BLOB1))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    info = h.stat("sha256:c1")
    assert info.labels[L.NYDUS_DATA_LAYER] == "true" and info.labels[L.TARGET_SNAPSHOT_REF] == "sha256:c1"
    assert h.list() == ["sha256:c1"]  # the extract key itself is gone
    # a second pull of the same layer: still ALREADY_EXISTS, nothing new recorded
    code, _ = code_of(h.prepare, "k8s.io/9/extract-9 sha256:c1", "", data_labels("sha256:c1", BLOB1))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert h.list() == ["sha256:c1"]
    assert h.manager.ops("mount") == []


def test_data_layer_with_bad_digest_is_invalid(h):
    labels = data_labels("sha256:c1", BLOB1)
    labels[L.CRI_LAYER_DIGEST] = "sha256:nothex"
    code, msg = code_of(h.prepare, "k", "", labels)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cri.layer-digest" in msg
    assert h.list() == []


def test_container_on_nydus_image_gets_rafs_lowerdir_and_shares_instance(h, bootstrap):
    meta = pull_image(h, bootstrap)
    meta_id = "3"
    (m,) = h.prepare("k8s.io/10/ctr1", meta)
    mp = os.path.join(h.root, "mnt", meta_id)
    assert m.type == "overlay"
    assert [o for o in m.options if o.startswith("lowerdir=")] == [f"lowerdir={mp}"]
    assert any(o.startswith("upperdir=") for o in m.options) and any(o.startswith("workdir=") for o in m.options)
    (mount_call,) = h.manager.ops("mount")
    _, iid, boot, hint, backend = mount_call
    assert iid == meta_id and hint == mp
    assert boot == os.path.join(h.root, "snapshots", meta_id, "fs", "image", "image.boot")
    assert backend == {"type": "registry", "config": {
        "scheme": "https", "host": "127.0.0.1:5000", "repo": "foo/bar", "auth": "", "skip_verify": False,
        "timeout": 5, "connect_timeout": 5, "retry_limit": 2}}
    (m2,) = h.prepare("k8s.io/11/ctr2", meta)
    (v,) = h.view("k8s.io/12/view", meta)
    assert (v.type, v.source, list(v.options)) == ("bind", mp, ["ro", "rbind"])
    assert list(h.mounts("k8s.io/11/ctr2")) == [m2]
    assert len(h.manager.ops("mount")) == 1  # one instance per image, shared
    h.remove("k8s.io/10/ctr1")
    h.remove("k8s.io/12/view")
    assert h.manager.ops("umount") == []
    h.remove("k8s.io/11/ctr2")
    assert h.manager.ops("umount") == [("umount", meta_id)]
    # the next container mounts it again
    h.prepare("k8s.io/13/ctr3", meta)
    assert len(h.manager.ops("mount")) == 2


def test_legacy_bootstrap_location_and_dedicated_mountpoint(tmp_path, bootstrap):
    from snapshotter.config import DaemonConfig

    h = Harness(tmp_path, manager=FakeManager(), daemon=DaemonConfig(daemon_mode="dedicated"))
    try:
        meta = pull_image(h, bootstrap, legacy=True)
        (m,) = h.prepare("ctr", meta)
        mp = os.path.join(h.root, "snapshots", "3", "mnt")
        assert f"lowerdir={mp}" in m.options
        assert h.manager.ops("mount")[0][2].endswith(os.path.join("fs", "image.boot"))
    finally:
        h.stop()


def test_plain_layers_above_meta_layer_are_stacked_over_rafs(h, bootstrap):
    meta = pull_image(h, bootstrap)
    h.prepare("c", meta)
    h.commit("C", "c")
    (m,) = h.prepare("d", "C")
    lower = [o for o in m.options if o.startswith("lowerdir=")][0]
    assert lower == f"lowerdir={os.path.join(h.root, 'snapshots', '4', 'fs')}:{os.path.join(h.root, 'mnt', '3')}"


def test_bootstrap_layer_that_is_not_a_bootstrap_is_rejected(h):
    labels = meta_labels("sha256:m")
    (m,) = h.prepare("extract", "", labels)
    os.makedirs(os.path.join(m.source, "image"))
    with open(os.path.join(m.source, "image", "image.boot"), "wb") as f:
        f.write(b"this is not a bootstrap" * 100)
    code, msg = code_of(h.commit, "sha256:m", "extract", labels)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not" in msg and "bootstrap" in msg
    os.unlink(os.path.join(m.source, "image", "image.boot"))
    code, msg = code_of(h.commit, "sha256:m", "extract", labels)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image/image.boot" in msg
    assert h.stat("extract").kind == pb.ACTIVE  # nothing half-committed


def test_missing_image_ref_is_failed_precondition(h, bootstrap):
    meta = pull_image(h, bootstrap, meta_extra={L.CRI_IMAGE_REF: None})
    code, msg = code_of(h.prepare, "ctr", meta)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "image ref" in msg
    assert "ctr" not in h.list()


def test_unreachable_registry_is_unavailable_and_leaves_nothing(h, bootstrap):
    meta = pull_image(h, bootstrap)
    h.ping_errors["127.0.0.1:5000"] = "connection refused"
    code, msg = code_of(h.prepare, "ctr", meta)
    assert code == grpc.StatusCode.UNAVAILABLE and "unreachable" in msg and "connection refused" in msg
    assert "ctr" not in h.list()
    assert sorted(os.listdir(os.path.join(h.root, "snapshots"))) == ["1", "2", "3"]
    del h.ping_errors["127.0.0.1:5000"]
    h.prepare("ctr", meta)


def test_manager_failure_is_unavailable(h, bootstrap):
    meta = pull_image(h, bootstrap)
    h.manager.fail_mount = RuntimeError("daemon died")
    code, msg = code_of(h.prepare, "ctr", meta)
    assert code == grpc.StatusCode.UNAVAILABLE and "daemon died" in msg
    assert "ctr" not in h.list()


def test_view_of_data_layer_is_refused(h):
    code_of(h.prepare, "x", "", data_labels("sha256:c1", BLOB1))
    code, msg = code_of(h.view, "v", "sha256:c1")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "data layer" in msg


def test_usage_of_data_layer_is_cache_bytes_and_cleanup_gcs_cache(h, bootstrap):
    pull_image(h, bootstrap)
    cache = os.path.join(h.root, "cache")
    os.makedirs(cache, exist_ok=True)
    for name, size in ((BLOB1 + ".blob.data", 8192), (BLOB1 + ".chunk_map", 4096), ("d" * 64 + ".blob.data", 4096),
                       ("d" * 64 + ".blob.meta", 4096), ("unrelated.txt", 10)):
        with open(os.path.join(cache, name), "wb") as f:
            f.write(b"x" * size)
    u = h.usage("sha256:c1")
    assert u.size == 8192 + 4096 and u.inodes == 2
    assert h.usage("sha256:c2").size == 0
    h.cleanup()
    assert sorted(os.listdir(cache)) == sorted([BLOB1 + ".blob.data", BLOB1 + ".chunk_map", "unrelated.txt"])


def test_restart_recovers_instances_without_remounting(h, bootstrap):
    meta = pull_image(h, bootstrap)
    (m,) = h.prepare("ctr", meta)
    h.restart()
    assert ("recover",) in h.manager.calls
    assert list(h.mounts("ctr")) == [m]
    assert len(h.manager.ops("mount")) == 1
    assert ("shutdown",) not in h.manager.calls  # instances stay up across restarts


def test_credentials_from_labels_config_and_docker_config(tmp_path, bootstrap):
    docker = tmp_path / "docker.json"
    docker.write_text(json.dumps({"auths": {"127.0.0.1:5000": {"auth": base64.b64encode(b"d:p").decode()}}}))
    remote = RemoteConfig(check_registry=False, docker_config=str(docker), insecure_registries=("127.0.0.1:5000",))
    h = Harness(tmp_path, manager=FakeManager(), remote=remote)
    try:
        meta = pull_image(h, bootstrap)
        h.prepare("c1", meta)
        cfg = h.manager.ops("mount")[-1][4]["config"]
        assert cfg["auth"] == base64.b64encode(b"d:p").decode() and cfg["scheme"] == "http"
        h.remove("c1")
        h.prepare("c2", meta, {L.PULL_USERNAME: "u", L.PULL_SECRET: "s"})
        assert h.manager.ops("mount")[-1][4]["config"]["auth"] == base64.b64encode(b"u:s").decode()
    finally:
        h.stop()
    h2_path = tmp_path / "second"
    h2_path.mkdir()
    remote = RemoteConfig(check_registry=False, auths={"127.0.0.1:5000": RegistryAuth(username="c", password="q")},
                          mirrors={"127.0.0.1:5000": ("http://127.0.0.1:6000",)})
    h = Harness(h2_path, manager=FakeManager(), remote=remote)
    try:
        meta = pull_image(h, bootstrap)
        h.prepare("c1", meta)
        cfg = h.manager.ops("mount")[-1][4]["config"]
        assert cfg["auth"] == base64.b64encode(b"c:q").decode()
        # with check_registry off the mirror list is not probed: the image's own host is used
        assert cfg["host"] == "127.0.0.1:5000"
    finally:
        h.stop()


def test_mirrors_go_to_nydusd_and_reachability_uses_storage_failover(tmp_path, bootstrap):
    """Mirrors are handed to nydusd (storage's RegistryBackend fails over between them); the
    reachability check goes through the same failover: one answering endpoint is enough."""
    remote = RemoteConfig(check_registry=True, mirrors={"127.0.0.1:5000": ("http://127.0.0.1:6000",
                                                                          "http://127.0.0.1:7000")})
    h = Harness(tmp_path, manager=FakeManager(), remote=remote)
    try:
        h.ping_errors["127.0.0.1:6000"] = "refused"
        h.ping_errors["127.0.0.1:5000"] = "refused"
        meta = pull_image(h, bootstrap)
        h.prepare("c1", meta)
        cfg = h.manager.ops("mount")[-1][4]["config"]
        assert (cfg["scheme"], cfg["host"]) == ("https", "127.0.0.1:5000")
        assert cfg["mirrors"] == [{"host": "http://127.0.0.1:6000", "auth_through": True},
                                  {"host": "http://127.0.0.1:7000", "auth_through": True}]
        h.remove("c1")
        h.sn.rafs.umount("3", only_if_unneeded=False)
        h.ping_errors["127.0.0.1:7000"] = "timed out"
        code, msg = code_of(h.prepare, "c2", meta)
        assert code == grpc.StatusCode.UNAVAILABLE and "unreachable" in msg
        for failure in ("http://127.0.0.1:6000/v2/: refused", "http://127.0.0.1:7000/v2/: timed out",
                        "https://127.0.0.1:5000/v2/: refused"):
            assert failure in msg
    finally:
        h.stop()


def test_credentials_from_a_docker_credential_helper(tmp_path, bootstrap, monkeypatch):
    """credHelpers through storage's credential module; the secret is never logged."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-test"
    helper.write_text('#!/bin/sh\nread -r url\n[ "$url" = 127.0.0.1:5000 ] || '
                      '{ echo "credentials not found in native keychain"; exit 1; }\n'
                      'echo \'{"ServerURL": "127.0.0.1:5000", "Username": "alice", "Secret": "helper-s3cret"}\'\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    docker = tmp_path / "docker.json"
    docker.write_text(json.dumps({"auths": {"127.0.0.1:5000": {}}, "credHelpers": {"127.0.0.1:5000": "test"}}))
    h = Harness(tmp_path, manager=FakeManager(),
                remote=RemoteConfig(check_registry=False, docker_config=str(docker)))
    try:
        meta = pull_image(h, bootstrap)
        with_logs = logging.getLogger()
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
        with_logs.addHandler(handler)
        old_level = with_logs.level
        with_logs.setLevel(logging.DEBUG)
        try:
            h.prepare("c1", meta)
        finally:
            with_logs.removeHandler(handler)
            with_logs.setLevel(old_level)
        cfg = h.manager.ops("mount")[-1][4]["config"]
        assert cfg["auth"] == base64.b64encode(b"alice:helper-s3cret").decode()
        assert cfg["docker_config"] == str(docker)
        assert records and not any("helper-s3cret" in r or cfg["auth"] in r for r in records)
        # a helper that is not installed: a clear UNAVAILABLE, not a silent anonymous pull
        docker.write_text(json.dumps({"credHelpers": {"127.0.0.1:5000": "absent"}}))
        h.remove("c1")
        code, msg = code_of(h.prepare, "c2", meta)
        assert code == grpc.StatusCode.UNAVAILABLE and "docker-credential-absent" in msg
    finally:
        h.stop()


def test_cleanup_gc_skips_a_blob_held_by_a_live_daemon(h, bootstrap):
    """Cleanup's cache GC is storage's: it honours the per-blob lock another process (a daemon
    with the blob open) holds; an unused blob goes."""
    pull_image(h, bootstrap)
    cache = os.path.join(h.root, "cache")
    os.makedirs(cache, exist_ok=True)
    held, unused = "e" * 64, "d" * 64
    for blob_id in (held, unused):
        for suffix in (".blob.data", ".chunk_map", ".blob.meta"):
            with open(os.path.join(cache, blob_id + suffix), "wb") as f:
                f.write(b"x" * 4096)
    with blob_held_by_another_process(os.path.join(cache, held + ".blob.data")):
        h.cleanup()
        assert sorted(os.listdir(cache)) == sorted(held + s for s in (".blob.data", ".chunk_map", ".blob.meta"))
    h.cleanup()
    assert os.listdir(cache) == []


def test_cleanup_unmounts_instances_of_removed_images(h, bootstrap):
    meta = pull_image(h, bootstrap)
    h.prepare("ctr", meta)
    h.remove("ctr")
    assert h.manager.ops("umount") == [("umount", "3")]
    for key in ("sha256:c3", "sha256:c2", "sha256:c1"):
        h.remove(key)
    h.cleanup()
    assert os.listdir(os.path.join(h.root, "snapshots")) == []


def test_bootstrap_damaged_after_commit_is_failed_precondition(h, bootstrap):
    meta = pull_image(h, bootstrap)
    boot = os.path.join(h.root, "snapshots", "3", "fs", "image", "image.boot")
    with open(boot, "r+b") as f:
        f.write(b"\0" * 2048)
    code, msg = code_of(h.prepare, "ctr", meta)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "bootstrap" in msg
    assert h.manager.ops("mount") == []


def test_restart_recovers_and_releases_leftover_instances(tmp_path, bootstrap):
    mgr = FakeManager()
    h = Harness(tmp_path, manager=mgr)
    try:
        meta = pull_image(h, bootstrap)
        h.prepare("ctr", meta)
        # the snapshotter dies before it could unmount; the container's snapshot goes away later
        h.sn.rafs._mounted.clear()
        h.remove("ctr")
        assert mgr.ops("umount") == []
        h.restart()  # recover() reports the instance; nobody needs it → released at next Remove/Cleanup
        assert h.sn.instances() == {"3": os.path.join(h.root, "mnt", "3")}
        h.cleanup()
        assert mgr.ops("umount") == [("umount", "3")] and h.sn.instances() == {}
    finally:
        h.stop()


def test_concurrent_prepare_and_remove_keep_instance_consistent(h, bootstrap):
    import concurrent.futures

    meta = pull_image(h, bootstrap)
    h.prepare("base", meta)

    def churn(i: int) -> None:
        h.prepare(f"c{i}", meta)
        h.remove(f"c{i}")

    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        list(ex.map(churn, range(30)))
    # "base" was alive throughout: its instance must never have been unmounted
    assert h.manager.ops("umount") == []
    assert h.sn.instances() == {"3": os.path.join(h.root, "mnt", "3")}
    h.remove("base")
    assert h.manager.ops("umount") == [("umount", "3")]


def test_broken_instance_is_remounted(h, bootstrap):
    meta = pull_image(h, bootstrap)
    h.prepare("c1", meta)
    os.rmdir(os.path.join(h.root, "mnt", "3"))  # stands in for a dead FUSE mount (stat fails)
    h.prepare("c2", meta)
    assert len(h.manager.ops("mount")) == 2


def test_data_layer_with_missing_or_other_parent(h):
    code, msg = code_of(h.prepare, "x", "sha256:nope", data_labels("sha256:c9", BLOB1))
    assert code == grpc.StatusCode.NOT_FOUND and "sha256:nope" in msg
    assert h.list() == []
    code_of(h.prepare, "a", "", data_labels("sha256:c1", BLOB1))
    code_of(h.prepare, "b", "", data_labels("sha256:c2", BLOB2))
    # the same chain id again but on another parent: refused, and the adoption filter finds nothing
    code, msg = code_of(h.prepare, "c", "sha256:c2", data_labels("sha256:c1", BLOB1))
    assert code == grpc.StatusCode.ALREADY_EXISTS and 'parent ""' in msg
    assert h.list('labels."containerd.io/snapshot.ref"==sha256:c1,parent=="sha256:c2"') == []
    assert h.list() == ["sha256:c1", "sha256:c2"]


def test_registry_probe_runs_beside_the_mount(h, bootstrap):
    """The check_registry probe overlaps the instance mount: here the registry only answers once
    the mount has started (serially, the probe would wait for it in vain and fail)."""
    meta = pull_image(h, bootstrap)
    mount_started = threading.Event()
    real_mount, real_ping = h.manager.mount, h.sn._ping

    def mount(*args):
        mount_started.set()
        return real_mount(*args)

    def ping(scheme, host, timeout):
        return None if mount_started.wait(10) else "the probe ran before the mount, not beside it"

    h.manager.mount = mount
    h.sn._ping = ping
    h.prepare("ctr", meta)
    assert h.manager.instances()  # mounted, and the probe's answer accepted


def test_failed_registry_probe_undoes_the_mount_and_wins_over_a_mount_error(h, bootstrap):
    meta = pull_image(h, bootstrap)
    h.ping_errors["127.0.0.1:5000"] = "connection refused"
    code, msg = code_of(h.prepare, "ctr", meta)
    assert code == grpc.StatusCode.UNAVAILABLE and "unreachable" in msg
    assert h.manager.ops("mount") and not h.manager.instances(), "the mount of a refused Prepare was kept"
    h.manager.fail_mount = RuntimeError("daemon died")  # both fail: the registry's error, as before
    code, msg2 = code_of(h.prepare, "ctr", meta)
    assert code == grpc.StatusCode.UNAVAILABLE and msg2 == msg
    h.manager.fail_mount = None
    del h.ping_errors["127.0.0.1:5000"]
    h.prepare("ctr", meta)
