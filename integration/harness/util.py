"""Small process/port helpers shared by the harness components."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable

from integration.harness import HarnessError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen | None = None, log_path: str | None = None) -> None:
    """Poll ``pred`` until true; fail with the process log tail if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - readiness probes may fail in many ways while starting
            pass
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"{what}: process {proc.pid} exited with {proc.returncode}\n"
                               f"{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise HarnessError(f"{what}: not ready after {timeout}s\n{log_tail(log_path)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def log_tail(path: str | None, lines: int = 30) -> str:
    """Last lines of a log file, for error messages."""
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        data = f.read()[-16384:]
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop one process we started, by its PID: ``sig``, wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (FileNotFoundError, IndexError):
        return False


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix`` (from /proc/self/mounts), deepest first."""
    prefix = os.path.realpath(prefix).rstrip("/")
    found = []
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            mnt = parts[1].decode().replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _fuse_connections_under(prefix: str) -> list[str]:
    """fusectl ``abort`` files of the FUSE mounts at or below ``prefix``."""
    prefix = os.path.realpath(prefix).rstrip("/")
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields = head.split()
            if len(fields) < 5 or not tail.startswith("fuse"):
                continue
            mnt = fields[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                out.append(f"/sys/fs/fuse/connections/{fields[2].split(':')[1]}/abort")
    return out


def unmount_all(prefix: str, timeout: float = 30.0) -> list[str]:
    """Unmount everything under ``prefix`` (lazily where a plain umount fails); returns what was
    unmounted.

    Never hangs on a FUSE mount whose server is gone while its session is still held (a killed
    nydusd whose fd keeper lives): ``umount`` runs with ``--no-canonicalize`` (no stat of the
    mount point, which would wait for an answer forever) and a timeout, after which the FUSE
    connection is aborted through fusectl and the mount detached."""
    done = []
    for _ in range(3):
        mnts = mounts_under(prefix)
        if not mnts:
            break
        for m in mnts:
            try:
                ok = subprocess.run(["umount", "--no-canonicalize", m], capture_output=True,
                                    timeout=timeout).returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if not ok:
                for abort in _fuse_connections_under(m):
                    try:
                        with open(abort, "w") as f:
                            f.write("1")
                    except OSError:
                        pass
                subprocess.run(["umount", "--no-canonicalize", "-l", m], capture_output=True, timeout=timeout)
            done.append(m)
    return done


def stop_state_root(root: str) -> None:
    """Stop what a snapshotter state root leaves running by design (its nydusd daemons and their
    FUSE fd keepers outlive the snapshotter), by PID from the root's own records, then unmount
    everything under it."""
    from rafs.daemon.manager import _pid_is_nydusd
    from rafs.fs.takeover import holder_status

    pids = []
    for rec in pathlib.Path(root, "daemons").glob("*.json"):
        try:
            pid = int(json.loads(rec.read_text()).get("pid") or 0)
        except (OSError, ValueError):
            continue
        if pid > 0 and _pid_is_nydusd(pid):
            pids.append(pid)
    for sock in pathlib.Path(root, "supervisor").glob("*.sock"):
        status = holder_status(str(sock), timeout=1.0)
        if status and status.get("pid"):
            pids.append(int(status["pid"]))
    kill_pids(pids)
    unmount_all(root)


def pids_mentioning(*texts: str, exclude: int | None = None) -> list[int]:
    """PIDs of live processes whose command line contains every one of ``texts`` (e.g. our temp dir)."""
    needles = [t.encode() for t in texts]
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (os.getpid(), exclude):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if all(n in cmd for n in needles) and pid_alive(int(entry)):
            out.append(int(entry))
    return out


def kill_pids(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM these PIDs, wait, SIGKILL the survivors (only for processes we caused)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def with_pdeathsig(argv: list[str]) -> list[str]:
    """``argv`` run so that the child gets SIGTERM if the test process dies (no orphans after a
    crash), via util-linux ``setpriv --pdeathsig`` (which then execs ``argv``: same pid).

    Not a ``preexec_fn``: that forces a plain fork(), and the fork handlers of the gRPC core
    loaded in the test process can abort the child before it execs (seen as a registry dying
    with SIGABRT and a gRPC epoll error in its log).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)


def short_tempdir(prefix: str, base_dir: str | None, max_len: int = 40) -> str:
    """mkdtemp under ``base_dir`` unless that path would be too long for the unix sockets that
    live below it (108-byte limit, with room for nested daemon sockets); then under /tmp."""
    d = tempfile.mkdtemp(prefix=prefix, dir=base_dir)
    if len(d) <= max_len or base_dir is None:
        return d
    os.rmdir(d)
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")
