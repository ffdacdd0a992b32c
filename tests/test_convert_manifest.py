"""Unit tests: references, manifest/config/index rewrite, bootstrap layer, trees, sources."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import stat
import tarfile

import pytest

from integration import convert_images as ci
from rafs.convert import manifest as m
from rafs.convert.bootstrap_layer import extract_bootstrap, pack_bootstrap_layer
from rafs.convert.errors import InvalidReference, SourceError
from rafs.convert.layer import LayerOptions, fetch_layer_tar, layer_key
from rafs.convert.reference import parse_reference, parse_source
from rafs.convert.source import DockerArchiveSource, OciLayoutSource
from rafs.convert.tree import build_tree
from rafs.errors import RafsError


def test_parse_reference():
    r = parse_reference("127.0.0.1:5000/a/b:v1")
    assert (r.host, r.repository, r.tag, r.digest) == ("127.0.0.1:5000", "a/b", "v1", None)
    r = parse_reference("busybox")
    assert (r.host, r.repository, r.tag, r.endpoint) == ("docker.io", "library/busybox", "latest",
                                                        "registry-1.docker.io")
    d = "sha256:" + "a" * 64
    r = parse_reference(f"localhost/x@{d}")
    assert (r.host, r.repository, r.tag, r.digest, r.reference) == ("localhost", "x", None, d, d)
    for bad in ["", "UPPER/x", "x@sha256:zz", "host:5000/x:bad tag", " x"]:
        with pytest.raises(InvalidReference):
            parse_reference(bad)
    assert issubclass(InvalidReference, RafsError)


def test_parse_source():
    assert parse_source("oci:/tmp/layout:v2") == parse_source("oci:/tmp/layout:v2")
    s = parse_source("oci:/tmp/layout:v2")
    assert (s.kind, s.location, s.tag) == ("oci", "/tmp/layout", "v2")
    s = parse_source("oci:./dir")
    assert (s.kind, s.location, s.tag) == ("oci", "./dir", None)
    s = parse_source("docker-archive:/x/img.tar")
    assert (s.kind, s.location) == ("docker-archive", "/x/img.tar")
    assert parse_source("localhost:5000/r:t").kind == "registry"
    with pytest.raises(InvalidReference):
        parse_source("oci:")


def test_rewrite_config_and_manifest():
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ["sha256:1"]},
              "history": [{"created_by": "x"}]}
    out = m.rewrite_config(config, ["sha256:" + "b" * 64, "sha256:" + "c" * 64])
    assert out["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "b" * 64, "sha256:" + "c" * 64]}
    assert out["history"][-1] == {"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"}
    assert config["rootfs"]["diff_ids"] == ["sha256:1"]        # source untouched
    blob = m.blob_descriptor("b" * 64, 123)
    boot = m.bootstrap_descriptor("sha256:" + "d" * 64, 45, 6)
    cfg = m.Descriptor(m.MEDIA_TYPE_OCI_CONFIG, "sha256:" + "e" * 64, 9)
    man = m.build_manifest({"annotations": {"k": "v"}}, cfg, [blob], boot)
    assert man == {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "e" * 64,
                   "size": 9},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.nydus.blob.v1", "digest": "sha256:" + "b" * 64,
             "size": 123, "annotations": {"containerd.io/snapshot/nydus-blob": "true"}},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "d" * 64,
             "size": 45, "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                                         "containerd.io/snapshot/nydus-fs-version": "6"}},
        ],
        "annotations": {"k": "v"},
    }
    assert "containerd.io/uncompressed" not in json.dumps(man)


def test_index_and_platforms():
    idx = {"manifests": [
        {"digest": "sha256:1", "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": "sha256:2", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": "sha256:3", "platform": {"os": "unknown", "architecture": "unknown"}},
    ]}
    entries = m.convertible_platforms(idx)
    assert [e["digest"] for e in entries] == ["sha256:1", "sha256:2"]
    assert m.platform_matches(entries[1]["platform"], "linux/arm64")
    assert m.platform_matches(entries[1]["platform"], "linux/arm64/v8")
    assert not m.platform_matches(entries[1]["platform"], "linux/arm64/v7")
    assert not m.platform_matches(entries[0]["platform"], "linux/arm64")
    out = m.build_index({}, [m.Descriptor(m.MEDIA_TYPE_OCI_MANIFEST, "sha256:9", 3,
                                          platform=(("architecture", "amd64"), ("os", "linux")))])
    assert out["manifests"][0]["platform"] == {"architecture": "amd64", "os": "linux"}
    with pytest.raises(SourceError):
        m.convertible_platforms({"manifests": []})


def test_source_layers_rejects():
    with pytest.raises(SourceError, match="already a nydus"):
        m.source_layers({"layers": [{"mediaType": m.MEDIA_TYPE_NYDUS_BLOB, "digest": "sha256:1"}]})
    with pytest.raises(SourceError, match="unsupported layer media type"):
        m.source_layers({"layers": [{"mediaType": "application/x-foo", "digest": "sha256:1"}]})
    with pytest.raises(SourceError):
        m.source_layers({})


def test_bootstrap_layer_shape(tmp_path):
    boot = tmp_path / "b.boot"
    boot.write_bytes(b"B" * 5000)
    meta = tmp_path / "x.meta"
    meta.write_bytes(b"M" * 10)
    p1 = pack_bootstrap_layer(str(boot), str(tmp_path / "l1.tgz"), [("ab" * 32, str(meta))])
    p2 = pack_bootstrap_layer(str(boot), str(tmp_path / "l2.tgz"), [("ab" * 32, str(meta))])
    assert p1.digest == p2.digest and p1.diff_id == p2.diff_id         # deterministic
    data = (tmp_path / "l1.tgz").read_bytes()
    assert p1.digest == "sha256:" + hashlib.sha256(data).hexdigest() and p1.size == len(data)
    raw = gzip.decompress(data)
    assert p1.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {t.name: t for t in tar.getmembers()}
    assert list(members) == ["image", "image/image.boot", f"image/{'ab' * 32}.blob.meta"]
    assert members["image"].isdir() and members["image"].mode == 0o755
    assert members["image/image.boot"].mode == 0o444 and members["image/image.boot"].size == 5000
    assert extract_bootstrap(data) == b"B" * 5000
    with pytest.raises(SourceError):
        extract_bootstrap(b"not a tar")


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_fetch_layer_tar_verifies(tmp_path, kind):
    tar = ci.tar_bytes([{"name": "a", "data": b"hello"}])
    blob = ci.compress_layer(tar, kind)
    out = tmp_path / "l.tar"
    diff_id = fetch_layer_tar(io.BytesIO(blob.data), blob.digest, str(out))
    assert out.read_bytes() == tar
    assert diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    with pytest.raises(SourceError, match="digest"):
        fetch_layer_tar(io.BytesIO(blob.data), "sha256:" + "0" * 64, str(tmp_path / "x.tar"))
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.partial").exists()


def test_layer_key_depends_on_everything():
    a = layer_key("sha256:1", LayerOptions(), [])
    assert a == layer_key("sha256:1", LayerOptions(), [])
    assert a != layer_key("sha256:2", LayerOptions(), [])
    assert a != layer_key("sha256:1", LayerOptions(compressor="lz4_block"), [])
    assert a != layer_key("sha256:1", LayerOptions(), ["k"])
    assert a != layer_key("sha256:1", LayerOptions(prefetch_patterns=("/bin",)), [])


def test_tree_applies_whiteouts():
    tree = build_tree(io.BytesIO(tar) for tar, _ in ci.sample_layers())
    e = tree.entries
    assert "/etc/gone" not in e
    assert "/opt/old/a" not in e and e["/opt/old/b"].sha256 == hashlib.sha256(b"b\n").hexdigest()
    assert e["/etc/passwd"].sha256 == hashlib.sha256(
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/app:/bin/sh\n").hexdigest()
    assert e["/bin/sh"].link_target == "busybox" and stat.S_ISLNK(e["/bin/sh"].mode)
    assert e["/bin/cat"].sha256 == e["/bin/busybox"].sha256
    assert e["/app/attr"].xattrs == ((b"user.test", b"value"),)
    assert e["/app/setuid"].mode == stat.S_IFREG | 0o4755
    assert e["/app"].uid == 1000 and e["/tmp"].mode == stat.S_IFDIR | 0o1777
    assert e["/app/big.bin"].size == (1 << 20) + 7
    assert not any(".wh." in p for p in e)


def test_oci_layout_and_docker_archive_sources(tmp_path):
    image = ci.build_image()
    ci.write_oci_layout(str(tmp_path / "oci"), [image], tag="v1")
    src = OciLayoutSource(str(tmp_path / "oci"), "v1")
    data, media_type = src.root()
    assert data == image[0].data and media_type == m.MEDIA_TYPE_OCI_MANIFEST
    assert src.document(image[1].digest) == image[1].data
    with pytest.raises(SourceError):
        OciLayoutSource(str(tmp_path / "oci"), "nope").root()
    with pytest.raises(SourceError):
        OciLayoutSource(str(tmp_path / "missing"))
    ci.write_docker_archive(str(tmp_path / "img.tar"))
    src2 = DockerArchiveSource(str(tmp_path / "img.tar"))
    man = json.loads(src2.root()[0])
    assert [layer["mediaType"] for layer in man["layers"]] == [m.MEDIA_TYPE_OCI_LAYER] * 3
    with src2.open_blob(man["layers"][0]["digest"]) as fh:
        assert "sha256:" + hashlib.sha256(fh.read()).hexdigest() == man["layers"][0]["digest"]
    with pytest.raises(SourceError):
        src2.open_blob("sha256:" + "0" * 64)
    assert json.loads(src2.document(man["config"]["digest"]))["os"] == "linux"
    src2.close()


def test_cli_option_errors(tmp_path, capsys):
    from rafs.convert.cli import _prefetch_patterns, _suffixed, main

    assert _suffixed("localhost:5000/a/b:v1", "-nydus") == "localhost:5000/a/b:v1-nydus"
    (tmp_path / "p").write_text("/bin\n\n /etc/passwd \n")
    assert _prefetch_patterns(str(tmp_path / "p")) == ("/bin", "/etc/passwd")
    (tmp_path / "bad").write_text("relative\n")
    assert main(["convert", "--source", "oci:/nonexistent", "--target", "localhost:1/x:y",
                 "--prefetch-patterns", str(tmp_path / "bad"), "--work-dir", str(tmp_path / "w")]) == 1
    assert "absolute path" in capsys.readouterr().err
    assert main(["convert", "--source", "oci:/nonexistent", "--target", "localhost:1/x:y",
                 "--chunk-size", "0x3000", "--work-dir", str(tmp_path / "w")]) == 1
    assert "power of two" in capsys.readouterr().err
    assert main(["convert", "--source", f"oci:{tmp_path}/none", "--target", "localhost:1/x:y",
                 "--work-dir", str(tmp_path / "w")]) == 1
    assert "not an OCI image layout" in capsys.readouterr().err
