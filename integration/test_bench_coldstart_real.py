"""The real-image cold-start benchmark's own pieces: the rootfs split into layers, the page-cache
residency count it measures read bytes with, and the log parsing of its timeline."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from integration.bench_coldstart_real import (evict, nydus_timeline, resident_bytes,
                                              split_rootfs)


def _rootfs_tar(path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, data=None, kind=tarfile.REGTYPE, link="", mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.linkname = kind, mode, link
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        add("./", kind=tarfile.DIRTYPE, mode=0o755)
        add("./usr/", kind=tarfile.DIRTYPE, mode=0o755)
        add("./usr/bin/", kind=tarfile.DIRTYPE, mode=0o755)
        add("./usr/bin/python3.11", b"ELF python", mode=0o755)
        add("./usr/lib/", kind=tarfile.DIRTYPE, mode=0o755)
        add("./usr/lib/python3.11/", kind=tarfile.DIRTYPE, mode=0o755)
        add("./usr/lib/python3.11/json.py", b"import x\n")
        add("./usr/lib/python3/dist-packages/", kind=tarfile.DIRTYPE, mode=0o755)
        add("./usr/lib/python3/dist-packages/empty/", kind=tarfile.DIRTYPE, mode=0o700)
        add("./usr/lib/python3.11/json-link.py", kind=tarfile.LNKTYPE, link="./usr/lib/python3.11/json.py")
        add("./usr/bin/python3", kind=tarfile.SYMTYPE, link="python3.11")
        add("./usr/share/", kind=tarfile.DIRTYPE, mode=0o755)
        add("./usr/share/doc/copyright", b"GPL")
        add("./usr/bin/perl-link", kind=tarfile.LNKTYPE, link="./usr/bin/python3.11")


def test_split_rootfs_keeps_every_entry_once_with_parents_and_hardlinks(tmp_path):
    src = tmp_path / "rootfs.tar"
    _rootfs_tar(src)
    layers = dict(split_rootfs(src))
    assert list(layers) == ["base", "python", "share"]       # gcc: no entries, no layer
    members = {}
    for name, data in layers.items():
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            members[name] = {m.name.removeprefix("./").rstrip("/"): m for m in tf.getmembers()}
    files = {n: {p for p, m in ms.items() if not m.isdir()} for n, ms in members.items()}
    assert files["base"] == {"usr/bin/python3.11", "usr/bin/python3", "usr/bin/perl-link"}
    assert files["python"] == {"usr/lib/python3.11/json.py", "usr/lib/python3.11/json-link.py"}
    assert files["share"] == {"usr/share/doc/copyright"}
    # parents travel with their files, with the rootfs' own modes; empty dirs are kept
    assert {"usr", "usr/lib", "usr/lib/python3.11", "usr/lib/python3/dist-packages/empty"} <= set(members["python"])
    assert members["python"]["usr/lib/python3/dist-packages/empty"].mode == 0o700
    assert "usr/share/doc" not in members["share"] or members["share"]["usr/share/doc"].isdir()
    assert "usr/lib/python3.11" not in members["base"]


def test_resident_bytes_counts_pages_read_after_evict(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 20))
    os.sync()
    evict(str(path))
    assert resident_bytes(str(path)) < (1 << 20)
    with open(path, "rb") as f:
        f.read()
    assert resident_bytes(str(path)) == 1 << 20
    assert resident_bytes(str(tmp_path / "missing")) == 0


def test_nydus_timeline_from_logs(tmp_path):
    snap = tmp_path / "snapshotter.log"
    snap.write_text("\n".join(json.dumps({"time": t, "level": "info", "logger": "x", "msg": m}) for t, m in [
        ("2026-12-04T17:08:01.930Z", "started nydusd shared-erofs (pid 3550, erofs) at /m"),
        ("2026-12-04T17:08:06.648Z", "RAFS instance 5 for 127.0.0.1:1/b/d:nydus mounted at /m/5 in 5.038s"),
    ]) + "\nnot json\n")
    daemon = tmp_path / "nydusd.log"
    daemon.write_text("2026-12-04 17:08:01,867 INFO [rafs.daemon.service] nydusd shared-erofs RUNNING "
                      "(erofs, shared) at /m; FUSE no_open off\n")
    tl = nydus_timeline(str(snap), [str(daemon)])
    assert set(tl) == {"daemon_started", "instance_mounted", "mount_requested", "daemon_running"}
    assert round(tl["instance_mounted"] - tl["mount_requested"], 3) == 5.038
    assert round(tl["instance_mounted"] - tl["daemon_started"], 3) == 4.718


def test_regular_files_lists_each_inode_once(tmp_path):
    from integration.bench_coldstart_real import regular_files

    (tmp_path / "a").write_bytes(b"x")
    os.link(tmp_path / "a", tmp_path / "b")
    os.symlink("a", tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "e").write_bytes(b"y")
    files = regular_files([str(tmp_path)])
    assert len(files) == 2 and str(tmp_path / "d" / "e") in files


def test_link_counts_the_time_it_sat_idle(tmp_path):
    """The throttled link logs the requests (with the range asked for) and what it sends back; a
    pause between two requests shows up as idle link time, a throttled transfer does not."""
    import socket
    import threading
    import time

    from integration.bench_coldstart_real import Link

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    pause, size, rate = 0.4, 1 << 20, 4e6

    def serve():
        conn, _ = server.accept()
        with conn:
            for fill in b"xy":
                conn.recv(1024)
                conn.sendall(bytes([fill]) * size)

    threading.Thread(target=serve, daemon=True).start()
    link = Link(server.getsockname()[1], rate)      # each MiB: 0.26 s of link, 256 KiB of it burst
    try:
        t0 = time.time()
        with socket.create_connection(("127.0.0.1", link.proxy.port)) as c:
            for i in range(2):
                if i:
                    time.sleep(pause)
                c.sendall(b"GET /v2/x HTTP/1.1\r\nRange: bytes=0-1048575\r\n\r\n" if i else
                          b"GET /v2/x HTTP/1.1\r\n\r\n")
                got = 0
                while got < size:
                    data = c.recv(1 << 16)
                    assert data
                    got += len(data)
        t1 = time.time()
        assert link.sent == 2 * size
        assert [line for _, line in link.requests] == ["GET /v2/x HTTP/1.1",
                                                       "GET /v2/x HTTP/1.1 range=0-1048575"]
        # the pause, less the burst of the first MiB: its link time runs on after the client had it
        burst = (256 << 10) / rate
        idle = link.idle_seconds(t0, t1)
        assert pause - burst - 0.06 < idle < pause + 0.06, idle
        first = link.sends[0][0]
        assert link.idle_seconds(first, first + 0.2) < 0.01      # throttled, not idle
        link.forget(t1 + 1)
        assert link.sends == []
    finally:
        link.close()
        server.close()


def test_compressed_read_bytes_counts_the_chunks_holding_newly_read_pages(tmp_path):
    from integration.bench_coldstart_real import PAGE, compressed_read_bytes, resident_pages

    mib = 1 << 20
    path = tmp_path / "f"
    path.write_bytes(os.urandom(mib) + bytes(mib) + os.urandom(mib // 2))
    os.sync()
    evict(str(path))
    before = resident_pages(str(path))
    assert len(before) == (5 * mib // 2) // PAGE
    with open(path, "rb") as f:              # one page of the random chunk, one of the zeros
        f.seek(10 * PAGE)
        f.read(1)
        f.seek(mib + 3 * PAGE)
        f.read(1)
    after = resident_pages(str(path))
    assert after[10] and after[256 + 3]
    got = compressed_read_bytes(str(path), before, after)
    # the random chunk stored raw (compressing does not shrink it), the zero chunk a few bytes
    assert mib <= got < mib + 1024
    # pages resident before the run are not the workload's reads
    assert compressed_read_bytes(str(path), after, after) == 0
    assert compressed_read_bytes(str(path), b"", b"") == 0


def test_read_set_study_weighs_the_chunks_holding_loaded_pages(tmp_path):
    import zstandard

    from integration.bench_coldstart_real import PAGE
    from integration.study_read_set import weigh

    path = tmp_path / "f"
    path.write_bytes(os.urandom(256 << 10) + bytes(256 << 10))
    bits = bytearray((512 << 10) // PAGE)
    bits[0] = 1                                   # a page of the random half
    bits[(256 << 10) // PAGE + 1] = 1             # a page of the zero half
    z = {3: zstandard.ZstdCompressor(level=3)}
    raw, packed = weigh({str(path): bytes(bits)}, 64 << 10, z)
    assert raw == 128 << 10                       # two 64 KiB chunks
    assert (64 << 10) <= packed[3] < (64 << 10) + 256
    raw, packed = weigh({str(path): bytes(bits)}, 1 << 20, z)
    assert raw == 512 << 10                       # the whole file is one chunk
    assert packed[3] < (256 << 10) + 1024


def test_workload_groups_expand_in_order_each_once():
    from integration.bench_coldstart_real import BENCHMARKED, HELD_OUT, STARTUP_WORKLOADS, expand_workloads

    assert expand_workloads("benchmarked") == list(BENCHMARKED)
    assert expand_workloads("held-out,git") == [*HELD_OUT, "git"]
    assert expand_workloads("perl,all") == ["perl", *[w for w in (*BENCHMARKED, *HELD_OUT) if w != "perl"]]
    # the held-out programs are start-ups too (the optimized modes trace each), none renamed
    assert not set(HELD_OUT) & set(BENCHMARKED) and set(HELD_OUT) <= set(STARTUP_WORKLOADS)


def test_disk_read_ahead_is_set_for_the_measurement_and_restored(tmp_path):
    """The read set is measured with the disk's read-ahead at the kernel's default: set on the
    disk holding the path, restored after (also after an error); nothing to set on tmpfs."""
    from integration.bench_coldstart_real import _queue_read_ahead, disk_read_ahead

    knob = _queue_read_ahead(str(tmp_path))
    if knob is None or not os.access(knob, os.W_OK):
        pytest.skip(f"{tmp_path} is on no block device whose read-ahead can be set here (needs root)")
    with open(knob) as f:
        was = int(f.read())
    other = 256 if was != 256 else 512
    with pytest.raises(RuntimeError):
        with disk_read_ahead(str(tmp_path), other) as old:
            assert old == was
            with open(knob) as f:
                assert int(f.read()) == other
            raise RuntimeError("the workload failed")
    with open(knob) as f:
        assert int(f.read()) == was
    if os.path.isdir("/dev/shm"):
        with disk_read_ahead("/dev/shm", other) as old:
            assert old is None
