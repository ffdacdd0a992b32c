"""RegistryClient HTTP behaviour against loopback stub servers: redirects never carry the
registry's Authorization to another host; 5xx is retried; status codes map to precise errors."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest

from storage.backend.credentials import Credentials
from storage.backend.registry import MirrorConfig, RegistryBackend, RegistryClient, RegistryConfig
from storage.errors import AuthError, BlobNotFound, RegistryError, RegistryUnavailable

BLOB = bytes(range(256)) * 64
BLOB_ID = "ab" * 32


class _Server:
    def __init__(self, handler):
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.seen.append(("GET", self.path, self.headers.get("Authorization")))
                handler(self)

            do_HEAD = do_GET

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.host = self.url[7:]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(h, code, body=b"", headers=()):
    h.send_response(code)
    for k, v in headers:
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def _serve_range(h):
    rng = h.headers.get("Range")
    if rng:
        a, b = (int(x) for x in rng[6:].split("-"))
        _reply(h, 206, BLOB[a : b + 1], [("Content-Range", f"bytes {a}-{b}/{len(BLOB)}")])
    else:
        _reply(h, 200, BLOB)


EXPIRED: set[str] = set()


def _storage(h):
    sig = h.path.rpartition("sig=")[2]
    if sig in EXPIRED:
        return _reply(h, 403)
    _serve_range(h)


@pytest.fixture
def servers():
    EXPIRED.clear()
    storage = _Server(_storage)
    expected = Credentials("u", "p").basic()
    sigs = iter(range(1, 100))

    def registry(h):
        if h.headers.get("Authorization") != expected:
            return _reply(h, 401, headers=[("WWW-Authenticate", 'Basic realm="r"')])
        if h.path.startswith("/v2/r/blobs/"):
            return _reply(h, 307, headers=[("Location", f"{storage.url}/data/blob?sig={next(sigs)}")])
        return _reply(h, 404)

    reg = _Server(registry)
    yield reg, storage
    reg.close()
    storage.close()


def test_redirect_drops_authorization_off_host(servers):
    reg, storage = servers
    client = RegistryClient(reg.host, "r", scheme="http", credentials=Credentials("u", "p"))
    assert client.read_blob_range(BLOB_ID, 100, 50) == BLOB[100:150]
    assert client.blob_size(BLOB_ID) == len(BLOB)
    assert storage.seen and all(auth is None for _, _, auth in storage.seen)
    assert any(auth == Credentials("u", "p").basic() for _, _, auth in reg.seen)
    # the redirected URL is reused: the registry is not asked again for this blob's data
    n = len(reg.seen)
    assert client.read_blob_range(BLOB_ID, 5, 5) == BLOB[5:10]
    assert len(reg.seen) == n
    assert all(auth is None for _, _, auth in storage.seen)
    EXPIRED.update({"1", "2"})  # the presigned URLs expire: ask the registry again
    assert client.read_blob_range(BLOB_ID, 7, 3) == BLOB[7:10]
    assert len(reg.seen) > n
    client.close()


def test_status_codes_map_to_errors(servers):
    reg, _ = servers
    client = RegistryClient(reg.host, "other", scheme="http", credentials=Credentials("u", "p"))
    with pytest.raises(BlobNotFound):
        client.read_blob_range(BLOB_ID, 0, 1)
    with pytest.raises(AuthError):
        RegistryClient(reg.host, "r", scheme="http").read_blob_range(BLOB_ID, 0, 1)


def test_5xx_retried_then_served():
    state = {"n": 0}

    def flaky(h):
        state["n"] += 1
        if state["n"] <= 2:
            return _reply(h, 503)
        _serve_range(h)

    srv = _Server(flaky)
    try:
        be = RegistryBackend(RegistryConfig(host=srv.host, repo="r", scheme="http", retry_limit=2,
                                            use_docker_config=False))
        assert be.reader(BLOB_ID).read(10, 10) == BLOB[10:20]
        assert be.metrics.backend_retries.value == 2
        state["n"] = -10
        be2 = RegistryBackend(RegistryConfig(host=srv.host, repo="r", scheme="http", retry_limit=1,
                                             use_docker_config=False))
        with pytest.raises(RegistryError, match="503"):
            be2.reader(BLOB_ID).read(0, 1)
    finally:
        srv.close()


def test_server_ignoring_range_is_sliced():
    srv = _Server(lambda h: _reply(h, 200, BLOB))
    try:
        client = RegistryClient(srv.host, "r", scheme="http")
        assert client.read_blob_range(BLOB_ID, 1000, 24) == BLOB[1000:1024]
    finally:
        srv.close()


def test_credentials_from_auth_field():
    assert Credentials.from_auth(base64.b64encode(b"a:b:c").decode()) == Credentials("a", "b:c")


def test_ping_goes_through_mirror_failover():
    """``RegistryBackend.ping``: any HTTP answer to ``/v2/`` counts (401 too), mirrors first in
    order, a dead one skipped; the origin's error when nothing answers."""
    origin = _Server(lambda h: _reply(h, 401, headers=[("WWW-Authenticate", 'Basic realm="r"')]))
    mirror = _Server(lambda h: _reply(h, 200))
    dead = _Server(lambda h: _reply(h, 200))
    dead_url = dead.url
    dead.close()  # nothing listens there any more
    try:
        cfg = RegistryConfig(host=origin.host, repo="r", scheme="http", use_docker_config=False,
                             mirrors=(MirrorConfig(host=dead_url), MirrorConfig(host=mirror.url)))
        be = RegistryBackend(cfg)
        assert be.ping() == mirror.url
        assert be.ping() == mirror.url  # the dead mirror is now skipped (unhealthy)
        be.close()
        be = RegistryBackend(RegistryConfig(host=origin.host, repo="r", scheme="http", use_docker_config=False))
        assert be.ping() == origin.url and origin.seen[-1][:2] == ("GET", "/v2/")
        be.close()
        be = RegistryBackend(RegistryConfig(host=dead_url, repo="r", use_docker_config=False))
        with pytest.raises(RegistryUnavailable, match="/v2/"):
            be.ping()
        be.close()
    finally:
        origin.close()
        mirror.close()


