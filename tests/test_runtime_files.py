"""The files nearly every container start reads first (``rafs.runtime``) and the symlink
resolution they are found with (``Rafs.resolve`` / ``realpath``)."""

from __future__ import annotations

import os

import pytest

from rafs.errors import NotFound
from rafs.runtime import runtime_files


def _build(tmp_path, make):
    from rafs.builder.build import BuildOptions, build
    from rafs.metadata import Rafs

    src = tmp_path / "src"
    src.mkdir(parents=True)
    make(src)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    res = build(str(src), bootstrap_out=str(tmp_path / "boot"), blob_dir=str(blobs),
                options=BuildOptions(chunk_size=65536))
    return Rafs.open(res.bootstrap)


def _put(root, rel, data=b"x"):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _debian(src):
    """Debian bookworm's usrmerge layout: /lib and /lib64 link into /usr, the loader's
    /lib64 name links into the multiarch directory that holds libc.so.6."""
    multi = "usr/lib/x86_64-linux-gnu"
    _put(src, f"{multi}/ld-linux-x86-64.so.2", b"loader")
    _put(src, f"{multi}/libc.so.6", b"libc")
    _put(src, f"{multi}/libm.so.6", b"libm")
    _put(src, "etc/ld.so.cache", b"cache")
    _put(src, "etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    (src / "usr/lib64").mkdir(parents=True)
    os.symlink("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", src / "usr/lib64/ld-linux-x86-64.so.2")
    os.symlink("usr/lib", src / "lib")
    os.symlink("usr/lib64", src / "lib64")


def test_debian_layout_gives_user_db_loader_cache_and_libc_in_start_order(tmp_path):
    def debian(src):
        _debian(src)
        _put(src, "etc/group", b"root:x:0:\n")

    rafs = _build(tmp_path, debian)
    got = runtime_files(rafs)
    multi = "/usr/lib/x86_64-linux-gnu"
    assert [n.ino for n in got] == [rafs.lookup_path(p).ino for p in
                                    ("/etc/group", "/etc/passwd", f"{multi}/ld-linux-x86-64.so.2",
                                     "/etc/ld.so.cache", f"{multi}/libc.so.6")]


def test_user_db_alone_in_an_image_of_static_binaries(tmp_path):
    """distroless-style: /etc/passwd and /etc/group (runc reads them whatever the binary), no
    loader, so no ld.so.cache either; a user file that is a link is followed, a directory skipped."""
    def distroless(src):
        _put(src, "app", b"a static binary")
        _put(src, "usr/share/base-passwd/passwd.master", b"root:x:0:0::/root:/sbin/nologin\n")
        _put(src, "etc/ld.so.cache", b"no loader: not read")
        os.symlink("../usr/share/base-passwd/passwd.master", src / "etc/passwd")
        (src / "etc/group").mkdir()

    rafs = _build(tmp_path, distroless)
    assert [n.ino for n in runtime_files(rafs)] == [rafs.lookup_path("/usr/share/base-passwd/passwd.master").ino]


def test_musl_loader_is_its_libc_and_a_static_image_gives_nothing(tmp_path):
    def alpine(src):
        _put(src, "lib/libc.musl-x86_64.so.1", b"musl")
        os.symlink("libc.musl-x86_64.so.1", src / "lib/ld-musl-x86_64.so.1")
        _put(src, "bin/busybox", b"static")

    rafs = _build(tmp_path / "alpine", alpine)
    assert [n.ino for n in runtime_files(rafs)] == [rafs.lookup_path("/lib/libc.musl-x86_64.so.1").ino]

    def static(src):
        _put(src, "app", b"a static binary")
        _put(src, "etc/ld.so.cache", b"no loader: not read")
        (src / "lib64").mkdir()
        os.symlink("/nowhere/ld.so", src / "lib64/ld-linux-x86-64.so.2")  # dangling: skipped

    assert runtime_files(_build(tmp_path / "static", static)) == []


def test_resolve_follows_links_in_every_component_inside_the_image(tmp_path):
    rafs = _build(tmp_path, _debian)
    loader = rafs.lookup_path("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    assert rafs.resolve("/lib64/ld-linux-x86-64.so.2").ino == loader.ino
    assert rafs.realpath("/lib64/ld-linux-x86-64.so.2") == "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert rafs.realpath("/lib/../../../etc/./passwd") == "/etc/passwd"  # ".." stops at the root
    with pytest.raises(NotFound):
        rafs.resolve("/lib/missing")


def test_resolve_stops_at_a_symlink_loop(tmp_path):
    def loop(src):
        os.symlink("b", src / "a")
        os.symlink("a", src / "b")

    rafs = _build(tmp_path, loop)
    with pytest.raises(NotFound, match="too many levels"):
        rafs.resolve("/a")


class _Device:
    """Records the daemon's prefetch calls (sizes of each iovec, priority, exact)."""

    def __init__(self):
        self.calls = []

    def prefetch(self, iovecs, *, priority="low", exact=False):
        self.calls.append(([sum(d.size for d in v) for v in iovecs], priority, exact))

    def wait_demand_settled(self, or_sustained=False):
        return True

    def prefetch_blob(self, blob_index):
        return False


def _start(tmp_path, rafs, fs_prefetch):
    from rafs.daemon.config import DaemonConfig
    from rafs.daemon.service import Nydusd
    from rafs.fs.instance import Instance

    daemon = Nydusd(mountpoint=str(tmp_path / "m"))
    dev = _Device()
    daemon._start_prefetch(Instance("x", rafs, dev), DaemonConfig.parse({"fs_prefetch": fs_prefetch}))
    for t in daemon._prefetch_threads:
        t.join(10)
    return dev.calls


def test_the_daemon_fetches_them_at_mount_at_once_unless_told_not_to(tmp_path):
    rafs = _build(tmp_path, _debian)
    want = [len(b"root:x:0:0::/root:/bin/sh\n"), len(b"loader"), len(b"cache"), len(b"libc")]
    # the snapshotter's default: prefetch enabled, no prefetch_all, an image without a table
    # at once, and exactly these files: not amplified into the files laid out behind them
    assert _start(tmp_path, rafs, {"enable": True, "prefetch_all": False}) == [(want, "high", True)]
    assert _start(tmp_path, rafs, {"enable": True, "prefetch_all": False, "runtime_files": False}) == []
    assert _start(tmp_path, rafs, {"enable": False}) == []  # nydusd's default: no prefetch at all


def test_an_image_with_its_own_start_up_set_gets_only_that(tmp_path):
    rafs = _build(tmp_path, _debian)
    rafs.prefetch_inos = [rafs.lookup_path("/etc/passwd").ino]  # e.g. from a recorded trace
    calls = _start(tmp_path, rafs, {"enable": True, "prefetch_all": False})
    assert calls == [([len(b"root:x:0:0::/root:/bin/sh\n")], "high", False)]


def test_a_failing_lookup_leaves_the_listed_prefetch_alone(tmp_path, monkeypatch, caplog):
    from rafs.errors import FormatError
    from rafs.fs.instance import Instance

    def broken(self):
        raise FormatError("corrupt directory block")

    monkeypatch.setattr(Instance, "runtime_iovecs", broken)
    rafs = _build(tmp_path, _debian)
    calls = _start(tmp_path, rafs, {"enable": True, "prefetch_all": True})
    assert [(priority, exact) for _, priority, exact in calls] == [("low", False)]  # the whole image
    assert "runtime files" in caplog.text and "corrupt directory block" in caplog.text
