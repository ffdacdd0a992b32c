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
    from rafs.daemon.api import DaemonClient
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
