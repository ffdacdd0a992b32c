"""The daemon API answers upstream nydusd's v1 JSON shapes (golden field/type list in
tests/data/upstream/api_v1_shapes.json) on a real FUSE mount, and keeps the Prometheus text."""

from __future__ import annotations

import json
import logging
import os
import socket

from tests.fs_harness import require_fuse, running_daemon

SHAPES = json.load(open(os.path.join(os.path.dirname(__file__), "data", "upstream", "api_v1_shapes.json")))
TYPES = {"str": str, "bool": bool, "int": int, "list": list, "object": dict}


def _check(obj: dict, shape: str) -> None:
    for field, kind in SHAPES[shape].items():
        assert field in obj, (shape, field, obj)
        assert isinstance(obj[field], TYPES[kind]), (shape, field, obj[field])


def _call(sock_path: str, method: str, target: str, body: bytes = b"", accept: str = "") -> tuple[int, str, bytes]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sock_path)
    extra = f"Accept: {accept}\r\n" if accept else ""
    s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    s.close()
    head, _, payload = buf.partition(b"\r\n\r\n")
    ctype = [h.split(b":", 1)[1].strip().decode() for h in head.split(b"\r\n")
             if h.lower().startswith(b"content-type:")][0]
    return int(head.split(b" ", 2)[1]), ctype, payload


def test_upstream_v1_shapes_on_a_real_mount(tmp_path):
    require_fuse()
    from rafs.builder import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"hello upstream" * 100)
    (tmp_path / "blobs").mkdir()
    boot = build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(tmp_path / "blobs"),
                 options=BuildOptions()).bootstrap
    config = {"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path / "blobs")}},
                         "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}}}
    with running_daemon(tmp_path, opener="real") as (client, mnt, _):
        sock = client.apisock
        client.mount("/a", boot, config)
        assert open(os.path.join(mnt, "a", "f"), "rb").read() == b"hello upstream" * 100

        status, ctype, body = _call(sock, "GET", "/api/v1/daemon")
        info = json.loads(body)
        assert status == 200 and "json" in ctype
        _check(info, "DaemonInfo")
        _check(info["version"], "BuildTimeInfo")
        assert info["state"] == "RUNNING" and "supervisor" in info and "/a" in info["instances"]

        status, ctype, body = _call(sock, "GET", "/api/v1/metrics?id=/a")
        metric = json.loads(body)
        assert status == 200 and "json" in ctype
        _check(metric, "FsMetric")
        assert metric["id"] == "/a" and metric["data_read"] >= 1400
        assert len(metric["fop_hits"]) == 15 and metric["fop_hits"][4] >= 1  # StatsFop::Read
        assert metric["fop_hits"][9] >= 1  # Lookup, counted by the FUSE loop

        status, _, body = _call(sock, "GET", "/api/v1/metrics")  # global: summed, id ""
        total = json.loads(body)
        _check(total, "FsMetric")
        assert status == 200 and total["id"] == "" and total["data_read"] == metric["data_read"]

        status, _, body = _call(sock, "GET", "/api/v1/metrics?id=/nope")
        assert status == 404
        _check(json.loads(body), "ErrorMessage")

        # Prometheus text where it was: Accept text/plain, ?format=prometheus, and our client
        for target, accept in (("/api/v1/metrics", "text/plain"), ("/api/v1/metrics?format=prometheus", "")):
            status, ctype, body = _call(sock, "GET", target, accept=accept)
            assert status == 200 and ctype.startswith("text/plain") and b"nydusd_read_count" in body
        assert "nydusd_read_count" in client.metrics()

        status, _, body = _call(sock, "GET", "/api/v1/daemon/backend")
        assert status == 200 and isinstance(json.loads(body), dict)

        status, _, _ = _call(sock, "PUT", "/api/v1/daemon", b'{"log_level": "debug"}')
        assert status == 204
        status, _, body = _call(sock, "PUT", "/api/v1/daemon", b'{"log_level": "loud"}')
        assert status == 400 and "log_level" in json.loads(body)["message"]
        client.umount("/a")

        # upstream nydusctl's commands against the same daemon
        from snapshotter import ctl

        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps(config))
        assert ctl.main(["-S", sock, "mount", "-s", boot, "-c", str(cfg), "-m", "/b"]) == 0
        assert open(os.path.join(mnt, "b", "f"), "rb").read() == b"hello upstream" * 100
        assert ctl.main(["-S", sock, "set", "log-level", "info"]) == 0
        assert ctl.main(["--sock", sock, "metrics", "--id", "/b"]) == 0
        assert ctl.main(["-S", sock, "info"]) == 0
        assert ctl.main(["-S", sock, "umount", "-m", "/b"]) == 0
        assert client.info()["instances"] == {}
        assert ctl.main(["-S", sock, "umount", "-m", "/b"]) == 1  # the daemon's 404, one line


