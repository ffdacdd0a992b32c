"""Configuration: defaults, the example file, strict errors, CLI overrides, nydusd template."""

from __future__ import annotations

import json
import pathlib

import pytest

from snapshotter import cli, config as C
from snapshotter.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_dataclass_defaults():
    c = C.Config()
    assert (c.version, c.root, c.address, c.cleanup_on_close) == (
        1, "/var/lib/containerd/io.containerd.snapshotter.v1.nydus",
        "/run/containerd-nydus/containerd-nydus-grpc.sock", False)
    assert c.daemon == C.DaemonConfig("erofs", "shared", "", "failover", 0)  # threads: nydusd default
    assert c.remote == C.RemoteConfig((), False, {}, {}, "", True, 5, 5, 2)
    assert c.cache_manager == C.CacheManagerConfig(False, "", 0, True)
    assert c.prefetch == C.PrefetchConfig(True, False, 4, 1048576, 0, False)
    assert c.log == C.LogConfig("info", "text")
    assert c.metrics == C.MetricsConfig("")
    assert c.snapshot == C.SnapshotConfig(True, False)
    assert c.cache_dir == c.root + "/cache"


def test_example_file_is_the_defaults():
    assert C.load(REPO / "config.toml.example") == C.Config()


def test_example_documents_every_key():
    text = (REPO / "config.toml.example").read_text()
    import dataclasses

    for section in ("daemon", "remote", "cache_manager", "prefetch", "log", "metrics", "snapshot"):
        assert f"[{section}]" in text
        for f in dataclasses.fields(getattr(C.Config(), section)):
            assert f"\n{f.name} =" in text or f"[{section}.{f.name}]" in text, f"{section}.{f.name} undocumented"


def write(tmp_path, text: str) -> pathlib.Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_full_file(tmp_path):
    c = C.load(write(tmp_path, """
version = 1
root = "/x"
address = "/x/s.sock"
[daemon]
fs_driver = "erofs"
daemon_mode = "dedicated"
[remote]
insecure_registries = ["127.0.0.1:5000"]
[remote.mirrors]
"docker.io" = ["http://127.0.0.1:5001"]
[remote.auths."r.example"]
username = "u"
password = "p"
[cache_manager]
size_limit = "10GiB"
[log]
format = "json"
[metrics]
address = "127.0.0.1:0"
"""))
    assert c.daemon.fs_driver == "erofs" and c.daemon.daemon_mode == "dedicated"
    assert c.remote.insecure_registries == ("127.0.0.1:5000",)
    assert c.remote.mirrors == {"docker.io": ("http://127.0.0.1:5001",)}
    assert c.remote.auths["r.example"] == C.RegistryAuth("u", "p", "")
    assert c.cache_manager.size_limit == 10 * 1024**3
    assert c.log.format == "json" and c.metrics.address == "127.0.0.1:0"


@pytest.mark.parametrize("text,needle", [
    ("version = 1\nbogus = 1", "unknown configuration key bogus"),
    ("version = 1\n[daemon]\nfs_drvier = 'fusedev'", "unknown configuration key daemon.fs_drvier"),
    ("version = 1\n[daemon]\nfs_driver = 'nfs'", "daemon.fs_driver"),
    ("version = 1\n[daemon]\nthreads_number = '4'", "daemon.threads_number: expected an integer"),
    ("version = 1\n[snapshot]\nsync_remove = 1", "snapshot.sync_remove: expected true/false"),
    ("version = 1\n[remote]\ninsecure_registries = 'x'", "remote.insecure_registries: expected a list"),
    ("version = 1\n[remote.mirrors]\nx = ['ftp://a']", "must start with http"),
    ("version = 1\n[cache_manager]\nsize_limit = 'lots'", "cache_manager.size_limit"),
    ("version = 2", "unsupported configuration version 2"),
    ("root = '/x'", "version: missing"),
    ("version = 1\nroot = 'relative'", "root: must be an absolute path"),
    ("version = 1\n[log]\nlevel = 'loud'", "log.level"),
    ("version = 1\n[metrics]\naddress = 'nohostport'", "metrics.address"),
    ("version = 1\ndaemon = 3", "daemon: expected a table"),
    ("version = [", "invalid TOML"),
    ("version = 1\n[prefetch]\nburst_fraction = 2", "burst_fraction must be 0..1"),
    ("version = 1\n[prefetch]\nburst_cap = 'long'", "prefetch.burst_cap: expected a number"),
])
def test_bad_files(tmp_path, text, needle):
    with pytest.raises(ConfigError) as ei:
        C.load(write(tmp_path, text))
    assert needle in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.toml")


