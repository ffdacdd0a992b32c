"""Keeping a FUSE connection across daemon restarts: the handover message and an fd holder.

A daemon started with a *supervisor* socket sends its handover state (JSON) and its
``/dev/fuse`` fds there with ``SCM_RIGHTS`` whenever the state changes; the holder keeps them
open, so the kernel connection (and the requests the daemon had taken) outlives the daemon. A
successor fetches both and adopts the session (:meth:`FuseSession.adopt`) without a new mount
or INIT. :class:`FdHolder` serves that protocol; :class:`FdKeeper` runs one as its own process
(``python -m rafs.fs.takeover <socket>``, own session), so the held connection outlives both the
daemon and the process that started the keeper (the snapshotter): any later process attaches to
it by its socket path.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import threading
import time

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
        while not self._closed:
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
                    if self._closed:  # a "Q" request
                        return
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
        if msg == b"H":  # status: whether it holds a session, who serves
            conn.sendall(json.dumps({"held": self.held, "pid": os.getpid(), "fds": len(self.fds)}).encode())
            return
        if msg == b"D":
            self.drop()
            conn.sendall(b"ok")
            return
        if msg == b"Q":  # stop: close the held fds, remove the socket, end serve_forever
            conn.sendall(b"ok")
            self.close()
            return
        with self._lock:
            state, held = self.state, list(self.fds)
        if msg == b"G" and state is not None:
            _send(conn, b"S" + state, held)
        else:
            for fd in fds:
                os.close(fd)
            conn.sendall(b"E nothing held" if msg == b"G" else b"E bad request")


def _request(path: str, verb: bytes, timeout: float) -> bytes:
    with _connect(path, timeout) as sock:
        sock.sendall(verb)
        return sock.recv(4096)


def holder_status(path: str, *, timeout: float = 2.0) -> dict | None:
    """``{"held": bool, "pid": int, "fds": int}`` of the holder serving ``path``, None if none does."""
    try:
        reply = _request(path, b"H", timeout)
        return json.loads(reply)
    except (MountError, OSError, ValueError):
        return None


class FdKeeper:
    """An :class:`FdHolder` in a process of its own (own session: a SIGKILL of its starter, or a
    signal to the starter's process group, does not reach it), attached by socket path.

    :meth:`attach` returns the keeper already serving ``path`` (it survived the process that
    started it) or starts one; :meth:`close` stops it (the held fds close with it)."""

    READY_TIMEOUT = 10.0

    def __init__(self, path: str, pid: int, proc: subprocess.Popen | None = None) -> None:
        self.path = path
        self.pid = pid
        self._proc = proc
        self.started = proc is not None  #: started here (not one that outlived an earlier process)

    @classmethod
    def attach(cls, path: str, *, log_file: str | None = None, env: dict | None = None) -> "FdKeeper":
        status = holder_status(path)
        if status is not None:
            return cls(path, int(status.get("pid", 0)))
        out = open(log_file, "ab") if log_file else subprocess.DEVNULL
        try:
            proc = subprocess.Popen([sys.executable, "-m", "rafs.fs.takeover", path], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, env=env, start_new_session=True, close_fds=True)
        finally:
            if log_file:
                out.close()
        return cls(path, proc.pid, proc)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the keeper answers (a fresh one is importing); False if it died or did not."""
        deadline = time.monotonic() + (self.READY_TIMEOUT if timeout is None else timeout)
        while holder_status(self.path, timeout=1.0) is None:
            if self._proc is not None and self._proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    @property
    def held(self) -> bool:
        status = holder_status(self.path)
        return bool(status and status.get("held"))

    def alive(self) -> bool:
        return holder_status(self.path) is not None

    def drop(self) -> None:
        """Close the held fds (the FUSE connection ends if nobody else holds one)."""
        try:
            _request(self.path, b"D", 5.0)
        except (MountError, OSError):
            pass

    def close(self) -> None:
        """Stop the keeper (its held fds close) and wait for it to exit."""
        try:
            _request(self.path, b"Q", 5.0)
        except (MountError, OSError):
            pass
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            return
        deadline = time.monotonic() + 10
        while self.pid > 0 and os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            time.sleep(0.02)


def _watch_socket(holder: FdHolder, period: float) -> None:
    """End the keeper when its socket is gone or replaced (its root was removed, or another
    holder took the path): nobody can reach the held session any more."""
    try:
        ino = os.stat(holder.path).st_ino
    except OSError:
        ino = -1
    while not holder._closed:
        time.sleep(period)
        try:
            same = os.stat(holder.path).st_ino == ino
        except OSError:
            same = False
        if not same and not holder._closed:
            print(f"fd keeper: {holder.path} is gone or replaced; closing the held fds and exiting",
                  file=sys.stderr, flush=True)
            holder._closed = True
            try:
                holder._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            holder._sock.close()
            holder.drop()
            return


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - runs as the keeper process
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rafs.fs.takeover <supervisor socket>", file=sys.stderr)
        return 2
    holder = FdHolder(args[0])
    threading.Thread(target=_watch_socket, args=(holder, 2.0), daemon=True).start()
    holder.serve_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
