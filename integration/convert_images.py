"""Small source images for converter tests, built offline (busybox-static + generated files).

Not a test module: helpers that make layer tars, OCI layouts, docker archives, and push
images to a registry through the converter's own distribution client.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from dataclasses import dataclass
from typing import Any

import zstandard

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
MTIME = 1_700_000_000


@dataclass(frozen=True, slots=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


def tar_bytes(entries: list[dict[str, Any]]) -> bytes:
    """entries: dicts with name, type ('file','dir','symlink','hardlink'), data, mode, uid, gid,
    mtime, target, xattrs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            kind = e.get("type", "file")
            info.mtime = e.get("mtime", MTIME)
            info.uid = e.get("uid", 0)
            info.gid = e.get("gid", 0)
            data = e.get("data", b"")
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, e.get("mode", 0o755)
            elif kind == "symlink":
                info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, e["target"]
            elif kind == "hardlink":
                info.type, info.mode, info.linkname = tarfile.LNKTYPE, e.get("mode", 0o644), e["target"]
            else:
                info.mode, info.size = e.get("mode", 0o644), len(data)
            if e.get("xattrs"):
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e["xattrs"].items()}
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def compress_layer(tar: bytes, kind: str) -> Blob:
    if kind == "gzip":
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
            gz.write(tar)
        return Blob("application/vnd.oci.image.layer.v1.tar+gzip", out.getvalue())
    if kind == "zstd":
        return Blob("application/vnd.oci.image.layer.v1.tar+zstd", zstandard.ZstdCompressor().compress(tar))
    return Blob("application/vnd.oci.image.layer.v1.tar", tar)


def sample_layers() -> list[tuple[bytes, str]]:
    """Three layers: busybox base (gzip), app files (zstd), changes with whiteouts (plain tar)."""
    with open(BUSYBOX, "rb") as fh:
        busybox = fh.read()
    big = random.Random(42).randbytes(3 << 20)   # incompressible; spans several 1 MiB chunks
    base = tar_bytes([
        {"name": "bin", "type": "dir"},
        {"name": "bin/busybox", "data": busybox, "mode": 0o755},
        {"name": "bin/sh", "type": "symlink", "target": "busybox"},
        {"name": "bin/cat", "type": "hardlink", "target": "bin/busybox", "mode": 0o755},
        {"name": "etc", "type": "dir"},
        {"name": "etc/passwd", "data": b"root:x:0:0:root:/root:/bin/sh\n"},
        {"name": "etc/gone", "data": b"removed by a whiteout\n"},
        {"name": "opt", "type": "dir"},
        {"name": "opt/old", "type": "dir"},
        {"name": "opt/old/a", "data": b"a\n"},
        {"name": "tmp", "type": "dir", "mode": 0o1777},
    ])
    app = tar_bytes([
        {"name": "app", "type": "dir", "uid": 1000, "gid": 1000},
        {"name": "app/big.bin", "data": big, "uid": 1000, "gid": 1000},
        {"name": "app/copy.bin", "data": big},   # dedups against big.bin chunk by chunk
        {"name": "app/empty", "data": b""},
        {"name": "app/attr", "data": b"x", "xattrs": {"user.test": "value"}},
        {"name": "app/link", "type": "symlink", "target": "/etc/passwd"},
        {"name": "app/setuid", "data": b"#!/bin/sh\n", "mode": 0o4755},
    ])
    changes = tar_bytes([
        {"name": "etc", "type": "dir"},
        {"name": "etc/.wh.gone", "data": b""},
        {"name": "etc/passwd", "data": b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/app:/bin/sh\n"},
        {"name": "opt/old", "type": "dir"},
        {"name": "opt/old/.wh..wh..opq", "data": b""},
        {"name": "opt/old/b", "data": b"b\n"},
        {"name": "app/big.bin", "data": big[: 1 << 20] + b"changed"},
    ])
    return [(base, "gzip"), (app, "zstd"), (changes, "none")]


def image_config(diff_ids: list[str], arch: str = "amd64") -> bytes:
    config = {
        "architecture": arch, "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(diff_ids))],
    }
    return json.dumps(config).encode()


def build_image(layers: list[tuple[bytes, str]] | None = None, arch: str = "amd64"
                ) -> tuple[Blob, Blob, list[Blob]]:
    """(manifest, config, layer blobs) for the layers."""
    layers = sample_layers() if layers is None else layers
    blobs = [compress_layer(tar, kind) for tar, kind in layers]
    diff_ids = ["sha256:" + hashlib.sha256(tar).hexdigest() for tar, _ in layers]
    config = Blob("application/vnd.oci.image.config.v1+json", image_config(diff_ids, arch))
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config.descriptor(), "layers": [b.descriptor() for b in blobs]}
    return Blob(manifest["mediaType"], json.dumps(manifest).encode()), config, blobs


def write_oci_layout(path: str, images: list[tuple[Blob, Blob, list[Blob]]], tag: str = "latest",
                     platforms: list[dict[str, str]] | None = None) -> None:
    """An OCI layout; several images become entries (with platforms) of one tagged index."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)

    def put(blob: Blob) -> None:
        with open(os.path.join(path, "blobs", "sha256", blob.digest[7:]), "wb") as fh:
            fh.write(blob.data)

    for manifest, config, layers in images:
        for b in [manifest, config, *layers]:
            put(b)
    if len(images) == 1:
        top = images[0][0].descriptor()
    else:
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [dict(m.descriptor(), platform=p) for (m, _, _), p in zip(images, platforms or [])]}
        blob = Blob(index["mediaType"], json.dumps(index).encode())
        put(blob)
        top = blob.descriptor()
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    with open(os.path.join(path, "oci-layout"), "w") as fh:
        json.dump({"imageLayoutVersion": "1.0.0"}, fh)
    with open(os.path.join(path, "index.json"), "w") as fh:
        json.dump({"schemaVersion": 2, "manifests": [top]}, fh)


def write_docker_archive(path: str, layers: list[tuple[bytes, str]] | None = None) -> None:
    """A ``docker save``-style tar (uncompressed layer.tar members)."""
    layers = sample_layers() if layers is None else layers
    diff_ids = ["sha256:" + hashlib.sha256(tar).hexdigest() for tar, _ in layers]
    config = image_config(diff_ids)
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    files = {config_name: config}
    names = []
    for i, (tar, _) in enumerate(layers):
        name = f"{i:02d}{diff_ids[i][7:15]}/layer.tar"
        files[name] = tar
        names.append(name)
    files["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": ["sample:latest"],
                                          "Layers": names}]).encode()
    with tarfile.open(path, "w") as out:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def push_image(registry: Any, repository: str, tag: str, image: tuple[Blob, Blob, list[Blob]]) -> str:
    """Push through the harness :class:`Registry` helpers; return the manifest digest."""
    manifest, config, layers = image
    for blob in [config, *layers]:
        registry.push_blob(repository, blob.data)
    return registry.put_manifest(repository, tag, manifest.data, manifest.media_type)


def push_index(registry: Any, repository: str, tag: str, images: list[tuple[Blob, Blob, list[Blob]]],
               platforms: list[dict[str, str]]) -> str:
    for image in images:
        push_image(registry, repository, image[0].digest, image)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [dict(m.descriptor(), platform=p) for (m, _, _), p in zip(images, platforms)]}
    return registry.put_manifest(repository, tag, json.dumps(index).encode(), index["mediaType"])
