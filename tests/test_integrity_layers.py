"""Hostile layers cost bounded work: declared sizes and entry counts are capped with a clear
error before any data is read, holes stay holes on unpack, and SIGTERM/SIGINT remove temporary
output as errors do."""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from rafs.builder import BuildOptions, LayerLimits, build
from rafs.errors import BuildError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tar(entries: list[tuple[str, int, bytes | None]]) -> bytes:
    """A tar whose regular entries declare ``size`` but carry ``data`` (None: the header only,
    as a truncated or lying stream would)."""
    out = io.BytesIO()
    for name, size, data in entries:
        ti = tarfile.TarInfo(name)
        ti.size = size
        out.write(ti.tobuf(format=tarfile.PAX_FORMAT))
        if data is not None:
            out.write(data + bytes(-len(data) % 512))
    return out.getvalue()


#: runs argv with SIGINT and SIGTERM at their defaults and unblocked, as a command started from an
#: interactive shell does, whatever the test runner inherited (a runner started in the background
#: without job control has SIGINT ignored, which Python keeps); exec keeps the pid
_FROM_A_SHELL = ("import os, signal, sys\n"
                 "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_DFL)\n"
                 "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})\n"
                 "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")


def _from_a_shell(*args: str) -> list[str]:
    return [sys.executable, "-c", _FROM_A_SHELL, *args]


