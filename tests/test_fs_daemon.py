"""nydusd config parsing, CLI and control API (no mounts needed for most)."""

from __future__ import annotations

import os
import subprocess
import time
import sys

import pytest

from rafs.daemon.config import DaemonConfig, PrefetchConfig
from rafs.errors import ConfigError
from tests.fs_fakes import make_image
from tests.fs_harness import require_fuse, running_daemon

UPSTREAM_FUSEDEV = {
    "device": {"id": "/snap1",
               "backend": {"type": "registry",
                           "config": {"scheme": "https", "host": "index.docker.io", "repo": "library/nginx",
                                      "auth": "", "timeout": 5, "connect_timeout": 5, "retry_limit": 2,
                                      "proxy": {"url": "", "fallback": True}}},
               "cache": {"type": "blobcache", "compressed": False,
                         "config": {"work_dir": "/cache", "disable_indexed_map": False}}},
    "mode": "direct", "digest_validate": False, "iostats_files": False, "enable_xattr": True,
    "access_pattern": False, "latest_read_files": False, "amplify_io": 1048576,
    "fs_prefetch": {"enable": True, "prefetch_all": True, "threads_count": 8, "merging_size": 1048576,
                    "bandwidth_rate": 0, "stream_prefetch": False},
}


def test_config_defaults():
    c = DaemonConfig()
    assert (c.mode, c.digest_validate, c.iostats_files, c.enable_xattr, c.amplify_io) == ("direct", False, False, True, 1 << 20)
    assert PrefetchConfig() == PrefetchConfig(enable=False, prefetch_all=True, threads_count=8,
                                              merging_size=1 << 20, bandwidth_rate=0)
    assert DaemonConfig.parse("{}").backend_type == ""


def test_config_parses_upstream_snapshotter_json():
    c = DaemonConfig.parse(UPSTREAM_FUSEDEV)
    assert c.backend_type == "registry" and c.backend_config["repo"] == "library/nginx"
    assert (c.cache_type, c.cache_work_dir, c.device_id) == ("blobcache", "/cache", "/snap1")
    assert c.fs_prefetch.enable and c.fs_prefetch.threads_count == 8
    local = DaemonConfig.parse('{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}},'
                               '"cache":{"type":"filecache","config":{"work_dir":"/c"}}},"digest_validate":true}')
    assert (local.backend_type, local.cache_type, local.digest_validate) == ("localfs", "filecache", True)