def test_cli_overrides_file(tmp_path):
    p = write(tmp_path, "version = 1\nroot = '/from/file'\n[log]\nlevel = 'debug'")
    args = cli.build_parser().parse_args(["--config", str(p), "--root", str(tmp_path / "r"),
                                          "--address", str(tmp_path / "s.sock"), "--log-format", "json"])
    c = cli.load_config(args)
    assert c.root == str(tmp_path / "r") and c.address == str(tmp_path / "s.sock")
    assert (c.log.level, c.log.format) == ("debug", "json")


def test_cli_config_error_exit_code(tmp_path, capsys):
    p = write(tmp_path, "version = 1\nnope = 1")
    assert cli.main(["--config", str(p)]) == 2
    assert "unknown configuration key nope" in capsys.readouterr().err


def test_nydusd_template(tmp_path):
    c = C.Config(root="/r")
    t = C.nydusd_config(c)
    assert t["device"]["cache"]["config"]["work_dir"] == "/r/cache"
    assert t["fs_prefetch"]["threads_count"] == 4
    assert "limit_size" not in t["device"]["cache"]["config"]
    t_limited = C.nydusd_config(C.Config(root="/r", cache_manager=C.CacheManagerConfig(size_limit=1 << 30)))
    assert t_limited["device"]["cache"]["config"]["limit_size"] == 1 << 30
    assert (t["fs_prefetch"]["burst_cap"], t["fs_prefetch"]["burst_fraction"], t["fs_prefetch"]["demand_share"]) \
        == (2.0, 0.1, 4)
    from rafs.daemon.config import DaemonConfig as NydusdConfig

    pf = NydusdConfig.parse(t).fs_prefetch  # what the daemon makes of it
    assert (pf.burst_cap, pf.burst_fraction, pf.demand_share) == (2.0, 0.1, 4)
    t_sustained = C.nydusd_config(C.Config(root="/r", prefetch=C.PrefetchConfig(burst_cap=3, demand_share=0)))
    pf = NydusdConfig.parse(t_sustained).fs_prefetch
    assert (pf.burst_cap, pf.demand_share) == (3.0, 0)
    assert t["fs_prefetch"]["runtime_files"] is True and NydusdConfig.parse(t).fs_prefetch.runtime_files
    off = C.nydusd_config(C.load(write(tmp_path, "version = 1\n[prefetch]\nruntime_files = false\n")))
    assert NydusdConfig.parse(off).fs_prefetch.runtime_files is False
    with pytest.raises(Exception, match="burst_fraction"):
        NydusdConfig.parse({"fs_prefetch": {"burst_fraction": 1.5}})
    tmpl = tmp_path / "n.json"
    tmpl.write_text(json.dumps({"device": {"backend": {"type": "registry", "config": {}}}, "mode": "cached"}))
    c2 = C.Config(root="/r", daemon=C.DaemonConfig(nydusd_config=str(tmpl)),
                  cache_manager=C.CacheManagerConfig(disable=True))
    t2 = C.nydusd_config(c2)
    assert t2["mode"] == "cached" and t2["device"]["cache"] == {"type": "dummycache"}
    tmpl.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        C.nydusd_config(c2)


UPSTREAM = REPO / "tests" / "data" / "upstream" / "snapshotter-config.toml"


def test_upstream_file_loads_unchanged():
    c = C.load(UPSTREAM)
    assert (c.root, c.address, c.cleanup_on_close) == (
        "/var/lib/containerd/io.containerd.snapshotter.v1.nydus",
        "/run/containerd-nydus/containerd-nydus-grpc.sock", False)
    assert c.daemon.daemon_mode == "dedicated"          # top-level upstream key, honoured
    assert c.daemon.fs_driver == "fusedev"
    assert c.daemon.recover_policy == "failover"          # served (fd holder + nydusd --upgrade)
    assert c.daemon.failover_policy == "resend"
    assert c.daemon.threads_number == 4                  # passed on as nydusd --thread-num 4
    assert c.daemon.nydusd_config == "/etc/nydus/nydusd-config.fusedev.json"
    assert c.log.level == "info"
    assert c.metrics.address == ":9110"
    assert c.snapshot == C.SnapshotConfig(sync_remove=False, enable_overlayfs_volatile=False)
    assert (c.cache_manager.disable, c.cache_manager.cache_dir) == (False, "")
    assert c.remote.mirrors_config.dir == ""
    # one warning line per unsupported key, each naming it
    joined = "\n".join(c.warnings)
    assert c.system == C.SystemConfig(enable=True, address="/run/containerd-nydus/system.sock")
    assert c.system_address == "/run/containerd-nydus/system.sock"
    assert not any("system.enable" in w or "system.address" in w for w in c.warnings)
    for key in ("system.debug.pprof_address", "cgroup.memory_limit",
                "log.log_rotation_max_size", "metrics.collect_interval", "remote.convert_vpc_registry",
                "remote.auth.enable_cri_keychain", "snapshot.enable_nydus_overlayfs", "cache_manager.gc_period",
                "image.validate_signature", "experimental.enable_stargz", "experimental.tarfs.export_mode",
                "daemon.nydusimage_path", "daemon.nydusd_path"):
        assert sum(f"{key} " in w or f"{key}:" in w for w in c.warnings) == 1, (key, joined)
    assert all("\n" not in w for w in c.warnings)
    assert c.daemon.nydusd_path == ""   # /usr/local/bin/nydusd is absent here: the bundled one
    assert not any("daemon.recover_policy" in w or "daemon.failover_policy" in w for w in c.warnings)
    # honoured now, so not warned: upstream's values are read
    assert not any("hung_io_interval" in w or "credential_renewal_interval" in w for w in c.warnings)
    assert (c.metrics.hung_io_seconds, c.remote.auth.renewal_seconds) == (10.0, 0.0)


