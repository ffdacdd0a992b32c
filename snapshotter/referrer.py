"""Referrer detection (upstream's ``[experimental] enable_referrer_detect``).

When containerd pulls a plain OCI image, each layer's Prepare carries the image reference and
(CRI) the manifest digest. If a nydus image is attached to that manifest as an OCI referrer
(``nydusify convert --with-referrer``), the snapshotter answers every layer from the nydus
image: it fetches only the nydus bootstrap layer and serves the image lazily. Referrers are
listed by the registry's referrers API or, without it, the ``sha256-<hex>`` fallback tag; a
referrer counts when its manifest's last layer is a nydus bootstrap (as upstream checks).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading
from collections.abc import Mapping

from snapshotter import labels as L
from snapshotter.config import Config
from snapshotter.errors import Unavailable
from snapshotter.remote import registry_config, registry_credentials
from storage.backend.registry import RegistryClient
from storage.errors import StorageError

log = logging.getLogger(__name__)

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_ACCEPT = ", ".join([MANIFEST, INDEX, "application/vnd.docker.distribution.manifest.v2+json",
                     "application/vnd.docker.distribution.manifest.list.v2+json"])
MAX_DOC = 4 << 20  #: manifests and indexes larger than this are not trusted
MAX_BOOTSTRAP_LAYER = 512 << 20


class ReferrerDetector:
    """Finds and fetches the nydus bootstrap layer attached to an image; results cached per
    subject digest (a miss too, for the process lifetime)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._cache: dict[str, bytes | None] = {}

    def bootstrap_layer(self, labels: Mapping[str, str]) -> bytes | None:
        """The gzip bytes of the attached nydus image's bootstrap layer, or None."""
        image_ref = labels.get(L.CRI_IMAGE_REF)
        if not image_ref:
            return None
        ref = L.parse_image_ref(image_ref)
        reg = registry_config(image_ref, self.config)
        client = RegistryClient(reg.host, reg.repo, scheme=reg.scheme,
                                credentials=registry_credentials(ref.host, labels, self.config),
                                skip_verify=reg.skip_verify, timeout=reg.timeout,
                                connect_timeout=reg.connect_timeout)
        try:
            subjects = [d for d in (labels.get(L.CRI_MANIFEST_DIGEST), self._resolve(client, reg.repo, ref.reference))
                        if d]
            for subject in dict.fromkeys(subjects):
                with self._lock:
                    if subject in self._cache:
                        found = self._cache[subject]
                        if found is not None:
                            return found
                        continue
                found = self._find(client, reg.repo, subject)
                with self._lock:
                    self._cache[subject] = found
                if found is not None:
                    log.info("image %s: nydus referrer of %s found; serving it lazily", image_ref, subject)
                    return found
            return None
        except (StorageError, ValueError, KeyError) as exc:
            raise Unavailable(f"referrer detection for {image_ref}: {exc}") from exc
        finally:
            client.close()

    def _get(self, client: RegistryClient, path: str, accept: str) -> bytes | None:
        resp = client.request("GET", path, headers={"Accept": accept})
        try:
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise StorageError(f"GET {path}: HTTP {resp.status_code}")
            return resp.content[: MAX_DOC + 1]
        finally:
            resp.close()

    def _resolve(self, client: RegistryClient, repo: str, reference: str) -> str | None:
        if reference.startswith("sha256:"):
            return reference
        resp = client.request("HEAD", f"/v2/{repo}/manifests/{reference}", headers={"Accept": _ACCEPT})
        resp.close()
        return resp.headers.get("Docker-Content-Digest") if resp.status_code == 200 else None

    def _find(self, client: RegistryClient, repo: str, subject: str) -> bytes | None:
        data = self._get(client, f"/v2/{repo}/referrers/{subject}", INDEX)
        if data is None:
            alg, _, hexpart = subject.partition(":")
            data = self._get(client, f"/v2/{repo}/manifests/{alg}-{hexpart}", INDEX)
        if data is None or len(data) > MAX_DOC:
            return None
        for desc in json.loads(data).get("manifests") or []:
            if desc.get("mediaType", MANIFEST) != MANIFEST:
                continue
            raw = self._get(client, f"/v2/{repo}/manifests/{desc['digest']}", MANIFEST)
            if raw is None or len(raw) > MAX_DOC:
                continue
            manifest = json.loads(raw)
            layers = manifest.get("layers") or []
            if manifest.get("subject", {}).get("digest") != subject or not layers:
                continue
            boot = layers[-1]
            if (boot.get("annotations") or {}).get(L.NYDUS_META_LAYER) != "true":
                continue
            if int(boot.get("size", 0)) > MAX_BOOTSTRAP_LAYER:
                continue
            blob = self._get(client, f"/v2/{repo}/blobs/{boot['digest']}", "*/*")
            if blob is not None:
                import hashlib

                if "sha256:" + hashlib.sha256(blob).hexdigest() == boot["digest"]:
                    return blob
        return None


def unpack_bootstrap_layer(layer: bytes, fs_dir: str) -> None:
    """Write ``image/image.boot`` and ``image/*.blob.meta`` of a bootstrap layer under ``fs_dir``
    (nothing else; names are checked)."""
    image_dir = os.path.join(fs_dir, "image")
    os.makedirs(image_dir, mode=0o755, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tar:
        for member in tar:
            name = member.name.lstrip("./")
            if not member.isreg() or not name.startswith("image/"):
                continue
            base = name[len("image/"):]
            if "/" in base or not (base == "image.boot" or base.endswith(".blob.meta")):
                continue
            fh = tar.extractfile(member)
            if fh is None:
                continue
            with open(os.path.join(image_dir, base), "wb") as out:
                out.write(fh.read())