def _signal_state(pid: int) -> str:
    """Each thread's signal masks, for a failure message."""
    out = []
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task")):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out.append(tid + " " + " ".join(line.strip() for line in f if line.startswith(
                    ("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))))
    except OSError as exc:
        out.append(str(exc))
    return "\n".join(out)


def _leftovers(d: pathlib.Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_declared_file_size_over_the_cap_fails_fast_leaving_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stream = io.BytesIO(_tar([("small", 3, b"abc"), ("huge", 1 << 40, None)]))  # 1 TiB declared
    t0 = time.monotonic()
    with pytest.raises(BuildError, match=r"huge: declared size 1099511627776 bytes exceeds .*--max-file-size"):
        build(stream, bootstrap_out=str(out / "b.boot"), blob_dir=str(out), source_type="tar-rafs")
    assert time.monotonic() - t0 < 5
    assert list(out.iterdir()) == []


def test_layer_total_and_entry_caps(tmp_path):
    entries = [(f"f{i}", 1000, bytes(1000)) for i in range(20)]
    with pytest.raises(BuildError, match="exceed 10000 bytes in total"):
        build(io.BytesIO(_tar(entries)), bootstrap_out=str(tmp_path / "a.boot"), blob_dir=str(tmp_path),
              source_type="tar-rafs", options=BuildOptions(limits=LayerLimits(max_layer_size=10_000)))
    with pytest.raises(BuildError, match="more than 5 entries"):
        build(io.BytesIO(_tar(entries)), bootstrap_out=str(tmp_path / "b.boot"), blob_dir=str(tmp_path),
              source_type="tar-rafs", options=BuildOptions(limits=LayerLimits(max_entries=5)))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(b"x")
    with pytest.raises(BuildError, match="more than 5 entries"):
        build(str(src), bootstrap_out=str(tmp_path / "c.boot"), blob_dir=str(tmp_path),
              options=BuildOptions(limits=LayerLimits(max_entries=5)))
    # 0 = no cap; within the caps it builds
    build(io.BytesIO(_tar(entries)), bootstrap_out=str(tmp_path / "d.boot"), blob_dir=str(tmp_path),
          source_type="tar-rafs", options=BuildOptions(limits=LayerLimits(0, 0, 0)))


def test_create_cli_caps(tmp_path):
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_tar([("big", 5000, bytes(5000))]))
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "create", "-t", "tar-rafs", "--max-file-size", "4096",
                           "-B", str(tmp_path / "b.boot"), "-D", str(tmp_path), str(tar)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--max-file-size" in proc.stderr, proc.stderr


def test_holes_stay_holes_on_unpack(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    size = 256 << 20
    with open(src / "sparse", "wb") as f:  # 256 MiB, 3 data bytes
        f.truncate(size)
        f.seek(5 << 20)
        f.write(b"abc")
    (src / "dense").write_bytes(os.urandom(100_000))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    res = build(str(src), bootstrap_out=str(tmp_path / "img.boot"), blob_dir=str(blobs))
    assert os.path.getsize(blobs / res.blob_ids[0]) < 1 << 20  # one zero chunk, deduplicated
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "unpack", str(res.bootstrap), "-D", str(blobs),
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    st = os.stat(out / "sparse")
    assert st.st_size == size and st.st_blocks * 512 <= 2 << 20  # not 256 MiB of written zeros
    with open(out / "sparse", "rb") as f:
        f.seek((5 << 20) - 1)
        assert f.read(5) == b"\0abc\0"
    assert (out / "dense").read_bytes() == (src / "dense").read_bytes()


def _wait_for(pred, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_create_removes_temp_output(tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(_from_a_shell("-m", "rafs.cli", "create", "-t", "tar-rafs",
                                          "-B", str(out / "b.boot"), "-D", str(out), "-"),
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    try:
        # a file entry whose data never finishes arriving: create blocks, its temp blob open
        head = _tar([("slow", 10 << 20, None)])
        proc.stdin.write(head + bytes(1 << 20))
        proc.stdin.flush()
        _wait_for(lambda: _leftovers(out))
        proc.send_signal(sig)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            state = _signal_state(proc.pid)
            proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack on stderr
            proc.wait(10)
            pytest.fail(f"create ignored signal {sig} for 60 s\n{state}\n{proc.stderr.read().decode()[-4000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
    assert rc == 128 + sig, proc.stderr.read()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_unpack_removes_temp_output(tmp_path, sig):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(400):
        (src / f"f{i:03d}").write_bytes(os.urandom(64 << 10))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    res = build(str(src), bootstrap_out=str(tmp_path / "img.boot"), blob_dir=str(blobs))
    parent = tmp_path / "dest"
    parent.mkdir()
    proc = subprocess.Popen(_from_a_shell("-m", "rafs.cli", "unpack", str(res.bootstrap), "-D", str(blobs),
                                          "--output", str(parent / "out")), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: _leftovers(parent) or proc.poll() is not None)
        proc.send_signal(sig)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc == 0:
        pytest.skip("unpack finished before the signal arrived")
    assert rc == 128 + sig, proc.stderr.read()
    assert list(parent.iterdir()) == []


def test_sparse_bomb_tar_costs_work_for_its_data_only(tmp_path):
    """A 10 KiB tar holding a 20 GiB sparse file: create reads only the data regions, unpack
    keeps the holes; both are quick and the content is exact."""
    import shutil

    if shutil.which("tar") is None:
        pytest.skip("tar not installed")
    src = tmp_path / "src"
    src.mkdir()
    size = 20 << 30
    pieces = {(1 << 20) - 2: b"edge", 7_000_123: b"middle", size - 3: b"end"}
    with open(src / "bomb", "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    tar = tmp_path / "layer.tar"
    subprocess.run(["tar", "-cSf", str(tar), "-C", str(src), "bomb"], check=True)
    os.unlink(src / "bomb")
    assert tar.stat().st_size < 64 << 10
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "create", "-t", "tar-rafs", "-B", str(out / "b.boot"),
                           "-D", str(out), str(tar)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 60
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "unpack", str(out / "b.boot"), "-D", str(out),
                           "--output", str(tmp_path / "unpacked")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 120
    st = os.stat(tmp_path / "unpacked" / "bomb")
    assert st.st_size == size and st.st_blocks * 512 < 1 << 20
    with open(tmp_path / "unpacked" / "bomb", "rb") as f:
        for off, data in pieces.items():
            f.seek(off - 1)
            assert f.read(len(data) + 1)[: len(data) + 1] == (b"\0" + data)[: size - off + 1]


def test_sparse_file_unpacked_to_tar_keeps_its_holes(tmp_path):
    """Tar output keeps holes as a PAX 1.0 sparse member: a 4 GiB file with three small data
    regions (one ending the file, one not) costs kilobytes of tar, and both GNU tar and Python's
    tarfile restore the exact content; a dense file stays a plain member."""
    import shutil
    import tarfile

    if shutil.which("tar") is None:
        pytest.skip("tar not installed")
    src = tmp_path / "src"
    src.mkdir()
    size = 4 << 30
    pieces = {0: b"start", (3 << 20) + 17: b"middle", size - 3: b"end"}
    with open(src / "sparse", "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    with open(src / "tailhole", "wb") as f:
        f.write(b"head")
        f.truncate(9 << 20)
    (src / "dense").write_bytes(os.urandom(300_000))
    out = tmp_path / "img"
    out.mkdir()
    res = build(str(src), bootstrap_out=str(out / "b.boot"), blob_dir=str(out))
    tar = tmp_path / "out.tar"
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "unpack", str(res.bootstrap), "-D", str(out),
                           "--output", str(tar)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert tar.stat().st_size < 8 << 20  # dense file + a few chunks, not 4 GiB of zeros

    with tarfile.open(tar) as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert members["./sparse"].size == size and members["./sparse"].issparse()
        assert members["./tailhole"].size == 9 << 20 and members["./tailhole"].issparse()
        assert not members["./dense"].issparse()
        assert tf.extractfile("./dense").read() == (src / "dense").read_bytes()
        tail = tf.extractfile("./tailhole").read()
        assert tail[:4] == b"head" and tail[4:] == bytes((9 << 20) - 4)

    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(tar), "-C", str(dest)], check=True)
    st = os.stat(dest / "sparse")
    assert st.st_size == size and st.st_blocks * 512 < 64 << 20
    with open(dest / "sparse", "rb") as f:
        for off, data in pieces.items():
            f.seek(off)
            assert f.read(len(data)) == data
        f.seek(1 << 30)
        assert f.read(4096) == bytes(4096)
    assert (dest / "dense").read_bytes() == (src / "dense").read_bytes()
    assert (dest / "tailhole").stat().st_size == 9 << 20
