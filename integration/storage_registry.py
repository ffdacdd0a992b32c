"""A real ``docker-registry`` for the storage integration tests, plus the helpers around it.

* :class:`LocalRegistry` — runs ``docker-registry serve`` on 127.0.0.1:<free port> with
  filesystem storage under a temp dir; optional htpasswd (bcrypt) or token auth.
* :class:`TokenIssuer` — a small token server signing ES256 JWTs (x5c header) that the
  registry trusts through ``auth.token.rootcertbundle``.
* :class:`FaultProxy` — a loopback HTTP proxy the test controls: it forwards one request per
  connection (origin-form to a fixed upstream, or absolute-form like a forward proxy) and applies
  planned faults to blob GETs: ``reset`` mid-body, ``500``, ``slow``, ``truncate``, ``corrupt``.
  It logs every request (method, path, Range) so tests count backend fetches.

Processes are stopped by PID; everything lives under the caller's temp dir.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass

import requests

REGISTRY_BIN = shutil.which("docker-registry")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """``GET /token?service=..&scope=..`` → ``{"token": <ES256 JWT>, "expires_in": N}``."""

    def __init__(self, workdir: str, *, service: str = "storage-test", issuer: str = "storage-test-issuer",
                 users: dict[str, str] | None = None, expires_in: int = 300) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.service, self.issuer, self.users, self.expires_in = service, issuer, users, expires_in
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "storage-test-token")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .sign(self._key, hashes.SHA256()))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.cert_path = os.path.join(workdir, "token-cert.pem")
        with open(self.cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict[str, str]] = []
        issuer_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                q = urllib.parse.urlsplit(self.path)
                params = urllib.parse.parse_qs(q.query)
                issuer_self.requests.append({"auth": self.headers.get("Authorization", ""),
                                             "scope": " ".join(params.get("scope", []))})
                user = ""
                if issuer_self.users is not None:
                    auth = self.headers.get("Authorization", "")
                    ok = False
                    if auth.startswith("Basic "):
                        u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                        ok = issuer_self.users.get(u) == p
                        user = u
                    if not ok:
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                token = issuer_self.mint(params.get("scope", []), subject=user)
                body = json.dumps({"token": token, "expires_in": issuer_self.expires_in}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def mint(self, scopes, subject: str = "") -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        access = []
        for scope in scopes:
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind and name:
                    access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + self.expires_in,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class LocalRegistry:
    """``docker-registry`` on a free loopback port; ``auth`` is None, "htpasswd" or "token"."""

    def __init__(self, workdir: str, *, auth: str | None = None, users: dict[str, str] | None = None,
                 token_issuer: TokenIssuer | None = None) -> None:
        if REGISTRY_BIN is None:
            raise RuntimeError("docker-registry not installed")
        self.workdir = workdir
        self.auth = auth
        self.users = users or {}
        self.token_issuer = token_issuer
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        cfg: dict = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": os.path.join(workdir, "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        if auth == "htpasswd":
            import bcrypt

            path = os.path.join(workdir, "htpasswd")
            with open(path, "w") as f:
                for user, pw in self.users.items():
                    f.write(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
            cfg["auth"] = {"htpasswd": {"realm": "storage-test", "path": path}}
        elif auth == "token":
            assert token_issuer is not None
            cfg["auth"] = {"token": {"realm": token_issuer.realm, "service": token_issuer.service,
                                     "issuer": token_issuer.issuer, "rootcertbundle": token_issuer.cert_path}}
        self.config_path = os.path.join(workdir, "registry.yml")
        with open(self.config_path, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        self.log_path = os.path.join(workdir, "registry.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", self.config_path], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                if requests.get(self.url + "/v2/", timeout=1).status_code in (200, 401):
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not start: {open(self.log_path).read()[-2000:]}")
            time.sleep(0.05)

    def _auth_headers(self, repo: str) -> dict[str, str]:
        if self.auth == "htpasswd":
            user, pw = next(iter(self.users.items()))
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}
        if self.auth == "token":
            return {"Authorization": "Bearer " + self.token_issuer.mint([f"repository:{repo}:pull,push"])}
        return {}

    def push_blob(self, repo: str, data: bytes) -> str:
        """Monolithic upload (POST then PUT ?digest=); returns the hex digest (= blob id)."""
        digest = hashlib.sha256(data).hexdigest()
        headers = self._auth_headers(repo)
        r = requests.post(f"{self.url}/v2/{repo}/blobs/uploads/", headers=headers, timeout=30)
        assert r.status_code == 202, (r.status_code, r.text)
        loc = urllib.parse.urljoin(self.url, r.headers["Location"])
        sep = "&" if "?" in loc else "?"
        r = requests.put(f"{loc}{sep}digest=sha256:{digest}", data=data,
                         headers={**headers, "Content-Type": "application/octet-stream"}, timeout=120)
        assert r.status_code == 201, (r.status_code, r.text)
        return digest

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@dataclass
class ProxyRequest:
    method: str
    target: str
    range: str | None

    @property
    def range_bounds(self) -> tuple[int, int] | None:
        if not self.range or not self.range.startswith("bytes="):
            return None
        a, _, b = self.range[6:].partition("-")
        return int(a), int(b)


class FaultProxy:
    """Loopback HTTP proxy; one request per connection; faults applied to blob GETs in order.

    ``upstream`` ("host:port") is used for origin-form requests; absolute-form requests
    (``GET http://h:p/path``) go where they name, so this also serves as a forward proxy.
    """

    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        self.faults: deque[str] = deque()
        self.log: list[ProxyRequest] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def blob_gets(self) -> list[ProxyRequest]:
        with self._lock:
            return [r for r in self.log if r.method == "GET" and "/blobs/" in r.target]

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_head(conn: socket.socket) -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return b""
            buf += chunk
        return buf

    def _serve(self, conn: socket.socket) -> None:
        try:
            buf = self._read_head(conn)
            if not buf:
                return
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            headers = [ln for ln in lines[1:] if ln]
            hmap = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip() for ln in headers}
            length = int(hmap.get("content-length", "0") or 0)
            while len(rest) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
            upstream = self.upstream
            path = target
            if target.startswith("http://"):
                u = urllib.parse.urlsplit(target)
                upstream, path = u.netloc, u.path + (f"?{u.query}" if u.query else "")
            with self._lock:
                self.log.append(ProxyRequest(method, path, hmap.get("range")))
                fault = None
                if method == "GET" and "/blobs/" in path and self.faults:
                    fault = self.faults.popleft()
            if fault == "500":
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if fault and fault.startswith("slow:"):
                time.sleep(float(fault[5:]))
            keep = [ln for ln in headers if ln.split(":", 1)[0].strip().lower() not in ("connection", "proxy-connection")]
            req = f"{method} {path} {version}\r\n" + "\r\n".join(keep + ["Connection: close"]) + "\r\n\r\n"
            host, _, port = upstream.partition(":")
            with socket.create_connection((host, int(port)), timeout=30) as up:
                up.sendall(req.encode("latin-1") + rest)
                resp = b""
                while True:
                    chunk = up.recv(1 << 20)
                    if not chunk:
                        break
                    resp += chunk
            rhead, _, body = resp.partition(b"\r\n\r\n")
            rlines = [ln for ln in rhead.decode("latin-1").split("\r\n")
                      if not ln.lower().startswith("connection:")]
            rhead = ("\r\n".join(rlines) + "\r\nConnection: close").encode("latin-1")
            if fault in ("reset", "truncate") and len(body) > 1:
                conn.sendall(rhead + b"\r\n\r\n" + body[: len(body) // 2])
                if fault == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if fault == "corrupt" and body:
                body = bytearray(body)
                body[len(body) // 2] ^= 0xFF
                body = bytes(body)
            conn.sendall(rhead + b"\r\n\r\n" + body)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
