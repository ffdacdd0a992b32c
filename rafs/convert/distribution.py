"""The OCI distribution-API calls the converter needs, over ``requests``.

This is a deliberately small client: manifests (GET/PUT), blobs (GET/HEAD), uploads
(monolithic ``POST`` + ``PUT`` or chunked ``POST`` + ``PATCH``… + ``PUT``). Authentication
covers anonymous access, Basic, and Bearer tokens (with docker ``config.json`` credentials).
It is the converter's own interface; when :mod:`storage.backend.registry` offers a
``RegistryClient`` session with the same abilities, :class:`Distribution` delegates to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urljoin

import requests

from .errors import PushError, SourceError
from .reference import ImageReference

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])

_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True, slots=True)
class Fetched:
    """A manifest as the registry returned it."""

    data: bytes
    media_type: str
    digest: str


def docker_credentials(host: str) -> tuple[str, str] | None:
    """Username/password for ``host`` from ``$DOCKER_CONFIG/config.json`` (``auths`` only)."""
    cfg_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    try:
        with open(os.path.join(cfg_dir, "config.json"), encoding="utf-8") as fh:
            auths = json.load(fh).get("auths", {})
    except (OSError, ValueError):
        return None
    for key in (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/"):
        entry = auths.get(key)
        if entry and entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
    return None


class Distribution:
    """A session with one registry host (scheme chosen once: https, or http when insecure)."""

    def __init__(self, host: str, *, insecure: bool = False,
                 credentials: tuple[str, str] | None = None, timeout: float = 60.0) -> None:
        self.host = host
        self.insecure = insecure
        self.timeout = timeout
        self._session = requests.Session()
        self._session.verify = not insecure
        self._credentials = credentials if credentials is not None else docker_credentials(host)
        self._tokens: dict[str, str] = {}
        self._scheme: str | None = None
        self._lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------
    def _base(self) -> str:
        with self._lock:
            if self._scheme is None:
                self._scheme = self._probe()
            return f"{self._scheme}://{self.host}"

    def _probe(self) -> str:
        schemes = ["https", "http"] if self.insecure else ["https"]
        last: Exception | None = None
        for scheme in schemes:
            try:
                self._session.get(f"{scheme}://{self.host}/v2/", timeout=self.timeout)
                return scheme
            except requests.RequestException as exc:
                last = exc
        raise SourceError(f"registry {self.host} unreachable: {last}") from last

    def _token(self, challenge: str, scope: str) -> str | None:
        params = dict(_CHALLENGE_RE.findall(challenge))
        realm = params.get("realm")
        if not realm:
            return None
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        auth = self._credentials
        resp = self._session.get(realm, params=query, auth=auth, timeout=self.timeout)
        if resp.status_code != 200:
            raise SourceError(f"token request to {realm} failed: HTTP {resp.status_code}")
        body = resp.json()
        return body.get("token") or body.get("access_token")

    def request(self, method: str, url: str, *, scope: str, **kw: object) -> requests.Response:
        """One authenticated request; on 401 answer the challenge once and retry."""
        if not url.startswith("http"):
            url = self._base() + url
        headers = dict(kw.pop("headers", {}) or {})  # type: ignore[arg-type]
        token = self._tokens.get(scope)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        kw.setdefault("timeout", self.timeout)
        try:
            resp = self._session.request(method, url, headers=headers, **kw)  # type: ignore[arg-type]
            if resp.status_code == 401:
                challenge = resp.headers.get("WWW-Authenticate", "")
                if challenge.lower().startswith("bearer"):
                    token = self._token(challenge, scope)
                    if token:
                        self._tokens[scope] = token
                        headers["Authorization"] = f"Bearer {token}"
                elif challenge.lower().startswith("basic") and self._credentials:
                    user, password = self._credentials
                    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
                    headers["Authorization"] = f"Basic {raw}"
                if "Authorization" in headers:
                    data = kw.get("data")
                    if hasattr(data, "seek"):
                        data.seek(0)  # type: ignore[union-attr]
                    resp = self._session.request(method, url, headers=headers, **kw)  # type: ignore[arg-type]
        except requests.RequestException as exc:
            raise SourceError(f"{method} {url}: {exc}") from exc
        return resp

    # -- pull -----------------------------------------------------------------------------
    def get_manifest(self, ref: ImageReference) -> Fetched:
        scope = f"repository:{ref.repository}:pull"
        resp = self.request("GET", f"/v2/{ref.repository}/manifests/{ref.reference}",
                            scope=scope, headers={"Accept": MANIFEST_ACCEPT})
        if resp.status_code != 200:
            raise SourceError(f"manifest {ref}: HTTP {resp.status_code} {resp.text[:200]}")
        data = resp.content
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.digest and ref.digest != digest:
            raise SourceError(f"manifest {ref}: content digest is {digest}")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            declared = json.loads(data).get("mediaType")
        except ValueError as exc:
            raise SourceError(f"manifest {ref} is not JSON") from exc
        return Fetched(data, declared or media_type, digest)

    def open_blob(self, repository: str, digest: str) -> requests.Response:
        """A streaming response for the blob (caller closes it)."""
        resp = self.request("GET", f"/v2/{repository}/blobs/{digest}",
                            scope=f"repository:{repository}:pull", stream=True)
        if resp.status_code != 200:
            resp.close()
            raise SourceError(f"blob {repository}@{digest}: HTTP {resp.status_code}")
        return resp

    def blob_size(self, repository: str, digest: str) -> int | None:
        """``HEAD`` the blob: its size, or None when the registry does not have it."""
        resp = self.request("HEAD", f"/v2/{repository}/blobs/{digest}",
                            scope=f"repository:{repository}:pull,push", allow_redirects=True)
        if resp.status_code == 200:
            return int(resp.headers.get("Content-Length", "0"))
        if resp.status_code == 404:
            return None
        raise PushError(f"HEAD blob {repository}@{digest}: HTTP {resp.status_code}")

    # -- push -----------------------------------------------------------------------------
    def push_blob(self, repository: str, digest: str, fh: BinaryIO, size: int, *,
                  chunk_size: int = 0, progress: Callable[[int], None] | None = None) -> None:
        """Upload ``size`` bytes from ``fh`` as blob ``digest``.

        ``chunk_size == 0`` uploads monolithically (``POST`` then one ``PUT`` with the body);
        otherwise ``PATCH`` requests of ``chunk_size`` bytes then a closing ``PUT``.
        """
        scope = f"repository:{repository}:pull,push"
        resp = self.request("POST", f"/v2/{repository}/blobs/uploads/", scope=scope,
                            headers={"Content-Length": "0"})
        if resp.status_code != 202 or "Location" not in resp.headers:
            raise PushError(f"start upload to {repository}: HTTP {resp.status_code} {resp.text[:200]}")
        location = self._absolute(resp.headers["Location"])
        if chunk_size > 0:
            offset = 0
            while offset < size:
                data = fh.read(min(chunk_size, size - offset))
                if not data:
                    raise PushError(f"upload {digest}: source ended at {offset} of {size} bytes")
                headers = {"Content-Type": "application/octet-stream",
                           "Content-Range": f"{offset}-{offset + len(data) - 1}",
                           "Content-Length": str(len(data))}
                resp = self.request("PATCH", location, scope=scope, headers=headers, data=data)
                if resp.status_code != 202:
                    raise PushError(f"upload {digest} chunk at {offset}: HTTP {resp.status_code}")
                location = self._absolute(resp.headers.get("Location", location))
                offset += len(data)
                if progress:
                    progress(len(data))
            resp = self.request("PUT", _with_digest(location, digest), scope=scope,
                                headers={"Content-Length": "0"})
        else:
            body = _ProgressReader(fh, size, progress)
            resp = self.request("PUT", _with_digest(location, digest), scope=scope,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(size)}, data=body)
        if resp.status_code != 201:
            raise PushError(f"finish upload {digest} to {repository}: HTTP {resp.status_code} "
                            f"{resp.text[:200]}")

    def put_manifest(self, ref: ImageReference, data: bytes, media_type: str) -> str:
        """Upload a manifest or index under the reference's tag (or digest); return its digest."""
        resp = self.request("PUT", f"/v2/{ref.repository}/manifests/{ref.reference}",
                            scope=f"repository:{ref.repository}:pull,push",
                            headers={"Content-Type": media_type}, data=data)
        if resp.status_code not in (200, 201):
            raise PushError(f"put manifest {ref}: HTTP {resp.status_code} {resp.text[:300]}")
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def _absolute(self, location: str) -> str:
        return location if location.startswith("http") else urljoin(self._base() + "/", location)

    def close(self) -> None:
        self._session.close()


def _with_digest(location: str, digest: str) -> str:
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


class _ProgressReader:
    """A file-like body for ``requests`` that reports bytes read and can be rewound."""

    def __init__(self, fh: BinaryIO, size: int, progress: Callable[[int], None] | None) -> None:
        self._fh, self._size, self._progress = fh, size, progress
        self._start = fh.tell()
        self.len = size

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n if n >= 0 else self._size)
        if data and self._progress:
            self._progress(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(self._start + offset, whence)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            data = self.read(1 << 20)
            if not data:
                return
            yield data


_CLIENTS: dict[tuple[str, bool], Distribution] = {}


def client_for(ref: ImageReference, *, insecure: bool) -> Distribution:
    """A shared :class:`Distribution` per (endpoint, insecure)."""
    key = (ref.endpoint, insecure)
    if key not in _CLIENTS:
        _CLIENTS[key] = Distribution(ref.endpoint, insecure=insecure)
    return _CLIENTS[key]
