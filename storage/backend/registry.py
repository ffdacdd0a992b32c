"""Registry backend: blobs from an OCI distribution registry, with mirrors and a P2P proxy.

* :class:`RegistryClient` — one pooled ``requests.Session`` for one registry host and repo, with
  auth handled: anonymous, Basic, Bearer (``WWW-Authenticate`` challenge → token endpoint with
  scope, token reused until near expiry, refreshed on 401), credentials from
  :mod:`storage.backend.credentials` (docker ``config.json``, credential helpers), redirects
  followed by hand so ``Authorization`` never leaves the registry host. The image converter
  reuses it for pushes (``request("PUT", ...)``).
* :class:`RegistryBackend` — range GETs of ``/v2/<repo>/blobs/sha256:<id>``; tries the proxy
  (an HTTP proxy such as a P2P agent), then healthy mirrors in order, then the origin registry.
  A failing proxy/mirror is marked unhealthy for ``check_interval`` seconds (re-checked with its
  ``ping_url`` when given). Retries with backoff live in :class:`~storage.backend.base.BlobReader`.
  ``ping()`` asks the same order whether any endpoint answers at all.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import requests
import requests.adapters
import urllib3.exceptions

from storage.backend.base import DEFAULT_RETRY_LIMIT, BlobBackend, BlobReader, speculation, yield_to_demand
from storage.backend.credentials import Credentials, docker_config_credentials
from storage.errors import (
    AuthError,
    BlobNotFound,
    BlobRangeError,
    ConfigError,
    RegistryError,
    RegistryUnavailable,
    TransientBackendError,
)
from storage.metrics import StorageMetrics

log = logging.getLogger(__name__)

#: a token is refreshed when fewer than this many seconds of its life remain
TOKEN_REFRESH_MARGIN = 10.0
#: lifetime assumed when the token endpoint gives no ``expires_in`` (distribution spec: 60 s)
DEFAULT_TOKEN_LIFETIME = 60.0
MAX_REDIRECTS = 10
_TRANSPORT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


def transport_reason(exc: BaseException) -> str:
    """The cause of a transport error in a few words ("connection refused", "[SSL: ...] ..."),
    without the HTTP library's wrapping (pool names, object reprs, retry counts)."""
    text = str(exc)
    ssl = re.search(r"\[SSL: [A-Z_]+\] [^'\"()]+", text)
    if ssl:
        return ssl.group(0).strip()
    errno = re.findall(r"\[Errno -?\d+\] ([^'\"()]+)", text)
    if errno:
        return errno[-1].strip().rstrip(".").lower()
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return "timed out"
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "connection closed by the server"
    return text.splitlines()[0][:200] if text else type(exc).__name__


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_www_authenticate(value: str) -> tuple[str, dict[str, str]]:
    """``'Bearer realm="x",service="y"'`` → ``("bearer", {"realm": "x", "service": "y"})``."""
    scheme, _, rest = value.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def split_host(host: str, default_scheme: str) -> tuple[str, str]:
    """``"http://h:5000"`` → ``("http", "h:5000")``; ``"h"`` → ``(default_scheme, "h")``."""
    if "://" in host:
        parsed = urllib.parse.urlsplit(host)
        return parsed.scheme, parsed.netloc
    return default_scheme, host.rstrip("/")


