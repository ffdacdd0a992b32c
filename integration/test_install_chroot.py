"""The host install on a clean root filesystem: a Debian bookworm minbase root made by mmdebstrap
with only what a node has before our install (python3, python3-venv, fuse3, kmod). Inside it, as
``chroot``: ``misc/install.sh`` names what is missing when python3-venv and libfuse3 are hidden
(and all that ``build`` lacks there), then installs from the wheels; every CLI answers ``--version`` from PATH and ``uninstall --purge``
leaves the root as it was; installed again, the installed nydus-image and nydusd build and serve
an image from inside the root (fusedev with pyfuse3 and with the own loop, kernel EROFS where
usable), containerd's snapshotter conformance suite (integration/conformance, run on the host)
passes against the INSTALLED ``nydus-snapshotter --config /etc/nydus/config.toml``, started per
case inside the chroot, and ``uninstall --purge`` leaves the root as it was again (but for /tmp).

The root gets a fresh procfs and sysfs, /dev (rbind, slave: with /dev/fuse), the checkout and the
wheels read-only, and the suite's work directory at the same path as on the host, as a shared
mount so that mounts made on either side are seen on the other. All of it is unmounted and every
process running in the root is stopped (by PID) afterwards.

Slow (marked): the first run builds the root tar with mmdebstrap (apt's mirror, about 1 minute)
into ``.cache/`` keyed by suite and package list; later runs reuse it. Skipped when mmdebstrap is
missing or cannot reach its package source, and without the Go suite (test_conformance.py)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from integration.harness.util import kill_pids, mounts_under, pid_alive, pids_mentioning, unmount_all, wait_until
from integration.install_support import CLIS, REPO, tree
from integration.test_conformance import CASES, build_suite, verdicts
from rafs import erofs
from rafs.daemon.client import DaemonClient

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1800)]

SUITE = "bookworm"
#: a node before our install: python3 + python3-venv (install.sh's virtualenv), fuse3 (libfuse3
#: for pyfuse3), kmod (the unit's modprobe); util-linux, coreutils, mawk come with minbase
PACKAGES = ("python3", "python3-venv", "fuse3", "kmod")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNREACHABLE = ("Could not resolve", "Temporary failure resolving", "Failed to fetch", "Unable to connect",
               "Network is unreachable", "Connection refused", "Release file")
SRC, DIST = "/mnt/pynydus-src", "/mnt/pynydus-dist"   # where the checkout and the wheels appear
HELLO = b"hello from a clean root\n"
BIG = bytes(range(256)) * 12289                          # 3 MiB + 256 bytes: several chunks


def root_tar(cache: pathlib.Path) -> pathlib.Path:
    """The mmdebstrap root tar for (SUITE, PACKAGES), built once and kept in ``cache``."""
    key = hashlib.sha256(f"{SUITE} minbase {','.join(sorted(PACKAGES))}".encode()).hexdigest()[:12]
    path = cache / f"debian-{SUITE}-{key}.tar"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"debian-{SUITE}-{key}.{os.getpid()}.tmp.tar"   # mmdebstrap picks the format by suffix
    r = subprocess.run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), "--format=tar",
                        "--mode=root", "--quiet", SUITE, str(tmp)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        if any(m in r.stderr for m in UNREACHABLE):
            pytest.skip(f"mmdebstrap cannot reach its package source: {r.stderr[-500:]}")
        raise AssertionError(f"mmdebstrap failed: {r.stderr[-3000:]}")
    os.rename(tmp, path)
    return path


def in_root(root: pathlib.Path, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``argv`` run inside ``root`` with a clean environment (nothing of this checkout's)."""
    return subprocess.run(["chroot", str(root), "/usr/bin/env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8",
                           *argv], capture_output=True, text=True, timeout=timeout, cwd="/")


