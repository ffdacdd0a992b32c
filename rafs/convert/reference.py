"""Image references: ``[host[:port]/]repo[:tag][@sha256:...]`` and local source specs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidReference

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"

_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A registry image reference split into its parts."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def endpoint(self) -> str:
        """The host to talk to (Docker Hub's API lives on another name)."""
        return DOCKER_HUB_ENDPOINT if self.host == DEFAULT_REGISTRY else self.host

    @property
    def reference(self) -> str:
        """What goes into ``/v2/<repo>/manifests/<reference>``: digest, else tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> "ImageReference":
        return ImageReference(self.host, self.repository, tag, None)

    def with_digest(self, digest: str) -> "ImageReference":
        return ImageReference(self.host, self.repository, self.tag, digest)

    def __str__(self) -> str:
        out = f"{self.host}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> ImageReference:
    """Parse a docker-style reference; ``busybox`` means ``docker.io/library/busybox:latest``."""
    if not text or text != text.strip():
        raise InvalidReference(f"invalid image reference {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(f"invalid digest {digest!r} in reference {text!r}")
    host = DEFAULT_REGISTRY
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, rest = first, remainder
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid tag {tag!r} in reference {text!r}")
    if host == DEFAULT_REGISTRY and "/" not in rest:
        rest = f"library/{rest}"
    if not _REPO_RE.match(rest):
        raise InvalidReference(f"invalid repository {rest!r} in reference {text!r}")
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(host, rest, tag, digest)


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """Where a source image comes from: ``registry``, ``oci`` (layout dir) or ``docker-archive``."""

    kind: str
    location: str            # reference text, directory or archive path
    tag: str | None = None   # oci layout: the ``org.opencontainers.image.ref.name`` to pick


def parse_source(text: str) -> SourceSpec:
    """``oci:<dir>[:tag]``, ``docker-archive:<file>`` or a registry reference."""
    if text.startswith("oci:"):
        body = text[4:]
        if not body:
            raise InvalidReference("oci: source needs a layout directory")
        path, tag = body, None
        head, sep, tail = body.rpartition(":")
        if sep and head and "/" not in tail:
            path, tag = head, tail
        return SourceSpec("oci", path, tag)
    if text.startswith("docker-archive:"):
        body = text[len("docker-archive:"):]
        if not body:
            raise InvalidReference("docker-archive: source needs a file")
        return SourceSpec("docker-archive", body)
    parse_reference(text)
    return SourceSpec("registry", text)
