"""The system controller's request handling (snapshotter/system.py) on a real unix socket; the
hot upgrade itself runs against real daemons in tests/test_fs_manager.py and, through this
socket and a real snapshotter, integration/test_snapshotter_failover.py (scenario upgrade)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import sys
from types import SimpleNamespace

import pytest

from snapshotter.system import SystemController


class _Conn(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def _req(path: str, method: str, url: str, body: bytes | None = None) -> tuple[int, object]:
    c = _Conn(path)
    try:
        c.request(method, url, body=body)
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        c.close()


class _Manager:
    """Records what it was asked (the controller's contract with DaemonManager.upgrade)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list = []
        self.fail = fail

    def daemons(self):
        return [SimpleNamespace(daemon_id="shared-fusedev", pid=7, fs_driver="fusedev", mountpoint="/m",
                                instances={"b": 1, "a": 2})]

    def upgrade(self, nydusd_cmd=None):
        self.calls.append(nydusd_cmd)
        if self.fail:
            raise self.fail
        return [SimpleNamespace(daemon_id="shared-fusedev", old_pid=7, new_pid=8, seconds=0.1234, outcome="upgraded")]


@pytest.fixture
def controller(tmp_path):
    made = []

    def make(manager):
        ctl = SystemController(SimpleNamespace(manager_if_started=manager), str(tmp_path / "system.sock")).start()
        made.append(ctl)
        return ctl.path

    yield make
    for ctl in made:
        ctl.stop()


def test_socket_mode_and_removed_on_stop(tmp_path):
    ctl = SystemController(SimpleNamespace(manager_if_started=None), str(tmp_path / "system.sock")).start()
    assert stat.S_IMODE(os.stat(ctl.path).st_mode) == 0o600
    ctl.stop()
    assert not os.path.exists(ctl.path)


def test_daemons_and_upgrade(controller):
    mgr = _Manager()
    path = controller(mgr)
    assert _req(path, "GET", "/api/v1/daemons") == (200, [{"id": "shared-fusedev", "pid": 7, "fs_driver": "fusedev",
                                                          "mountpoint": "/m", "instances": ["a", "b"]}])
    status, body = _req(path, "PUT", "/api/v1/daemons/upgrade")
    assert status == 200 and body == {"upgraded": [{"id": "shared-fusedev", "old_pid": 7, "new_pid": 8,
                                                    "seconds": 0.123, "outcome": "upgraded"}]}
    assert mgr.calls == [None]
    status, _ = _req(path, "PUT", "/api/v1/daemons/upgrade", json.dumps({"nydusd_path": sys.executable}).encode())
    assert status == 200 and mgr.calls[-1] == [sys.executable]


def test_errors_say_why(controller, tmp_path):
    from rafs.errors import UnsupportedError

    path = controller(_Manager(fail=UnsupportedError("hot upgrade needs recover_policy = \"failover\"")))
    assert _req(path, "GET", "/api/v1/nope")[0] == 404
    assert _req(path, "PUT", "/api/v1/daemons/upgrade", b"{not json")[0] == 400
    assert _req(path, "PUT", "/api/v1/daemons/upgrade", b"[1]")[0] == 400
    status, body = _req(path, "PUT", "/api/v1/daemons/upgrade", json.dumps({"nydusd_path": str(tmp_path)}).encode())
    assert status == 400 and "not an executable file" in body["message"]
    status, body = _req(path, "PUT", "/api/v1/daemons/upgrade")
    assert status == 409 and body["code"] == "UnsupportedError" and "failover" in body["message"]


def test_no_daemon_started_yet(controller):
    path = controller(None)
    assert _req(path, "GET", "/api/v1/daemons") == (200, [])
    assert _req(path, "PUT", "/api/v1/daemons/upgrade") == (200, {"upgraded": []})
