"""The snapshotter's system controller: operator requests over HTTP on a unix socket.

As upstream nydus-snapshotter's system controller (its ``/api/v1/daemons`` and
``/api/v1/daemons/upgrade`` endpoints), on ``[system] address`` (default ``<root>/system.sock``,
mode 0600; ``[system] enable = false`` turns it off)::

    curl --unix-socket <root>/system.sock http://localhost/api/v1/daemons
    curl --unix-socket <root>/system.sock -X PUT http://localhost/api/v1/daemons/upgrade \
         [-d '{"nydusd_path": "<the new nydusd executable>"}']

* ``GET /api/v1/daemons`` — ``[{"id", "pid", "fs_driver", "mountpoint", "instances"}]``.
* ``PUT /api/v1/daemons/upgrade`` — hot upgrade of every live daemon to the nydusd installed now
  (or ``nydusd_path``): each hands its FUSE session to its fd keeper and exits, a successor
  adopts the session; running containers keep reading (``DaemonManager.upgrade``, needs
  ``recover_policy = "failover"``). Answers ``{"upgraded": [{"id", "old_pid", "new_pid",
  "seconds", "outcome"}]}``; 409 with ``{"code", "message"}`` when it cannot upgrade.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import socketserver
import threading
from typing import Any

from snapshotter.errors import SnapshotterError

log = logging.getLogger(__name__)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, instances: Any) -> None:
        self.instances = instances
        super().__init__(path, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("system controller: " + fmt, *args)

    def address_string(self) -> str:
        return "unix"

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._reply(status, {"code": code, "message": message})

    def do_GET(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/api/v1/daemons":
            self._error(404, "NotFound", f"no endpoint GET {self.path}")
            return
        mgr = self.server.instances.manager_if_started
        out = []
        for rec in mgr.daemons() if mgr is not None and hasattr(mgr, "daemons") else []:
            out.append({"id": rec.daemon_id, "pid": rec.pid, "fs_driver": rec.fs_driver,
                        "mountpoint": rec.mountpoint, "instances": sorted(rec.instances)})
        self._reply(200, out)

    def do_PUT(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/api/v1/daemons/upgrade":
            self._error(404, "NotFound", f"no endpoint PUT {self.path}")
            return
        try:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}") if n else {}
        except ValueError as exc:
            self._error(400, "BadRequest", f"body is not JSON: {exc}")
            return
        if not isinstance(body, dict):
            self._error(400, "BadRequest", "body must be a JSON object")
            return
        path = body.get("nydusd_path") or ""
        if path and not (isinstance(path, str) and os.path.isfile(path) and os.access(path, os.X_OK)):
            self._error(400, "BadRequest", f"nydusd_path {path!r} is not an executable file")
            return
        mgr = self.server.instances.manager_if_started
        if mgr is None or not hasattr(mgr, "upgrade"):
            self._reply(200, {"upgraded": []})  # no daemon was ever started: nothing to upgrade
            return
        try:
            events = mgr.upgrade(nydusd_cmd=[path] if path else None)
        except Exception as exc:  # noqa: BLE001 - the manager's errors, answered to the operator
            self._error(409, type(exc).__name__, str(exc))
            return
        self._reply(200, {"upgraded": [{"id": e.daemon_id, "old_pid": e.old_pid, "new_pid": e.new_pid,
                                        "seconds": round(e.seconds, 3), "outcome": e.outcome} for e in events]})


class SystemController:
    """Serve the system controller for ``instances`` (``snapshotter.instances.Instances``)."""

    def __init__(self, instances: Any, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            os.unlink(path)  # a previous process's socket
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SnapshotterError(f"system controller socket {path}: {exc}") from exc
        old = os.umask(0o177)
        try:
            self._server = _Server(path, instances)
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._server.serve_forever, name="system-controller", daemon=True)

    def start(self) -> "SystemController":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
