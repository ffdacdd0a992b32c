"""DaemonManager with real nydusd processes (fake tree/device opener) and real FUSE mounts."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from rafs import erofs
from rafs.daemon.manager import DaemonManager
from rafs.errors import ConfigError, MountError, NotFound
from tests.fs_fakes import make_image
from tests.fs_harness import cleanup_mounts, require_fuse

pytestmark = [pytest.mark.fuse, pytest.mark.root]

FAKE_CMD = [sys.executable, "-m", "tests.fake_nydusd"]


@pytest.fixture
def images(tmp_path):
    out = {}
    for name in ("a", "b", "c"):
        out[name] = make_image(str(tmp_path), {"/id": name.encode() * 3, "/dir": None,
                                                "/dir/f": b"data-" + name.encode()}, name=name)
    return out


@pytest.fixture
def manager_factory(tmp_path):
    made = []
    root = tmp_path / "root"

    def make(mode="shared", **kw):
        kw.setdefault("monitor_interval", None)
        m = DaemonManager(str(root), mode=mode, fs_driver="fusedev", nydusd_config={}, nydusd_cmd=FAKE_CMD, **kw)
        made.append(m)
        return m

    require_fuse()
    yield make
    for m in made:
        try:
            m.shutdown(keep_records=False)
        except Exception:
            pass
    for m in made:  # fd keepers (own processes) left by a failed test
        for holder in list(m._holders.values()):
            holder.close()
    for m in made:  # kill anything left by pid, then lazy-unmount
        for rec in list(m._records.values()):
            if rec.pid > 0:
                try:
                    os.kill(rec.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    cleanup_mounts(str(root))


def test_shared_mode_instances(manager_factory, images):
    m = manager_factory("shared")
    ma = m.mount("a", images["a"], None, None)
    mb = m.mount("b", images["b"], None, {"host": "example.invalid"})
    assert os.path.dirname(ma) == os.path.dirname(mb)  # one FUSE mount, one daemon
    assert open(f"{ma}/id", "rb").read() == b"aaa"
    assert open(f"{mb}/dir/f", "rb").read() == b"data-b"
    states = m.instances()
    assert {s.daemon_id for s in states.values()} == {"shared-fusedev"}
    assert all(s.state == "RUNNING" for s in states.values())
    cfg = json.load(open(os.path.join(m.root, "config", "shared-fusedev", "b", "config.json")))
    assert cfg["device"]["backend"]["config"]["host"] == "example.invalid"
    assert m.mount("a", images["a"], None, None) == ma  # idempotent
    m.umount("a")
    assert not os.path.exists(ma)
    assert open(f"{mb}/id", "rb").read() == b"bbb"
    with pytest.raises(NotFound):
        m.umount("a")
    with pytest.raises(ConfigError):
        m.mount("../x", images["a"], None, None)
    with pytest.raises(MountError):
        m.mount("z", "/nonexistent/boot", None, None)


def test_dedicated_mode_and_reattach(manager_factory, images, tmp_path):
    m = manager_factory("dedicated")
    hint = str(tmp_path / "snap" / "mnt")
    ma = m.mount("a", images["a"], hint, None)
    mb = m.mount("b", images["b"], None, None)
    assert ma == hint and erofs.mounted_fstype(ma) == "fuse.rafs"
    pids = {r.daemon_id: r.pid for r in m._records.values()}
    assert len(set(pids.values())) == 2  # one process per image
    assert open(f"{ma}/id", "rb").read() == b"aaa"
    # a restarted manager reattaches to the live daemons without restarting them
    m2 = manager_factory("dedicated")
    m2.recover()
    assert {r.daemon_id: r.pid for r in m2._records.values()} == pids
    assert open(f"{mb}/dir/f", "rb").read() == b"data-b"
    m2.umount("a")
    assert erofs.mounted_fstype(ma) is None
    assert set(m2.instances()) == {"b"}


@pytest.mark.parametrize("thread_num", [0, 3])
def test_thread_num_reaches_nydusd(manager_factory, images, thread_num):
    """``[daemon] threads_number`` is nydusd's --thread-num, as upstream passes it; 0 passes
    nothing (nydusd's own default)."""
    m = manager_factory("shared", thread_num=thread_num)
    ma = m.mount("a", images["a"], None, None)
    assert open(f"{ma}/id", "rb").read() == b"aaa"
    (rec,) = m._records.values()
    with open(f"/proc/{rec.pid}/cmdline", "rb") as fh:
        argv = fh.read().split(b"\0")
    if thread_num:
        assert argv[argv.index(b"--thread-num") + 1] == b"3"
    else:
        assert b"--thread-num" not in argv
    with pytest.raises(ConfigError, match="thread_num"):
        DaemonManager(m.root, thread_num=2000, monitor_interval=None)


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_sigkill_daemon_then_remount_serves(manager_factory, images, mode):
    m = manager_factory(mode)
    ma = m.mount("a", images["a"], None, None)
    if mode == "shared":
        mb = m.mount("b", images["b"], None, None)
    rec = next(iter(m._records.values()))
    os.kill(rec.pid, signal.SIGKILL)
    m._procs[rec.daemon_id].wait(10)
    with pytest.raises(OSError):  # the stale FUSE mount answers ENOTCONN
        os.stat(f"{ma}/id")
    assert m.instances()["a"].state == "DEAD"
    again = m.mount("a", images["a"], None, None)  # detects the dead daemon, cleans, restarts
    assert again == ma
    assert open(f"{ma}/id", "rb").read() == b"aaa"
    new = next(iter(m._records.values()))
    assert new.pid != rec.pid
    if mode == "shared":
        assert open(f"{mb}/id", "rb").read() == b"bbb"  # its instances were remounted too
        with open("/proc/self/mountinfo") as f:
            assert sum(1 for line in f if f" {new.mountpoint} " in line) == 1  # no stacked stale mount


def test_shutdown_then_recover_remounts(manager_factory, images):
    m = manager_factory("shared")
    ma = m.mount("a", images["a"], None, None)
    m.shutdown()
    assert erofs.mounted_fstype(os.path.dirname(ma)) is None
    m2 = manager_factory("shared")
    m2.recover()
    assert open(f"{ma}/id", "rb").read() == b"aaa"


def test_start_failure_is_reported(manager_factory, images, tmp_path):
    m = manager_factory("dedicated", start_timeout=60)  # generous: a loaded CI machine starts Python slowly
    bad = tmp_path / "bad.boot"
    bad.write_text("not json")
    with pytest.raises(MountError, match="exited with"):
        m.mount("bad", str(bad), None, None)


def test_liveness_monitor_restarts_dead_daemon(manager_factory, images):
    m = manager_factory("shared", monitor_interval=0.2)
    ma = m.mount("a", images["a"], None, None)
    mb = m.mount("b", images["b"], None, None)
    old = next(iter(m._records.values())).pid
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 90  # a loaded machine restarts Python daemons slowly
    while True:  # no call into the manager: the monitor notices, cleans up, restarts, remounts
        try:
            if open(f"{ma}/id", "rb").read() == b"aaa":
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "daemon not restarted by the liveness monitor"
        time.sleep(0.1)
    assert open(f"{mb}/id", "rb").read() == b"bbb"
    assert next(iter(m._records.values())).pid != old


READER = r"""
import json, os, sys
paths = json.loads(sys.argv[1]); stop = sys.argv[2]; errors = []; good = 0
while not os.path.exists(stop):
    for path, want in paths.items():
        try:
            with open(path, "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                if f.read() != want.encode():
                    errors.append(path + ": wrong data")
            good += 1
        except OSError as exc:
            errors.append(f"{path}: {exc}")
print(json.dumps({"errors": errors, "good": good}))
"""


def _readers(paths: dict[str, bytes], stop: str, n: int = 2) -> list:
    """Reader processes (not threads: a file of the FUSE mount open in the manager's process
    would be flushed by the fork of the successor's Popen, which blocks while no daemon serves)."""
    import subprocess

    arg = json.dumps({k: v.decode() for k, v in paths.items()})
    return [subprocess.Popen([sys.executable, "-c", READER, arg, stop], stdout=subprocess.PIPE)
            for _ in range(n)]


def _reader_results(procs: list, stop: str) -> tuple[list, int]:
    open(stop, "w").close()
    errors, good = [], 0
    for p in procs:
        out, _ = p.communicate(timeout=60)
        r = json.loads(out)
        errors += r["errors"]
        good += r["good"]
    return errors, good


def _wait_held(m, rec, timeout=10):
    deadline = time.monotonic() + timeout
    while not m._holders[rec.daemon_id].held:
        assert time.monotonic() < deadline, "the daemon's FUSE session never reached its keeper"
        time.sleep(0.05)


def _wait_failover(m, old_pid, n=1, timeout=90):
    deadline = time.monotonic() + timeout
    while m.failovers.snapshot()[0].get("ok", 0) < n:
        assert time.monotonic() < deadline, f"no failover: {m.failovers.snapshot()}"
        time.sleep(0.05)
    assert next(iter(m._records.values())).pid != old_pid


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_failover_keeps_the_mount_and_readers_see_no_error(manager_factory, images, mode):
    """recover_policy=failover: the manager holds each daemon's FUSE session; a SIGKILLed
    daemon is replaced by an --upgrade successor, the mount never goes away, readers get no error."""
    from rafs.fs.takeover import fetch_handover

    m = manager_factory(mode, monitor_interval=0.2, recover_policy="failover")
    ma = m.mount("a", images["a"], None, None)
    paths = {f"{ma}/id": b"aaa", f"{ma}/dir/f": b"data-a"}
    if mode == "shared":
        mb = m.mount("b", images["b"], None, None)
        paths[f"{mb}/id"] = b"bbb"
    rec = next(iter(m._records.values()))
    assert rec.supervisor == m.supervisor_path(rec.daemon_id)
    _wait_held(m, rec)  # (the handover runs in the background, the keeper process may still be starting)
    fds, state = fetch_handover(rec.supervisor)
    for fd in fds:
        os.close(fd)
    assert len(state["instances"]) == (2 if mode == "shared" else 1)  # the mount table is held
    stop = os.path.join(m.root, "stop-readers")
    readers = _readers(paths, stop)
    try:
        for n in (1, 2):
            old = next(iter(m._records.values())).pid
            time.sleep(0.3)
            os.kill(old, signal.SIGKILL)
            _wait_failover(m, old, n)
        time.sleep(0.5)
    finally:
        errors, good = _reader_results(readers, stop)
    assert errors == [] and good > 0
    assert erofs.mounted_fstype(rec.mountpoint) is not None  # never unmounted
    counts, durations, _, events = m.failovers.snapshot()
    assert counts == {"ok": 2} and len(durations) == 2 and events[-1].outcome == "ok"
    # the successor's handover reached the holder: a third kill fails over too
    _wait_held(m, rec)


def test_keeper_outlives_the_manager_so_a_daemon_dying_with_it_is_failed_over(manager_factory, images):
    """The fd keeper is a process of its own: the manager that started it goes (as a SIGKILLed
    snapshotter does), its daemon is SIGKILLed too, a new manager's recover() attaches to the same
    keeper and fails the daemon over; the readers, blocked meanwhile, see no error."""
    from rafs.fs.takeover import holder_status

    m1 = manager_factory("shared", recover_policy="failover")
    ma = m1.mount("a", images["a"], None, None)
    rec = next(iter(m1._records.values()))
    _wait_held(m1, rec)
    keeper_pid = m1._holders[rec.daemon_id].pid
    assert keeper_pid not in (0, os.getpid()) and os.getsid(keeper_pid) == keeper_pid  # own session
    stop = os.path.join(m1.root, "stop-readers")
    readers = _readers({f"{ma}/id": b"aaa", f"{ma}/dir/f": b"data-a"}, stop)
    try:
        time.sleep(0.3)
        m1._stop.set()  # the manager "dies": it forgets everything it held in memory
        m1._records.clear()
        m1._holders.clear()
        os.kill(rec.pid, signal.SIGKILL)
        time.sleep(1.0)  # readers now wait in the kernel: nobody serves, the keeper holds
        assert holder_status(rec.supervisor)["held"] and holder_status(rec.supervisor)["pid"] == keeper_pid
        m2 = manager_factory("shared", recover_policy="failover")
        m2.recover()
        counts, _, _, events = m2.failovers.snapshot()
        assert counts == {"ok": 1} and events[0].old_pid == rec.pid, (counts, events)
        assert m2._holders[rec.daemon_id].pid == keeper_pid
        time.sleep(0.5)
    finally:
        errors, good = _reader_results(readers, stop)
    assert errors == [] and good > 0
    assert erofs.mounted_fstype(rec.mountpoint) is not None
    # the keeper stops with its daemon
    m2.shutdown(keep_records=False)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{keeper_pid}") and open(f"/proc/{keeper_pid}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "keeper still running after its daemon stopped"
        time.sleep(0.05)
    assert not os.path.exists(rec.supervisor)


def test_hot_upgrade_keeps_the_mount_and_readers_see_no_error(manager_factory, images):
    """DaemonManager.upgrade: the daemon hands its session to its keeper and exits, a successor
    adopts it; readers see no error; an event per daemon (outcome upgraded). Under the restart
    policy it is refused."""
    from rafs.errors import UnsupportedError

    m = manager_factory("shared", recover_policy="failover")
    ma = m.mount("a", images["a"], None, None)
    mb = m.mount("b", images["b"], None, None)
    rec = next(iter(m._records.values()))
    _wait_held(m, rec)
    stop = os.path.join(m.root, "stop-readers")
    readers = _readers({f"{ma}/id": b"aaa", f"{ma}/dir/f": b"data-a", f"{mb}/id": b"bbb"}, stop)
    pids = [rec.pid]
    try:
        for _ in range(2):
            time.sleep(0.3)
            events = m.upgrade()
            assert [(e.old_pid, e.outcome) for e in events] == [(pids[-1], "upgraded")], events
            pids.append(events[0].new_pid)
            assert next(iter(m._records.values())).pid == pids[-1] and not os.path.exists(f"/proc/{pids[-2]}/cmdline")
        time.sleep(0.3)
    finally:
        errors, good = _reader_results(readers, stop)
    assert errors == [] and good > 0
    assert erofs.mounted_fstype(rec.mountpoint) is not None
    assert m.failovers.snapshot()[0] == {"upgraded": 2}
    r = DaemonManager(os.path.join(os.path.dirname(m.root), "restart-root"), nydusd_cmd=FAKE_CMD,
                      monitor_interval=None)  # (recover_policy restart)
    with pytest.raises(UnsupportedError):
        r.upgrade()


def test_daemon_cgroup_holds_the_fd_keeper_too(manager_factory, images):
    """[daemon] cgroup: the keeper must outlive the snapshotter's container as the daemon does,
    so it is moved into the daemons' cgroup as well; shutdown stops both and removes the cgroup."""
    import uuid

    from rafs.daemon.cgroup import DaemonCgroup

    if not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("no /sys/fs/cgroup")
    path = f"pynydus-test-{uuid.uuid4().hex[:8]}/daemons"
    m = manager_factory("shared", recover_policy="failover", cgroup=path)
    m.mount("a", images["a"], None, None)
    rec = next(iter(m._records.values()))
    _wait_held(m, rec)
    keeper = m._holders[rec.daemon_id].pid
    for pid in (rec.pid, keeper):
        lines = DaemonCgroup.of(pid)
        assert lines and all(line.endswith(":/" + path) for line in lines), (pid, lines)
    m.shutdown(keep_records=False)
    deadline = time.monotonic() + 10
    while m.cgroup.remove() and time.monotonic() < deadline:  # exited tasks leave asynchronously
        time.sleep(0.1)
    assert not any(os.path.exists(os.path.join(h, path.split("/")[0])) for h in m.cgroup.hierarchies)


def test_restart_policy_starts_no_holder(manager_factory, images):
    m = manager_factory("shared")
    m.mount("a", images["a"], None, None)
    rec = next(iter(m._records.values()))
    assert rec.supervisor == "" and not m._holders
    with pytest.raises(ConfigError):
        manager_factory("shared", recover_policy="later")


def test_update_auth_changes_the_config_only_once_the_daemon_has_it(manager_factory, images):
    """``update_auth``: unchanged credentials are a no-op; the config file is rewritten only after
    the daemon took them (here it cannot: its fake device has no registry backend), and a dead
    daemon changes nothing, so the caller's next attempt finds the difference again."""
    from rafs.daemon.client import ApiError
    from rafs.errors import ConfigError, MountError, NotFound

    m = manager_factory("shared")
    backend = {"type": "registry", "config": {"host": "127.0.0.1:1", "repo": "r", "scheme": "http", "auth": "b2xk"}}
    m.mount("a", images["a"], None, backend)
    rec = next(iter(m._records.values()))
    path = rec.instances["a"].config_path
    before = open(path).read()
    assert m.update_auth("a", "b2xk") is False
    with pytest.raises(ApiError, match="no storage backend"):
        m.update_auth("a", "bmV3")
    assert open(path).read() == before
    os.kill(rec.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while m._alive(rec):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(MountError, match="not running"):
        m.update_auth("a", "bmV3")
    assert open(path).read() == before
    with pytest.raises(NotFound):
        m.update_auth("zzz", "bmV3")
    m.mount("b", images["b"], None, {"type": "localfs", "config": {"dir": "/nonexistent"}})
    with pytest.raises(ConfigError, match="not a registry"):
        m.update_auth("b", "bmV3")


def test_starting_the_shared_daemon_does_not_load_the_fuse_stack(tmp_path):
    """The snapshotter's process spawns nydusd without importing the FUSE stack (trio, pyfuse3,
    the storage stack: ~0.1 s, all on the way to the first daemon's start) when there is no
    stale mount to check; it only runs the daemon's command."""
    import subprocess
    import textwrap

    require_fuse()
    root = tmp_path / "root"
    script = textwrap.dedent(f"""
        import json, sys
        from rafs.daemon.manager import DaemonManager
        m = DaemonManager({str(root)!r}, mode="shared", fs_driver="fusedev", nydusd_config={{}},
                          nydusd_cmd={FAKE_CMD!r}, monitor_interval=None)
        try:
            daemon_id = m.prestart()
            print(json.dumps({{"daemon": daemon_id, "loaded": sorted(n for n in ("trio", "pyfuse3", "storage.cache")
                                                                    if n in sys.modules)}}))
        finally:
            m.shutdown(keep_records=False)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == {"daemon": "shared-fusedev", "loaded": []}
    finally:
        cleanup_mounts(str(root))
