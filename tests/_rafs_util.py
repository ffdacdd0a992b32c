"""Shared helpers for the rafs reader tests: vector paths and a tiny blob-file reader."""

from __future__ import annotations

import json
import pathlib
import re
import tarfile

from storage.compress import decompress
from storage.device import BlobIoVec, Compressor
from storage.digest import digest

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
