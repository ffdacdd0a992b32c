"""The Snapshots gRPC service with plain overlayfs behaviour, through a real gRPC channel."""

from __future__ import annotations

import os
import stat
import time

import grpc
import pytest
from google.protobuf import field_mask_pb2

from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from tests.snapshotter_helpers import Harness, code_of


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.stop()


def opts(m) -> list[str]:
    return list(m.options)


def test_socket_mode_0600(h):
    assert stat.S_IMODE(os.stat(h.address).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(h.address).st_mode)


def test_prepare_no_parent_is_rw_bind_and_layout(h):
    (m,) = h.prepare("ns/1/a")
    assert (m.type, opts(m)) == ("bind", ["rw", "rbind"])
    assert m.source == os.path.join(h.root, "snapshots", "1", "fs")
    assert os.path.isdir(os.path.join(h.root, "snapshots", "1", "work"))
    assert stat.S_IMODE(os.stat(m.source).st_mode) == 0o755
    assert not [d for d in os.listdir(os.path.join(h.root, "snapshots")) if d.startswith("new-")]


def test_view_no_parent_is_ro_bind_without_workdir(h):
    (m,) = h.view("v")
    assert (m.type, opts(m)) == ("bind", ["ro", "rbind"])
    sid = os.path.basename(os.path.dirname(m.source))
    assert not os.path.exists(os.path.join(h.root, "snapshots", sid, "work"))


def test_overlay_mounts_nearest_parent_first(h):
    h.prepare("a")
    h.commit("A", "a")
    h.prepare("b", "A")
    h.commit("B", "b")
    (m,) = h.prepare("c", "B")
    fs = lambda i: os.path.join(h.root, "snapshots", str(i), "fs")  # noqa: E731
    assert m.type == "overlay" and m.source == "overlay"
    o = [x for x in opts(m) if x not in ("index=off", "userxattr")]
    assert o == [f"workdir={os.path.join(h.root, 'snapshots', '3', 'work')}", f"upperdir={fs(3)}",
                 f"lowerdir={fs(2)}:{fs(1)}"]
    (v1,) = h.view("v1", "A")
    assert (v1.type, v1.source, opts(v1)) == ("bind", fs(1), ["ro", "rbind"])
    (v2,) = h.view("v2", "B")
    assert v2.type == "overlay"
    assert [x for x in opts(v2) if x.startswith("lowerdir=")] == [f"lowerdir={fs(2)}:{fs(1)}"]
    assert not any(x.startswith(("upperdir=", "workdir=")) for x in opts(v2))
    assert list(h.mounts("c")) == [m]


def test_commit_sets_created_equal_updated_and_keeps_id(h):
    h.prepare("a", labels={"x": "1"})
    before = h.stat("a")
    assert before.kind == pb.ACTIVE
    time.sleep(0.01)
    h.commit("A", "a", labels={"y": "2"})
    info = h.stat("A")
    assert info.kind == pb.COMMITTED and info.name == "A" and info.parent == ""
    assert info.created_at == info.updated_at
    assert info.created_at.ToNanoseconds() > before.created_at.ToNanoseconds()
    assert dict(info.labels) == {"y": "2"}
    assert code_of(h.stat, "a")[0] == grpc.StatusCode.NOT_FOUND
    (m,) = h.prepare("b", "A")
    assert os.path.join(h.root, "snapshots", "1", "fs") in [x.split("=", 1)[1] for x in opts(m) if x.startswith("lowerdir")]


def test_sequence_ids_never_reused(h):
    h.prepare("a")
    h.remove("a")
    (m,) = h.prepare("b")
    assert m.source == os.path.join(h.root, "snapshots", "2", "fs")
    assert not os.path.exists(os.path.join(h.root, "snapshots", "1"))