def test_warm_takes_the_token_so_the_first_read_needs_one_request():
    tokens = []

    def registry(h):
        if h.path.startswith("/token"):
            tokens.append(h.path)
            return _reply(h, 200, b'{"token": "t1", "expires_in": 300}')
        if h.headers.get("Authorization") != "Bearer t1":
            return _reply(h, 401, headers=[("WWW-Authenticate",
                                            f'Bearer realm="{reg.url}/token",service="reg"')])
        if h.path == "/v2/":
            return _reply(h, 200, b"{}")
        return _serve_range(h)

    reg = _Server(registry)
    try:
        client = RegistryClient(reg.host, "r", scheme="http")
        client.warm()
        assert client.token_requests == 1 and "scope=repository%3Ar%3Apull" in tokens[0]
        n = len(reg.seen)
        assert client.read_blob_range(BLOB_ID, 10, 20) == BLOB[10:30]
        assert reg.seen[n:] == [("GET", f"/v2/r/blobs/sha256:{BLOB_ID}", "Bearer t1")]  # no 401 first
        assert client.token_requests == 1
        client.close()
    finally:
        reg.close()


def test_backend_warm_failure_leaves_health_alone():
    down = _Server(lambda h: _reply(h, 200))
    down.close()  # a mirror that refuses connections
    origin = _Server(lambda h: _reply(h, 200, b"{}") if h.path == "/v2/" else _serve_range(h))
    try:
        backend = RegistryBackend(RegistryConfig(host=origin.host, repo="r", scheme="http",
                                                 mirrors=(MirrorConfig(host=down.url),)))
        with pytest.raises(RegistryUnavailable):
            backend.warm()  # the endpoint a read tries first is the mirror
        assert all(ep.usable() and ep._failed_at is None for ep, _ in backend.endpoints)
        assert not origin.seen
        backend.close()
    finally:
        origin.close()
