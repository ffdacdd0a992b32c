"""Keeping a FUSE connection across daemon restarts: the handover message and an fd holder.

A daemon started with a *supervisor* socket sends its handover state (JSON) and its
``/dev/fuse`` fds there with ``SCM_RIGHTS`` whenever the state changes; the holder keeps them
open, so the kernel connection (and the requests the daemon had taken) outlives the daemon. A
successor fetches both and adopts the session (:meth:`FuseSession.adopt`) without a new mount
or INIT. The holder here is the one the tests use; in production it is the snapshotter's job.
"""

from __future__ import annotations

import array
import json
import os
import socket
import threading
from typing import Any

from rafs.errors import MountError

MAX_MESSAGE = 1 << 20
MAX_FDS = 64


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, ancdata, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def _send(sock: socket.socket, msg: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([msg], anc)


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise MountError(f"supervisor socket {path}: {exc}") from exc
    return sock


def send_handover(path: str, state: dict, fds: list[int], *, timeout: float = 5.0) -> None:
    """Give the holder at ``path`` the current state and fds (it replaces what it held)."""
    with _connect(path, timeout) as sock:
        _send(sock, b"P" + json.dumps(state).encode(), fds)
        if sock.recv(16) != b"ok":
            raise MountError(f"supervisor {path} did not accept the handover")


def fetch_handover(path: str, *, timeout: float = 5.0) -> tuple[list[int], dict]:
    """``(fds, state)`` held at ``path`` (MountError when it holds nothing or is unusable)."""
    with _connect(path, timeout) as sock:
        sock.sendall(b"G")
        msg, fds = _recv(sock)
    if not msg.startswith(b"S"):
        for fd in fds:
            os.close(fd)
        raise MountError(f"supervisor {path} holds no FUSE session: {msg[:200]!r}")
    try:
        state = json.loads(msg[1:])
    except ValueError as exc:
        for fd in fds:
            os.close(fd)
        raise MountError(f"supervisor {path}: handover state is not JSON: {exc}") from exc
    return fds, state


class FdHolder:
    """Serve ``send_handover``/``fetch_handover`` on ``path`` (blocking; one client at a time).

    :meth:`serve_forever` runs until :meth:`close` (from another thread), which also closes the
    held fds; :attr:`held` says whether it holds a session. ``path`` is replaced if it exists
    (a previous holder's socket: that holder is gone, a unix socket cannot be shared)."""

    def __init__(self, path: str, *, client_timeout: float = 10.0) -> None:
        self.path = path
        self.state: bytes | None = None
        self.fds: list[int] = []
        self.client_timeout = client_timeout
        self._lock = threading.Lock()
        self._closed = False
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(8)

    @property
    def held(self) -> bool:
        with self._lock:
            return self.state is not None and bool(self.fds)

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                raise
            with conn:
                conn.settimeout(self.client_timeout)
                try:
                    self._handle(conn)
                except OSError:  # a client that went away mid-request: keep serving the others
                    if self._closed:
                        return

    def drop(self) -> None:
        """Close the held fds (the FUSE connection ends if nobody else holds one)."""
        with self._lock:
            fds, self.fds, self.state = self.fds, [], None
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        """Stop serving, remove the socket, close the held fds."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.drop()

    def _handle(self, conn: socket.socket) -> None:
        msg, fds = _recv(conn)
        if msg.startswith(b"P"):
            with self._lock:
                old, self.state, self.fds = self.fds, msg[1:], fds
            for fd in old:
                os.close(fd)
            conn.sendall(b"ok")
            return
        with self._lock:
            state, held = self.state, list(self.fds)
        if msg == b"G" and state is not None:
            _send(conn, b"S" + state, held)
        else:
            for fd in fds:
                os.close(fd)
            conn.sendall(b"E nothing held" if msg == b"G" else b"E bad request")


def holder_main(path: str) -> Any:  # pragma: no cover - runs in a child process
    FdHolder(path).serve_forever()
