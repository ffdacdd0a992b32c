"""Shared helpers for the rafs reader tests: vector paths and a tiny blob-file reader."""

from __future__ import annotations

import json
import os
import pathlib
import re
import stat
import tarfile

from storage.compress import decompress
from storage.digest import digest
from storage.records import BlobIoVec, Compressor

TEXTURE = "dragonflyoss-nydus/tests/texture"
SNAP = "containerd-nydus-snapshotter/pkg/filesystem/testdata"


def extract_boot(vectors_dir: pathlib.Path, name: str, dest: pathlib.Path) -> pathlib.Path:
    """Extract ``image/image.boot`` of a snapshotter testdata tarball into ``dest``."""
    out = dest / f"{name}.boot"
    if not out.exists():
        with tarfile.open(vectors_dir / SNAP / f"{name}.tar.gz") as tf:
            out.write_bytes(tf.extractfile("image/image.boot").read())
    return out


def read_iovec(vec: BlobIoVec, blob_paths: dict[str, pathlib.Path], *, verify: bool = True) -> bytes:
    """Assemble the bytes of an iovec straight from blob files (decompress + digest check)."""
    out = bytearray()
    cache: dict[tuple[str, int], bytes] = {}
    for desc in vec:
        if desc.is_hole:
            out += bytes(desc.size)
            continue
        blob, chunk = desc.blob, desc.chunk
        key = (blob.blob_id, chunk.index)
        data = cache.get(key)
        if data is None:
            with open(blob_paths[blob.blob_id], "rb") as f:
                f.seek(chunk.compressed_offset)
                raw = f.read(chunk.compressed_size)
            algo = blob.compressor if chunk.is_compressed else Compressor.NONE
            data = decompress(algo, raw, chunk.uncompressed_size)
            if verify:
                assert digest(blob.digester, data) == chunk.digest, f"digest mismatch for chunk {chunk}"
            cache[key] = data
        out += data[desc.offset : desc.offset + desc.size]
    return bytes(out)


def parse_result(path: pathlib.Path) -> tuple[list, dict[str, str]]:
    """The ``.result`` oracle: (tree -J JSON, {path: md5})."""
    text = path.read_text()
    md5s = {}
    json_lines = []
    for line in text.splitlines():
        m = re.fullmatch(r"([0-9a-f]{32})  (/.*)", line)
        if m:
            md5s[m.group(2)] = m.group(1)
        else:
            json_lines.append(line)
    return json.loads("\n".join(json_lines)), md5s


def flatten_tree(tree: list) -> dict[str, tuple[str, str | None]]:
    """{path: (type, link target)} from ``tree -J`` output."""
    out: dict[str, tuple[str, str | None]] = {}

    def rec(node: dict, base: str) -> None:
        path = base.rstrip("/") + "/" + node["name"] if node["name"] else "/"
        out[path] = (node["type"], node.get("target"))
        if node["type"] == "directory":
            for child in node.get("contents", []):
                rec(child, path)

    for node in tree:
        if node.get("type") == "directory":
            rec(node, "")
    return out


def rich_tree(root: pathlib.Path) -> None:
    """A source tree exercising what the vectors lack: xattrs, big dirs, devices, odd sizes."""
    (root / "big").mkdir()
    for i in range(600):  # > one 4 KiB block of dirents: multi-block binary search
        (root / "big" / f"entry-{i:04d}-{'x' * (i % 40)}").write_bytes(bytes([i % 251]) * (i % 7))
    (root / "deep").mkdir()
    d = root / "deep"
    for i in range(30):
        d = d / f"d{i}"
        d.mkdir()
    (d / "leaf").write_text("leaf")
    data = os.urandom(3 * 8192 + 123)
    (root / "multi").write_bytes(data)
    (root / "empty").write_bytes(b"")
    (root / "exact").write_bytes(b"z" * 8192)
    os.link(root / "multi", root / "multi-link")
    os.symlink("multi", root / "rel-link")
    os.symlink("/" + "a" * 300, root / "long-link")
    os.mkfifo(root / "fifo")
    (root / "attrs").write_text("x")
    os.setxattr(root / "attrs", b"user.one", b"1")
    os.setxattr(root / "attrs", b"user.empty", b"")
    if os.geteuid() == 0:  # trusted.* xattrs, device nodes and foreign owners need root
        os.setxattr(root / "attrs", b"trusted.t", b"\x00\x01\x02")
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "blk", stat.S_IFBLK | 0o600, os.makedev(259, 70000))
        os.chown(root / "attrs", 70000, 80000)
    os.chmod(root / "empty", 0o4755)
    os.utime(root / "multi", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def build_rich_image(dest: pathlib.Path) -> pathlib.Path:
    """A v6 bootstrap of :func:`rich_tree` made by ``rafs.builder``."""
    from rafs.builder.build import BuildOptions, build

    src = dest / "rich-src"
    src.mkdir()
    rich_tree(src)
    boot = dest / "rich.boot"
    build(str(src), bootstrap_out=str(boot), blob_out=str(dest / "rich.blob"), options=BuildOptions(chunk_size=0x2000))
    return boot
