"""``nydusify optimize``: a nydus image rebuilt around its start-up set, from a prefetch trace.

Upstream's ``separated-blob-with-prefetch-files`` policy, from the nydus image itself (no OCI
source needed): the chunks of the traced files are copied, in trace order, into one new data
blob; those files point at the copies; the bootstrap's prefetch table lists them in trace
order. Every other blob is reused as it is (its chunks still serve the other files), so only the
new blob and the new bootstrap layer are uploaded. A node running the result prefetches the
start-up set from the front of one blob, in access order, in a few large range requests.

Steps: read the source manifest and its bootstrap layer; load the bootstrap into the builder's
tree; fetch the traced files' chunks with merged range GETs (each decompressed and checked
against its digest); write the new blob; write the bootstrap (blob table = the blobs still
referenced + the new one); push blobs missing in the target repository (copied from the
source), the bootstrap layer, config and manifest.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any

from rafs.errors import RafsError
from storage.atomic import atomic_write

from .bootstrap_layer import BOOTSTRAP_DIR, extract_bootstrap, pack_bootstrap_layer
from .converter import ConvertedManifest, ConvertResult
from .distribution import client_for
from .errors import ConvertError, SourceError
from .manifest import (ANNOTATION_NYDUS_BOOTSTRAP, INDEX_TYPES, MEDIA_TYPE_OCI_CONFIG,
                       MEDIA_TYPE_OCI_MANIFEST, Descriptor, blob_descriptor, bootstrap_descriptor,
                       build_manifest, canonical_json, convertible_platforms, parse_json,
                       platform_matches, rewrite_config, sha256_digest)
from .push import Pusher
from .reference import parse_reference
from .source import RegistrySource


@dataclass(frozen=True, slots=True)
class OptimizeOptions:
    """What ``nydusify optimize`` takes."""

    source: str                     # a nydus image in a registry
    target: str                     # a tag
    prefetch_files: str             # a prefetch trace (or a plain path list)
    work_dir: str
    source_insecure: bool = False
    target_insecure: bool = False
    platform: str | None = None
    push_chunk_size: int = 0
    progress: bool | None = None
    merging_size: int = 4 << 20     #: bytes per range GET when copying the start-up chunks


def optimize(opts: OptimizeOptions) -> ConvertResult:
    """Rebuild ``opts.source`` with its start-up set in a new leading blob; push ``opts.target``."""
    from rafs.trace import load_trace, trace_paths

    target = parse_reference(opts.target)
    if target.digest:
        raise ConvertError(f"target {opts.target} must be a tag, not a digest")
    paths = trace_paths(load_trace(opts.prefetch_files))
    if not paths:
        raise ConvertError(f"--prefetch-files {opts.prefetch_files}: no path listed")
    try:
        source = RegistrySource(opts.source, insecure=opts.source_insecure)
    except RafsError as exc:
        raise SourceError(f"optimize needs a nydus image in a registry: {exc}") from exc
    os.makedirs(opts.work_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".optimize-", dir=opts.work_dir)
    try:
        manifest = _source_manifest(source, opts.platform)
        layers = manifest.get("layers") or []
        if not layers or (layers[-1].get("annotations") or {}).get(ANNOTATION_NYDUS_BOOTSTRAP) != "true":
            raise SourceError(f"{opts.source} is not a nydus image (no bootstrap layer)")
        config = parse_json(source.document(manifest["config"]["digest"]), "config")
        with source.open_blob(layers[-1]["digest"]) as fh:
            boot_layer = fh.read()
        if "sha256:" + hashlib.sha256(boot_layer).hexdigest() != layers[-1]["digest"]:
            raise SourceError(f"bootstrap layer {layers[-1]['digest']}: content does not match its digest")
        source_boot = os.path.join(work, "source.boot")
        with open(source_boot, "wb") as fh:
            fh.write(extract_bootstrap(boot_layer))
        client = source.client.client(source.ref.repository)
        built = rebuild(source_boot, paths, work, client.read_blob_range, opts.merging_size)
        pusher = Pusher(client_for(target, insecure=opts.target_insecure), target,
                        chunk_size=opts.push_chunk_size, progress=opts.progress)
        old_metas = _blob_metas(boot_layer, work)
        blob_descs: list[Descriptor] = []
        metas: list[tuple[str, str]] = []
        for blob_id in built.blob_ids:
            digest = f"sha256:{blob_id}"
            if blob_id == built.new_blob_id:
                pusher.push_file(digest, built.new_blob)
                size = os.path.getsize(built.new_blob)
                metas.append((blob_id, built.new_blob_meta))
            else:
                have = pusher.exists(digest)
                if have is None:  # another repository: copy the blob over
                    copy = os.path.join(work, f"{blob_id}.blob")
                    with source.open_blob(digest) as src, open(copy, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    pusher.push_file(digest, copy)
                    have = os.path.getsize(copy)
                    os.unlink(copy)
                size = have
                if blob_id in old_metas:
                    metas.append((blob_id, old_metas[blob_id]))
            blob_descs.append(blob_descriptor(blob_id, size))
        packed = pack_bootstrap_layer(built.bootstrap, os.path.join(work, "bootstrap.tar.gz"), metas)
        pusher.push_file(packed.digest, packed.path)
        diff_ids = [d.digest for d in blob_descs] + [packed.diff_id]
        new_config = rewrite_config(config, diff_ids)
        # the source is converted already: keep one converter history entry
        hist = new_config.get("history") or []
        if len(hist) >= 2 and hist[-1] == hist[-2]:
            new_config["history"] = hist[:-1]
        config_bytes = canonical_json(new_config)
        config_digest = sha256_digest(config_bytes)
        pusher.push_bytes(config_digest, config_bytes)
        config_desc = Descriptor(MEDIA_TYPE_OCI_CONFIG, config_digest, len(config_bytes))
        fs_version = int((layers[-1].get("annotations") or {}).get("containerd.io/snapshot/nydus-fs-version", "6"))
        boot_desc = bootstrap_descriptor(packed.digest, packed.size, fs_version)
        new_manifest = build_manifest(manifest, config_desc, blob_descs, boot_desc)
        data = canonical_json(new_manifest)
        digest = pusher.push_manifest(data, MEDIA_TYPE_OCI_MANIFEST, tag=target.tag)
        conv = ConvertedManifest(digest, len(data), "", new_manifest, new_config, "", ())
        return ConvertResult(str(target), digest, MEDIA_TYPE_OCI_MANIFEST, [conv], pusher.stats)
    finally:
        source.close()
        shutil.rmtree(work, ignore_errors=True)


def _source_manifest(source: RegistrySource, platform: str | None) -> dict[str, Any]:
    data, media_type = source.root()
    doc = parse_json(data, f"{source.name} root")
    if (doc.get("mediaType") or media_type) not in INDEX_TYPES and "manifests" not in doc:
        return doc
    entries = convertible_platforms(doc)
    if platform:
        entries = [e for e in entries if platform_matches(e.get("platform"), platform)]
    if len(entries) != 1:
        raise SourceError(f"{source.name} is an index with {len(entries)} matching images: pick one "
                          "with --platform")
    return parse_json(source.document(entries[0]["digest"]), f"manifest {entries[0]['digest']}")


def _blob_metas(boot_layer: bytes, work: str) -> dict[str, str]:
    """The ``image/<blob id>.blob.meta`` files of a bootstrap layer, extracted into ``work``."""
    out: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(boot_layer), mode="r:*") as tar:
            for member in tar.getmembers():
                name = member.name
                if member.isreg() and name.startswith(BOOTSTRAP_DIR + "/") and name.endswith(".blob.meta"):
                    blob_id = name[len(BOOTSTRAP_DIR) + 1:-len(".blob.meta")]
                    fh = tar.extractfile(member)
                    if fh is None or "/" in blob_id:
                        continue
                    path = os.path.join(work, f"old-{blob_id}.blob.meta")
                    with open(path, "wb") as dst:
                        dst.write(fh.read())
                    out[blob_id] = path
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"bootstrap layer is not a readable tar: {exc}") from exc
    return out


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What :func:`rebuild` wrote into its work dir."""

    bootstrap: str
    blob_ids: list[str]          # the new bootstrap's blob table
    new_blob_id: str
    new_blob: str
    new_blob_meta: str
    startup_files: int
    startup_bytes: int           # uncompressed bytes of the start-up set


