"""The service process: `python3 -m snapshotter serve`, JSON logs, metrics, clean SIGTERM/SIGINT."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

REPO = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proc_factory(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        p = subprocess.Popen([sys.executable, "-m", "snapshotter", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    # the shared nydusd starts with the snapshotter and outlives it by design: stop ours (by PID)
    from integration.harness.util import kill_pids, pids_mentioning, unmount_all

    kill_pids(pids_mentioning(str(tmp_path)))
    unmount_all(str(tmp_path))


def wait_socket(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("socket never appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_json_logs_metrics_and_clean_shutdown(proc_factory, tmp_path, sig):
    sock = tmp_path / "s.sock"
    port = free_port()
    p = proc_factory("serve", "--root", str(tmp_path / "root"), "--address", str(sock), "--log-format", "json",
                     "--metrics-address", f"127.0.0.1:{port}")
    wait_socket(sock, p)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
        with pytest.raises(grpc.RpcError):
            stub.Stat(pb.StatSnapshotRequest(key="missing"))
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'snapshotter_snapshots{kind="active"} 1.0' in body
    assert 'snapshotter_snapshot_operation_elapsed_seconds_count{op="prepare"} 1.0' in body
    assert 'snapshotter_snapshot_operations_total{op="stat",outcome="not_found"} 1.0' in body
    assert "snapshotter_rafs_instances 0.0" in body and "snapshotter_cache_usage_bytes" in body
    p.send_signal(sig)
    assert p.wait(timeout=20) == 0
    assert not sock.exists()
    lines = [json.loads(line) for line in p.stderr.read().splitlines() if line.strip()]
    assert any("serving on" in e["msg"] for e in lines) and lines[-1]["msg"] == "stopped"
    assert {"time", "level", "logger", "msg"} <= set(lines[0])


def test_restart_keeps_state(proc_factory, tmp_path):
    sock = tmp_path / "s.sock"
    for round_ in range(2):
        p = proc_factory("--root", str(tmp_path / "root"), "--address", str(sock))
        wait_socket(sock, p)
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            if round_ == 0:
                stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
                stub.Commit(pb.CommitSnapshotRequest(name="A", key="a"))
            else:
                assert stub.Stat(pb.StatSnapshotRequest(key="A")).info.kind == pb.COMMITTED
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0


def test_bad_config_exits_2(proc_factory, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("version = 1\n[daemon]\nfs_driver = 'nfs'\n")
    p = proc_factory("--config", str(cfg))
    assert p.wait(timeout=20) == 2
    assert "daemon.fs_driver" in p.stderr.read()


def test_fscache_without_kernel_support_is_refused(tmp_path):
    from snapshotter.config import Config, DaemonConfig
    from snapshotter.errors import ConfigError
    from snapshotter.instances import check_fs_driver

    cfg = Config(root=str(tmp_path), daemon=DaemonConfig(fs_driver="fscache"))
    with pytest.raises(ConfigError, match="CONFIG_EROFS_FS_ONDEMAND"):
        check_fs_driver(cfg, cachefiles_dev=str(tmp_path / "no-cachefiles"))
    (tmp_path / "cachefiles").touch()
    check_fs_driver(cfg, cachefiles_dev=str(tmp_path / "cachefiles"))
    check_fs_driver(Config(root=str(tmp_path)), cachefiles_dev=str(tmp_path / "no-cachefiles"))


def test_nydusctl(tmp_path, capsys):
    from snapshotter import ctl
    from tests.snapshotter_helpers import Harness

    h = Harness(tmp_path)
    try:
        h.prepare("a", labels={"x": "1"})
        assert ctl.main(["snapshots", "--address", h.address, "list", "labels.x"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert [(i["name"], i["kind"], i["labels"]) for i in out] == [("a", "active", {"x": "1"})]
        assert ctl.main(["snapshots", "--address", h.address, "mounts", "a"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["type"] == "bind"
        assert ctl.main(["snapshots", "--address", h.address, "stat", "missing"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        assert ctl.main(["snapshots", "--address", h.address, "rm", "a"]) == 0
        assert ctl.main(["snapshots", "--address", h.address, "cleanup"]) == 0
    finally:
        h.stop()


def test_socket_group(proc_factory, tmp_path):
    """``socket_group``: the socket gets that group and mode 0660; an unknown group exits 2."""
    import grp  # noqa: PLC0415

    group = grp.getgrgid(os.getgid() if os.getgid() != 0 else 0)
    for value in (group.gr_name, str(group.gr_gid)):
        sock = tmp_path / f"g-{value}.sock"
        conf = tmp_path / f"g-{value}.toml"
        conf.write_text(f'version = 1\nsocket_group = "{value}"\n')
        p = proc_factory("serve", "--config", str(conf), "--root", str(tmp_path / f"root-{value}"),
                         "--address", str(sock))
        wait_socket(sock, p)
        st = os.stat(sock)
        # checked as soon as the socket exists: it appears with its final owner and mode
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # the bind name is gone
        p.terminate()
        assert p.wait(20) == 0
    conf = tmp_path / "bad.toml"
    conf.write_text('version = 1\nsocket_group = "no-such-group-pyn"\n')
    p = proc_factory("serve", "--config", str(conf), "--root", str(tmp_path / "r2"), "--address",
                     str(tmp_path / "x.sock"))
    assert p.wait(30) == 2
    assert "socket_group: no such group 'no-such-group-pyn'" in p.stderr.read()


def test_help_lists_the_flags(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "snapshotter", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: nydus-snapshotter")
    for flag in ("--config", "--root", "--address", "--log-level", "--log-format", "--metrics-address"):
        assert flag in p.stdout


def test_sd_notify_ready_after_socket_listens(tmp_path):
    """Type=notify: READY=1 reaches $NOTIFY_SOCKET only once the gRPC socket accepts calls."""
    sock = tmp_path / "s.sock"
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify))
        ns.settimeout(30)
        env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=str(notify))
        p = subprocess.Popen([sys.executable, "-m", "snapshotter", "--root", str(tmp_path / "root"),
                              "--address", str(sock)], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            msg = ns.recv(4096).decode()
            assert msg.splitlines()[0] == "READY=1" and f"MAINPID={p.pid}" in msg
            with grpc.insecure_channel(f"unix:{sock}") as ch:  # listening when READY arrived
                pb_grpc.SnapshotsStub(ch).Prepare(pb.PrepareSnapshotRequest(key="a"), timeout=5)
            p.send_signal(signal.SIGTERM)
            assert ns.recv(4096) == b"STOPPING=1"
            assert p.wait(timeout=20) == 0
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
            from integration.harness.util import kill_pids, pids_mentioning, unmount_all

            kill_pids(pids_mentioning(str(tmp_path)))  # the shared nydusd it started and its fd keeper (by PID)
            unmount_all(str(tmp_path))


@pytest.mark.parametrize("enable", [True, False])
def test_system_controller_socket_follows_the_system_section(proc_factory, tmp_path, enable):
    sock, system = tmp_path / "s.sock", tmp_path / "ctl" / "system.sock"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'version = 1\n[daemon]\ndaemon_mode = "dedicated"\n'
                   f'[system]\nenable = {str(enable).lower()}\naddress = "{system}"\n')
    p = proc_factory("serve", "--root", str(tmp_path / "root"), "--address", str(sock), "--config", str(cfg))
    wait_socket(sock, p)
    deadline = time.monotonic() + 5
    while enable and not system.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert system.exists() == enable
    assert not (tmp_path / "root" / "system.sock").exists()
    if enable:
        assert stat.S_IMODE(os.stat(system).st_mode) == 0o600
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert not system.exists()  # removed on shutdown
