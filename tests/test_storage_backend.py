"""Backends: the retry loop, localfs, config parsing, auth helpers (no network)."""

from __future__ import annotations

import base64
import json

import pytest

from storage.backend.base import BlobReader
from storage.backend.config import backend_from_config, registry_config
from storage.backend.localfs import LocalFsBackend
from storage.backend.memory import MemoryBackend
from storage.backend.credentials import Credentials
from storage.backend.registry import ProxyConfig, RegistryBackend, RegistryConfig, parse_www_authenticate
from storage.errors import (
    BackendError,
    BlobNotFound,
    BlobRangeError,
    ConfigError,
    TransientBackendError,
    TruncatedRead,
)


def test_retry_loop_retries_transient_and_counts():
    calls = []

    def fault(blob_id, off, size):
        calls.append(off)
        if len(calls) == 1:
            raise TransientBackendError("reset")
        if len(calls) == 2:
            return b"short"
        return None

    backend = MemoryBackend({"b": bytes(range(256)) * 4}, fault=fault, retry_limit=2)
    assert backend.reader("b").read(10, 20) == (bytes(range(256)) * 4)[10:30]
    assert len(calls) == 3
    m = backend.metrics
    assert (m.backend_retries.value, m.backend_read_count.value, m.backend_read_bytes.value) == (2, 1, 20)


def test_retry_loop_gives_up_with_last_error():
    backend = MemoryBackend({"b": b"x" * 100}, fault=lambda *a: b"", retry_limit=1)
    with pytest.raises(TruncatedRead):
        backend.reader("b").read(0, 10)
    assert backend.metrics.backend_read_errors.value == 1
    with pytest.raises(BlobNotFound):
        backend.reader("missing").read(0, 1)
    with pytest.raises(BlobRangeError):
        backend.reader("b").read(95, 10)


def test_localfs_dir_and_blob_file(tmp_path):
    (tmp_path / "abc").write_bytes(b"0123456789")
    be = LocalFsBackend(dir=str(tmp_path))
    assert be.reader("abc").read(2, 3) == b"234"
    assert be.reader("abc").blob_size() == 10
    with pytest.raises(BlobNotFound):
        be.reader("nope").read(0, 1)
    with pytest.raises(BlobNotFound):
        be.reader("../etc").read(0, 1)
    single = LocalFsBackend(blob_file=str(tmp_path / "abc"))
    assert single.reader("anything").read(0, 2) == b"01"
    with pytest.raises(ConfigError):
        LocalFsBackend()
    be.close()


def test_registry_config_defaults_match_nydusd():
    c = RegistryConfig(host="h", repo="r")
    assert (c.scheme, c.timeout, c.connect_timeout, c.retry_limit, c.skip_verify) == ("https", 5.0, 5.0, 2, False)
    assert ProxyConfig() == ProxyConfig(url="", fallback=True, ping_url="", check_interval=5.0, use_http=False)


def test_backend_from_nydusd_json(tmp_path):
    cfg = {"device": {"backend": {"type": "registry", "config": {
        "scheme": "http", "host": "127.0.0.1:1", "repo": "library/nginx", "auth": base64.b64encode(b"u:p").decode(),
        "skip_verify": True, "timeout": 3, "connect_timeout": 1, "retry_limit": 4,
        "proxy": {"url": "http://127.0.0.1:2", "fallback": False, "ping_url": "http://127.0.0.1:2/ping",
                  "check_interval": 7},
        "mirrors": [{"host": "http://127.0.0.1:3", "headers": {"X-A": "b"}, "ping_url": ""}],
        "blob_url_scheme": "", "blob_redirected_host": ""}}}}
    be = backend_from_config(cfg)
    assert isinstance(be, RegistryBackend)
    c = be.config
    assert (c.scheme, c.host, c.repo, c.timeout, c.retry_limit) == ("http", "127.0.0.1:1", "library/nginx", 3.0, 4)
    assert c.proxy == ProxyConfig("http://127.0.0.1:2", False, "http://127.0.0.1:2/ping", 7.0)
    assert c.mirrors[0].headers == {"X-A": "b"}
    assert be.client.credentials == Credentials("u", "p")
    assert len(be.endpoints) == 2
    be.close()
    lf = backend_from_config({"type": "localfs", "config": {"dir": str(tmp_path)}})
    assert isinstance(lf, LocalFsBackend)


@pytest.mark.parametrize("cfg, match", [
    ({"type": "oss", "config": {}}, "backend.type"),
    ({"type": "registry", "config": {"repo": "r"}}, "host"),
    ({"type": "registry", "config": {"host": "h", "repo": "r", "timeout": "5"}}, "timeout"),
    ({"type": "registry", "config": {"host": "h", "repo": "r", "scheme": "ftp"}}, "scheme"),
    ({"type": "registry", "config": {"host": "h", "repo": "r", "mirrors": [{}]}}, r"mirrors\[0\]"),
    ({"type": "registry", "config": {"host": "h", "repo": "r", "retry_limit": True}}, "retry_limit"),
])
def test_bad_config_names_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        backend_from_config(cfg)


def test_parse_www_authenticate():
    assert parse_www_authenticate('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                                  'scope="repository:library/nginx:pull"') == (
        "bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                   "scope": "repository:library/nginx:pull"})
    assert parse_www_authenticate('Basic realm="x"') == ("basic", {"realm": "x"})


def test_reader_is_abstract():
    with pytest.raises(TypeError):
        BlobReader("x")  # type: ignore[abstract]
    assert issubclass(TruncatedRead, BackendError)
