"""Snapshot labels the nydus snapshotter reads (names as upstream ``pkg/label``)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Mapping

from snapshotter.errors import InvalidArgument

TARGET_SNAPSHOT_REF = "containerd.io/snapshot.ref"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
NYDUS_DATA_LAYER = "containerd.io/snapshot/nydus-blob"
NYDUS_META_LAYER = "containerd.io/snapshot/nydus-bootstrap"
NYDUS_REF_LAYER = "containerd.io/snapshot/nydus-ref"
PULL_USERNAME = "containerd.io/snapshot/pullusername"
PULL_SECRET = "containerd.io/snapshot/pullsecret"
#: labels holding secrets: never stored in the metastore, returned or logged (snapshotter.pull_credentials)
CREDENTIAL_LABELS = frozenset({PULL_USERNAME, PULL_SECRET})
OVERLAY_VOLATILE = "containerd.io/snapshot/overlay.volatile"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
#: set by this snapshotter on snapshots it committed itself for a remote layer
REMOTE = "containerd.io/snapshot/remote"

_TRUE = {"true", "1", "yes"}


def without_credentials(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` minus :data:`CREDENTIAL_LABELS`."""
    return {k: v for k, v in labels.items() if k not in CREDENTIAL_LABELS}


def _flag(labels: Mapping[str, str], key: str) -> bool:
    return labels.get(key, "").strip().lower() in _TRUE


def is_nydus_data_layer(labels: Mapping[str, str]) -> bool:
    return _flag(labels, NYDUS_DATA_LAYER)


def is_nydus_meta_layer(labels: Mapping[str, str]) -> bool:
    return _flag(labels, NYDUS_META_LAYER)


def target_ref(labels: Mapping[str, str]) -> str | None:
    """The name an extract snapshot is to be committed under (``snapshot.ref``), if any."""
    ref = labels.get(TARGET_SNAPSHOT_REF)
    return ref if ref else None


def image_ref(labels: Mapping[str, str]) -> str | None:
    return labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REFERENCE) or None


def layer_blob_id(labels: Mapping[str, str]) -> str | None:
    """The blob id (digest hex) of a layer from ``cri.layer-digest``; None when absent."""
    digest = labels.get(CRI_LAYER_DIGEST, "")
    if not digest:
        return None
    algo, sep, hexpart = digest.partition(":")
    if not sep or algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidArgument(f"label {CRI_LAYER_DIGEST}={digest!r} is not a sha256 digest")
    return hexpart


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed image reference: registry host, repository path, tag/digest."""

    host: str
    repo: str
    reference: str

    @property
    def backend_host(self) -> str:
        """The host nydusd talks to (docker.io → index.docker.io, as upstream)."""
        return "index.docker.io" if self.host == "docker.io" else self.host


def parse_image_ref(ref: str) -> ImageRef:
    """Split ``host[:port]/repo[:tag][@digest]`` (docker.io defaults, like containerd's reference)."""
    if not ref or any(c.isspace() for c in ref) or "\0" in ref:
        raise InvalidArgument(f"invalid image reference {ref!r}")
    name, at, digest = ref.partition("@")
    reference = digest if at else ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        reference = reference or tag
    reference = reference or "latest"
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host, repo = first, rest
    else:
        host, repo = "docker.io", name
    if host == "docker.io" and "/" not in repo:
        repo = "library/" + repo
    if not repo or repo.startswith("/") or repo.endswith("/") or "//" in repo:
        raise InvalidArgument(f"invalid image reference {ref!r}")
    return ImageRef(host=host, repo=repo, reference=reference)


def label_credentials(labels: Mapping[str, str]) -> str | None:
    """``base64(user:secret)`` from pullusername/pullsecret labels, or None."""
    user = labels.get(PULL_USERNAME)
    secret = labels.get(PULL_SECRET)
    if user is None and secret is None:
        return None
    if not secret:
        raise InvalidArgument(f"label {PULL_USERNAME} given without {PULL_SECRET}")
    return base64.b64encode(f"{user or ''}:{secret}".encode()).decode()
