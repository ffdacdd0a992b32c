"""The control API answers every malformed request with a 4xx and a reason (never a 500), and one
rule decides which instance names exist; the daemon keeps serving afterwards."""

from __future__ import annotations

import json
import os
import socket

import pytest

from rafs.daemon.config import MAX_NAME_BYTES, check_instance_name, loads_json
from rafs.errors import ConfigError
from tests.fs_harness import require_fuse, running_daemon


@pytest.mark.parametrize("name", ["a", "pod-1", "x.y_z", "9", "a" * MAX_NAME_BYTES])
def test_instance_name_rule_accepts(name):
    assert check_instance_name(name) == name


@pytest.mark.parametrize("name", ["", "a\0b", "\0", "a" * (MAX_NAME_BYTES + 1), ".", "..", "-x", "a/b",
                                  "é" * 200, "a b", "a\nb"])
def test_instance_name_rule_rejects(name):
    with pytest.raises(ConfigError):
        check_instance_name(name)


def test_deeply_nested_json_is_a_config_error():
    with pytest.raises(ConfigError, match="nested too deeply"):
        loads_json("[" * 200_000 + "]" * 200_000, "body")


def _raw(sock_path: str, data: bytes) -> tuple[int, dict]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sock_path)
    s.sendall(data)
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if body else {})


def _post(sock_path: str, target: str, body: bytes) -> tuple[int, dict]:
    return _raw(sock_path, f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body)


def test_malformed_requests_get_4xx_with_a_reason(tmp_path):
    require_fuse()
    from rafs.builder import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    (tmp_path / "blobs").mkdir()
    boot = build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(tmp_path / "blobs"),
                 options=BuildOptions()).bootstrap
    config = {"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path / "blobs")}},
                         "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
              "enable_xattr": False}
    not_boot = tmp_path / "not-a-bootstrap"
    not_boot.write_bytes(os.urandom(8192))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    deep = b"[" * 100_000 + b"]" * 100_000
    with running_daemon(tmp_path, opener="real") as (client, mnt, _):
        sock = client.apisock
        cases = [
            ("/api/v1/mount?mountpoint=/a", b'{"source": ' + json.dumps(boot).encode() + b', "config": ' + deep + b"}"),
            ("/api/v1/mount?mountpoint=/a", deep),
            ("/api/v1/mount?mountpoint=/a", json.dumps({"source": boot, "config": "[" * 50_000}).encode()),
            ("/api/v1/mount?mountpoint=/a", json.dumps({"source": boot, "config": 5}).encode()),
            ("/api/v1/mount?mountpoint=/a", json.dumps({"source": str(not_boot)}).encode()),
            ("/api/v1/mount?mountpoint=/a", json.dumps({"source": str(empty)}).encode()),
            ("/api/v1/mount?mountpoint=/a", json.dumps({"source": str(tmp_path)}).encode()),
            ("/api/v1/mount?mountpoint=/a", json.dumps({"source": boot + "\0x"}).encode()),
            ("/api/v1/mount?mountpoint=/a%00b", json.dumps({"source": boot}).encode()),
            ("/api/v1/mount?mountpoint=/" + "n" * 256, json.dumps({"source": boot}).encode()),
            ("/api/v1/mount?mountpoint=a", json.dumps({"source": boot}).encode()),
            ("/api/v1/mount?mountpoint=/a", b"\xff\xfe"),
            ("/api/v1/prefetch?mountpoint=/a", json.dumps({"files": ["/x\0"]}).encode()),
        ]
        for target, body in cases:
            status, answer = _post(sock, target, body)
            assert 400 <= status < 500 and answer.get("message"), (target, body[:80], status, answer)
        for raw in (b"GARBAGE\r\n\r\n", b"POST /api/v1/mount HTTP/1.1\r\nContent-Length: nope\r\n\r\n"):
            status, answer = _raw(sock, raw)
            assert status == 400 and answer.get("message"), raw
        assert client.info()["instances"] == {}  # nothing half-mounted
        client.mount("/" + "n" * MAX_NAME_BYTES, boot, config)  # the longest name works
        assert open(os.path.join(mnt, "n" * MAX_NAME_BYTES, "f"), "rb").read() == b"x"
