"""End to end: ``nydusify convert --oci-ref`` against a real docker-registry. The gzip layers of
the source stay the data blobs (only bootstrap layer, config and manifest are uploaded) and
``nydusify check`` reads every file back through the ZRAN path (ranges of the original layers)."""

from __future__ import annotations

import gzip
import io
import tarfile

from integration import convert_images as ci
from integration.test_convert_e2e import get, run_convert
from rafs.convert.check import check
from rafs.convert.cli import main as nydusify
from storage.records import BlobFeatures

REF = "containerd.io/snapshot/nydus-ref"


def _gzip_image():
    return ci.build_image([(tar, "gzip") for tar, _ in ci.sample_layers()])


def test_oci_ref_convert_pushes_ref_blobs_and_the_bootstrap_and_checks(registry, tmp_path):
    """Upstream's --oci-ref layout: per OCI layer a small "ref" blob layer (nydus blob media type,
    ``nydus-ref`` = the original gzip layer digest), then the bootstrap layer; the original layers
    stay the data blobs and are not uploaded again."""
    import hashlib

    from rafs import metadata
    from storage.meta.toc import read_toc

    image = _gzip_image()
    ci.push_image(registry, "src/app", "v1", image)
    src_layers = [d["digest"] for d in get(registry.host, "src/app", "manifests", "v1").json()["layers"]]
    mark = registry.log_mark()
    summary = run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/src/app:zran", str(tmp_path / "w"),
                          "--oci-ref", "--zran-spacing", "0x10000")
    manifest = get(registry.host, "src/app", "manifests", "zran").json()
    *blobs, boot = manifest["layers"]
    assert len(blobs) == len(src_layers)
    for b, src in zip(blobs, src_layers):
        assert b["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1"
        assert b["annotations"] == {"containerd.io/snapshot/nydus-blob": "true", REF: src}
        assert b["digest"] != src
    assert boot["annotations"] == {"containerd.io/snapshot/nydus-bootstrap": "true",
                                   "containerd.io/snapshot/nydus-fs-version": "6"}
    config = get(registry.host, "src/app", "blobs", manifest["config"]["digest"]).json()
    assert config["rootfs"]["diff_ids"][:-1] == [b["digest"] for b in blobs]
    # uploads: the ref blobs, the bootstrap layer and the config; no original layer again
    assert set(summary["uploaded"]) == {b["digest"] for b in blobs} | {boot["digest"], manifest["config"]["digest"]}
    puts = [e.path for e in registry.access_log()[mark:] if e.method == "PUT" and "/blobs/" in e.path]
    assert len(puts) == len(blobs) + 2
    refs = {}
    for b in blobs:
        data = get(registry.host, "src/app", "blobs", b["digest"]).content
        entries, _ = read_toc(lambda o, n, d=data: d[o:o + n], len(data))
        assert [e.entry_name for e in entries] == ["blob.meta", "blob.meta.header", "blob.digest", "image.boot"]
        refs[b["digest"]] = data
    raw = gzip.decompress(get(registry.host, "src/app", "blobs", boot["digest"]).content)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert sorted(tar.getnames()) == ["image", "image/image.boot"]
        bootstrap = tar.extractfile("image/image.boot").read()
    path = tmp_path / "image.boot"
    path.write_bytes(bootstrap)
    with metadata.Rafs.open(str(path)) as fs:  # blob table: data = original layer, meta = ref blob
        assert [bl.blob_id for bl in fs.blobs] == [d[7:] for d in src_layers]
        for bl, b in zip(fs.blobs, blobs):
            assert bl.has(BlobFeatures.ZRAN) and bl.has(BlobFeatures.SEPARATE)
            assert bl.blob_meta_id == b["digest"][7:] and bl.blob_meta_size == b["size"]
            assert bl.blob_toc_digest == read_toc(lambda o, n, d=refs[b["digest"]]: d[o:o + n], b["size"])[1]
            assert hashlib.sha256(refs[b["digest"]]).hexdigest() == b["digest"][7:]
    extra = boot["size"] + sum(b["size"] for b in blobs)
    total = sum(get(registry.host, "src/app", "manifests", "v1").json()["layers"][i]["size"]
                for i in range(len(src_layers)))
    print(f"oci-ref extra stored: {extra} B (ref blobs + bootstrap layer) for {total} B of layers")
    report = check(f"{registry.host}/src/app:v1", f"{registry.host}/src/app:zran", source_insecure=True,
                   target_insecure=True)
    assert report.problems == [] and report.files_compared > 5


def test_oci_ref_into_another_repository_copies_the_layers(registry, tmp_path):
    ci.push_image(registry, "src/app", "v1", _gzip_image())
    run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:zran", str(tmp_path / "w"), "--oci-ref")
    report = check(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:zran", source_insecure=True,
                   target_insecure=True)
    assert report.problems == [] and report.files_compared > 5


def test_oci_ref_refuses_non_gzip_layers(registry, tmp_path):
    ci.push_image(registry, "src/mixed", "v1", ci.build_image())  # gzip, zstd and plain layers
    rc = nydusify(["convert", "--source", f"{registry.host}/src/mixed:v1", "--target",
                   f"{registry.host}/src/mixed:zran", "--source-insecure", "--target-insecure", "--work-dir",
                   str(tmp_path / "w"), "--no-progress", "--oci-ref"])
    assert rc != 0
    import requests

    assert requests.get(f"http://{registry.host}/v2/src/mixed/manifests/zran", timeout=30).status_code == 404


def test_with_referrer_attaches_the_nydus_image_to_the_source(registry, tmp_path):
    from rafs.convert.distribution import client_for
    from rafs.convert.reference import parse_reference
    from rafs.convert.referrers import fallback_tag, find_nydus_referrer

    ci.push_image(registry, "src/app", "v1", _gzip_image())
    src = get(registry.host, "src/app", "manifests", "v1")
    src_digest = "sha256:" + __import__("hashlib").sha256(src.content).hexdigest()
    summary = run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/src/app:zran", str(tmp_path / "w"),
                          "--oci-ref", "--with-referrer")
    nydus = get(registry.host, "src/app", "manifests", "zran").json()
    assert nydus["subject"] == {"mediaType": src.json()["mediaType"], "digest": src_digest,
                                "size": len(src.content)}
    # docker-registry has no referrers API: the fallback tag lists the nydus manifest
    index = get(registry.host, "src/app", "manifests", fallback_tag(src_digest),
                accept="application/vnd.oci.image.index.v1+json").json()
    assert [m["digest"] for m in index["manifests"]] == [summary["digest"]]
    client = client_for(parse_reference(f"{registry.host}/src/app:v1"), insecure=True)
    found = find_nydus_referrer(client, parse_reference(f"{registry.host}/src/app:v1"), src_digest)
    assert found is not None and found[0]["digest"] == summary["digest"]
    assert found[1]["digest"] == nydus["layers"][-1]["digest"]
    # converting again (e.g. another option set) keeps one entry per referrer
    run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/src/app:zran", str(tmp_path / "w"),
                "--oci-ref", "--with-referrer")
    index = get(registry.host, "src/app", "manifests", fallback_tag(src_digest),
                accept="application/vnd.oci.image.index.v1+json").json()
    assert len(index["manifests"]) == 1
    # another repository cannot carry referrers of the source
    rc = nydusify(["convert", "--source", f"{registry.host}/src/app:v1", "--target",
                   f"{registry.host}/dst/app:zran", "--source-insecure", "--target-insecure", "--work-dir",
                   str(tmp_path / "w2"), "--no-progress", "--with-referrer"])
    assert rc != 0
