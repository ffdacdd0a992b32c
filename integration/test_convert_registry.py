"""The converter's registry path against a real docker-registry: pull, HEAD, both upload modes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import requests

from integration import convert_images as ci
from rafs.convert.distribution import Distribution
from rafs.convert.errors import PushError, SourceError
from rafs.convert.push import Pusher
from rafs.convert.reference import parse_reference
from rafs.convert.source import RegistrySource



def test_pull_from_registry(registry):
    image = ci.build_image()
    digest = ci.push_image(registry, "src/app", "v1", image)
    src = RegistrySource(f"{registry.host}/src/app:v1", insecure=True)
    data, media_type = src.root()
    assert data == image[0].data and "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert src.document(image[1].digest) == image[1].data
    with src.open_blob(image[2][0].digest) as fh:   # gzip layer: raw bytes, not decoded
        assert fh.read() == image[2][0].data
    with pytest.raises(SourceError):
        RegistrySource(f"{registry.host}/src/app:missing", insecure=True).root()


@pytest.mark.parametrize("chunk_size", [0, 4096])
def test_push_blobs_once(registry, tmp_path, chunk_size):
    client = Distribution(registry.host, insecure=True)
    pusher = Pusher(client, parse_reference(f"{registry.host}/dst/app:v1"), chunk_size=chunk_size, progress=False)
    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert pusher.push_file(digest, str(path)) is True
    assert pusher.push_file(digest, str(path)) is False            # same session
    resp = requests.get(f"{registry.url}/v2/dst/app/blobs/{digest}", timeout=10)
    assert resp.content == data
    again = Pusher(client, parse_reference(f"{registry.host}/dst/app:v1"), chunk_size=chunk_size, progress=False)
    assert again.push_file(digest, str(path)) is False             # HEAD says it is there
    assert again.stats.skipped == [digest] and again.stats.uploaded == []
    bad = "sha256:" + "0" * 64
    with pytest.raises(PushError):
        again.push_bytes(bad, b"not matching")
    doc = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": digest, "size": len(data)}, "layers": []}).encode()
    got = again.push_manifest(doc, "application/vnd.oci.image.manifest.v1+json", tag="v1")
    assert got == "sha256:" + hashlib.sha256(doc).hexdigest()
    assert requests.get(f"{registry.url}/v2/dst/app/manifests/v1", timeout=10,
                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).content == doc
