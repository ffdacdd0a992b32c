"""OCI 1.1 referrers: attach a converted nydus image to its source manifest, and find it again.

``nydusify convert --with-referrer`` pushes the nydus manifest with a ``subject`` naming the
source root (manifest or index). A registry with the referrers API
(``GET /v2/<repo>/referrers/<digest>``) indexes it by itself; otherwise the referrers tag
fallback of the distribution spec is maintained: an OCI index under the tag
``sha256-<hex of the subject digest>`` listing every referrer's descriptor. Referrers live in
one repository, so the nydus image must be pushed into the source's repository.
"""

from __future__ import annotations

import json
from typing import Any

from .distribution import Distribution
from .errors import PushError, SourceError
from .manifest import ANNOTATION_NYDUS_BOOTSTRAP, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST
from .reference import ImageReference


def fallback_tag(digest: str) -> str:
    """The referrers tag schema: ``<alg>-<hex>``."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}"


def referrers(client: Distribution, repo: ImageReference, subject_digest: str) -> list[dict[str, Any]] | None:
    """Referrer descriptors of ``subject_digest``: from the referrers API when the registry has
    it, else from the fallback tag (``[]`` when that tag does not exist)."""
    resp = client.request(repo.repository, "GET", f"/v2/{repo.repository}/referrers/{subject_digest}",
                          SourceError, headers={"Accept": MEDIA_TYPE_OCI_INDEX})
    try:
        if resp.status_code == 200:
            return list(json.loads(resp.content).get("manifests") or [])
    except ValueError as exc:
        raise SourceError(f"referrers of {subject_digest}: not JSON: {exc}") from exc
    finally:
        resp.close()
    try:
        fetched = client.get_manifest(repo.with_tag(fallback_tag(subject_digest)))
    except SourceError as exc:
        if "HTTP 404" in str(exc):
            return []
        raise
    return list(json.loads(fetched.data).get("manifests") or [])


def _api_supported(client: Distribution, repo: ImageReference, subject_digest: str) -> bool:
    resp = client.request(repo.repository, "GET", f"/v2/{repo.repository}/referrers/{subject_digest}",
                          PushError, headers={"Accept": MEDIA_TYPE_OCI_INDEX})
    resp.close()
    return resp.status_code == 200


def attach(client: Distribution, repo: ImageReference, subject_digest: str, referrer: dict[str, Any]) -> str:
    """Make ``referrer`` (a descriptor of a manifest already pushed with ``subject``) findable:
    nothing to do on a registry with the referrers API, else add it to the fallback tag's index.
    Returns ``"api"`` or the fallback tag."""
    if _api_supported(client, repo, subject_digest):
        return "api"
    tag = fallback_tag(subject_digest)
    try:
        current = json.loads(client.get_manifest(repo.with_tag(tag)).data)
    except SourceError as exc:
        if "HTTP 404" not in str(exc):
            raise PushError(f"referrers tag {tag}: {exc}") from exc
        current = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": []}
    manifests = [m for m in current.get("manifests") or [] if m.get("digest") != referrer["digest"]]
    manifests.append(referrer)
    current["manifests"] = manifests
    data = json.dumps(current, sort_keys=True, separators=(",", ":")).encode()
    client.put_manifest(repo.with_tag(tag), data, MEDIA_TYPE_OCI_INDEX)
    return tag


def find_nydus_referrer(client: Distribution, repo: ImageReference,
                        subject_digest: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A nydus image attached to ``subject_digest``, as upstream's snapshotter detects one: a
    referrer manifest whose last layer is annotated ``containerd.io/snapshot/nydus-bootstrap``.
    Returns (referrer descriptor, bootstrap layer descriptor) or None."""
    for d in referrers(client, repo, subject_digest) or []:
        if d.get("mediaType") not in (None, MEDIA_TYPE_OCI_MANIFEST):
            continue
        manifest = json.loads(client.get_manifest(repo.with_digest(d["digest"])).data)
        layers = manifest.get("layers") or []
        if layers and (layers[-1].get("annotations") or {}).get(ANNOTATION_NYDUS_BOOTSTRAP) == "true":
            return d, layers[-1]
    return None
