"""The bootstrap layer: a gzip'd tar with ``image/`` (0755) and ``image/image.boot`` (0444).

``image/<blob_id>.blob.meta`` files (chunk-info tables in cache-file format) are added when
the builder produced them, so the snapshotter can seed its cache without fetching blob tails.
The archive is deterministic (zero times, root owner, gzip mtime 0): equal inputs give equal
digests, which keeps re-conversion idempotent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

from storage.atomic import atomic_open

BOOTSTRAP_DIR = "image"
BOOTSTRAP_NAME = "image/image.boot"


@dataclass(frozen=True, slots=True)
class PackedLayer:
    """A packed bootstrap layer on disk."""

    path: str
    digest: str      # sha256 of the gzip bytes (the layer digest)
    size: int
    diff_id: str     # sha256 of the uncompressed tar


def _info(name: str, mode: int, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_bootstrap_layer(bootstrap: str, out: str, blob_metas: Sequence[tuple[str, str]] = ()) -> PackedLayer:
    """Write the layer to ``out`` (temp + rename). ``blob_metas``: (blob_id, path) pairs."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(BOOTSTRAP_DIR, 0o755, kind=tarfile.DIRTYPE))
        with open(bootstrap, "rb") as fh:
            tar.addfile(_info(BOOTSTRAP_NAME, 0o444, os.fstat(fh.fileno()).st_size), fh)
        for blob_id, path in blob_metas:
            with open(path, "rb") as fh:
                tar.addfile(_info(f"{BOOTSTRAP_DIR}/{blob_id}.blob.meta", 0o444,
                                  os.fstat(fh.fileno()).st_size), fh)
    tar_bytes = raw.getvalue()
    with atomic_open(out, "wb") as fh:
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
            gz.write(tar_bytes)
    with open(out, "rb") as fh:
        data = fh.read()
    return PackedLayer(out, "sha256:" + hashlib.sha256(data).hexdigest(), len(data),
                       "sha256:" + hashlib.sha256(tar_bytes).hexdigest())


def extract_bootstrap(layer: bytes) -> bytes:
    """``image/image.boot`` (or legacy ``image.boot``) from a bootstrap layer's gzip bytes."""
    from .errors import SourceError

    try:
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tar:
            for name in (BOOTSTRAP_NAME, "image.boot"):
                try:
                    member = tar.getmember(name)
                except KeyError:
                    continue
                fh = tar.extractfile(member)
                if fh is not None:
                    return fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"bootstrap layer is not a readable tar: {exc}") from exc
    raise SourceError("bootstrap layer has no image/image.boot")


def extract_blob_metas(layer: bytes) -> dict[str, bytes]:
    """``image/<blob_id>.blob.meta`` files of a bootstrap layer, by blob id."""
    from .errors import SourceError

    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tar:
            for member in tar:
                name = member.name
                if member.isreg() and name.startswith(f"{BOOTSTRAP_DIR}/") and name.endswith(".blob.meta"):
                    blob_id = name[len(BOOTSTRAP_DIR) + 1 : -len(".blob.meta")]
                    fh = tar.extractfile(member)
                    if fh is not None and "/" not in blob_id:
                        out[blob_id] = fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"bootstrap layer is not a readable tar: {exc}") from exc
    return out
