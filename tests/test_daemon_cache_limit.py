"""``device.cache.config.limit_size`` (written by the snapshotter from ``[cache_manager]
size_limit``) reaches the storage cache of every instance a daemon mounts."""

from __future__ import annotations

import pytest

from rafs.daemon.config import DaemonConfig
from rafs.daemon.device import build_device
from rafs.errors import ConfigError


def _cfg(tmp_path, **cache_config) -> dict:
    return {"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path)}},
                       "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache"),
                                                                 **cache_config}}}}


def test_limit_size_parsed(tmp_path):
    assert DaemonConfig.parse(_cfg(tmp_path)).cache_limit_size == 0
    assert DaemonConfig.parse(_cfg(tmp_path, limit_size=1 << 30)).cache_limit_size == 1 << 30


@pytest.mark.parametrize("bad", ["1GiB", True, -1, 1.5])
def test_bad_limit_size_is_a_config_error(tmp_path, bad):
    with pytest.raises(ConfigError, match="device.cache.config.limit_size"):
        DaemonConfig.parse(_cfg(tmp_path, limit_size=bad))


def test_limit_size_drives_the_cache_manager(tmp_path):
    dev = build_device([], DaemonConfig.parse(_cfg(tmp_path, limit_size=12345)))
    try:
        assert dev._factory.config.limit_size == 12345
    finally:
        dev.close()


def test_snapshotter_size_limit_reaches_the_daemon_config():
    from snapshotter import config as C

    tmpl = C.nydusd_config(C.Config(root="/r", cache_manager=C.CacheManagerConfig(size_limit=64 << 20)))
    tmpl["device"]["backend"] = {"type": "localfs", "config": {"dir": "/r"}}
    assert DaemonConfig.parse(tmpl).cache_limit_size == 64 << 20
