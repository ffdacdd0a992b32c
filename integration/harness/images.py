"""Small OCI images built in pure Python (no internet): busybox-static + generated files.

    layer = Layer.from_tree({"etc/hello.txt": b"hi\\n", "bin/run": File(b"#!/bin/sh\\n", 0o755),
                             "etc/old": WHITEOUT, "var/cache": OPAQUE})
    img = busybox_image(extra_layers=[layer], cmd=["/bin/sh"])
    pushed = img.push(registry, "test/busybox", "v1")     # -> PushedImage(ref=..., digest=...)
    img.write_oci_layout("/tmp/x/oci", "v1")              # an OCI image layout dir (skopeo oci:...)

Tars are deterministic (sorted entries, fixed mtime, gzip mtime 0) and always end with the two
zero blocks; parent directories are added automatically.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

from integration.harness import HarnessError

if TYPE_CHECKING:
    from integration.harness.registry import Registry

MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"

MTIME = 1_700_000_000
BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "cat", "ls", "echo", "mount", "id", "ps", "sleep", "uname", "hostname",
                   "env", "true", "false", "touch", "mkdir", "rm", "wc", "head", "tail", "md5sum",
                   "sha256sum", "dd", "find", "stat", "test", "[", "grep", "sed", "seq", "date")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class File:
    """A regular file entry."""

    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: Mapping[str, str] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Symlink:
    target: str


@dataclasses.dataclass(frozen=True, slots=True)
class Hardlink:
    target: str          # path inside the layer, e.g. "bin/busybox"


@dataclasses.dataclass(frozen=True, slots=True)
class _Marker:
    kind: str


WHITEOUT = _Marker("whiteout")     # delete this path from lower layers (".wh.<name>")
OPAQUE = _Marker("opaque")         # this directory hides lower contents (".wh..wh..opq")

Entry = Union[bytes, str, File, Dir, Symlink, Hardlink, _Marker]


def _norm(path: str) -> str:
    p = os.path.normpath("/" + path).lstrip("/")
    if not p or p == ".":
        raise HarnessError(f"bad layer path {path!r}")
    return p


def build_tar(tree: Mapping[str, Entry]) -> bytes:
    """An uncompressed, deterministic tar of ``tree`` (path -> entry)."""
    items: dict[str, Entry] = {}
    for path, entry in tree.items():
        p = _norm(path)
        if isinstance(entry, _Marker):
            head, name = os.path.split(p)
            if entry.kind == "whiteout":
                items[os.path.join(head, ".wh." + name)] = File(b"")
            else:
                items[os.path.join(p, ".wh..wh..opq")] = File(b"")
                items.setdefault(p, Dir())
        else:
            items[p] = entry
    for p in list(items):                      # implicit parent directories
        parent = os.path.dirname(p)
        while parent:
            items.setdefault(parent, Dir())
            parent = os.path.dirname(parent)

    def order(p: str) -> tuple:
        e = items[p]
        return (0 if not isinstance(e, Hardlink) else 1, p.split("/"))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(items, key=order):
            e = items[p]
            if isinstance(e, (bytes, str)):
                e = File(e.encode() if isinstance(e, str) else e)
            ti = tarfile.TarInfo(p)
            ti.mtime = MTIME
            ti.uname = ti.gname = ""
            if isinstance(e, File):
                ti.type, ti.size, ti.mode, ti.uid, ti.gid = tarfile.REGTYPE, len(e.data), e.mode, e.uid, e.gid
                if e.xattrs:
                    ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in e.xattrs.items()}
                tf.addfile(ti, io.BytesIO(e.data))
            elif isinstance(e, Dir):
                ti.type, ti.mode, ti.uid, ti.gid = tarfile.DIRTYPE, e.mode, e.uid, e.gid
                tf.addfile(ti)
            elif isinstance(e, Symlink):
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e.target, 0o777
                tf.addfile(ti)
            elif isinstance(e, Hardlink):
                ti.type, ti.linkname, ti.mode = tarfile.LNKTYPE, _norm(e.target), 0o644
                tf.addfile(ti)
            else:
                raise HarnessError(f"unknown entry type for {p}: {e!r}")
    return buf.getvalue()


def tar_directory(src: str) -> bytes:
    """A deterministic tar of a real directory tree (owners/modes kept, mtimes fixed)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, src)
            names = sorted(dirnames + filenames) if rel_dir == "." else sorted(filenames)
            if rel_dir != ".":
                ti = tf.gettarinfo(dirpath, rel_dir)
                ti.mtime = MTIME
                tf.addfile(ti)
            for name in names:
                full = os.path.join(dirpath, name)
                if rel_dir == "." and name in dirnames:
                    continue
                arc = name if rel_dir == "." else os.path.join(rel_dir, name)
                ti = tf.gettarinfo(full, arc)
                ti.mtime = MTIME
                if ti.isreg():
                    with open(full, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True, slots=True)