def test_upstream_daemon_mode_values(tmp_path):
    assert C.load(write(tmp_path, 'version = 1\ndaemon_mode = "multiple"\n')).daemon.daemon_mode == "dedicated"
    assert C.load(write(tmp_path, 'version = 1\ndaemon_mode = "shared"\n')).daemon.daemon_mode == "shared"
    with pytest.raises(ConfigError, match="daemon_mode: 'none' is not supported"):
        C.load(write(tmp_path, 'version = 1\ndaemon_mode = "none"\n'))
    with pytest.raises(ConfigError, match="contradicts"):
        C.load(write(tmp_path, 'version = 1\ndaemon_mode = "shared"\n[daemon]\ndaemon_mode = "dedicated"\n'))


def test_unknown_keys_still_refused_outside_upstream_sections(tmp_path):
    with pytest.raises(ConfigError, match="unknown configuration key daemon.bogus"):
        C.load(write(tmp_path, 'version = 1\n[daemon]\nbogus = 1\n'))
    # inside an upstream section of features not built here: accepted with a warning
    c = C.load(write(tmp_path, 'version = 1\n[cgroup]\nenable = true\n'))
    assert c.warnings == ("configuration key cgroup.enable is accepted but not supported here (ignored)",)


def test_failover_policy_is_validated():
    c = C.from_dict({"version": 1, "daemon": {"recover_policy": "failover", "failover_policy": "flush"}})
    assert (c.daemon.recover_policy, c.daemon.failover_policy) == ("failover", "flush")
    with pytest.raises(ConfigError, match="daemon.failover_policy"):
        C.from_dict({"version": 1, "daemon": {"failover_policy": "later"}})


def test_daemon_cgroup_is_validated():
    assert C.from_dict({"version": 1}).daemon.cgroup == ""
    assert C.from_dict({"version": 1, "daemon": {"cgroup": "pynydus-daemons"}}).daemon.cgroup == "pynydus-daemons"
    with pytest.raises(ConfigError, match="daemon.cgroup"):
        C.from_dict({"version": 1, "daemon": {"cgroup": "../escape"}})


def test_system_controller_defaults_under_the_root_and_can_be_off(tmp_path):
    c = C.load(write(tmp_path, f'version = 1\nroot = "{tmp_path}/r"\n'))
    assert c.system.enable and c.system_address == f"{tmp_path}/r/system.sock"
    c = C.load(write(tmp_path, 'version = 1\n[system]\nenable = false\n'))
    assert not c.system.enable
    with pytest.raises(ConfigError, match="unknown configuration key system.bogus"):
        C.load(write(tmp_path, 'version = 1\n[system]\nbogus = 1\n'))


def test_threads_number_reaches_the_daemon_manager(tmp_path):
    """``[daemon] threads_number`` of a config file becomes the manager's nydusd ``--thread-num``
    (tests/test_fs_manager.py::test_thread_num_reaches_nydusd checks the running daemon's argv)."""
    from snapshotter.instances import default_manager_factory

    path = tmp_path / "config.toml"
    path.write_text(f'version = 1\nroot = "{tmp_path / "root"}"\n[daemon]\nthreads_number = 5\n')
    manager = default_manager_factory(C.load(path))
    try:
        assert manager.thread_num == 5
    finally:
        manager.shutdown(keep_records=False)
