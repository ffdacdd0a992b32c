"""A real ``docker-registry`` for the storage integration tests, plus the helpers around it.

* :class:`LocalRegistry` — the harness ``Registry`` (``docker-registry`` on 127.0.0.1:<free
  port>), extended via its config hook: htpasswd (bcrypt) or token auth, TLS.
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
import http.server
import json
import os
import shutil
import socket
import struct
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass

import requests

from integration.harness.registry import Registry
from integration.harness.util import free_port

REGISTRY_BIN = shutil.which("docker-registry")


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

            def do_POST(self):  # OAuth2 refresh-token grant (docker "identitytoken")
                length = int(self.headers.get("Content-Length", "0") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                issuer_self.requests.append({"auth": "refresh_token:" + form.get("refresh_token", [""])[0],
                                             "scope": " ".join(form.get("scope", []))})
                if form.get("grant_type") != ["refresh_token"] or \
                        form.get("refresh_token") != [issuer_self.refresh_token]:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                token = issuer_self.mint(form.get("scope", []), subject="refresh")
                body = json.dumps({"access_token": token, "expires_in": issuer_self.expires_in}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.refresh_token = "identity-" + os.urandom(8).hex()
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


def _self_signed(workdir: str, ip: str) -> tuple[str, str]:
    """A self-signed server certificate for ``ip``; returns (cert.pem, key.pem) paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(workdir, "tls-cert.pem"), os.path.join(workdir, "tls-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class _BearerAuth:
    """requests auth callable adding a fixed bearer token."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, req):
        req.headers["Authorization"] = "Bearer " + self.token
        return req


class _TlsRegistry(Registry):
    """The harness registry serving HTTPS with a self-signed certificate."""

    ca_path: str = ""

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def _ping(self) -> bool:
        return requests.get(f"{self.url}/v2/", timeout=2, verify=self.ca_path).status_code in (200, 401)


class LocalRegistry:
    """The harness :class:`~integration.harness.registry.Registry`, extended through its config
    hook with token auth (``auth="token"``) and TLS; ``auth="htpasswd"`` uses its users."""

    def __init__(self, workdir: str, *, auth: str | None = None, users: dict[str, str] | None = None,
                 token_issuer: TokenIssuer | None = None, tls: bool = False, quiet: bool = False) -> None:
        self.auth = auth
        self.token_issuer = token_issuer
        self.ca_path: str | None = None
        extra: dict = {"storage": {"cache": {"blobdescriptor": "inmemory"}}}  # as Debian's stock config
        if quiet:
            extra["log"] = {"level": "warn", "accesslog": {"disabled": True}}
        cls = Registry
        if tls:
            cert, key = _self_signed(workdir, "127.0.0.1")
            self.ca_path = cert
            extra["http"] = {"tls": {"certificate": cert, "key": key}}
            cls = _TlsRegistry

        def hook(reg: Registry, cfg: dict) -> None:
            if auth == "token":
                assert token_issuer is not None
                cfg["auth"] = {"token": {"realm": token_issuer.realm, "service": token_issuer.service,
                                         "issuer": token_issuer.issuer,
                                         "rootcertbundle": token_issuer.cert_path}}

        self.registry = cls(users=users if auth == "htpasswd" else None, extra_config=extra,
                            config_hook=hook, base_dir=workdir)
        if tls:
            self.registry.ca_path = self.ca_path  # type: ignore[attr-defined]
            self.registry.session.verify = self.ca_path
            self.registry.session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
        self.registry.start()
        self.host = self.registry.host
        self.url = self.registry.url

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload a blob; returns the hex digest (= blob id)."""
        auth = None
        if self.auth == "token":
            auth = _BearerAuth(self.token_issuer.mint([f"repository:{repo}:pull,push"]))
        return self.registry.push_blob(repo, data, auth=auth).partition(":")[2]

    def stop(self) -> None:
        self.registry.stop()


@dataclass
class ProxyRequest:
    method: str
    target: str
    range: str | None
    at: float = 0.0  #: time.monotonic() when the request arrived

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
                self.log.append(ProxyRequest(method, path, hmap.get("range"), time.monotonic()))
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
