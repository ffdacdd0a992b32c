"""``nydus-image merge``: per-layer bootstraps -> one image bootstrap (overlay semantics).

Layers are applied bottom-up: an upper entry replaces a lower one, ``.wh.<name>`` deletes
``name`` below, ``.wh..wh..opq`` hides everything below in that directory (``overlayfs`` spec:
0/0 char devices and ``trusted.overlay.opaque=y``).  The blob table is the union of the
layers' blobs in layer order, keeping only blobs some file still references.  A layer's own
blob id comes from ``blob_digests[i]`` if given, else stays as recorded, except the inline
placeholder (``x`` * 64) which is replaced by the bootstrap file name when that is a blob id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from rafs.builder.blob import INLINE_BLOB_ID_PLACEHOLDER, BlobRecord, ChunkStore
from rafs.builder.bootstrap import BootstrapOptions, write_bootstrap
from rafs.builder.build import blob_ids_of
from rafs.builder.loader import load_bootstrap
from rafs.builder.tree import ChunkRef, Tree, apply_whiteouts_in_layer, overlay
from rafs.errors import BuildError
from storage.atomic import atomic_write
from storage.records import BlobFeatures

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class MergeResult:
    bootstrap: str
    blob_ids: list[str]


def _digest_hex(value: str) -> str:
    value = value.strip()
    if value.startswith("sha256:"):
        value = value[len("sha256:"):]
    if not _HEX64.match(value):
        raise BuildError(f"invalid blob digest {value!r}")
    return value


def _own_blob(blobs: list[BlobRecord], store: ChunkStore, is_layer: bool, have_digests: bool) -> int | None:
    """Index of the layer's own data blob: the one with the inline placeholder id, else (when
    digests are given) the last blob not already known from lower layers / the chunk dict."""
    if not is_layer:
        return None
    for i, rec in enumerate(blobs):
        if rec.info.blob_id == INLINE_BLOB_ID_PLACEHOLDER or not _HEX64.match(rec.info.blob_id):
            return i
    if have_digests:
        known = {b.info.blob_id for b in store.blobs}
        for i in range(len(blobs) - 1, -1, -1):
            if blobs[i].info.blob_id not in known:
                return i
    return None


def merge(bootstraps: list[str], out: str, *, blob_digests: list[str] | None = None,
          blob_sizes: list[int] | None = None, blob_toc_digests: list[str] | None = None,
          blob_toc_sizes: list[int] | None = None, prefetch: list[str] | None = None,
          whiteout_spec: str = "oci", parent_bootstrap: str | None = None) -> MergeResult:
    """Merge ``bootstraps`` (bottom layer first) into ``out``."""
    if not bootstraps:
        raise BuildError("merge needs at least one source bootstrap")
    for name, lst in (("--blob-digests", blob_digests), ("--blob-sizes", blob_sizes),
                      ("--blob-toc-digests", blob_toc_digests), ("--blob-toc-sizes", blob_toc_sizes)):
        if lst is not None and len(lst) != len(bootstraps):
            raise BuildError(f"{name} has {len(lst)} entries for {len(bootstraps)} bootstraps")
    store = ChunkStore()
    tree: Tree | None = None
    params = None
    sources = ([parent_bootstrap] if parent_bootstrap else []) + list(bootstraps)
    for layer, path in enumerate(sources):
        li = layer - (1 if parent_bootstrap else 0)
        loaded = load_bootstrap(path)
        this = (loaded.chunk_size, loaded.compressor, loaded.digester)
        if params is None:
            params = this
        elif loaded.blobs and params[0] != loaded.chunk_size:
            raise BuildError(f"{path}: chunk size {loaded.chunk_size:#x} differs from {params[0]:#x}")
        remap: dict[int, int] = {}
        own_index = _own_blob(loaded.blobs, store, li >= 0, blob_digests is not None)
        for i, rec in enumerate(loaded.blobs):
            info = rec.info
            own = i == own_index
            if own:
                separate = bool(info.features & BlobFeatures.SEPARATE)
                if blob_digests is not None and separate:
                    # upstream: for a SEPARATE (OCI-ref) blob the digest names its ref blob
                    info = replace(info, blob_meta_digest=bytes.fromhex(_digest_hex(blob_digests[li])))
                elif blob_digests is not None:
                    info = replace(info, blob_id=_digest_hex(blob_digests[li]))
                elif info.blob_id == INLINE_BLOB_ID_PLACEHOLDER or not _HEX64.match(info.blob_id):
                    name = os.path.basename(path)
                    if not _HEX64.match(name):
                        raise BuildError(f"{path}: blob id is a placeholder; pass --blob-digests")
                    info = replace(info, blob_id=name)
                if blob_sizes is not None and separate:
                    info = replace(info, blob_meta_size=int(blob_sizes[li]))
                elif blob_sizes is not None:
                    info = replace(info, compressed_size=int(blob_sizes[li]))
                if blob_toc_digests is not None:
                    info = replace(info, blob_toc_digest=bytes.fromhex(_digest_hex(blob_toc_digests[li])))
                if blob_toc_sizes is not None:
                    info = replace(info, blob_toc_size=int(blob_toc_sizes[li]))
            existing = next((j for j, b in enumerate(store.blobs) if b.info.blob_id == info.blob_id), None)
            if existing is None:
                existing = store.add_blob(BlobRecord(info, [c for c in rec.chunks]))
            else:
                # fill in chunks this layer knows about
                known = store.blobs[existing].chunks
                for k, c in enumerate(rec.chunks):
                    if c is not None and k < len(known) and known[k] is None:
                        known[k] = replace(c, blob_index=existing)
            remap[i] = existing
        seen: set[int] = set()
        for _, node in loaded.tree.walk():
            if node.is_reg and id(node) not in seen:
                seen.add(id(node))
                node.chunks = [ChunkRef(remap[r.blob_index], r.ci_index) for r in node.chunks]
                for r in node.chunks:
                    if store.blobs[r.blob_index].chunks[r.ci_index] is None:
                        raise BuildError(f"{path}: chunk {r.ci_index} of blob {r.blob_index} missing from chunk table")
        if tree is None:
            tree = loaded.tree
            apply_whiteouts_in_layer(tree, whiteout_spec)  # nothing below the bottom layer
        else:
            tree = overlay(tree, loaded.tree, whiteout_spec)
    assert tree is not None and params is not None
    opts = BootstrapOptions(chunk_size=params[0], compressor=params[1], digester=params[2],
                            prefetch=list(prefetch or []))
    boot = write_bootstrap(tree, store, opts)
    atomic_write(out, boot, perms=0o600)
    return MergeResult(out, blob_ids_of(boot))