def test_error_codes_and_messages(h):
    h.prepare("a")
    assert code_of(h.prepare, "a")[0] == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(h.view, "a")[0] == grpc.StatusCode.ALREADY_EXISTS
    code, msg = code_of(h.prepare, "b", "missing")
    assert code == grpc.StatusCode.NOT_FOUND and "missing" in msg
    code, msg = code_of(h.prepare, "b", "a")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not committed" in msg
    h.commit("A", "a")
    assert code_of(h.commit, "A", "x")[0] == grpc.StatusCode.NOT_FOUND  # key checked first, as containerd
    h.prepare("x")
    code, msg = code_of(h.commit, "A", "x")
    assert code == grpc.StatusCode.ALREADY_EXISTS and "committed snapshot A" in msg
    assert code_of(h.commit, "Z", "nothing")[0] == grpc.StatusCode.NOT_FOUND
    h.view("v", "A")
    assert code_of(h.commit, "V", "v")[0] == grpc.StatusCode.FAILED_PRECONDITION
    code, msg = code_of(h.mounts, "A")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not active or view" in msg
    assert code_of(h.mounts, "nope")[0] == grpc.StatusCode.NOT_FOUND
    code, msg = code_of(h.remove, "A")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert msg == "failed to remove: cannot remove snapshot with child: failed precondition"
    assert code_of(h.remove, "nope")[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(h.usage, "nope")[0] == grpc.StatusCode.NOT_FOUND
    h.remove("v")
    h.remove("A")
    h.remove("x")
    assert h.list() == []


@pytest.mark.parametrize("key", ["", "a/../b", "..", "x\0y", "../etc"])
def test_bad_keys_are_invalid_argument(h, key):
    assert code_of(h.prepare, key)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(h.view, key)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(h.stat, key)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert h.list() == []


def test_absolute_keys_are_allowed(h):
    # containerd's conformance suite uses absolute paths as keys
    h.prepare("/tmp/work/preparing")
    h.commit("/tmp/work/committed", "/tmp/work/preparing")
    assert h.list() == ["/tmp/work/committed"]


def test_bad_labels_are_invalid_argument(h):
    code, msg = code_of(h.prepare, "a", labels={"k": "v" * 5000})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "maximum size" in msg
    code, msg = code_of(h.prepare, "a", labels={"containerd.io/snapshot/nydus-blob": "maybe"})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nydus-blob" in msg
    # unknown labels are kept verbatim
    h.prepare("a", labels={"org.example/whatever": "x", "garbage \u2603": "\u2603"})
    assert dict(h.stat("a").labels) == {"org.example/whatever": "x", "garbage \u2603": "\u2603"}


def test_update_field_paths(h):
    h.prepare("a", labels={"l1": "v1", "l2": "v2", "l3": "v3"})
    h.commit("A", "a", labels={"l1": "v1", "l2": "v2", "l3": "v3"})
    created = h.stat("A").created_at

    def update(labels, *paths):
        info = pb.Info(name="A", labels=labels)
        mask = field_mask_pb2.FieldMask(paths=list(paths)) if paths else None
        req = pb.UpdateSnapshotRequest(snapshotter="nydus", info=info, update_mask=mask)
        return h.stub.Update(req).info

    out = update({"l1": "new", "l2": "ignored"}, "labels.l1")
    assert dict(out.labels) == {"l1": "new", "l2": "v2", "l3": "v3"}
    out = update({}, "labels.l2")  # an empty value deletes the label
    assert dict(out.labels) == {"l1": "new", "l3": "v3"}
    out = update({"only": "this"})
    assert dict(out.labels) == {"only": "this"}
    out = update({"a": "b"}, "labels")
    assert dict(out.labels) == {"a": "b"}
    assert out.created_at == created and out.updated_at.ToNanoseconds() > created.ToNanoseconds()
    assert dict(h.stat("A").labels) == {"a": "b"}
    code, msg = code_of(update, {}, "parent")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and 'cannot update "parent"' in msg
    req = pb.UpdateSnapshotRequest(snapshotter="nydus", info=pb.Info(name="zz"))
    assert code_of(h.stub.Update, req)[0] == grpc.StatusCode.NOT_FOUND


def test_list_filters(h):
    h.prepare("a", labels={"l": "1", "containerd.io/snapshot.ref": "sha256:aa"})
    h.commit("A", "a", labels={"l": "1", "containerd.io/snapshot.ref": "sha256:aa", "x y": "q,v"})
    h.prepare("b", "A", labels={"m": "2"})
    h.view("v", "A")
    assert h.list() == ["A", "b", "v"]
    assert h.list("name==A") == ["A"]
    assert h.list("kind==active") == ["b"]
    assert h.list("kind!=active") == ["A", "v"]
    assert h.list('parent!=""') == ["b", "v"]
    assert h.list('parent==""') == ["A"]
    assert h.list("labels.l") == ["A"]
    assert h.list("labels.m", "labels.l") == ["A", "b"]  # OR across strings
    assert h.list("name==A,labels.l") == ["A"]
    assert h.list("name==b,labels.l") == []
    assert h.list('labels."containerd.io/snapshot.ref"==sha256:aa,parent==""') == ["A"]
    assert h.list('labels."containerd.io/snapshot.ref"=="sha256:aa",parent=="x"') == []
    assert h.list('labels."x y"=="q,v"') == ["A"]
    assert h.list("name~=^[Ab]$") == ["A", "b"]
    for bad in ("name==", "==x", "name=x", 'labels."unterminated', "name==a,", "name~=("):
        code, _ = code_of(h.list, bad)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_usage_active_and_committed(h):
    (m,) = h.prepare("a")
    with open(os.path.join(m.source, "f"), "wb") as f:
        f.write(b"x" * 100_000)
    u = h.usage("a")
    assert u.size >= 100_000 and u.inodes == 2
    h.commit("A", "a")
    u2 = h.usage("A")
    assert (u2.size, u2.inodes) == (u.size, u.inodes)


def test_cleanup_removes_orphan_dirs_only(h):
    h.prepare("a")
    orphan = os.path.join(h.root, "snapshots", "99")
    os.makedirs(os.path.join(orphan, "fs"))
    temp = os.path.join(h.root, "snapshots", "new-123")
    os.makedirs(temp)
    h.cleanup()
    assert not os.path.exists(orphan) and not os.path.exists(temp)
    assert os.path.isdir(os.path.join(h.root, "snapshots", "1", "fs"))


def test_remove_deletes_directory_after_commit(h):
    h.prepare("a")
    h.remove("a")
    assert os.listdir(os.path.join(h.root, "snapshots")) == []


def test_state_survives_restart(h):
    h.prepare("a", labels={"k": "v"})
    h.commit("A", "a")
    h.prepare("b", "A")
    h.restart()
    assert h.list() == ["A", "b"]
    (m,) = h.mounts("b")
    assert m.type == "overlay"
    (n,) = h.prepare("c")
    assert n.source.endswith(os.path.join("snapshots", "3", "fs"))


def test_service_keeps_serving_after_errors(h):
    for _ in range(20):
        code_of(h.prepare, "x", "nope")
        code_of(h.stat, "")
    h.prepare("ok")
    assert h.list() == ["ok"]


def test_concurrent_prepares(h):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: h.prepare(f"k{i}"), range(40)))
    assert len(h.list()) == 40
    ids = sorted(int(d) for d in os.listdir(os.path.join(h.root, "snapshots")))
    assert ids == list(range(1, 41))


def test_remove_never_deletes_through_a_mountpoint(h):
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    (m,) = h.prepare("a")
    mnt = os.path.join(os.path.dirname(m.source), "mnt")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], check=True)
    try:
        with open(os.path.join(mnt, "precious"), "w") as f:
            f.write("x")
        h.remove("a")
        assert os.path.exists(os.path.join(mnt, "precious"))  # kept: still mounted
    finally:
        subprocess.run(["umount", mnt], check=True)
    h.cleanup()
    assert not os.path.exists(os.path.dirname(m.source))