def rebuild(bootstrap: str, paths: list[str], work: str, read_range: Any, merging_size: int = 4 << 20) -> Rebuilt:
    """Copy the chunks of ``paths`` (trace order; a directory: its files breadth-first) into a new
    blob in ``work``, point those files at it and write ``work/image.boot`` with the prefetch
    table = ``paths``. ``read_range(blob_id, offset, size) -> bytes`` reads a source blob."""
    from rafs.builder.blob import BlobRecord, BlobWriter, ChunkStore
    from rafs.builder.bootstrap import BootstrapOptions, write_bootstrap
    from rafs.builder.build import blob_ids_of
    from rafs.builder.loader import load_bootstrap
    from rafs.builder.tree import ChunkRef, Tree
    from rafs.errors import BuildError

    from storage.records import BlobFeatures

    from .layer import write_blob_meta

    loaded = load_bootstrap(bootstrap)
    if any(rec.info.features & BlobFeatures.ZRAN for rec in loaded.blobs):
        raise ConvertError("optimize does not support OCI-ref (zran) images: their chunks are gzip spans "
                           "of the original layers, not nydus chunks to copy (optimize the full conversion)")
    store = ChunkStore()
    for rec in loaded.blobs:
        store.add_blob(BlobRecord(rec.info, list(rec.chunks)))
    nodes = []
    seen: set[int] = set()
    for path in paths:
        top = loaded.tree.lookup(path)
        if top is None:
            continue
        for _, node in Tree(top).bfs() if top.is_dir else [(b"", top)]:
            if node.is_reg and node.chunks and id(node) not in seen:
                seen.add(id(node))
                nodes.append(node)
    if not nodes:
        raise ConvertError("no file of the prefetch list has data in this image")
    wanted: dict[tuple[int, int], None] = {}
    for node in nodes:
        for ref in node.chunks:
            wanted.setdefault((ref.blob_index, ref.ci_index), None)
    data = _fetch_chunks(store, list(wanted), read_range, merging_size)
    new_index = len(store.blobs)
    blob_tmp = os.path.join(work, ".new.blob")
    with open(blob_tmp, "wb") as f:
        writer = BlobWriter(f, blob_index=new_index, chunk_size=loaded.chunk_size,
                            compressor=loaded.compressor, digester=loaded.digester)
        try:
            remap: dict[tuple[int, int], int] = {}
            for key in wanted:
                chunk = store.blobs[key[0]].chunks[key[1]]
                assert chunk is not None
                remap[key] = writer.add_chunk(data.pop(key), chunk.digest)
            info, _ = writer.finish(inline_meta=False, blob_toc=True)
        except BuildError as exc:
            raise ConvertError(f"writing the start-up blob failed: {exc}") from exc
        finally:
            writer.close()
    new_blob = os.path.join(work, f"{info.blob_id}.blob")
    os.replace(blob_tmp, new_blob)
    store.blobs.append(BlobRecord(info, list(writer.chunk_infos), new=True))
    # the copied chunks stay in the chunk table: each reused blob's table remains whole
    moved = [(r, i * loaded.chunk_size) for node in nodes for i, r in enumerate(node.chunks)]
    for node in nodes:
        node.chunks = [ChunkRef(new_index, remap[(r.blob_index, r.ci_index)]) for r in node.chunks]
    opts = BootstrapOptions(chunk_size=loaded.chunk_size, compressor=loaded.compressor,
                            digester=loaded.digester, prefetch=list(paths), table_extra=moved)
    out = os.path.join(work, "image.boot")
    boot = write_bootstrap(loaded.tree, store, opts)
    atomic_write(out, boot)
    meta = os.path.join(work, f"{info.blob_id}.blob.meta")
    write_blob_meta(new_blob, info, meta)
    return Rebuilt(out, blob_ids_of(boot), info.blob_id, new_blob, meta, len(nodes),
                   sum(n.size for n in nodes))


