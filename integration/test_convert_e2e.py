"""End to end: source images in a real docker-registry -> nydusify convert -> push -> check."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest
import requests

from integration import convert_images as ci
from rafs.convert import layer as layer_mod
from rafs.convert.check import check
from rafs.convert.cli import main as nydusify
from rafs.convert.converter import ConvertOptions, convert
from rafs.convert.errors import CheckError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"




def get(host: str, repo: str, kind: str, ref: str, accept: str = OCI_MANIFEST) -> requests.Response:
    resp = requests.get(f"http://{host}/v2/{repo}/{kind}/{ref}", headers={"Accept": accept}, timeout=30)
    resp.raise_for_status()
    return resp


def head_blob(host: str, repo: str, digest: str) -> int:
    return requests.head(f"http://{host}/v2/{repo}/blobs/{digest}", timeout=30).status_code


def run_convert(source: str, target: str, work: str, *extra: str) -> dict:
    out = os.path.join(work, "summary.json")
    rc = nydusify(["convert", "--source", source, "--target", target, "--source-insecure",
                   "--target-insecure", "--work-dir", work, "--no-progress", "--output-json", out, *extra])
    assert rc == 0
    with open(out) as fh:
        return json.load(fh)


def assert_nydus_manifest(host: str, repo: str, tag: str) -> tuple[dict, dict, bytes]:
    manifest = get(host, repo, "manifests", tag).json()
    assert manifest["mediaType"] == OCI_MANIFEST
    *blobs, boot = manifest["layers"]
    assert blobs, "a nydus image with file data has at least one blob"
    for blob in blobs:
        assert blob["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1"
        assert blob["annotations"] == {"containerd.io/snapshot/nydus-blob": "true"}
        assert head_blob(host, repo, blob["digest"]) == 200
    assert boot["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert boot["annotations"] == {"containerd.io/snapshot/nydus-bootstrap": "true",
                                   "containerd.io/snapshot/nydus-fs-version": "6"}
    config = get(host, repo, "blobs", manifest["config"]["digest"]).json()
    boot_bytes = get(host, repo, "blobs", boot["digest"]).content
    raw = gzip.decompress(boot_bytes)
    assert config["rootfs"]["diff_ids"] == [b["digest"] for b in blobs] + [
        "sha256:" + hashlib.sha256(raw).hexdigest()]
    assert config["history"][-1] == {"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"}
    from storage.meta.blob_meta import parse_blob_meta_file

    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["image"].isdir() and members["image"].mode == 0o755
        assert members["image/image.boot"].mode == 0o444
        metas = {n for n in members if n.endswith(".blob.meta")}
        for name in metas:   # cache-format CI tables of blobs this image lists
            assert name[len("image/"):-len(".blob.meta")] in {b["digest"][7:] for b in blobs}
            assert parse_blob_meta_file(tar.extractfile(name).read()).chunk_count > 0
    return manifest, config, boot_bytes


def test_convert_push_and_reconvert(registry, tmp_path):
    image = ci.build_image()
    ci.push_image(registry, "src/app", "v1", image)
    work = str(tmp_path / "work")
    first = run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:nydus", work)
    manifest, config, boot = assert_nydus_manifest(registry.host, "dst/app", "nydus")
    assert config["os"] == "linux" and config["config"]["Cmd"] == ["/bin/sh"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(boot))) as tar:
        assert {f"image/{b['digest'][7:]}.blob.meta" for b in manifest["layers"][:-1]} <= set(tar.getnames())
    pushed = {layer["digest"] for layer in manifest["layers"]} | {manifest["config"]["digest"]}
    assert pushed <= set(first["uploaded"])
    # a chunk shared by big.bin and copy.bin (3 MiB of random data) is stored once
    sizes = [layer["size"] for layer in manifest["layers"][:-1]]
    assert sum(sizes) < 2 * (3 << 20) + (2 << 20)
    # converting again uploads nothing (HEAD finds every blob), even with a fresh work dir
    again = run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:nydus2", str(tmp_path / "work2"))
    assert again["uploaded"] == [] and set(again["skipped"]) == pushed
    assert get(registry.host, "dst/app", "manifests", "nydus2").content == get(
        registry.host, "dst/app", "manifests", "nydus").content
    # the registry's own access log agrees: the second run started no upload
    mark = registry.log_mark()
    run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:nydus3", str(tmp_path / "work3"))
    writes = [e for e in registry.access_log()[mark:] if e.method in ("POST", "PATCH")
              or (e.method == "PUT" and "/blobs/" in e.path)]
    assert writes == []


def test_interrupted_conversion_resumes(registry, tmp_path, monkeypatch):
    image = ci.build_image()
    ci.push_image(registry, "src/app", "v1", image)
    work = str(tmp_path / "work")
    opts = ConvertOptions(source=f"{registry.host}/src/app:v1", target=f"{registry.host}/dst/app:v1", work_dir=work,
                          source_insecure=True, target_insecure=True, progress=False)
    real = layer_mod.build_layer
    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(layer_mod, "build_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(opts)
    assert not [n for n in os.listdir(os.path.join(work, "layers")) if n.startswith(".")]
    monkeypatch.setattr(layer_mod, "build_layer", real)
    result = convert(opts)
    layers = [d["digest"] for d in json.loads(image[0].data)["layers"]]
    assert result.layers_reused == layers[:1] and result.layers_built == layers[1:]
    assert_nydus_manifest(registry.host, "dst/app", "v1")
    result = convert(opts)
    assert result.layers_reused == layers and result.layers_built == []
    assert result.stats.uploaded == []


def test_chunked_upload_and_lz4(registry, tmp_path):
    image = ci.build_image()
    ci.push_image(registry, "src/app", "v1", image)
    mark = registry.log_mark()
    summary = run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/dst/lz4:v1", str(tmp_path / "w"),
                          "--compressor", "lz4_block", "--push-chunk-size", "65536")
    assert summary["uploaded"]
    manifest, _, _ = assert_nydus_manifest(registry.host, "dst/lz4", "v1")
    patches = [e for e in registry.access_log()[mark:] if e.method == "PATCH"]
    biggest = max(layer["size"] for layer in manifest["layers"])
    assert len(patches) >= biggest // 65536


def test_basic_auth_with_docker_config(registry_factory, tmp_path, monkeypatch):
    import base64

    from rafs.convert import distribution

    reg = registry_factory(users={"alice": "s3cret"})
    ci.push_image(reg, "src/app", "v1", ci.build_image(ci.sample_layers()[:1]))
    monkeypatch.setattr(distribution, "_CLIENTS", {})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "noconfig"))
    rc = nydusify(["convert", "--source", f"{reg.host}/src/app:v1", "--target", f"{reg.host}/dst/app:v1",
                   "--source-insecure", "--target-insecure", "--work-dir", str(tmp_path / "w0"), "--no-progress"])
    assert rc == 1
    cfg = tmp_path / "docker"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(
        {"auths": {reg.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    monkeypatch.setattr(distribution, "_CLIENTS", {})
    run_convert(f"{reg.host}/src/app:v1", f"{reg.host}/dst/app:v1", str(tmp_path / "w"))
    manifest = json.loads(reg.get_manifest("dst/app", "v1")[0])
    assert manifest["layers"][-1]["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"


def test_docker_schema2_source(registry, tmp_path):
    manifest, config, layers = ci.build_image(ci.sample_layers()[:1])
    doc = json.loads(manifest.data)
    doc["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json"
    doc["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json"
    doc["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    docker = ci.Blob(doc["mediaType"], json.dumps(doc).encode())
    ci.push_image(registry, "src/docker", "v1", (docker, config, layers))
    run_convert(f"{registry.host}/src/docker:v1", f"{registry.host}/dst/docker:v1", str(tmp_path / "w"))
    manifest, config_doc, _ = assert_nydus_manifest(registry.host, "dst/docker", "v1")
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    check(f"{registry.host}/src/docker:v1", f"{registry.host}/dst/docker:v1", source_insecure=True,
          target_insecure=True)


def test_multi_platform_index(registry, tmp_path):
    amd = ci.build_image(arch="amd64")
    arm = ci.build_image(ci.sample_layers()[:2], arch="arm64")
    platforms = [{"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64"}]
    ci.push_index(registry, "src/multi", "v1", [amd, arm], platforms)
    run_convert(f"{registry.host}/src/multi:v1", f"{registry.host}/dst/multi:all", str(tmp_path / "w"))
    index = get(registry.host, "dst/multi", "manifests", "all", accept=OCI_INDEX).json()
    assert index["mediaType"] == OCI_INDEX
    assert [m["platform"] for m in index["manifests"]] == platforms
    for entry in index["manifests"]:
        assert_nydus_manifest(registry.host, "dst/multi", entry["digest"])
    report = check(f"{registry.host}/src/multi:v1", f"{registry.host}/dst/multi:all",
                   source_insecure=True, target_insecure=True)
    assert report.platforms == ["linux/amd64", "linux/arm64"]
    report = check(f"{registry.host}/src/multi:v1", f"{registry.host}/dst/multi:all",
                   source_insecure=True, target_insecure=True, platform="linux/arm64")
    assert report.platforms == ["linux/arm64"]
    run_convert(f"{registry.host}/src/multi:v1", f"{registry.host}/dst/multi:arm", str(tmp_path / "w"),
                "--platform", "linux/arm64")
    manifest, config, _ = assert_nydus_manifest(registry.host, "dst/multi", "arm")
    assert config["architecture"] == "arm64"
    # an index with a single manifest collapses to that manifest
    ci.push_index(registry, "src/one", "v1", [arm], platforms[1:])
    run_convert(f"{registry.host}/src/one:v1", f"{registry.host}/dst/one:v1", str(tmp_path / "w"))
    manifest, config, _ = assert_nydus_manifest(registry.host, "dst/one", "v1")
    assert config["architecture"] == "arm64"


def test_check_passes_for_all_source_kinds(registry, tmp_path):
    image = ci.build_image()
    ci.push_image(registry, "src/app", "v1", image)
    ci.write_oci_layout(str(tmp_path / "layout"), [image], tag="v1")
    ci.write_docker_archive(str(tmp_path / "img.tar"))
    for i, source in enumerate([f"{registry.host}/src/app:v1", f"oci:{tmp_path / 'layout'}:v1",
                                f"docker-archive:{tmp_path / 'img.tar'}"]):
        target = f"{registry.host}/dst/check:{i}"
        run_convert(source, target, str(tmp_path / f"w{i}"))
        report = check(source, target, source_insecure=True, target_insecure=True)
        assert report.files_compared > 15
        assert nydusify(["check", "--source", source, "--target", target, "--source-insecure",
                         "--target-insecure"]) == 0


def test_check_finds_differences(registry, tmp_path):
    ci.push_image(registry, "src/app", "v1", ci.build_image())
    other = ci.sample_layers()
    other[2] = (ci.tar_bytes([{"name": "etc/passwd", "data": b"different\n"}]), "none")
    ci.push_image(registry, "src/other", "v1", ci.build_image(other))
    run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:v1", str(tmp_path / "w"))
    with pytest.raises(CheckError) as err:
        check(f"{registry.host}/src/other:v1", f"{registry.host}/dst/app:v1", source_insecure=True, target_insecure=True)
    text = str(err.value)
    assert "/etc/passwd: content differs" in text and "/etc/gone" in text and "/opt/old/a" in text
    # a plain OCI image is not a valid nydus image
    with pytest.raises(CheckError, match="nydus-bootstrap"):
        check(None, f"{registry.host}/src/app:v1", target_insecure=True)


def test_bootstrap_tree_and_prefetch(registry, tmp_path):
    from rafs.metadata import Rafs

    ci.push_image(registry, "src/app", "v1", ci.build_image())
    patterns = tmp_path / "prefetch.txt"
    patterns.write_text("/bin/busybox\n/app\n")
    work = str(tmp_path / "w")
    run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:v1", work, "--prefetch-patterns", str(patterns))
    manifest, _, boot_bytes = assert_nydus_manifest(registry.host, "dst/app", "v1")
    from rafs.convert.bootstrap_layer import extract_bootstrap

    path = tmp_path / "image.boot"
    path.write_bytes(extract_bootstrap(boot_bytes))
    with Rafs.open(str(path)) as rafs:
        assert rafs.version == 6
        assert sorted(b.blob_id for b in rafs.blobs) == sorted(b["digest"][7:] for b in manifest["layers"][:-1])
        paths = {p for p, _ in rafs.walk()}
        assert {"/bin/busybox", "/bin/sh", "/app/big.bin", "/opt/old/b", "/etc/passwd"} <= paths
        assert "/etc/gone" not in paths and "/opt/old/a" not in paths
        assert not any(".wh." in p for p in paths)
        assert rafs.lookup_path("/bin/sh").readlink() == b"busybox"
        prefetch = {rafs.inode(i).ino for i in rafs.prefetch_inos}
        assert rafs.lookup_path("/bin/busybox").ino in prefetch


def test_chunk_dict_reuses_blobs(registry, tmp_path):
    ci.push_image(registry, "src/app", "v1", ci.build_image())
    work = str(tmp_path / "w")
    run_convert(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:base", work)
    base, _, boot = assert_nydus_manifest(registry.host, "dst/app", "base")
    from rafs.convert.bootstrap_layer import extract_bootstrap

    dict_path = tmp_path / "dict.boot"
    dict_path.write_bytes(extract_bootstrap(boot))
    layers = ci.sample_layers()[:2]   # same busybox and big data: everything is in the dict
    ci.push_image(registry, "src/app", "v2", ci.build_image(layers))
    summary = run_convert(f"{registry.host}/src/app:v2", f"{registry.host}/dst/app:v2", str(tmp_path / "w2"),
                          "--chunk-dict", f"bootstrap:local:{dict_path}")
    manifest, _, _ = assert_nydus_manifest(registry.host, "dst/app", "v2")
    base_blobs = {b["digest"] for b in base["layers"][:-1]}
    new_blobs = {b["digest"] for b in manifest["layers"][:-1]}
    assert new_blobs & base_blobs, "chunk-dict blobs are referenced, not stored again"
    assert sum(b["size"] for b in manifest["layers"][:-1] if b["digest"] not in base_blobs) < (1 << 20)
    assert not (set(summary["uploaded"]) & base_blobs)
    check(f"{registry.host}/src/app:v2", f"{registry.host}/dst/app:v2", source_insecure=True, target_insecure=True)


def test_sigkill_mid_conversion_then_resume(registry, tmp_path):
    """A real kill -9 of ``nydusify convert`` after its first layer: the rerun reuses that layer."""
    import signal
    import subprocess
    import sys
    import time

    layers = ci.sample_layers()
    layers.append((ci.tar_bytes([{"name": "data/more.bin", "data": os.urandom(12 << 20)}]), "gzip"))
    image = ci.build_image(layers)
    ci.push_image(registry, "src/big", "v1", image)
    work = tmp_path / "work"
    argv = [sys.executable, "-m", "rafs.convert.cli", "convert", "--source", f"{registry.host}/src/big:v1",
            "--target", f"{registry.host}/dst/big:v1", "--source-insecure", "--target-insecure",
            "--work-dir", str(work), "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if [p for p in work.glob("layers/*/result.json") if not p.parent.name.startswith(".")]:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    done = {p.parent.name for p in work.glob("layers/*/result.json") if not p.parent.name.startswith(".")}
    assert 1 <= len(done) < len(layers)
    result = convert(ConvertOptions(source=f"{registry.host}/src/big:v1", target=f"{registry.host}/dst/big:v1",
                                    work_dir=str(work), source_insecure=True, target_insecure=True,
                                    progress=False))
    assert len(result.layers_reused) == len(done) and len(result.layers_built) == len(layers) - len(done)
    assert not [p for p in (work / "layers").iterdir() if p.name.startswith(".")]
    assert_nydus_manifest(registry.host, "dst/big", "v1")


def test_progress_bars_on_stderr(registry, tmp_path, capsys):
    ci.push_image(registry, "src/app", "v1", ci.build_image(ci.sample_layers()[:2]))
    convert(ConvertOptions(source=f"{registry.host}/src/app:v1", target=f"{registry.host}/dst/app:p",
                           work_dir=str(tmp_path / "w"), source_insecure=True, target_insecure=True,
                           progress=True))
    err = capsys.readouterr().err
    assert "pull " in err and "push " in err