def test_set_log_level_changes_the_root_logger():
    from rafs.daemon.api import set_log_level

    root = logging.getLogger()
    old = root.level
    try:
        set_log_level("warn")
        assert root.level == logging.WARNING
        set_log_level("DEBUG")
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(old)


def test_nydusctl_daemon_commands_need_a_socket(capsys):
    from snapshotter import ctl

    assert ctl.main(["info"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "-S/--sock" in err


V2_SAMPLE = os.path.join(os.path.dirname(__file__), "data", "upstream", "nydusd-config-v2.toml")


def test_upstream_v2_sample_loads(caplog):
    from rafs.daemon.config import DaemonConfig

    with caplog.at_level(logging.WARNING):
        cfg = DaemonConfig.load(V2_SAMPLE)
    assert cfg.backend_type == "localfs" and cfg.backend_config["dir"] == "/tmp"
    assert cfg.cache_type == "filecache" and cfg.cache_work_dir == "." and cfg.cache_compressed
    assert cfg.device_id == "my_id" and cfg.mode == "direct" and cfg.digest_validate and cfg.enable_xattr
    assert cfg.amplify_io == 1000000
    pf = cfg.fs_prefetch
    assert (pf.enable, pf.threads_count, pf.merging_size, pf.bandwidth_rate, pf.prefetch_all) == \
        (True, 8, 1000000, 10000000, True)
    assert "cache.enable_encryption is accepted but not supported" in caplog.text
    # the same as JSON
    import tomllib

    obj = tomllib.load(open(V2_SAMPLE, "rb"))
    assert DaemonConfig.parse(json.dumps(obj)) == cfg


def test_v2_config_errors_name_the_key():
    import pytest

    from rafs.daemon.config import DaemonConfig
    from rafs.errors import ConfigError

    with pytest.raises(ConfigError, match="cache.type: 'fscache'"):
        DaemonConfig.parse({"version": 2, "cache": {"type": "fscache"}})
    with pytest.raises(ConfigError, match="version: only 2"):
        DaemonConfig.parse({"version": 3})
    with pytest.raises(ConfigError, match="rafs.mode"):
        DaemonConfig.parse({"version": 2, "rafs": {"mode": 5}})


def test_v2_toml_config_mounts_for_real(tmp_path):
    require_fuse()
    import tomllib

    from rafs.builder import BuildOptions, build
    from rafs.daemon.config import DaemonConfig

    src = tmp_path / "src"
    src.mkdir()
    (src / "g").write_bytes(b"v2 config" * 1000)
    (tmp_path / "blobs").mkdir()
    boot = build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(tmp_path / "blobs"),
                 options=BuildOptions()).bootstrap
    text = open(V2_SAMPLE).read()
    text = text.replace('dir = "/tmp"', f'dir = "{tmp_path}/blobs"').replace(
        'blob_file = "/tmp/nydus.blob.data"\n', "").replace('alt_dirs = ["/var/nydus/cache"]\n', "").replace(
        'work_dir = "."', f'work_dir = "{tmp_path}/cache"')
    (tmp_path / "cache").mkdir()
    cfg_path = tmp_path / "nydusd.toml"
    cfg_path.write_text(text)
    v1 = DaemonConfig.load(str(cfg_path)).raw
    assert v1 == DaemonConfig.parse(tomllib.loads(text)).raw
    with running_daemon(tmp_path, opener="real") as (client, mnt, _):
        client.mount("/v2", boot, tomllib.loads(text))  # the v2 object itself through the API
        assert open(os.path.join(mnt, "v2", "g"), "rb").read() == b"v2 config" * 1000
        client.umount("/v2")
    assert os.listdir(tmp_path / "cache")  # the filecache work_dir was used
