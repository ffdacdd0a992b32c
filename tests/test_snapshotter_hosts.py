"""containerd hosts.toml directories → nydusd mirrors, and upstream's plain-HTTP fallback rule."""

from __future__ import annotations

import pytest

from snapshotter import config as C
from snapshotter import remote
from snapshotter.errors import FailedPrecondition
from snapshotter.hosts import host_directory, load_hosts

REF = "reg.example:5000/lib/app:v1"


def write_hosts(root, name: str, text: str):
    d = root / name
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(text)


def cfg_for(root) -> C.Config:
    return C.from_dict({"version": 1, "remote": {"mirrors_config": {"dir": str(root)}, "check_registry": False}})


def test_host_directory_names():
    assert host_directory("reg.example:5000") == "reg.example_5000_"
    assert host_directory("docker.io") == "docker.io"


def test_lookup_order_and_file_order(tmp_path):
    write_hosts(tmp_path, "_default", '[host."http://fallback:1"]\n')
    write_hosts(tmp_path, "reg.example_5000_", 'server = "http://reg.example:5000"\n'
                '[host."http://m2:5000"]\nheader = { X-A = ["1", "2"] }\nping_url = "http://m2:5000/ok"\n'
                '[host."m1:5000"]\nhealth_check_interval = 9\n')
    h = load_hosts(str(tmp_path), "reg.example:5000")
    assert [m.url for m in h.mirrors] == ["http://m2:5000", "https://m1:5000"]   # file order, https default
    assert h.mirrors[0].headers == {"X-A": "1"} and h.mirrors[0].ping_url == "http://m2:5000/ok"
    assert h.mirrors[1].health_check_interval == 9.0
    assert h.server.url == "http://reg.example:5000"
    assert [m.url for m in load_hosts(str(tmp_path), "other").mirrors] == ["http://fallback:1"]
    assert load_hosts("", "other") is None


def test_backend_config_from_hosts_dir(tmp_path):
    write_hosts(tmp_path, "reg.example:5000", 'server = "http://reg.example:5000"\n[host."http://m:1"]\n')
    backend = remote.backend_config(REF, {}, cfg_for(tmp_path))["config"]
    assert backend["scheme"] == "http"                     # server = "http://..." → plain-HTTP origin
    assert [m["host"] for m in backend["mirrors"]] == ["http://m:1"]
    assert backend["mirrors"][0]["auth_through"] is True


@pytest.mark.parametrize("error, scheme", [
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number", "http"),
    ("[Errno 111] Connection refused", "http"),
    ("certificate verify failed", "https"),
    (None, "https"),
])
def test_plain_http_fallback_only_for_insecure_hosts(tmp_path, error, scheme):
    write_hosts(tmp_path, "reg.example_5000_", '[host."m:1"]\nskip_verify = true\n[host."n:1"]\n')
    calls = []

    def ping(s, host, _timeout):
        calls.append((s, host))
        return error

    backend = remote.backend_config(REF, {}, cfg_for(tmp_path), ping=ping)["config"]
    # only the insecure, scheme-less host is probed; the verified one stays https
    assert calls == [("https", "m:1")]
    assert [m["host"] for m in backend["mirrors"]] == [f"{scheme}://m:1", "https://n:1"]
    assert backend["skip_verify"] is True


def test_bad_hosts_toml_is_one_precise_error(tmp_path):
    write_hosts(tmp_path, "reg.example_5000_", "[host\n")
    with pytest.raises(FailedPrecondition, match="hosts.toml"):
        remote.backend_config(REF, {}, cfg_for(tmp_path))


def test_hosts_toml_mirror_settings_reach_nydusd(tmp_path):
    write_hosts(tmp_path, "reg.example_5000_", '[host."http://m:1"]\nheader = { X-A = "1" }\n'
                'ping_url = "http://m:1/ok"\nhealth_check_interval = 9\n')
    (entry,) = remote.backend_config(REF, {}, cfg_for(tmp_path))["config"]["mirrors"]
    assert entry == {"host": "http://m:1", "auth_through": True, "headers": {"X-A": "1"},
                     "ping_url": "http://m:1/ok", "health_check_interval": 9.0}