def _fetch_chunks(store: Any, keys: list[tuple[int, int]], read_range: Any,
                  merging_size: int) -> dict[tuple[int, int], bytes]:
    """Uncompressed, digest-checked data of the chunks ``keys`` ((blob index, ci index)), read
    with one range GET per run of chunks contiguous in their blob (up to ``merging_size``)."""
    from storage.compress import decompress
    from storage.digest import digest as chunk_digest

    out: dict[tuple[int, int], bytes] = {}
    by_blob: dict[int, list[Any]] = {}
    for blob_index, ci in keys:
        chunk = store.blobs[blob_index].chunks[ci]
        if chunk is None or (chunk.compressed_size == 0 and chunk.uncompressed_size):
            raise ConvertError(f"chunk {ci} of blob {store.blobs[blob_index].info.blob_id} is not in the "
                               "bootstrap's chunk table")
        by_blob.setdefault(blob_index, []).append((ci, chunk))
    for blob_index, chunks in by_blob.items():
        info = store.blobs[blob_index].info
        chunks.sort(key=lambda c: c[1].compressed_offset)
        runs: list[list[Any]] = []
        for item in chunks:
            c = item[1]
            if runs:
                first, last = runs[-1][0][1], runs[-1][-1][1]
                end = last.compressed_offset + last.compressed_size
                if c.compressed_offset == end and end + c.compressed_size - first.compressed_offset <= merging_size:
                    runs[-1].append(item)
                    continue
            runs.append([item])
        for run in runs:
            start = run[0][1].compressed_offset
            size = run[-1][1].compressed_offset + run[-1][1].compressed_size - start
            try:
                raw = read_range(info.blob_id, start, size)
            except Exception as exc:
                raise SourceError(f"blob {info.blob_id} range {start}+{size}: {exc}") from exc
            if len(raw) != size:
                raise SourceError(f"blob {info.blob_id} range {start}+{size}: got {len(raw)} bytes")
            for ci, c in run:
                piece = raw[c.compressed_offset - start:c.compressed_offset - start + c.compressed_size]
                plain = decompress(info.compressor, piece, c.uncompressed_size) if c.is_compressed else piece
                if len(plain) != c.uncompressed_size or (c.digest and chunk_digest(info.digester, plain) != c.digest):
                    raise SourceError(f"blob {info.blob_id} chunk {ci}: data does not match its digest")
                out[(blob_index, ci)] = bytes(plain)
    return out