def pids_in(root: pathlib.Path) -> list[int]:
    """Live processes whose root directory is ``root``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/root") == str(root) and pid_alive(int(entry)):
                    out.append(int(entry))
            except OSError:
                continue
    return out


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def clean_root(tmp_path: pathlib.Path):
    """(root, work): a fresh root extracted from the cached tar and a short, empty host directory
    ``work`` (the test mounts them with :func:`mount_into`). Afterwards every process in the root
    or mentioning ``work`` is stopped by PID, everything mounted below either is unmounted, and
    both are removed (kept, and the test fails, if a mount would not go)."""
    if os.geteuid() != 0:
        pytest.skip("chroot and mounts need root")
    for tool, package in (("mmdebstrap", "mmdebstrap"), ("chroot", "coreutils")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (Debian package {package})")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse missing")
    tar = root_tar(REPO / ".cache")
    base = tempfile.mkdtemp(prefix="pyn-chroot-")
    work = tempfile.mkdtemp(prefix="pyn-cc-")          # short: the suite's sockets live below it
    root = pathlib.Path(base) / "root"
    root.mkdir()
    try:
        subprocess.run(["tar", "-C", str(root), "-xf", str(tar)], check=True, timeout=600)
        yield root, work
    finally:
        kill_pids(pids_mentioning(work) + pids_in(root))
        unmount_all(base)
        unmount_all(work)
        left = mounts_under(base) + mounts_under(work)
        assert not left, f"still mounted, {base} and {work} kept: {left}"
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def mount_into(root: pathlib.Path, wheels: pathlib.Path, work: str) -> list[str]:
    """The mounts of the module doc; returns the mount points (relative to ``root``)."""
    points = ["proc", "sys", "dev", SRC.lstrip("/"), DIST.lstrip("/"), work.lstrip("/")]
    for d in points[3:]:
        (root / d).mkdir(parents=True)
    mount("-t", "proc", "proc", str(root / "proc"))
    mount("-t", "sysfs", "sysfs", str(root / "sys"))
    mount("--rbind", "/dev", str(root / "dev"))
    mount("--make-rslave", str(root / "dev"))          # unmounting here never reaches the host's /dev
    for src, dest in ((REPO, SRC), (wheels, DIST)):
        mount("--bind", str(src), str(root / dest.lstrip("/")))
        mount("-o", "remount,bind,ro", str(root / dest.lstrip("/")))
    # work: its own peer group, so the suite's mounts (host side) and the snapshotter's (root side)
    # show on both sides and the suite's unmounts reach both
    mount("--bind", work, work)
    mount("--make-private", work)
    mount("--make-shared", work)
    mount("--bind", work, str(root / work.lstrip("/")))
    return points


def install(root: pathlib.Path) -> None:
    t0 = time.monotonic()
    r = in_root(root, "/bin/bash", f"{SRC}/misc/install.sh", "install", "--dist", DIST)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "installed pynydus" in r.stderr and "note: no modprobe" not in r.stderr, r.stderr[-3000:]
    print(f"install in the clean root: {time.monotonic() - t0:.1f} s")


def uninstall_purge(root: pathlib.Path) -> None:
    r = in_root(root, "/bin/bash", f"{SRC}/misc/install.sh", "uninstall", "--purge")
    assert r.returncode == 0, r.stderr[-3000:]


def serve_image_in_root(root: pathlib.Path, work: str, fs_driver: str, fuse_impl: str) -> None:
    """The installed ``nydus-image`` builds a small image in ``work`` and the installed ``nydusd``
    mounts it inside the root (FUSE or kernel EROFS); the host reads it through the shared mount,
    then nydusd is stopped (SIGTERM by PID) and must leave no mount behind."""
    src, img = os.path.join(work, "img-src"), os.path.join(work, "img")
    if not os.path.isdir(src):
        os.makedirs(os.path.join(src, "etc"))
        os.makedirs(os.path.join(img, "blobs"))
        with open(os.path.join(src, "etc/hello.txt"), "wb") as f:
            f.write(HELLO)
        with open(os.path.join(src, "big.bin"), "wb") as f:
            f.write(BIG)
        r = in_root(root, "nydus-image", "create", "--bootstrap", f"{img}/bootstrap", "--blob-dir",
                    f"{img}/blobs", src)
        assert r.returncode == 0, r.stderr[-3000:]
    name = f"{fs_driver}-{fuse_impl}"
    mnt, sock, cfg = (os.path.join(work, f"{name}{ext}") for ext in ("-mnt", ".sock", ".json"))
    with open(cfg, "w") as f:
        json.dump({"device": {"backend": {"type": "localfs", "config": {"dir": f"{img}/blobs"}},
                              "cache": {"type": "blobcache", "config": {"work_dir": f"{work}/{name}-cache"}}}}, f)
    proc = subprocess.Popen(["chroot", str(root), "/usr/bin/env", "-i", f"PATH={PATH}", "nydusd", "fuse",
                             "--mountpoint", mnt, "--apisock", sock, "--bootstrap", f"{img}/bootstrap", "--config",
                             cfg, "--fs-driver", fs_driver, "--fuse-impl", fuse_impl, "--log-file",
                             f"{work}/{name}.log"], stdin=subprocess.DEVNULL, cwd="/", start_new_session=True)
    try:
        client = DaemonClient(sock, timeout=20)
        wait_until(lambda: proc.poll() is not None or os.path.exists(sock) and client.state() == "RUNNING", 60,
                   f"nydusd {name} in the root RUNNING")
        assert proc.poll() is None, open(f"{work}/{name}.log").read()[-3000:]
        with open(os.path.join(mnt, "etc/hello.txt"), "rb") as f:      # from the host, through the mount
            assert f.read() == HELLO
        with open(os.path.join(mnt, "big.bin"), "rb") as f:
            assert f.read() == BIG
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, open(f"{work}/{name}.log").read()[-3000:]
    assert not mounts_under(mnt), f"nydusd {name} left mounts behind: {mounts_under(mnt)}"


def diff(before: list[str], after: list[str]) -> str:
    return f"added: {sorted(set(after) - set(before))[:20]}, removed: {sorted(set(before) - set(after))[:20]}"


def test_installed_snapshotter_passes_conformance_in_a_clean_root(clean_root, wheels, tmp_path):
    root, work = clean_root
    binary = build_suite()                             # skips without the Go suite
    points = mount_into(root, wheels, work)
    before = tree(root, skip=points, detail=True)

    # install.sh names what is missing (here: python3-venv and libfuse3) and writes nothing
    hidden = [*root.glob("usr/lib/python3.*/ensurepip"), *root.glob("usr/lib/*/libfuse3.so.3")]
    assert len(hidden) == 2, hidden
    for p in hidden:
        p.rename(p.with_name(p.name + ".hidden"))
    try:
        r = in_root(root, "/bin/bash", f"{SRC}/misc/install.sh", "install", "--dist", DIST)
    finally:
        for p in hidden:
            p.with_name(p.name + ".hidden").rename(p)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "python3-venv" in r.stderr and "libfuse3" in r.stderr, r.stderr[-3000:]
    assert tree(root, skip=points, detail=True) == before

    # build on a node that has none of its tools: named, nothing written
    r = in_root(root, "/bin/bash", f"{SRC}/misc/install.sh", "build", "--dist", "/root/dist")
    assert r.returncode == 1, r.stderr[-3000:]
    for need in ("gcc", "pkg-config", "patch", "libfuse3-dev", "python3-dev"):
        assert f"Debian package {need}" in r.stderr, r.stderr[-3000:]
    assert tree(root, skip=points, detail=True) == before

    # install; every CLI from PATH (/usr/local/bin -> /opt/pynydus/bin); uninstall leaves the root as it was
    install(root)
    for cli in CLIS:
        r = in_root(root, cli, "--version", timeout=120)
        assert r.returncode == 0 and r.stdout.startswith(f"{cli} ") and "(pynydus)" in r.stdout, \
            (cli, r.stdout, r.stderr[-2000:])
    r = in_root(root, "python3", "-c", "import os; print(os.path.realpath('/usr/local/bin/nydus-snapshotter'))")
    assert r.stdout.strip() == "/opt/pynydus/bin/nydus-snapshotter", r.stdout + r.stderr
    uninstall_purge(root)
    after = tree(root, skip=points, detail=True)
    assert after == before, diff(before, after)

    # installed again: the installed nydusd serves an image from inside the root (patched pyfuse3
    # on the root's libfuse3, the own FUSE loop, kernel EROFS where the kernel has it) ...
    install(root)
    serve_image_in_root(root, work, "fusedev", "pyfuse3")
    serve_image_in_root(root, work, "fusedev", "ll")
    if erofs.detect_support().usable:
        serve_image_in_root(root, work, "erofs", "ll")
    # ... and the conformance suite on the host passes against the installed snapshotter inside it
    logs = tmp_path / "logs"
    logs.mkdir()
    argv = ["chroot", str(root), "/usr/bin/env", "-i", f"PATH={PATH}", "HOME=/root",
            "nydus-snapshotter", "--config", "/etc/nydus/config.toml"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"TMPDIR": work, "CONFORMANCE_LOG_DIR": str(logs), "CONFORMANCE_SNAPSHOTTER": json.dumps(argv)}
    t0 = time.monotonic()
    proc = subprocess.Popen([str(binary), "-test.v", "-test.count=1", "-test.timeout=15m"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=1000)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)           # its snapshotters die with it (PDEATHSIG)
            proc.wait()
        kill_pids(pids_mentioning(work))               # each case's shared nydusd outlives its snapshotter
    print(f"conformance suite against the chroot's snapshotter: {time.monotonic() - t0:.1f} s")
    got = verdicts(out)
    failed = sorted(name for name, v in got.items() if v == "FAIL")
    assert not failed and set(got) == CASES, f"failed: {failed}, missing: {CASES - set(got)}\n{out[-6000:]}"
    assert [name for name, v in got.items() if v == "SKIP"] == ["Rename"], got
    assert proc.returncode == 0, out[-3000:]
    case_logs = sorted(logs.glob("*.log"))
    assert len(case_logs) == len(CASES), case_logs                    # one snapshotter per case
    for log in case_logs:
        assert "nydus-snapshotter serving on" in log.read_text(), log.read_text()[-2000:]
    assert not pids_in(root), "a process still runs in the root"

    # uninstall after serving: nothing of ours is left. Not the install's, so not compared: the
    # root's /tmp, where a snapshotter or nydusd stopped by the suite while starting can leave a
    # temp file (rafs/erofs.py's EROFS probe file; the name tempfile's first use creates and unlinks)
    uninstall_purge(root)
    after = [p for p in tree(root, skip=points, detail=True) if p in before or not p.startswith("tmp/")]
    assert after == before, diff(before, after)
