"""kubelet-style exec credential providers (storage.backend.credentials.CredentialProviders): a real
plugin process gets a CredentialProviderRequest on stdin; its response's auth is used and cached."""

from __future__ import annotations

import json
import os
import sys

import pytest

from storage.backend.credentials import CredentialProviders, match_image, parse_duration
from storage.errors import ConfigError, CredentialError

PLUGIN = """#!{python}
import json, os, sys
req = json.load(sys.stdin)
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps(req) + "\\n")
if "fail" in req["image"]:
    sys.stderr.write("no token for you\\n")
    sys.exit(3)
json.dump({{"apiVersion": req["apiVersion"], "kind": "CredentialProviderResponse",
           "cacheKeyType": os.environ.get("KEY_TYPE", "Registry"), "cacheDuration": os.environ.get("TTL", "10m"),
           "auth": {{"*.example.test": {{"username": "alice", "password": "s3cret"}},
                    "127.0.0.1:5000/team": {{"username": "bob", "password": "pw-" + sys.argv[1]}}}}}}, sys.stdout)
"""


@pytest.mark.parametrize("pattern,image,ok", [
    ("*.example.test", "reg.example.test/app:1", True),
    ("*.example.test", "a.b.example.test/app", False),
    ("127.0.0.1:5000", "127.0.0.1:5000/x/y:tag", True),
    ("127.0.0.1:5000", "127.0.0.1:5001/x", False),
    ("127.0.0.1:5000/team", "127.0.0.1:5000/team/app@sha256:ab", True),
    ("127.0.0.1:5000/team", "127.0.0.1:5000/teamx/app", False),
])
def test_match_images(pattern, image, ok):
    assert match_image(pattern, image) is ok


def test_duration():
    assert parse_duration("1h30m", "x") == 5400 and parse_duration("0", "x") == 0
    with pytest.raises(ConfigError, match="not a duration"):
        parse_duration("soon", "x")


def _setup(tmp_path, monkeypatch, *, fmt="yaml", ttl="10m", key_type="Registry"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    plugin = bin_dir / "my-plugin"
    plugin.write_text(PLUGIN.format(python=sys.executable))
    plugin.chmod(0o755)
    calls = tmp_path / "calls"
    monkeypatch.setenv("CALLS", str(calls))
    monkeypatch.setenv("TTL", ttl)
    monkeypatch.setenv("KEY_TYPE", key_type)
    doc = {"apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig",
           "providers": [{"name": "my-plugin", "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                          "matchImages": ["*.example.test", "127.0.0.1:5000"], "defaultCacheDuration": "1h",
                          "args": ["arg1"], "env": [{"name": "EXTRA", "value": "1"}]}]}
    cfg = tmp_path / ("providers.yaml" if fmt == "yaml" else "providers.json")
    if fmt == "yaml":
        import yaml
        cfg.write_text(yaml.safe_dump(doc))
    else:
        cfg.write_text(json.dumps(doc))
    return str(cfg), str(bin_dir), calls


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_plugin_answers_and_cache(tmp_path, monkeypatch, fmt):
    cfg, bin_dir, calls = _setup(tmp_path, monkeypatch, fmt=fmt)
    now = [1000.0]
    provs = CredentialProviders.load(cfg, bin_dir)
    provs._clock = lambda: now[0]
    c = provs.credentials("reg.example.test/app:1")
    assert (c.username, c.password) == ("alice", "s3cret")
    c = provs.credentials("127.0.0.1:5000/team/app:2")
    assert (c.username, c.password) == ("bob", "pw-arg1")   # the longest matching auth key wins
    assert provs.credentials("127.0.0.1:5000/other/app") is None  # the plugin has nothing for it
    assert provs.credentials("elsewhere.test/app") is None  # no provider matches: not run
    reqs = [json.loads(ln) for ln in calls.read_text().splitlines()]
    assert len(reqs) == 2  # Registry cache key: 127.0.0.1:5000 asked once
    assert reqs[0] == {"apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                       "kind": "CredentialProviderRequest", "image": "reg.example.test/app:1"}
    provs.credentials("reg.example.test/app:1")
    assert len(calls.read_text().splitlines()) == 2  # cached (cacheDuration 10m)
    now[0] += 601
    provs.credentials("reg.example.test/app:1")
    assert len(calls.read_text().splitlines()) == 3  # expired: asked again


def test_zero_duration_is_not_cached_and_errors_are_one_line(tmp_path, monkeypatch):
    cfg, bin_dir, calls = _setup(tmp_path, monkeypatch, ttl="0", key_type="Image")
    provs = CredentialProviders.load(cfg, bin_dir)
    provs.credentials("reg.example.test/app:1")
    provs.credentials("reg.example.test/app:1")
    assert len(calls.read_text().splitlines()) == 2  # ttl 0: asked every time
    with pytest.raises(CredentialError, match=r"my-plugin for fail.example.test/app failed \(exit 3\): no token"):
        provs.credentials("fail.example.test/app")
    os.chmod(os.path.join(bin_dir, "my-plugin"), 0o644)
    with pytest.raises(CredentialError, match="cannot run"):
        provs.credentials("reg.example.test/other")


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"kind": "CredentialProviderConfig", "providers": [{"name": "p"}]}))
    with pytest.raises(ConfigError, match=r"providers\[0\]\.matchImages"):
        CredentialProviders.load(str(bad), str(tmp_path))
    bad.write_text(json.dumps({"kind": "Other"}))
    with pytest.raises(ConfigError, match="kind must be CredentialProviderConfig"):
        CredentialProviders.load(str(bad), str(tmp_path))


def test_snapshotter_uses_providers_from_remote_auth(tmp_path, monkeypatch):
    from snapshotter import config as C
    from snapshotter import remote

    cfg_path, bin_dir, calls = _setup(tmp_path, monkeypatch, fmt="json")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    toml = (f'version = 1\nroot = "{tmp_path}/root"\n[remote.auth]\nenable_kubelet_credential_providers = true\n'
            f'credential_provider_config = "{cfg_path}"\ncredential_provider_bin_dir = "{bin_dir}"\n'
            'enable_cri_keychain = false\n')
    (tmp_path / "config.toml").write_text(toml)
    cfg = C.load(tmp_path / "config.toml")
    assert any("remote.auth.enable_cri_keychain" in w for w in cfg.warnings)
    labels = {"containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/team/app:1"}
    creds = remote.registry_credentials("127.0.0.1:5000", labels, cfg)
    assert (creds.username, creds.password) == ("bob", "pw-arg1")
    assert remote.registry_credentials("other.test", {}, cfg) is None  # no provider matches
    bad = toml.replace(f'credential_provider_bin_dir = "{bin_dir}"\n', "")
    (tmp_path / "config.toml").write_text(bad)
    with pytest.raises(C.ConfigError, match="credential_provider_bin_dir"):
        C.load(tmp_path / "config.toml")
