"""Pure parts of the snapshotter: mounts(), filters, labels, key validation, metastore transactions."""

from __future__ import annotations


import pytest

from snapshotter import filters, labels as L, metastore as store
from snapshotter.errors import FailedPrecondition, InvalidArgument, NotFound, SnapshotterError
from snapshotter.metastore import Info, Kind, MetaStore, Snapshot, Usage
from snapshotter.mounts import Mount, OverlayOptions, native_mounts, remote_mounts
from snapshotter.bootstrap import check_bootstrap
from snapshotter.snapshot import validate_key

R = "/r"


def fs(i: str) -> str:
    return f"/r/snapshots/{i}/fs"


# ---------------------------------------------------------------- mounts (one test per case)

def test_mounts_active_no_parent_rw_bind():
    assert native_mounts(R, Snapshot("1", Kind.ACTIVE)) == [Mount("bind", fs("1"), ("rw", "rbind"))]


def test_mounts_view_no_parent_ro_bind():
    assert native_mounts(R, Snapshot("1", Kind.VIEW)) == [Mount("bind", fs("1"), ("ro", "rbind"))]


def test_mounts_view_one_parent_ro_bind_of_parent():
    assert native_mounts(R, Snapshot("2", Kind.VIEW, ("1",))) == [Mount("bind", fs("1"), ("ro", "rbind"))]


def test_mounts_view_many_parents_overlay_lowerdir_only():
    assert native_mounts(R, Snapshot("3", Kind.VIEW, ("2", "1"))) == [
        Mount("overlay", "overlay", (f"lowerdir={fs('2')}:{fs('1')}",))]


def test_mounts_active_with_parents_overlay_upper_work():
    assert native_mounts(R, Snapshot("3", Kind.ACTIVE, ("2", "1"))) == [
        Mount("overlay", "overlay", ("workdir=/r/snapshots/3/work", f"upperdir={fs('3')}",
                                     f"lowerdir={fs('2')}:{fs('1')}"))]


def test_mounts_host_options_index_off_userxattr_volatile():
    (m,) = native_mounts(R, Snapshot("2", Kind.ACTIVE, ("1",)), OverlayOptions(True, True, True))
    assert m.options[:3] == ("index=off", "userxattr", "volatile")
    (v,) = native_mounts(R, Snapshot("3", Kind.VIEW, ("2", "1")), OverlayOptions(True, False, True))
    assert v.options == ("index=off", f"lowerdir={fs('2')}:{fs('1')}")


def test_remote_mounts():
    assert remote_mounts(R, Snapshot("9", Kind.ACTIVE, ("3", "2", "1")), "/mnt/3") == [
        Mount("overlay", "overlay", ("workdir=/r/snapshots/9/work", f"upperdir={fs('9')}", "lowerdir=/mnt/3"))]
    assert remote_mounts(R, Snapshot("9", Kind.VIEW, ("3",)), "/mnt/3") == [Mount("bind", "/mnt/3", ("ro", "rbind"))]
    assert remote_mounts(R, Snapshot("9", Kind.VIEW, ("4", "3")), "/mnt/3", between=("4",)) == [
        Mount("overlay", "overlay", (f"lowerdir={fs('9')}:{fs('4')}:/mnt/3",))]


# ---------------------------------------------------------------- filters

def info(name="n", parent="", kind=Kind.COMMITTED, labels=None) -> Info:
    return Info(name, parent, kind, 0, 0, labels or {})


@pytest.mark.parametrize("flt,expect", [
    ("", True), ("name==n", True), ("name!=n", False), ("name", True), ("parent", True),
    ('parent==""', True), ('parent!=""', False), ("labels.a", True), ("labels.zz", False),
    ('labels."a"==1', True), ("labels.a==1,name==n", True), ("labels.a==1,name==x", False),
    ('labels."x.y/z"=="v w"', True), ("kind==committed", True),
    ("kind==active", False), ("name~=^n$", True), ("name~=/^m/", False), ("labels.a!=2", True),
    ("labels.none!=2", True), ("  name == n ,  labels.a  ", True), ("labels.'a'=='1'", True),
])
def test_filter_semantics(flt, expect):
    i = info(labels={"a": "1", "x.y/z": "v w"})
    assert filters.compile_filters([flt])(i) is expect


def test_labels_field_joins_dotted_path():
    assert filters.compile_filters(["labels.containerd.io==x"])(info(labels={"containerd.io": "x"}))


