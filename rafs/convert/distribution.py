"""The OCI distribution-API calls the converter needs: manifests (GET/PUT), blobs (GET/HEAD),
uploads (monolithic ``POST`` + ``PUT``, or chunked ``POST`` + ``PATCH``… + ``PUT``).

Authentication and transport are :class:`storage.backend.registry.RegistryClient`'s (anonymous,
Basic, Bearer tokens); credentials from :mod:`storage.backend.credentials` (docker ``config.json``
and its credential helpers); one client per repository. With
``insecure`` HTTPS is tried without certificate checks, then plain HTTP.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urljoin

import requests

from storage.backend.credentials import docker_config_credentials
from storage.backend.registry import RegistryClient
from storage.errors import StorageError

from .errors import PushError, SourceError
from .reference import ImageReference

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Fetched:
    """A manifest as the registry returned it."""

    data: bytes
    media_type: str
    digest: str


class Distribution:
    """A session with one registry host (scheme chosen once: https, or http when insecure)."""

    def __init__(self, host: str, *, insecure: bool = False) -> None:
        self.host = host
        self.insecure = insecure
        self._credentials = docker_config_credentials(host)
        self._clients: dict[str, RegistryClient] = {}
        self._scheme: str | None = None
        self._lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------
    def _new_client(self, repository: str, scheme: str) -> RegistryClient:
        return RegistryClient(self.host, repository, scheme=scheme, credentials=self._credentials,
                              skip_verify=self.insecure, timeout=TIMEOUT, connect_timeout=10.0)

    def client(self, repository: str) -> RegistryClient:
        """The authenticated client for ``repository`` on this host."""
        with self._lock:
            if self._scheme is None:
                self._scheme = self._probe(repository)
            if repository not in self._clients:
                self._clients[repository] = self._new_client(repository, self._scheme)
            return self._clients[repository]

    def _probe(self, repository: str) -> str:
        schemes = ["https", "http"] if self.insecure else ["https"]
        last: Exception | None = None
        for scheme in schemes:
            probe = self._new_client(repository, scheme)
            try:
                probe.request("GET", "/v2/").close()
                return scheme
            except StorageError as exc:
                last = exc
            finally:
                probe.close()
        raise SourceError(f"registry {self.host} unreachable: {last}") from last

    def request(self, repository: str, method: str, path: str, error: type[Exception],
                **kw: object) -> requests.Response:
        """``method path`` on ``repository``'s client; a storage failure is raised as ``error``."""
        try:
            return self.client(repository).request(method, path, **kw)  # type: ignore[arg-type]
        except StorageError as exc:
            raise error(f"{method} {self.host}/{repository}: {exc}") from exc

    # -- pull -----------------------------------------------------------------------------
    def get_manifest(self, ref: ImageReference) -> Fetched:
        resp = self.request(ref.repository, "GET", f"/v2/{ref.repository}/manifests/{ref.reference}",
                            SourceError, headers={"Accept": MANIFEST_ACCEPT})
        if resp.status_code != 200:
            resp.close()
            raise SourceError(f"manifest {ref}: HTTP {resp.status_code}")
        data = resp.content
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.digest and ref.digest != digest:
            raise SourceError(f"manifest {ref}: content digest is {digest}")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            declared = json.loads(data).get("mediaType")
        except (ValueError, AttributeError) as exc:
            raise SourceError(f"manifest {ref} is not a JSON object") from exc
        return Fetched(data, declared or media_type, digest)

    def open_blob(self, repository: str, digest: str) -> requests.Response:
        """A streaming response for the blob (caller closes it)."""
        resp = self.request(repository, "GET", f"/v2/{repository}/blobs/{digest}", SourceError, stream=True)
        if resp.status_code != 200:
            resp.close()
            raise SourceError(f"blob {repository}@{digest}: HTTP {resp.status_code}")
        return resp

    def blob_size(self, repository: str, digest: str) -> int | None:
        """``HEAD`` the blob: its size, or None when the registry does not have it."""
        resp = self.request(repository, "HEAD", f"/v2/{repository}/blobs/{digest}", PushError,
                            scope=f"repository:{repository}:pull,push")
        resp.close()
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
        resp = self.request(repository, "POST", f"/v2/{repository}/blobs/uploads/", PushError,
                            headers={"Content-Length": "0"})
        resp.close()
        if resp.status_code != 202 or "Location" not in resp.headers:
            raise PushError(f"start upload to {repository}: HTTP {resp.status_code}")
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
                resp = self.request(repository, "PATCH", location, PushError, headers=headers, data=data)
                resp.close()
                if resp.status_code != 202:
                    raise PushError(f"upload {digest} chunk at {offset}: HTTP {resp.status_code}")
                location = self._absolute(resp.headers.get("Location", location))
                offset += len(data)
                if progress:
                    progress(len(data))
            resp = self.request(repository, "PUT", _with_digest(location, digest), PushError,
                                headers={"Content-Length": "0"})
        else:
            body = _ProgressReader(fh, size, progress)
            resp = self.request(repository, "PUT", _with_digest(location, digest), PushError,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(size)}, data=body)
        resp.close()
        if resp.status_code != 201:
            raise PushError(f"finish upload {digest} to {repository}: HTTP {resp.status_code}")

    def put_manifest(self, ref: ImageReference, data: bytes, media_type: str) -> str:
        """Upload a manifest or index under the reference's tag (or digest); return its digest."""
        resp = self.request(ref.repository, "PUT", f"/v2/{ref.repository}/manifests/{ref.reference}",
                            PushError, headers={"Content-Type": media_type}, data=data)
        resp.close()
        if resp.status_code not in (200, 201):
            raise PushError(f"put manifest {ref}: HTTP {resp.status_code}")
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def _absolute(self, location: str) -> str:
        if "://" in location:
            return location
        return urljoin(f"{self._scheme or 'https'}://{self.host}/", location)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


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

    def tell(self) -> int:
        return self._fh.tell() - self._start

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