class Layer:
    """One layer blob: ``data`` as stored in the registry, ``diff_id`` of the uncompressed tar."""

    data: bytes
    diff_id: str
    media_type: str = MT_LAYER_GZIP
    annotations: Mapping[str, str] | None = None

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    @classmethod
    def from_tar(cls, tar: bytes, compression: str = "gzip",
                 annotations: Mapping[str, str] | None = None) -> "Layer":
        """Compress a tar: ``gzip`` (default), ``zstd`` or ``none``."""
        if compression == "gzip":
            data, mt = gzip.compress(tar, compresslevel=6, mtime=0), MT_LAYER_GZIP
        elif compression == "zstd":
            import zstandard

            data, mt = zstandard.ZstdCompressor(level=3).compress(tar), MT_LAYER_ZSTD
        elif compression == "none":
            data, mt = tar, MT_LAYER_TAR
        else:
            raise HarnessError(f"unknown layer compression {compression!r}")
        return cls(data=data, diff_id=sha256(tar), media_type=mt, annotations=annotations)

    @classmethod
    def from_tree(cls, tree: Mapping[str, Entry], compression: str = "gzip") -> "Layer":
        return cls.from_tar(build_tar(tree), compression)

    @classmethod
    def from_dir(cls, src: str, compression: str = "gzip") -> "Layer":
        return cls.from_tar(tar_directory(src), compression)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    def with_annotations(self, annotations: Mapping[str, str]) -> "Layer":
        return dataclasses.replace(self, annotations=dict(annotations))


@functools.lru_cache(maxsize=4)
def busybox_layer(compression: str = "gzip") -> Layer:
    """A root filesystem with the static busybox and common applets as symlinks."""
    if not os.path.exists(BUSYBOX):
        raise HarnessError(f"{BUSYBOX} not found (Debian package busybox-static)")
    with open(BUSYBOX, "rb") as f:
        bb = f.read()
    tree: dict[str, Entry] = {"bin/busybox": File(bb, 0o755)}
    for applet in BUSYBOX_APPLETS:
        tree[f"bin/{applet}"] = Symlink("busybox")
    tree.update({
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
        "etc/hostname": b"pynydus\n",
        "tmp": Dir(0o1777), "proc": Dir(0o555), "sys": Dir(0o555), "dev": Dir(), "root": Dir(0o700),
    })
    return Layer.from_tree(tree, compression)


@dataclasses.dataclass(frozen=True, slots=True)
class PushedImage:
    """An image in a registry."""

    ref: str              # host/repo:tag
    repo: str
    tag: str
    digest: str           # manifest digest
    manifest: Mapping[str, Any]
    layers: tuple[Layer, ...]

    host: str = ""        # registry host:port

    @property
    def ref_by_digest(self) -> str:
        return f"{self.host}/{self.repo}@{self.digest}"


