"""Blocking client of a nydusd's control API (:mod:`rafs.daemon.api` serves it).

Kept apart from the server so that a process that only drives daemons (the snapshotter's
``DaemonManager``, ``nydusctl``) does not import the server's event loop.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any

from rafs.errors import RafsError


class ApiError(RafsError):
    """A control-API call failed; ``status`` and ``code`` are the daemon's answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"nydusd API {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket (``path``): the API socket of a nydusd."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class DaemonClient:
    """Blocking client of one daemon's API socket (used by the DaemonManager)."""

    def __init__(self, apisock: str, *, timeout: float = 30.0) -> None:
        self.apisock = apisock
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        """One call; raises :class:`ApiError` for an error answer, ``OSError`` if unreachable."""
        conn = UnixHTTPConnection(self.apisock, self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            if raw:
                headers["Accept"] = "text/plain"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
        except http.client.HTTPException as exc:
            raise ConnectionError(f"{self.apisock}: bad HTTP answer: {exc}") from exc
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                err = json.loads(text)
                raise ApiError(resp.status, err.get("code", ""), err.get("message", ""))
            except (json.JSONDecodeError, AttributeError):
                raise ApiError(resp.status, "", text.decode(errors="replace")) from None
        if raw:
            return text.decode("utf-8", "surrogateescape")
        return json.loads(text) if text else None

    def info(self) -> dict:
        return self.request("GET", "/api/v1/daemon")

    def state(self) -> str | None:
        """The daemon state, or None when the socket does not answer."""
        try:
            return self.info().get("state")
        except (OSError, ApiError, ValueError):
            return None

    def mount(self, mountpoint: str, bootstrap: str, config: dict | str) -> None:
        cfg = config if isinstance(config, str) else json.dumps(config)
        q = urllib.parse.urlencode({"mountpoint": mountpoint})
        self.request("POST", f"/api/v1/mount?{q}", {"fs_type": "rafs", "source": bootstrap, "config": cfg})

    def remount(self, mountpoint: str, bootstrap: str, config: dict | str) -> None:
        """Serve the instance at ``mountpoint`` from a new bootstrap and config (upstream's remount)."""
        cfg = config if isinstance(config, str) else json.dumps(config)
        q = urllib.parse.urlencode({"mountpoint": mountpoint})
        self.request("PUT", f"/api/v1/mount?{q}", {"fs_type": "rafs", "source": bootstrap, "config": cfg})

    def umount(self, mountpoint: str) -> None:
        q = urllib.parse.urlencode({"mountpoint": mountpoint})
        self.request("DELETE", f"/api/v1/mount?{q}")

    def prefetch(self, mountpoint: str, files: list[str] | None = None) -> None:
        q = urllib.parse.urlencode({"mountpoint": mountpoint})
        self.request("POST", f"/api/v1/prefetch?{q}", {"files": files} if files else {})

    def trace(self, mountpoint: str) -> str:
        """The instance's recorded prefetch trace (text)."""
        q = urllib.parse.urlencode({"mountpoint": mountpoint})
        return self.request("GET", f"/api/v1/trace?{q}", raw=True)

    def metrics(self, instance: str | None = None) -> str:
        q = "?" + urllib.parse.urlencode({"id": instance}) if instance else ""
        return self.request("GET", f"/api/v1/metrics{q}", raw=True)

    def exit(self, *, handover: bool | None = False) -> None:
        """``handover`` True: leave the FUSE connection to a successor; False: unmount
        everything; None: upstream's exit (leaves it when the daemon has a supervisor)."""
        query = {True: "?handover=1", False: "?handover=0", None: ""}[handover]
        self.request("PUT", "/api/v1/daemon/exit" + query)

    def update_config(self, mountpoint: str | None, values: dict[str, str]) -> None:
        """Upstream's ``PUT /api/v1/config?id=``: e.g. ``{"registry_auth": <base64 user:password>}``
        for the instance at ``mountpoint`` (None: every instance)."""
        q = "?" + urllib.parse.urlencode({"id": mountpoint}) if mountpoint else ""
        self.request("PUT", f"/api/v1/config{q}", values)

    def get_config(self, mountpoint: str | None = None) -> dict[str, str]:
        q = "?" + urllib.parse.urlencode({"id": mountpoint}) if mountpoint else ""
        return self.request("GET", f"/api/v1/config{q}")

    def takeover(self) -> None:
        """Upstream's ``PUT /api/v1/daemon/fuse/takeover``: an ``--upgrade`` daemon in INIT
        adopts the session its supervisor holds (READY)."""
        self.request("PUT", "/api/v1/daemon/fuse/takeover")

    def start(self) -> None:
        """Upstream's ``PUT /api/v1/daemon/start``: a READY daemon serves (RUNNING)."""
        self.request("PUT", "/api/v1/daemon/start")

    def send_fd(self) -> None:
        self.request("PUT", "/api/v1/daemon/fuse/sendfd")