class RegistryClient:
    """An authenticated session with one registry host for one repository. Thread-safe.

    ``request(method, path)`` takes a path (``/v2/...``) or an absolute URL and returns the
    ``requests.Response`` after auth and redirects; transport failures become
    :class:`RegistryUnavailable`. The caller checks the status code (or uses :meth:`check`).
    """

    def __init__(self, host: str, repo: str, *, scheme: str = "https",
                 credentials: Credentials | None = None, registry_token: str = "",
                 skip_verify: bool = False, ca_cert_files: Sequence[str] = (),
                 timeout: float = 5.0, connect_timeout: float = 5.0,
                 proxy_url: str = "", headers: Mapping[str, str] | None = None,
                 pool_size: int = 32) -> None:
        if not host:
            raise ConfigError("registry: 'host' is required")
        self.scheme, self.host = split_host(host, scheme or "https")
        if self.scheme not in ("http", "https"):
            raise ConfigError(f"registry: scheme must be http or https, got {self.scheme!r}")
        self.repo = repo.strip("/")
        self.credentials = credentials or Credentials()
        self.registry_token = registry_token
        self.timeout = (connect_timeout, timeout)
        self.headers = dict(headers or {})
        self.session = requests.Session()
        #: speculative (prefetch) requests: their own connections with a small receive window,
        #: so a transfer paused for demand reads (read_body) stops taking link bandwidth at once
        self._spec_session = requests.Session()
        self._ca_bundle: str | None = None
        for session, adapter in ((self.session, requests.adapters.HTTPAdapter(
                pool_connections=4, pool_maxsize=pool_size, max_retries=0)),
                (self._spec_session, _SmallWindowAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0))):
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.trust_env = False
            if proxy_url:
                session.proxies = {"http": proxy_url, "https": proxy_url}
        if skip_verify:
            self.session.verify = self._spec_session.verify = False
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        elif ca_cert_files:
            self.session.verify = self._spec_session.verify = self._bundle(ca_cert_files)
        self._lock = threading.Lock()
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._tokens: dict[str, tuple[str, float]] = {}
        self.token_requests = 0  #: token endpoint calls made (for tests and metrics)
        self._redirects: dict[str, str] = {}  #: blob id -> redirected blob URL

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def set_credentials(self, credentials: Credentials) -> None:
        """Authenticate with ``credentials`` from the next request on: the tokens fetched with the
        old ones are dropped (a request in flight finishes with what it had)."""
        with self._lock:
            self.credentials = credentials
            self._tokens.clear()

    def set_proxy(self, url: str) -> None:
        """Send the next requests through the HTTP(S) proxy ``url``; ``""``: directly."""
        proxies = {"http": url, "https": url} if url else {}
        for session in (self.session, self._spec_session):
            session.proxies = dict(proxies)

    def blob_path(self, digest: str) -> str:
        if ":" not in digest:
            digest = "sha256:" + digest
        return f"/v2/{self.repo}/blobs/{digest}"

    def _bundle(self, files: Sequence[str]) -> str:
        if len(files) == 1:
            return files[0]
        fd, path = tempfile.mkstemp(prefix="nydus-ca-", suffix=".pem")
        with os.fdopen(fd, "wb") as out:
            for name in files:
                try:
                    with open(name, "rb") as f:
                        out.write(f.read() + b"\n")
                except OSError as exc:
                    raise ConfigError(f"registry: ca_cert_files: {name}: {exc}") from exc
        self._ca_bundle = path
        return path

    # -- auth -----------------------------------------------------------------------------------
    def _scope(self, method: str) -> str:
        actions = "pull" if method in ("GET", "HEAD") else "pull,push"
        return f"repository:{self.repo}:{actions}"

    def _authorization(self, scope: str, *, force: bool = False) -> str | None:
        with self._lock:
            challenge = self._challenge
            if challenge is None:
                if self.registry_token:
                    return "Bearer " + self.registry_token
                return None
            kind, params = challenge
            if kind == "basic":
                return self.credentials.basic() if self.credentials else None
            if kind != "bearer":
                raise AuthError(f"registry {self.host}: unsupported auth scheme {kind!r}")
            cached = self._tokens.get(scope)
            if cached and not force and cached[1] - time.monotonic() > TOKEN_REFRESH_MARGIN:
                return "Bearer " + cached[0]
            if self.registry_token and not params.get("realm"):
                return "Bearer " + self.registry_token
            token, lifetime = self._fetch_token(params, scope)
            self._tokens[scope] = (token, time.monotonic() + lifetime)
            return "Bearer " + token

    def _fetch_token(self, params: dict[str, str], scope: str) -> tuple[str, float]:
        realm = params.get("realm")
        if not realm:
            raise AuthError(f"registry {self.host}: Bearer challenge without realm")
        query = {"service": params.get("service", "")} if params.get("service") else {}
        scopes = [scope]
        if params.get("scope") and params["scope"] != scope:
            scopes.append(params["scope"])
        self.token_requests += 1
        try:
            if self.credentials.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": self.credentials.identity_token,
                        "client_id": "pynydus", "scope": " ".join(scopes), **query}
                resp = self.session.post(realm, data=form, timeout=self.timeout)
            else:
                headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
                q = list(query.items()) + [("scope", s) for s in scopes]
                resp = self.session.get(realm, params=q, headers=headers, timeout=self.timeout)
        except _TRANSPORT_ERRORS as exc:
            raise RegistryUnavailable(f"token endpoint {realm}: {transport_reason(exc)}") from exc
        if resp.status_code in (401, 403):
            raise AuthError(f"token endpoint {realm}: HTTP {resp.status_code} for scope {scope}")
        if resp.status_code >= 500:
            raise RegistryUnavailable(f"token endpoint {realm}: HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise AuthError(f"token endpoint {realm}: HTTP {resp.status_code}")
        try:
            doc = resp.json()
        except ValueError as exc:
            raise AuthError(f"token endpoint {realm}: response is not JSON") from exc
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise AuthError(f"token endpoint {realm}: no token in response")
        lifetime = float(doc.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        return token, lifetime

    # -- requests -------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                data: bytes | None = None, stream: bool = False, params: Mapping[str, str] | None = None,
                timeout: tuple[float, float] | None = None, scope: str | None = None) -> requests.Response:
        """Send ``method path`` with auth; follows redirects (dropping auth off-host)."""
        method = method.upper()
        url = path if "://" in path else self.base_url + path
        scope = scope or self._scope(method)
        for auth_attempt in range(2):
            auth = self._authorization(scope, force=auth_attempt > 0)
            resp = self._send_following(method, url, headers, data, stream, params, timeout, auth)
            if resp.status_code != 401 or auth_attempt == 1:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            if not challenge:
                return resp
            parsed = parse_www_authenticate(challenge)
            with self._lock:
                self._challenge = parsed
                self._tokens.pop(scope, None)
            if parsed[0] == "basic" and not self.credentials:
                raise AuthError(f"registry {self.host}: Basic auth required and no credentials configured")
        return resp  # pragma: no cover

    def _send_following(self, method, url, headers, data, stream, params, timeout, auth) -> requests.Response:
        origin = self.host  # Authorization goes to the registry host only
        hdrs = dict(self.headers)
        hdrs.update(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            send = dict(hdrs)
            if auth and urllib.parse.urlsplit(url).netloc == origin:
                send["Authorization"] = auth
            try:
                session = self.session if speculation.pause is None else self._spec_session
                resp = session.request(method, url, headers=send, data=data, stream=stream, params=params,
                                       timeout=timeout or self.timeout, allow_redirects=False)
            except requests.exceptions.SSLError as exc:  # not worth retrying: a config problem
                raise RegistryError(f"{method} {url}: TLS: {transport_reason(exc)}") from exc
            except _TRANSPORT_ERRORS as exc:
                raise RegistryUnavailable(f"{method} {url}: {transport_reason(exc)}") from exc
            if resp.status_code not in (301, 302, 303, 307, 308) or "Location" not in resp.headers:
                return resp
            url = urllib.parse.urljoin(url, resp.headers["Location"])
            params = None
            resp.close()
            if resp.status_code == 303:
                method, data = "GET", None
        raise RegistryError(f"{method} {url}: more than {MAX_REDIRECTS} redirects")

    def ping(self) -> None:
        """Raise unless ``GET /v2/`` gets an HTTP answer (any status: 401 still means reachable)."""
        url = self.base_url + "/v2/"
        try:
            self.session.get(url, headers=self.headers, timeout=self.timeout, allow_redirects=False).close()
        except requests.exceptions.SSLError as exc:
            raise RegistryError(f"GET {url}: TLS: {transport_reason(exc)}") from exc
        except _TRANSPORT_ERRORS as exc:
            raise RegistryUnavailable(f"GET {url}: {transport_reason(exc)}") from exc

    def warm(self) -> None:
        """Do now what the first blob read would do first: connect (TCP, TLS; the connection
        stays in the pool) and, when ``/v2/`` asks for auth, take the challenge and fetch this
        repository's pull token (cached as reads use it). Raises like :meth:`request`."""
        self.request("GET", "/v2/", scope=self._scope("GET")).close()

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def check(self, resp: requests.Response, what: str) -> requests.Response:
        """Raise the precise :mod:`storage.errors` type for a non-2xx response."""
        code = resp.status_code
        if 200 <= code < 300:
            return resp
        resp.close()
        msg = f"registry {self.host}: {what}: HTTP {code}"
        if code == 404:
            raise BlobNotFound(msg)
        if code in (401, 403):
            raise AuthError(msg)
        if code == 416:
            raise BlobRangeError(msg)
        if code >= 500 or code == 429:
            raise RegistryUnavailable(msg)
        raise RegistryError(msg)

    def read_blob_range(self, blob_id: str, offset: int, size: int) -> bytes:
        """``size`` bytes of blob ``blob_id`` at ``offset`` (one attempt; may be short).

        A redirect to another host (blob storage) is remembered per blob and used directly
        next time; when it stops working (expired: 401/403/404/410) the registry is asked again.
        """
        headers = {"Range": f"bytes={offset}-{offset + size - 1}", "Accept-Encoding": "identity"}
        cached = self._redirects.get(blob_id)
        resp = None
        if cached:
            resp = self.request("GET", cached, headers=headers, stream=True)
            if resp.status_code in (401, 403, 404, 410):
                resp.close()
                self._redirects.pop(blob_id, None)
                resp = None
        if resp is None:
            resp = self.request("GET", self.blob_path(blob_id), headers=headers, stream=True)
            final = urllib.parse.urlsplit(resp.url)
            if 200 <= resp.status_code < 300 and final.netloc != self.host:
                self._redirects[blob_id] = resp.url
        resp = self.check(resp, f"blob {blob_id} range {offset}+{size}")
        try:
            body = read_body(resp)
        finally:
            resp.close()
        if resp.status_code == 200:  # range ignored: whole blob
            body = body[offset : offset + size]
        return body

    def blob_size(self, blob_id: str) -> int:
        resp = self.check(self.request("HEAD", self.blob_path(blob_id)), f"blob {blob_id} size")
        length = resp.headers.get("Content-Length")
        if length is None:
            resp = self.check(self.request("GET", self.blob_path(blob_id), headers={"Range": "bytes=0-0"},
                                           stream=True), f"blob {blob_id} size")
            resp.close()
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            if not total.isdigit():
                raise RegistryError(f"registry {self.host}: blob {blob_id}: no size in response")
            return int(total)
        return int(length)

    def close(self) -> None:
        self.session.close()
        self._spec_session.close()
        if self._ca_bundle:
            try:
                os.unlink(self._ca_bundle)
            except OSError:
                pass
            self._ca_bundle = None


#: piece size of speculative transfers (between two checks whether demand reads wait)
SPECULATIVE_PIECE = 64 << 10
#: receive buffer of speculative connections (the kernel doubles it): bounds what a paused
#: transfer keeps taking from the link; 128 KiB per RTT is still 12 MB/s per stream at 10 ms
SPECULATIVE_RCVBUF = 64 << 10


class _SmallWindowAdapter(requests.adapters.HTTPAdapter):
    """Connections with ``SO_RCVBUF`` = ``SPECULATIVE_RCVBUF`` (see ``RegistryClient``)."""

    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        import socket

        from urllib3.connection import HTTPConnection

        kwargs["socket_options"] = [*HTTPConnection.default_socket_options,
                                    (socket.SOL_SOCKET, socket.SO_RCVBUF, SPECULATIVE_RCVBUF)]
        super().init_poolmanager(*args, **kwargs)


def read_body(resp: requests.Response) -> bytes:
    """The whole body of a streamed response; a broken/short transfer is a transient error.

    In a speculative (prefetch) thread the body is read in ``SPECULATIVE_PIECE`` pieces with a
    :func:`~storage.backend.base.yield_to_demand` before each, so demand reads get the link.
    """
    try:
        if speculation.pause is None:
            data = resp.raw.read(decode_content=False)  # blob bytes as stored (identity requested)
        else:
            parts = []
            while True:
                yield_to_demand()
                piece = resp.raw.read(SPECULATIVE_PIECE, decode_content=False)
                if not piece:
                    break
                parts.append(piece)
            data = b"".join(parts)
    except _TRANSPORT_ERRORS as exc:
        raise RegistryUnavailable(f"GET {resp.url}: body: {transport_reason(exc)}") from exc
    expected = resp.headers.get("Content-Length")
    if expected is not None and expected.isdigit() and len(data) != int(expected):
        raise RegistryUnavailable(f"GET {resp.url}: body truncated: {len(data)} of {expected} bytes")
    return data


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """nydusd ``proxy``: an HTTP proxy (e.g. a P2P agent) tried before the registry."""

    url: str = ""
    fallback: bool = True  #: fall back to the registry when the proxy fails
    ping_url: str = ""  #: health check URL (200-399 = healthy); empty = retry after check_interval
    check_interval: float = 5.0  #: seconds an unhealthy proxy is skipped
    use_http: bool = False  #: talk plain HTTP through the proxy


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """nydusd ``mirrors[]`` entry, tried in order before the origin registry."""

    host: str
    headers: Mapping[str, str] = field(default_factory=dict)
    ping_url: str = ""
    health_check_interval: float = 5.0
    auth_through: bool = False  #: send the registry credentials to this mirror


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """nydusd ``device.backend.config`` for ``type: registry``; defaults are nydusd's."""

    host: str
    repo: str
    scheme: str = "https"
    auth: str = ""  #: base64 ``user:password``
    registry_token: str = ""  #: a static bearer token
    skip_verify: bool = False
    ca_cert_files: tuple[str, ...] = ()
    timeout: float = 5.0
    connect_timeout: float = 5.0
    retry_limit: int = DEFAULT_RETRY_LIMIT
    proxy: ProxyConfig | None = None
    mirrors: tuple[MirrorConfig, ...] = ()
    docker_config: str | None = None  #: docker config.json path; None = the default locations
    use_docker_config: bool = True  #: look up credentials in docker config.json when auth is empty

    def credentials(self) -> Credentials:
        if self.auth:
            return Credentials.from_auth(self.auth)
        if self.use_docker_config:
            found = docker_config_credentials(split_host(self.host, self.scheme)[1], self.docker_config)
            if found:
                return found
        return Credentials()


class _Endpoint:
    """A proxy or mirror with a health state."""

    def __init__(self, name: str, client: RegistryClient, ping_url: str, check_interval: float) -> None:
        self.name = name
        self.client = client
        self.ping_url = ping_url
        self.check_interval = check_interval
        self._failed_at: float | None = None
        self._lock = threading.Lock()

    def usable(self) -> bool:
        with self._lock:
            if self._failed_at is None:
                return True
            if time.monotonic() - self._failed_at < self.check_interval:
                return False
        if self.ping_url:
            try:
                ok = self.client.session.get(self.ping_url, timeout=self.client.timeout).status_code < 400
            except _TRANSPORT_ERRORS:
                ok = False
            with self._lock:
                self._failed_at = None if ok else time.monotonic()
            return ok
        return True

    def mark_failed(self) -> None:
        with self._lock:
            self._failed_at = time.monotonic()

    def mark_ok(self) -> None:
        with self._lock:
            self._failed_at = None


def runtime_credentials(auth: str) -> Credentials:
    """The credentials of a ``registry_auth`` value handed over at run time (nydusd's
    ``PUT /api/v1/config``): docker's base64 ``user:password`` (or an identity token); ``""`` is
    anonymous. :class:`ConfigError` for anything else."""
    if not auth:
        return Credentials()
    try:
        creds = Credentials.from_auth(auth)
    except ConfigError as exc:
        raise ConfigError(f"registry_auth: {exc}") from exc
    if not (creds.username or creds.identity_token):
        raise ConfigError("registry_auth: expected base64 of user:password")
    return creds


def check_proxy_url(url: str) -> None:
    """:class:`ConfigError` unless ``url`` is ``""`` (no proxy) or an http:// or https:// URL."""
    if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"proxy_url: expected an http:// or https:// URL, got {url[:128]!r}")


class RegistryBackend(BlobBackend):
    """Blobs of one repository; proxy → mirrors → origin, each request."""

    def __init__(self, config: RegistryConfig, *, metrics: StorageMetrics | None = None) -> None:
        super().__init__(retry_limit=config.retry_limit, metrics=metrics)
        if not config.repo:
            raise ConfigError("registry: 'repo' is required")
        self.config = config
        creds = config.credentials()
        common = dict(skip_verify=config.skip_verify, ca_cert_files=config.ca_cert_files,
                      timeout=config.timeout, connect_timeout=config.connect_timeout)
        self.client = RegistryClient(config.host, config.repo, scheme=config.scheme, credentials=creds,
                                     registry_token=config.registry_token, **common)
        self.endpoints: list[tuple[_Endpoint, bool]] = []  # (endpoint, may fall back)
        self._auth_clients = [self.client]  #: the clients that send the registry's credentials
        if config.proxy and config.proxy.url:
            p = config.proxy
            scheme = "http" if p.use_http else config.scheme
            proxy_client = RegistryClient(config.host, config.repo, scheme=scheme, credentials=creds,
                                          registry_token=config.registry_token, proxy_url=p.url, **common)
            self.endpoints.append((_Endpoint(f"proxy {p.url}", proxy_client, p.ping_url, p.check_interval),
                                   p.fallback))
            self._auth_clients.append(proxy_client)
        for m in config.mirrors:
            mirror_client = RegistryClient(m.host, config.repo, scheme=config.scheme,
                                           credentials=creds if m.auth_through else None,
                                           headers=m.headers, **common)
            self.endpoints.append((_Endpoint(f"mirror {m.host}", mirror_client, m.ping_url,
                                             m.health_check_interval), True))
            if m.auth_through:
                self._auth_clients.append(mirror_client)

    def _new_reader(self, blob_id: str) -> BlobReader:
        return _RegistryReader(self, blob_id)

    def update_auth(self, auth: str) -> None:
        """New credentials for the origin, the proxy and the mirrors that pass auth through
        (``auth_through``); ``""``: anonymous. :class:`ConfigError` (:func:`runtime_credentials`)
        if ``auth`` is not base64 of ``user:password``, and then nothing changes."""
        creds = runtime_credentials(auth)
        for client in self._auth_clients:
            client.set_credentials(creds)
        log.info("registry %s/%s: credentials replaced (%s)", self.config.host, self.config.repo,
                 "anonymous" if not auth else "user " + (creds.username or "<identity token>"))

    def update_proxy(self, url: str) -> None:
        """The origin's requests go through the HTTP(S) proxy ``url`` (``""``: directly);
        :class:`ConfigError` (:func:`check_proxy_url`) for another kind of URL."""
        check_proxy_url(url)
        self.client.set_proxy(url)

    def _call(self, what: str, fn, *, after: str = "", served=None):
        """``fn(client)`` through the first healthy proxy/mirror that answers, else the origin.

        ``after``: skip the sources up to and including the one of that name (a re-read after a
        digest mismatch goes to the next mirror; the origin answers when no source follows).
        ``served(name)`` is told which source answered."""
        skipping = bool(after) and any(ep.name == after for ep, _ in self.endpoints)
        for ep, fallback in self.endpoints:
            if skipping:
                skipping = ep.name != after
                continue
            if not ep.usable():
                continue
            try:
                result = fn(ep.client)
            except (TransientBackendError, RegistryError) as exc:
                if isinstance(exc, BlobNotFound) or not isinstance(exc, TransientBackendError):
                    log.info("%s: %s: %s; trying next", ep.name, what, exc)
                else:
                    ep.mark_failed()
                    log.warning("%s unhealthy: %s: %s", ep.name, what, exc)
                if not fallback:
                    raise
                continue
            ep.mark_ok()
            if served is not None:
                served(ep.name)
            return result
        result = fn(self.client)
        if served is not None:
            served("origin")
        return result

    def warm(self) -> None:
        """Warm (:meth:`RegistryClient.warm`) the endpoint the next read tries first: the first
        usable proxy/mirror, else the origin. A failure leaves every health state alone."""
        client = next((ep.client for ep, _ in self.endpoints if ep.usable()), self.client)
        client.warm()

    def ping(self, probe: Callable[[RegistryClient], None] | None = None) -> str:
        """The base URL of the first endpoint that answers, in read order (proxy, healthy mirrors,
        origin) with the same failover as reads; the origin's error when none does.

        ``probe(client)`` replaces :meth:`RegistryClient.ping` (tests)."""
        check = probe or RegistryClient.ping

        def attempt(client: RegistryClient) -> str:
            check(client)
            return client.base_url

        return self._call("ping", attempt)

    def close(self) -> None:
        self.client.close()
        for ep, _ in self.endpoints:
            ep.client.close()


class _RegistryReader(BlobReader):
    def __init__(self, backend: RegistryBackend, blob_id: str) -> None:
        super().__init__(blob_id, retry_limit=backend.retry_limit, metrics=backend.metrics)
        self._backend = backend

    def _blob_size(self) -> int:
        return self._backend._call(f"size of {self.blob_id}", lambda c: c.blob_size(self.blob_id))

    def _read_once(self, offset: int, size: int) -> bytes:
        local = self._local
        after = self.reread_after or ""
        return self._backend._call(f"read {self.blob_id} {offset}+{size}",
                                   lambda c: c.read_blob_range(self.blob_id, offset, size),
                                   after=after, served=lambda name: setattr(local, "source", name))


__all__ = [
    "MirrorConfig", "ProxyConfig", "RegistryBackend", "RegistryClient", "RegistryConfig", "parse_www_authenticate",
]
