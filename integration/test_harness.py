"""The harness itself: real registry, containerd, images; nothing left behind."""

from __future__ import annotations

import json
import os

import pytest
import requests

from integration.harness.registry import Registry, sha256_digest
from integration.harness.util import pid_alive

pytestmark = pytest.mark.containerd


def test_registry_push_pull_blob_and_access_log(registry: Registry) -> None:
    assert registry.port != 5000
    data = os.urandom(3000)
    digest = registry.push_blob("test/blob", data)
    assert digest == sha256_digest(data)
    mark = registry.log_mark()
    assert registry.get_blob("test/blob", digest) == data
    fetches = registry.blob_fetches(digest, since=mark)
    assert len(fetches) == 1 and fetches[0].size == len(data) and fetches[0].repo == "test/blob"
    assert registry.bytes_fetched(since=mark) == len(data)
    assert registry.blob_fetches(sha256_digest(b"other")) == []


def test_registry_manifest_roundtrip(registry: Registry) -> None:
    cfg = registry.push_blob("test/m", b"{}")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cfg, "size": 2},
                "layers": []}
    d = registry.put_manifest("test/m", "v1", manifest)
    body, mt = registry.get_manifest("test/m", "v1")
    assert mt == "application/vnd.oci.image.manifest.v1+json"
    assert sha256_digest(body) == d and json.loads(body) == manifest
    assert registry.get_manifest("test/m", d)[0] == body
    assert registry.ref("test/m", "v1") == f"127.0.0.1:{registry.port}/test/m:v1"


def test_registry_stops_and_cleans_up() -> None:
    with Registry() as reg:
        pid, d = reg.pid, reg.dir
        assert pid is not None and pid_alive(pid) and os.path.isdir(d)
        requests.get(f"{reg.url}/v2/", timeout=5)
    assert not pid_alive(pid)
    assert not os.path.exists(d)
    assert any(e.path == "/v2/" for e in reg.access_log())   # log survives stop


def test_registry_two_at_once_distinct_ports(registry_factory) -> None:
    a, b = registry_factory(), registry_factory()
    assert a.port != b.port
    da = a.push_blob("x/y", b"a")
    assert a.has_blob("x/y", da) and not b.has_blob("x/y", da)


def test_registry_htpasswd_auth(registry_factory) -> None:
    reg = registry_factory(users={"alice": "s3cret"})
    r = requests.get(f"{reg.url}/v2/", timeout=5)
    assert r.status_code == 401 and "Basic" in r.headers.get("WWW-Authenticate", "")
    assert requests.get(f"{reg.url}/v2/", auth=("alice", "wrong"), timeout=5).status_code == 401
    assert requests.get(f"{reg.url}/v2/", auth=("alice", "s3cret"), timeout=5).status_code == 200
    d = reg.push_blob("priv/a", b"secret data")          # uses reg.auth
    assert reg.get_blob("priv/a", d) == b"secret data"


def test_registry_extra_config_and_hook(registry_factory) -> None:
    seen = {}

    def hook(reg: Registry, cfg: dict) -> None:
        seen["host"] = reg.host
        cfg["http"]["headers"] = {"X-Pynydus": ["yes"]}

    reg = registry_factory(extra_config={"log": {"level": "debug"}}, config_hook=hook)
    assert reg.config["log"] == {"level": "debug", "accesslog": {"disabled": False}}
    assert seen["host"] == reg.host
    assert requests.get(f"{reg.url}/v2/", timeout=5).headers.get("X-Pynydus") == "yes"