@dataclasses.dataclass(frozen=True, slots=True)
class Image:
    """An OCI image: layers (bottom first) plus config fields."""

    layers: tuple[Layer, ...]
    cmd: tuple[str, ...] = ("/bin/sh",)
    entrypoint: tuple[str, ...] = ()
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    workdir: str = "/"
    labels: Mapping[str, str] | None = None
    architecture: str = "amd64"
    os: str = "linux"

    def config_json(self) -> bytes:
        cfg: dict[str, Any] = {
            "created": "2023-11-14T22:13:20Z",
            "architecture": self.architecture,
            "os": self.os,
            "config": {"Env": list(self.env), "Cmd": list(self.cmd), "WorkingDir": self.workdir},
            "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in self.layers]},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "pynydus harness"}
                        for _ in self.layers],
        }
        if self.entrypoint:
            cfg["config"]["Entrypoint"] = list(self.entrypoint)
        if self.labels:
            cfg["config"]["Labels"] = dict(self.labels)
        return json.dumps(cfg, separators=(",", ":"), sort_keys=True).encode()

    def manifest(self, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        cfg = self.config_json()
        m: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": sha256(cfg), "size": len(cfg)},
            "layers": [la.descriptor() for la in self.layers],
        }
        if annotations:
            m["annotations"] = dict(annotations)
        return m

    def manifest_bytes(self, annotations: Mapping[str, str] | None = None) -> bytes:
        return json.dumps(self.manifest(annotations), separators=(",", ":")).encode()

    @property
    def uncompressed_size(self) -> int:
        return sum(len(_decompress(la)) for la in self.layers)

    def push(self, registry: "Registry", repo: str, tag: str = "latest", *,
             annotations: Mapping[str, str] | None = None, auth: Any = None) -> PushedImage:
        """Push blobs, config and the manifest; returns where it landed."""
        for la in self.layers:
            registry.push_blob(repo, la.data, auth=auth)
        registry.push_blob(repo, self.config_json(), auth=auth)
        body = self.manifest_bytes(annotations)
        digest = registry.put_manifest(repo, tag, body, MT_MANIFEST, auth=auth)
        return PushedImage(ref=registry.ref(repo, tag), repo=repo, tag=tag, digest=digest,
                           manifest=json.loads(body), layers=self.layers,
                           host=registry.host)

    def write_oci_layout(self, dest: str, tag: str = "latest") -> str:
        """Write an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``)."""
        blobs = os.path.join(dest, "blobs", "sha256")
        os.makedirs(blobs, exist_ok=True)
        manifest = self.manifest_bytes()
        for data in [la.data for la in self.layers] + [self.config_json(), manifest]:
            path = os.path.join(blobs, sha256(data).split(":", 1)[1])
            if not os.path.exists(path):
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.rename(path + ".tmp", path)
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [{
            "mediaType": MT_MANIFEST, "digest": sha256(manifest), "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
        with open(os.path.join(dest, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        with open(os.path.join(dest, "index.json.tmp"), "w") as f:
            json.dump(index, f)
        os.rename(os.path.join(dest, "index.json.tmp"), os.path.join(dest, "index.json"))
        return dest

    def unpack(self, dest: str) -> None:
        """Apply the layers (whiteouts included) into ``dest`` — the expected rootfs."""
        os.makedirs(dest, exist_ok=True)
        for la in self.layers:
            with tarfile.open(fileobj=io.BytesIO(_decompress(la)), mode="r:") as tf:
                for m in tf.getmembers():
                    head, name = os.path.split(m.name)
                    if name == ".wh..wh..opq":
                        d = os.path.join(dest, head)
                        for child in os.listdir(d) if os.path.isdir(d) else []:
                            _rm(os.path.join(d, child))
                        continue
                    if name.startswith(".wh."):
                        _rm(os.path.join(dest, head, name[4:]))
                        continue
                    target = os.path.join(dest, m.name)
                    if os.path.lexists(target) and not (m.isdir() and os.path.isdir(target)):
                        _rm(target)
                    tf.extract(m, dest, set_attrs=m.isdir() or m.isreg(), filter="fully_trusted")


def _rm(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _decompress(layer: Layer) -> bytes:
    if layer.media_type == MT_LAYER_GZIP:
        return gzip.decompress(layer.data)
    if layer.media_type == MT_LAYER_ZSTD:
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(layer.data)
    return layer.data


def busybox_image(extra_files: Mapping[str, Entry] | None = None,
                  extra_layers: Iterable[Layer] = (), *, cmd: Iterable[str] = ("/bin/sh",),
                  compression: str = "gzip") -> Image:
    """busybox rootfs layer, then one layer of ``extra_files`` (if any), then ``extra_layers``."""
    layers = [busybox_layer(compression)]
    if extra_files:
        layers.append(Layer.from_tree(extra_files, compression))
    layers.extend(extra_layers)
    return Image(layers=tuple(layers), cmd=tuple(cmd), env=("PATH=/bin",))


def generated_files(count: int, size: int, *, prefix: str = "data", seed: int = 0) -> dict[str, Entry]:
    """``count`` files of ``size`` pseudo-random (poorly compressible) bytes under ``prefix/``."""
    import random

    rnd = random.Random(seed)
    return {f"{prefix}/file{i:04d}.bin": File(rnd.randbytes(size)) for i in range(count)}


# --- nydus images assembled from existing parts (no converter needed) ---------------------------
MT_NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
ANN_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANN_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANN_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"


def nydus_bootstrap_layer(bootstrap: bytes, fs_version: str = "6",
                          extra_files: Mapping[str, bytes] | None = None) -> Layer:
    """The bootstrap layer of a nydus image: gzip tar with ``image/`` + ``image/image.boot``."""
    tree: dict[str, Entry] = {"image": Dir(0o755), "image/image.boot": File(bootstrap, 0o444)}
    for name, data in (extra_files or {}).items():
        tree[f"image/{name}"] = File(data, 0o444)
    layer = Layer.from_tree(tree, "gzip")
    return layer.with_annotations({ANN_NYDUS_BOOTSTRAP: "true", ANN_NYDUS_FS_VERSION: fs_version})


def nydus_blob_layer(blob: bytes) -> Layer:
    """A nydus data blob as an image layer (its digest must equal the bootstrap's blob id)."""
    d = sha256(blob)
    return Layer(data=blob, diff_id=d, media_type=MT_NYDUS_BLOB,
                 annotations={ANN_NYDUS_BLOB: "true"})


def nydus_image(bootstrap: bytes, blobs: Iterable[bytes], *, fs_version: str = "6",
                cmd: Iterable[str] = ("/bin/sh",),
                extra_bootstrap_files: Mapping[str, bytes] | None = None) -> Image:
    """An image in upstream nydus layout: blob layers (in blob-table order), then the bootstrap
    layer. For images made by real tools (e.g. the vectors) when no converter is at hand."""
    layers = [nydus_blob_layer(b) for b in blobs]
    layers.append(nydus_bootstrap_layer(bootstrap, fs_version, extra_bootstrap_files))
    return Image(layers=tuple(layers), cmd=tuple(cmd), env=("PATH=/bin",))


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """OCI ChainIDs of a layer stack (what containerd names committed snapshots by)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else sha256(f"{out[-1]} {d}".encode()))
    return out
