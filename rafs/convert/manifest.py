"""Media types, nydus annotations, and the pure manifest / config / index rewrite."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SourceError

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"

INDEX_TYPES = (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST)
LAYER_TYPES = (MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_LAYER_ZSTD,
               MEDIA_TYPE_DOCKER_LAYER, MEDIA_TYPE_DOCKER_LAYER_GZIP,
               "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
               "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")

ANNOTATION_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANNOTATION_NYDUS_REF_LAYER = "containerd.io/snapshot/nydus-ref"  # OCI-ref: the original layer digest
ANNOTATION_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
ANNOTATION_UNCOMPRESSED = "containerd.io/uncompressed"
ANNOTATION_NYDUS_SOURCE_DIGEST = "containerd.io/snapshot/nydus-source-digest"

HISTORY_CREATED_BY = "Nydus Converter"
HISTORY_COMMENT = "Nydus Bootstrap Layer"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Stable bytes for a JSON document we author (the digest depends on them)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor (only the fields the converter writes)."""

    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


def blob_descriptor(blob_id: str, size: int) -> Descriptor:
    """A nydus data-blob layer (the blob id is the sha256 of the blob file)."""
    return Descriptor(MEDIA_TYPE_NYDUS_BLOB, f"sha256:{blob_id}", size, ((ANNOTATION_NYDUS_BLOB, "true"),))


def ref_blob_descriptor(ref_digest: str, size: int, source_digest: str) -> Descriptor:
    """An OCI-ref (zran) image layer as upstream's converter writes it: the layer's "ref" blob
    (blob.meta with the ZRAN contexts + bootstrap + TOC), marked a nydus blob, with
    ``nydus-ref`` naming the original gzip layer that holds the data. Its diff_id in the config
    is the ref blob digest (upstream's ``containerd.io/uncompressed``, dropped from the manifest)."""
    return Descriptor(MEDIA_TYPE_NYDUS_BLOB, ref_digest, size,
                      ((ANNOTATION_NYDUS_BLOB, "true"), (ANNOTATION_NYDUS_REF_LAYER, source_digest)))


def bootstrap_descriptor(digest: str, size: int, fs_version: int, *, docker: bool = False) -> Descriptor:
    """The bootstrap layer (always the last layer)."""
    media_type = MEDIA_TYPE_DOCKER_LAYER_GZIP if docker else MEDIA_TYPE_OCI_LAYER_GZIP
    return Descriptor(media_type, digest, size,
                      ((ANNOTATION_NYDUS_BOOTSTRAP, "true"),
                       (ANNOTATION_NYDUS_FS_VERSION, str(fs_version))))


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SourceError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SourceError(f"{what} is not a JSON object")
    return doc


def source_layers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's layer descriptors, each checked to be a tar layer we can convert."""
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise SourceError("manifest has no layers list")
    for layer in layers:
        media_type = layer.get("mediaType", "")
        if media_type == MEDIA_TYPE_NYDUS_BLOB or layer.get("annotations", {}).get(ANNOTATION_NYDUS_BOOTSTRAP):
            raise SourceError("source image is already a nydus image")
        if media_type not in LAYER_TYPES:
            raise SourceError(f"unsupported layer media type {media_type!r} ({layer.get('digest')})")
        if not str(layer.get("digest", "")).startswith("sha256:"):
            raise SourceError(f"layer digest {layer.get('digest')!r} is not sha256")
    return layers


def rewrite_config(config: dict[str, Any], diff_ids: Sequence[str]) -> dict[str, Any]:
    """Source config with ``rootfs.diff_ids`` replaced and the converter's history entry added."""
    out = copy.deepcopy(config)
    rootfs = out.setdefault("rootfs", {})
    rootfs["type"] = "layers"
    rootfs["diff_ids"] = list(diff_ids)
    history = out.get("history")
    if not isinstance(history, list):
        history = []
    history.append({"created_by": HISTORY_CREATED_BY, "comment": HISTORY_COMMENT})
    out["history"] = history
    return out


def build_manifest(source: dict[str, Any], config: Descriptor, blobs: Sequence[Descriptor],
                   bootstrap: Descriptor) -> dict[str, Any]:
    """The nydus manifest: blobs in order, then the bootstrap; source annotations kept."""
    out: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [d.to_json() for d in blobs] + [bootstrap.to_json()],
    }
    if source.get("annotations"):
        out["annotations"] = dict(source["annotations"])
    return out


def build_index(source: dict[str, Any], manifests: Sequence[Descriptor]) -> dict[str, Any]:
    """The nydus index for a multi-platform source (one entry per converted platform)."""
    out: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_INDEX,
        "manifests": [d.to_json() for d in manifests],
    }
    if source.get("annotations"):
        out["annotations"] = dict(source["annotations"])
    return out


def platform_string(platform: dict[str, Any] | None) -> str:
    if not platform:
        return "unknown/unknown"
    out = f"{platform.get('os', 'unknown')}/{platform.get('architecture', 'unknown')}"
    if platform.get("variant"):
        out += f"/{platform['variant']}"
    return out


def platform_matches(platform: dict[str, Any] | None, wanted: str) -> bool:
    """``wanted`` is ``os/arch[/variant]``; a missing variant matches any variant."""
    have = platform_string(platform).split("/")
    want = wanted.split("/")
    return have[:2] == want[:2] and (len(want) < 3 or (len(have) > 2 and have[2] == want[2]))


def convertible_platforms(index: dict[str, Any]) -> list[dict[str, Any]]:
    """Index entries that are images (attestation manifests ``unknown/unknown`` are dropped)."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise SourceError("index has no manifests")
    return [m for m in entries
            if platform_string(m.get("platform")) != "unknown/unknown"
            or "platform" not in m]
