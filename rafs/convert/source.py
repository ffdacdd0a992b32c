"""Image sources: a registry, an OCI image layout directory, a ``docker save`` archive.

Every source answers the same three questions: the root document (an index or a manifest),
a small document by digest (manifest, config), and a blob stream by digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from abc import ABC, abstractmethod
from typing import Any, BinaryIO

from .distribution import client_for
from .errors import SourceError
from .manifest import (MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX,
                       MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_LAYER_ZSTD,
                       MEDIA_TYPE_OCI_MANIFEST, canonical_json, parse_json, sha256_digest)
from .reference import SourceSpec, parse_reference, parse_source

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_DOCUMENT_SIZE = 8 << 20


class ImageSource(ABC):
    """Read access to one source image."""

    name: str

    @abstractmethod
    def root(self) -> tuple[bytes, str]:
        """The top document (index or manifest) and its media type."""

    @abstractmethod
    def open_blob(self, digest: str) -> BinaryIO:
        """A readable stream of the blob's bytes (caller closes it)."""

    def document(self, digest: str) -> bytes:
        """A small document (manifest, config) by digest, verified."""
        with self.open_blob(digest) as fh:
            data = fh.read(MAX_DOCUMENT_SIZE + 1)
        if len(data) > MAX_DOCUMENT_SIZE:
            raise SourceError(f"document {digest} is larger than {MAX_DOCUMENT_SIZE} bytes")
        if sha256_digest(data) != digest:
            raise SourceError(f"document {digest} does not match its digest")
        return data

    def close(self) -> None:
        """Release what the source holds."""


class RegistrySource(ImageSource):
    """An image in a registry, pulled through :class:`~.distribution.Distribution`."""

    def __init__(self, reference: str, *, insecure: bool = False) -> None:
        self.ref = parse_reference(reference)
        self.name = str(self.ref)
        self.client = client_for(self.ref, insecure=insecure)

    def root(self) -> tuple[bytes, str]:
        fetched = self.client.get_manifest(self.ref)
        return fetched.data, fetched.media_type

    def document(self, digest: str) -> bytes:
        # Manifests are served under /manifests/, configs under /blobs/: try both.
        try:
            fetched = self.client.get_manifest(self.ref.with_digest(digest))
            return fetched.data
        except SourceError:
            return super().document(digest)

    def open_blob(self, digest: str) -> BinaryIO:
        resp = self.client.open_blob(self.ref.repository, digest)
        raw = resp.raw
        raw.decode_content = False
        return _ResponseStream(resp)


class _ResponseStream:
    """A ``requests`` streaming response as a closeable binary stream."""

    def __init__(self, resp: Any) -> None:
        self._resp = resp

    def read(self, n: int = -1) -> bytes:
        return self._resp.raw.read(None if n < 0 else n)

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> "_ResponseStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OciLayoutSource(ImageSource):
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/``)."""

    def __init__(self, path: str, tag: str | None = None) -> None:
        self.path, self.tag = path, tag
        self.name = f"oci:{path}" + (f":{tag}" if tag else "")
        if not os.path.isfile(os.path.join(path, "index.json")):
            raise SourceError(f"{path} is not an OCI image layout (no index.json)")

    def _blob_path(self, digest: str) -> str:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            raise SourceError(f"invalid digest {digest!r}")
        return os.path.join(self.path, "blobs", algo, hexdigest)

    def root(self) -> tuple[bytes, str]:
        with open(os.path.join(self.path, "index.json"), "rb") as fh:
            index = parse_json(fh.read(), "index.json")
        entries = index.get("manifests") or []
        if self.tag is not None:
            entries = [m for m in entries if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == self.tag]
            if not entries:
                raise SourceError(f"{self.path}: no image tagged {self.tag!r} in index.json")
        if len(entries) == 1:
            entry = entries[0]
            return self.document(entry["digest"]), entry.get("mediaType", MEDIA_TYPE_OCI_MANIFEST)
        if not entries:
            raise SourceError(f"{self.path}: index.json lists no images")
        doc = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": entries}
        return canonical_json(doc), MEDIA_TYPE_OCI_INDEX

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self._blob_path(digest), "rb")
        except OSError as exc:
            raise SourceError(f"{self.name}: blob {digest}: {exc}") from exc


def _sniff_layer_type(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return MEDIA_TYPE_OCI_LAYER_GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return MEDIA_TYPE_OCI_LAYER_ZSTD
    return MEDIA_TYPE_OCI_LAYER


class DockerArchiveSource(ImageSource):
    """A ``docker save`` tar: ``manifest.json`` names the config and layer members."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"docker-archive:{path}"
        try:
            self._tar = tarfile.open(path, "r:")
        except (OSError, tarfile.TarError) as exc:
            raise SourceError(f"{path}: not a docker archive: {exc}") from exc
        self._members: dict[str, str] = {}   # digest -> member name
        try:
            manifest = json.load(self._extract("manifest.json"))
        except ValueError as exc:
            raise SourceError(f"{path}: manifest.json is not JSON") from exc
        if not isinstance(manifest, list) or len(manifest) != 1:
            raise SourceError(f"{path}: manifest.json must describe exactly one image")
        entry = manifest[0]
        config = self._describe(entry["Config"])
        config["mediaType"] = MEDIA_TYPE_OCI_CONFIG
        layers = []
        for member in entry.get("Layers", []):
            desc = self._describe(member)
            with self._extract(member) as fh:
                desc["mediaType"] = _sniff_layer_type(fh.read(4))
            layers.append(desc)
        self._manifest = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                          "config": config, "layers": layers}

    def _extract(self, member: str) -> BinaryIO:
        try:
            fh = self._tar.extractfile(member)
        except KeyError as exc:
            raise SourceError(f"{self.path}: missing member {member}") from exc
        if fh is None:
            raise SourceError(f"{self.path}: member {member} is not a file")
        return fh

    def _describe(self, member: str) -> dict[str, Any]:
        h = hashlib.sha256()
        size = 0
        with self._extract(member) as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        digest = "sha256:" + h.hexdigest()
        self._members[digest] = member
        return {"digest": digest, "size": size}

    def root(self) -> tuple[bytes, str]:
        return canonical_json(self._manifest), MEDIA_TYPE_OCI_MANIFEST

    def open_blob(self, digest: str) -> BinaryIO:
        member = self._members.get(digest)
        if member is None:
            raise SourceError(f"{self.name}: no blob {digest}")
        return self._extract(member)

    def close(self) -> None:
        self._tar.close()


def open_source(text: str | SourceSpec, *, insecure: bool = False) -> ImageSource:
    """Open ``oci:<dir>[:tag]``, ``docker-archive:<file>`` or a registry reference."""
    spec = parse_source(text) if isinstance(text, str) else text
    if spec.kind == "oci":
        return OciLayoutSource(spec.location, spec.tag)
    if spec.kind == "docker-archive":
        return DockerArchiveSource(spec.location)
    return RegistrySource(spec.location, insecure=insecure)


__all__ = ["ImageSource", "RegistrySource", "OciLayoutSource", "DockerArchiveSource", "open_source"]