@pytest.mark.parametrize("bad", ["==", "name==", "name=", "name==a,", ",", "name!", 'labels."x', "1abc==2",
                                 "name==a b", "name~=(", "labels.x.y/z==v", 'name=="\\q"'])
def test_filter_syntax_errors(bad):
    with pytest.raises(InvalidArgument):
        filters.compile_filters([bad])


def test_filters_or_across_strings():
    f = filters.compile_filters(["name==a", "name==b"])
    assert f(info("a")) and f(info("b")) and not f(info("c"))


# ---------------------------------------------------------------- labels and keys

@pytest.mark.parametrize("ref,host,repo,tag", [
    ("busybox", "docker.io", "library/busybox", "latest"),
    ("docker.io/library/nginx:1.2", "docker.io", "library/nginx", "1.2"),
    ("127.0.0.1:5000/foo/bar:v1", "127.0.0.1:5000", "foo/bar", "v1"),
    ("localhost/x@sha256:" + "a" * 64, "localhost", "x", "sha256:" + "a" * 64),
    ("ghcr.io/o/r", "ghcr.io", "o/r", "latest"),
    ("user/repo:t", "docker.io", "user/repo", "t"),
])
def test_parse_image_ref(ref, host, repo, tag):
    r = L.parse_image_ref(ref)
    assert (r.host, r.repo, r.reference) == (host, repo, tag)


def test_backend_host_maps_docker_io():
    assert L.parse_image_ref("busybox").backend_host == "index.docker.io"


@pytest.mark.parametrize("bad", ["", "a b", "host:5000/", "x\0y"])
def test_bad_image_ref(bad):
    with pytest.raises(InvalidArgument):
        L.parse_image_ref(bad)


def test_label_credentials():
    assert L.label_credentials({}) is None
    assert L.label_credentials({L.PULL_USERNAME: "u", L.PULL_SECRET: "p"}) == "dTpw"
    with pytest.raises(InvalidArgument):
        L.label_credentials({L.PULL_USERNAME: "u"})


def test_validate_key():
    for ok in ("a", "/abs/path", "ns/1/extract-1 sha256:abc", "a..b"):
        validate_key(ok)
    for bad in ("", "..", "a/../b", "x\0", "a" * 5000):
        with pytest.raises(InvalidArgument):
            validate_key(bad)


def test_check_bootstrap_magic(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(InvalidArgument):
        check_bootstrap(str(bad))
    with pytest.raises(InvalidArgument):
        check_bootstrap(str(tmp_path / "missing"))


def test_check_bootstrap_real_vector(vectors_dir):
    boot = vectors_dir / "dragonflyoss-nydus" / "tests" / "texture" / "bootstrap" / "rafs-v6-2.2.boot"
    assert check_bootstrap(str(boot)) == 6


# ---------------------------------------------------------------- metastore

def test_transaction_rolls_back_on_error(tmp_path):
    ms = MetaStore(str(tmp_path / "m.db"))
    with pytest.raises(NotFound):
        with ms.transaction(writable=True) as tx:
            store.create_snapshot(tx, Kind.ACTIVE, "a", "")
            store.get_info(tx, "missing")
    with ms.transaction(writable=False) as tx:
        assert store.walk_info(tx) == []
        with pytest.raises(SnapshotterError):
            store.create_snapshot(tx, Kind.ACTIVE, "a", "")  # read-only transaction
    ms.close()


def test_store_functions_semantics(tmp_path):
    ms = MetaStore(str(tmp_path / "m.db"))
    with ms.transaction(writable=True) as tx:
        a = store.create_snapshot(tx, Kind.ACTIVE, "a", "", {"k": "v", "empty": ""})
        store.commit_active(tx, "a", "A", Usage(10, 2), {"k": "v"})
        b = store.create_snapshot(tx, Kind.VIEW, "b", "A")
        assert b.parent_ids == (a.id,)
        with pytest.raises(InvalidArgument):
            store.create_snapshot(tx, Kind.COMMITTED, "c", "")
        with pytest.raises(FailedPrecondition):
            store.remove(tx, "A")
        with pytest.raises(FailedPrecondition):
            store.commit_active(tx, "b", "B", Usage())
        assert store.get_info(tx, "A")[2] == Usage(10, 2)
        assert store.id_map(tx) == {a.id: "A", b.id: "b"}
    ms.close()