@pytest.mark.parametrize("bad, field", [
    ("[]", "JSON object"),
    ("{", "not valid JSON"),
    ('{"device": {"backend": {"type": "oss"}}}', "device.backend.type"),
    ('{"device": {"cache": {"type": "fscache"}}}', "device.cache.type"),
    ('{"digest_validate": "yes"}', "digest_validate"),
    ('{"fs_prefetch": {"threads_count": true}}', "fs_prefetch.threads_count"),
    ('{"mode": "weird"}', "mode"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DaemonConfig.parse(bad)


def _nydusd(*args, **kw):
    return subprocess.run([sys.executable, "-m", "rafs.daemon.cli", *args], capture_output=True, text=True,
                          timeout=60, **kw)


def test_cli_help_and_errors(tmp_path):
    r = _nydusd("--help")
    assert r.returncode == 0 and "--fs-driver" in r.stdout and "--apisock" in r.stdout
    r = _nydusd("fuse", "--mountpoint", str(tmp_path / "m"), "--config", str(tmp_path / "missing.json"),
                "--bootstrap", "x")
    assert r.returncode == 2 and "cannot read nydusd config" in r.stderr
    r = _nydusd("--mountpoint", str(tmp_path / "m"))
    assert r.returncode == 2 and "needs --apisock" in r.stderr
    r = _nydusd("fuse")
    assert r.returncode == 2 and "--mountpoint is required" in r.stderr
    r = _nydusd("singleton", "--fscache", str(tmp_path / "fscache"))
    assert r.returncode == 2 and "singleton/fscache mode unavailable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_api_errors_and_state(tmp_path):
    require_fuse()
    boot = make_image(str(tmp_path), {"/f": b"x"})
    with running_daemon(tmp_path) as (client, mnt, _):
        info = client.info()
        assert info["state"] == "RUNNING" and info["mode"] == "shared" and info["instances"] == {}
        assert oct(os.stat(client.apisock).st_mode & 0o777) == "0o600"
        for method, path, body, status in [
            ("POST", "/api/v1/mount", {"source": boot}, 400),                                   # no mountpoint
            ("POST", "/api/v1/mount?mountpoint=/a", {"fs_type": "rafs"}, 400),                   # no source
            ("POST", "/api/v1/mount?mountpoint=/a", {"fs_type": "ext4", "source": boot}, 400),
            ("POST", "/api/v1/mount?mountpoint=/a/b", {"source": boot}, 400),
            ("POST", "/api/v1/mount?mountpoint=/a", {"source": "/nonexistent"}, 400),
            ("POST", "/api/v1/mount?mountpoint=/a", {"source": boot, "config": "{"}, 400),
            ("DELETE", "/api/v1/mount?mountpoint=/nope", None, 404),
            ("GET", "/api/v1/nothing", None, 404),
        ]:
            with pytest.raises(Exception) as ei:
                client.request(method, path, body)
            assert getattr(ei.value, "status", None) == status, (method, path, ei.value)
        client.mount("/a", boot, {"enable_xattr": False})
        assert open(f"{mnt}/a/f", "rb").read() == b"x"
        client.prefetch("/a")
        text = client.metrics("/a")
        assert 'nydusd_read_count{id="/a"}' in text and "# TYPE nydusd_total_read_bytes counter" in text
        client.exit()


def test_cli_daemon_mode_detaches_when_running(tmp_path):
    require_fuse()
    from rafs import erofs
    from rafs.daemon.client import DaemonClient
    from tests.fs_harness import cleanup_mounts

    boot = make_image(str(tmp_path), {"/f": b"hello"})
    mnt, sock = str(tmp_path / "m"), str(tmp_path / "api.sock")
    r = subprocess.run([sys.executable, "-m", "tests.fake_nydusd", "fuse", "--bootstrap", boot, "--mountpoint", mnt,
                        "--apisock", sock, "--daemon", "--log-file", str(tmp_path / "log")],
                       capture_output=True, text=True, timeout=60)
    client = DaemonClient(sock)
    try:
        assert r.returncode == 0, r.stderr
        assert client.state() == "RUNNING"  # already RUNNING when the parent returned
        assert open(f"{mnt}/f", "rb").read() == b"hello"
        pid = client.info()["pid"]
        client.exit()
        for _ in range(200):
            if erofs.mounted_fstype(mnt) is None and not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
        assert erofs.mounted_fstype(mnt) is None
    finally:
        if client.state():
            os.kill(client.info()["pid"], 15)
        cleanup_mounts(mnt)


def test_trace_recorded_exported_and_written_at_unmount(tmp_path):
    """fs_prefetch.record_trace: GET /api/v1/trace and nydusctl trace list the files read, in
    order; the trace is written to fs_prefetch.trace_file at unmount (an existing file is kept)."""
    require_fuse()
    from rafs.trace import TraceEntry, load_trace, parse_trace
    from snapshotter.ctl import main as nydusctl

    boot = make_image(str(tmp_path), {"/a": b"A" * 5000, "/d": None, "/d/b": b"B" * 100, "/c": b"C"})
    trace_file = tmp_path / "traces" / "x.trace"
    cfg = {"fs_prefetch": {"record_trace": True, "trace_file": str(trace_file)}}
    with running_daemon(tmp_path) as (client, mnt, _):
        client.mount("/x", boot, cfg)
        client.mount("/plain", boot, {})
        for path in ("d/b", "a", "c"):
            assert open(f"{mnt}/x/{path}", "rb").read()
        want = [TraceEntry("/d/b", ((0, 100),)), TraceEntry("/a", ((0, 5000),)), TraceEntry("/c", ((0, 1),))]
        assert parse_trace(client.trace("/x")) == want
        out = tmp_path / "exported.trace"
        assert nydusctl(["trace", "--api-sock", client.apisock, "--id", "x", "-o", str(out)]) == 0
        assert load_trace(out) == want
        with pytest.raises(Exception) as ei:
            client.trace("/plain")  # not recording
        assert getattr(ei.value, "status", None) == 404
        assert not trace_file.exists()
        client.umount("/x")
        assert load_trace(trace_file) == want
        client.mount("/x", boot, cfg)
        assert open(f"{mnt}/x/c", "rb").read() == b"C"
        client.umount("/x")
        assert load_trace(trace_file) == want  # the first start's trace is kept
        client.exit()


def test_nydusctl_trace_from_a_snapshotter_root(tmp_path):
    from snapshotter.ctl import main as nydusctl

    root = tmp_path / "root"
    (root / "traces").mkdir(parents=True)
    (root / "daemons").mkdir()
    assert nydusctl(["trace", "--root", str(root)]) == 1  # nothing recorded
    (root / "traces" / "7.trace").write_text("# nydus prefetch trace v1\n/bin/sh\t0+10\n")
    out = tmp_path / "t"
    assert nydusctl(["trace", "--root", str(root), "-o", str(out)]) == 0
    assert out.read_text().endswith("/bin/sh\t0+10\n")
    (root / "traces" / "9.trace").write_text("/x\n")
    assert nydusctl(["trace", "--root", str(root), "-o", str(out)]) == 1  # which one?
    assert nydusctl(["trace", "--root", str(root), "--id", "9", "-o", str(out)]) == 0
    assert out.read_text() == "/x\n"


@pytest.mark.parametrize("table, priority", [([], "low"), ([1], "low"), ([3, 2], "high")])
def test_a_prefetch_table_naming_files_is_prefetched_first_in_table_order(tmp_path, table, priority):
    """A table listing files (a start-up set, e.g. from a trace) goes out as one high-priority
    prefetch in table order; the root alone ("everything") or no table stays polite."""
    from rafs.daemon.service import Nydusd
    from rafs.fs.instance import Instance
    from tests.fs_fakes import FakeRafs

    boot = make_image(str(tmp_path), {"/a": b"A" * 10, "/b": b"B" * 20})
    tree = FakeRafs.open(boot)
    tree.prefetch_inos = table
    calls = []

    class Device:
        def prefetch(self, iovecs, *, priority="low"):
            calls.append(([sum(d.size for d in v) for v in iovecs], priority))

        def wait_demand_settled(self, or_sustained=False):
            calls.append("waited")
            assert or_sustained  # a read-most workload never settles: sustained demand will do
            return True

        def prefetch_blob(self, blob_index):
            return False  # no CI table here: the daemon falls back to the file walk

    daemon = Nydusd(mountpoint=str(tmp_path / "m"))
    inst = Instance("x", tree, Device())
    daemon._start_prefetch(inst, DaemonConfig.parse({"fs_prefetch": {"enable": True}}))
    for t in daemon._prefetch_threads:
        t.join(10)
    waited = calls.count("waited")
    [(sizes, got_priority)] = [c for c in calls if c != "waited"]
    assert got_priority == priority
    # a start-up set goes out at once; anything else waits for the demand burst to settle
    assert waited == (0 if priority == "high" else 1)
    if priority == "high":
        assert sizes == [20, 10]  # /b (ino 3) then /a (ino 2): table order
    else:
        assert sorted(sizes) == [10, 20]


@pytest.mark.parametrize("fs_driver", ["fusedev", "erofs"])
def test_mounting_an_instance_fetches_its_ci_tables_before_any_read(tmp_path, fs_driver):
    """As upstream nydusd sets each blob up (blob.meta included) when it mounts an image, the
    CI tables are fetched once the instance is mounted: the container's first read of a blob
    then waits for its data only, not for the table first."""
    require_fuse()
    from rafs.builder import BuildOptions, build
    from rafs.metadata import Rafs

    if fs_driver == "erofs":
        from tests.test_fs_erofs import require_erofs
        require_erofs()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(20000))
    (tmp_path / "blobs").mkdir()
    boot = build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(tmp_path / "blobs"),
                 options=BuildOptions()).bootstrap
    with Rafs.open(boot) as rafs:
        [blob_id] = [b.blob_id for b in rafs.blobs]
    meta = tmp_path / "cache" / f"{blob_id}.blob.meta"
    config = {"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path / "blobs")}},
                         "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
              "enable_xattr": False, "fs_prefetch": {"enable": False}}
    with running_daemon(tmp_path, opener="real", fs_driver=fs_driver) as (client, mnt, _):
        client.mount("/x", boot, config)
        deadline = time.monotonic() + 10
        while not meta.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert meta.exists(), "no CI table fetched after the mount"
        client.umount("/x")
        client.exit()
