"""``build()``: a directory, tar stream or OCI layer -> RAFS v6 bootstrap + data blob."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from rafs.builder.blob import BlobRecord, BlobWriter, Chunker, ChunkStore
from rafs.builder.bootstrap import BootstrapOptions, write_bootstrap
from rafs.builder.source import LayerLimits, open_layer, spool_tar_files, walk_directory, walk_tar
from rafs.builder.tree import Inode, Tree, apply_whiteouts_in_layer
from rafs.errors import BuildError
from storage.atomic import atomic_write
from storage.records import BlobInfo, Compressor, Digester

SOURCE_TYPES = ("dir-rafs", "tar-rafs", "targz-rafs", "targz-ref")
#: upstream spellings accepted for --type/--source-type
SOURCE_TYPE_ALIASES = {"directory": "dir-rafs", "dir": "dir-rafs", "tar": "tar-rafs", "targz": "targz-rafs"}


@dataclass(slots=True)
class BuildOptions:
    """Builder options; defaults mirror ``nydus-image create``: 1 MiB chunks, zstd, blake3,
    whiteout spec ``oci``, no inline meta, no blob TOC, no prefetch, no chunk dict."""

    chunk_size: int = 0x100000
    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    whiteout_spec: str = "oci"
    blob_inline_meta: bool = False
    blob_toc: bool = False
    prefetch: list[str] = field(default_factory=list)
    chunk_dict: str | None = None
    #: a lower layer's bootstrap: the output is that image with this layer on top
    parent_bootstrap: str | None = None
    #: upstream's directory-builder compact-inode rule (see BootstrapOptions); default extended
    compact_inodes: bool = False
    threads: int = 2
    progress: bool = False
    #: caps on declared file size, total size and entry count of the layer (hostile input)
    limits: LayerLimits = field(default_factory=LayerLimits)
    #: targz-ref: uncompressed bytes between gzip checkpoints (ZRAN contexts)
    zran_spacing: int = 1 << 20

    def validate(self) -> None:
        cs = self.chunk_size
        if cs & (cs - 1) or not 0x1000 <= cs <= 0x100_0000:
            raise BuildError(f"chunk size {cs:#x} must be a power of two in 0x1000..0x1000000")
        if self.whiteout_spec not in ("oci", "overlayfs", "none"):
            raise BuildError(f"unknown whiteout spec {self.whiteout_spec!r}")
        if self.zran_spacing < 0:
            raise BuildError(f"zran checkpoint spacing {self.zran_spacing} must be >= 0")
        if Compressor(self.compressor) == Compressor.GZIP:
            raise BuildError("gzip is not a supported chunk compressor for create")


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What a build produced: the bootstrap path, the blob table (ids in order), the new blob."""

    bootstrap: str
    blob_ids: list[str]
    blob: BlobInfo | None
    blob_path: str | None
    bytes_in: int
    #: seconds per phase (upstream's ``trace`` in the output JSON)
    trace: dict[str, float] = field(default_factory=dict)
    #: targz-ref: the ``<blob_id>.blob.meta`` written (the blob itself is the gzip layer)
    blob_meta_path: str | None = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _progress_bar(enabled: bool, total: int | None):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, desc="nydus-image create")


def _dir_total(tree: Tree) -> int:
    seen: set[int] = set()
    total = 0
    for _, node in tree.walk():
        if node.is_reg and id(node) not in seen:
            seen.add(id(node))
            total += node.size
    return total


def _prefetch_first(tree: Tree, patterns: list[str]) -> list[Inode]:
    """Regular files in blob order: those under prefetch patterns first, then BFS order."""
    seen: set[int] = set()
    out: list[Inode] = []

    def add(node: Inode) -> None:
        if node.is_reg and id(node) not in seen:
            seen.add(id(node))
            out.append(node)

    for node in tree.prefetch_matches(patterns):
        for _, n in Tree(node).bfs() if node.is_dir else [(b"", node)]:
            add(n)
    for _, n in tree.bfs():
        add(n)
    return out


def layout_patterns(patterns: list[str]) -> list[str]:
    """The prefetch patterns that reorder a tar layer's blob: normalized, without ``/`` (the
    whole image: tar order is kept) and without repeats, in their order."""
    out: list[str] = []
    for pat in patterns:
        parts = [p for p in pat.strip().split("/") if p and p != "."]
        if parts:
            path = "/" + "/".join(parts)
            if path not in out:
                out.append(path)
    return out


def _tar_prefetch_first(stream: BinaryIO, patterns: list[str], chunker: Chunker, spool_dir: str | None,
                        limits: LayerLimits | None = None) -> None:
    """Chunk a tar layer's prefetch files first, in pattern order (files under a directory
    pattern in tar order), so they sit at the front of the blob in access order.

    The tar is read twice: once here (only the wanted files' content, spooled to a temp file),
    then by the normal walk, whose chunks of those files de-duplicate against the ones written
    here.  A stream that cannot seek back keeps tar order.
    """
    wanted_list = layout_patterns(patterns)
    if not wanted_list or chunker.writer is None:
        return
    try:
        start = stream.tell()
        stream.seek(start)
    except (OSError, AttributeError, ValueError):
        return
    exact = set(wanted_list)

    def wanted(path: str) -> bool:  # the path or one of its parent directories was named
        if path in exact:
            return True
        cut = path.rfind("/")
        while cut > 0:
            if path[:cut] in exact:
                return True
            cut = path.rfind("/", 0, cut)
        return False

    with tempfile.TemporaryFile(dir=spool_dir, prefix=".tmp-prefetch-spool.") as spool:
        links: dict[str, str] = {}
        found = spool_tar_files(open_layer(stream), wanted, spool, links, limits)
        stream.seek(start)
        if links:  # wanted hard links to files that were not: one more pass for their targets
            targets = set(links.values())
            more = spool_tar_files(open_layer(stream), targets.__contains__, spool, limits=limits)
            stream.seek(start)
            for path, target in links.items():
                if target in more and path not in found:
                    found[path] = more[target]
        if not found:
            return
        under: dict[str, list[str]] = {}  # directory pattern -> its files, tar order
        for path in found:
            cut = path.rfind("/")
            while cut > 0:
                if path[:cut] in exact:
                    under.setdefault(path[:cut], []).append(path)
                cut = path.rfind("/", 0, cut)
        bytes_in = chunker.bytes_in
        done: set[str] = set()
        for pat in wanted_list:
            names = [pat] if pat in found else under.get(pat, [])
            for name in names:
                if name in done:
                    continue
                done.add(name)
                offset, size = found[name]
                if size:
                    spool.seek(offset)
                    chunker.add_file(Inode(mode=stat.S_IFREG | 0o644), spool, size)  # type: ignore[arg-type]
        chunker.bytes_in = bytes_in  # the normal walk counts these files again


def build(source: str | os.PathLike | BinaryIO, *, bootstrap_out: str | None, blob_out: str | None = None,
          blob_dir: str | None = None, source_type: str = "dir-rafs",
          options: BuildOptions | None = None) -> BuildResult:
    """Build one layer.  ``source`` is a directory path (dir-rafs) or a tar file path / binary
    stream (tar-rafs, targz-rafs; gzip and zstd layers are detected by magic).

    Writes the blob to ``blob_out`` or ``blob_dir/<blob_id>`` and the bootstrap to
    ``bootstrap_out`` (or ``blob_dir/<sha256 of bootstrap>``); all via temp file + rename.
    """
    opts = options or BuildOptions()
    opts.validate()
    source_type = SOURCE_TYPE_ALIASES.get(source_type, source_type)
    if source_type not in SOURCE_TYPES:
        raise BuildError(f"unsupported source type {source_type!r} (supported: {', '.join(SOURCE_TYPES)})")
    if source_type == "targz-ref":  # with --blob-inline-meta the bootstrap goes into the ref blob
        return _build_targz_ref(source, bootstrap_out, blob_out, blob_dir, opts)
    if bootstrap_out is None and blob_dir is None:
        raise BuildError("either a bootstrap path or a blob dir is required")
    t0 = time.perf_counter()
    trace: dict[str, float] = {}
    store = ChunkStore()
    parent: Tree | None = None
    if opts.parent_bootstrap:
        parent = _load_parent(opts.parent_bootstrap, store, opts.chunk_size)
    if opts.chunk_dict:
        from rafs.builder.loader import load_chunk_dict

        for rec in load_chunk_dict(opts.chunk_dict, opts.chunk_size):
            store.add_blob(rec)
    out_dir = blob_dir or (os.path.dirname(os.path.abspath(blob_out)) if blob_out else None)
    tmp_path = None
    f = None
    writer = None
    try:
        if out_dir is not None:
            # named first and made inside the try: a Ctrl-C / SIGTERM right after the create
            # still finds it in the finally below (O_EXCL: a 128-bit name is never someone else's)
            tmp_path = os.path.join(out_dir, ".tmp-blob." + secrets.token_hex(16))
            f = os.fdopen(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600),
                          "wb", buffering=1 << 20)
        writer = BlobWriter(f, blob_index=len(store.blobs), chunk_size=opts.chunk_size,
                            compressor=Compressor(opts.compressor), digester=Digester(opts.digester),
                            threads=opts.threads)
        bar = None
        if source_type == "dir-rafs":
            if not isinstance(source, (str, os.PathLike)):
                raise BuildError("dir-rafs needs a directory path")
            tree = walk_directory(source, opts.limits)
            trace["load_from_directory"] = time.perf_counter() - t0
            bar = _progress_bar(opts.progress, _dir_total(tree))
            chunker = Chunker(store, writer, chunk_size=opts.chunk_size, digester=Digester(opts.digester),
                              progress=bar.update if bar else None)
            for node in _prefetch_first(tree, opts.prefetch):
                if node.size == 0:
                    node.chunks = []
                    continue
                chunker.add_path(node, node.source, node.size)  # type: ignore[arg-type]
            tree = _apply_layer(tree, parent, opts.whiteout_spec)
        else:
            bar = _progress_bar(opts.progress, None)
            chunker = Chunker(store, writer, chunk_size=opts.chunk_size, digester=Digester(opts.digester),
                              progress=bar.update if bar else None)
            if isinstance(source, (str, os.PathLike)):
                try:
                    stream: BinaryIO = open(source, "rb")
                except OSError as exc:
                    raise BuildError(f"cannot open {source!r}: {exc}") from exc
                close = True
            else:
                stream, close = source, False
            try:
                _tar_prefetch_first(stream, opts.prefetch, chunker, out_dir, opts.limits)
                tree = walk_tar(open_layer(stream), chunker.add_file, opts.limits)
            finally:
                if close:
                    stream.close()
            tree = _apply_layer(tree, parent, opts.whiteout_spec)
        if bar is not None:
            bar.close()
        bopts = BootstrapOptions(chunk_size=opts.chunk_size, compressor=Compressor(opts.compressor),
                                 digester=Digester(opts.digester), prefetch=list(opts.prefetch),
                                 compact_inodes=opts.compact_inodes)
        new_index = len(store.blobs)

        def bootstrap_with(info: BlobInfo) -> bytes:
            trial = ChunkStore()
            trial.blobs = list(store.blobs)
            trial.by_digest = store.by_digest
            trial.blobs.append(BlobRecord(info, list(writer.chunk_infos), new=True))
            return write_bootstrap(tree, trial, bopts)

        writer.close()
        trace["dump_blob"] = time.perf_counter() - t0 - sum(trace.values())
        has_blob = bool(writer.ci) or opts.blob_inline_meta
        info, _ = writer.finish(inline_meta=opts.blob_inline_meta, blob_toc=opts.blob_toc,
                                make_bootstrap=bootstrap_with)
        if f is not None:
            f.close()
            f = None
        blob_path = None
        if has_blob:
            store.blobs.append(BlobRecord(info, list(writer.chunk_infos), new=True))
            assert len(store.blobs) - 1 == new_index
            if tmp_path is not None:
                blob_path = blob_out or os.path.join(blob_dir, info.blob_id)  # type: ignore[arg-type]
                os.replace(tmp_path, blob_path)
                tmp_path = None
        t1 = time.perf_counter()
        boot = write_bootstrap(tree, store, bopts)
        trace["dump_bootstrap"] = time.perf_counter() - t1
        if bootstrap_out is None:
            bootstrap_out = os.path.join(blob_dir, hashlib.sha256(boot).hexdigest())  # type: ignore[arg-type]
        atomic_write(bootstrap_out, boot, perms=0o600)
        used = blob_ids_of(boot)
        trace["total_build"] = time.perf_counter() - t0
        return BuildResult(bootstrap_out, used, info if has_blob else None, blob_path, chunker.bytes_in,
                           {k: round(v, 6) for k, v in trace.items()})
    finally:
        if writer is not None:
            try:
                writer.close()
            except BuildError:
                pass
        if f is not None:
            f.close()
        if tmp_path is not None:
            _unlink(tmp_path)


def _build_targz_ref(source: str | os.PathLike | BinaryIO, bootstrap_out: str | None, blob_out: str | None,
                     blob_dir: str | None, opts: BuildOptions) -> BuildResult:
    """A bootstrap whose blob is the gzip layer itself (see ``rafs.builder.zran``).

    With ``blob_inline_meta`` (upstream's ``--blob-inline-meta --features blob-toc``) the output
    is the "ref" blob at ``blob_out`` (else ``blob_dir/<its sha256>``): blob.meta, chunk digests,
    the bootstrap and a TOC (``rafs.builder.zran.encode_ref_blob``); the result's BlobInfo then
    carries the ref blob's digest, size and TOC digest, as merge's ``--blob-digests``,
    ``--blob-sizes`` and ``--blob-toc-digests`` put them in the merged blob table. Without it
    (the older layout) ``<blob_id>.blob.meta`` is written to ``blob_dir`` (else beside the
    bootstrap)."""
    from rafs.builder.zran import build_zran_tree, encode_ref_blob, write_zran_blob_meta

    if not isinstance(source, (str, os.PathLike)):
        raise BuildError("targz-ref needs the layer as a file (its sha256 is the blob id)")
    if opts.parent_bootstrap or opts.chunk_dict:
        raise BuildError("targz-ref does not support --parent-bootstrap or --chunk-dict")
    ref = opts.blob_inline_meta
    if ref and blob_out is None and blob_dir is None:
        raise BuildError("targz-ref with --blob-inline-meta needs --blob or --blob-dir for the ref blob")
    if not ref and bootstrap_out is None and blob_dir is None:
        raise BuildError("either a bootstrap path or a blob dir is required")
    t0 = time.perf_counter()
    store = ChunkStore()
    out_path = bootstrap_out or blob_out
    work = blob_dir or os.path.dirname(os.path.abspath(out_path))  # type: ignore[arg-type]
    tree, info, writer, bytes_in = build_zran_tree(os.fspath(source), store, chunk_size=opts.chunk_size,
                                                   digester=Digester(opts.digester), spacing=opts.zran_spacing,
                                                   work_dir=work, limits=opts.limits, ref_blob=ref)
    tree = _apply_layer(tree, None, opts.whiteout_spec)
    bopts = BootstrapOptions(chunk_size=opts.chunk_size, compressor=Compressor.GZIP,
                             digester=Digester(opts.digester), prefetch=list(opts.prefetch),
                             compact_inodes=opts.compact_inodes)
    boot = write_bootstrap(tree, store, bopts)
    trace = {"total_build": 0.0}
    if ref:
        if info is None:
            raise BuildError("targz-ref: the layer has no file data, so there is no ref blob to write")
        blob, toc_digest, toc_size = encode_ref_blob(writer, boot)
        ref_id = hashlib.sha256(blob).hexdigest()
        blob_path = blob_out or os.path.join(blob_dir, ref_id)  # type: ignore[arg-type]
        atomic_write(blob_path, blob, perms=0o644)
        if bootstrap_out is not None:
            atomic_write(bootstrap_out, boot, perms=0o600)
        info = replace(info, blob_meta_digest=bytes.fromhex(ref_id), blob_meta_size=len(blob),
                       blob_toc_digest=toc_digest, blob_toc_size=toc_size)
        trace["total_build"] = round(time.perf_counter() - t0, 6)
        return BuildResult(bootstrap_out or blob_path, blob_ids_of(boot), info, blob_path, bytes_in, trace)
    if bootstrap_out is None:
        bootstrap_out = os.path.join(blob_dir, hashlib.sha256(boot).hexdigest())  # type: ignore[arg-type]
    meta_path = None
    if info is not None:
        meta_path = os.path.join(work, f"{info.blob_id}.blob.meta")
        write_zran_blob_meta(writer, meta_path)
    atomic_write(bootstrap_out, boot, perms=0o600)
    trace["total_build"] = round(time.perf_counter() - t0, 6)
    return BuildResult(bootstrap_out, blob_ids_of(boot), info, None, bytes_in, trace, meta_path)


def _load_parent(path: str, store: ChunkStore, chunk_size: int) -> Tree:
    """Add a parent bootstrap's blobs to ``store``; return its tree re-pointed at them."""
    from rafs.builder.loader import load_bootstrap
    from rafs.builder.tree import ChunkRef

    loaded = load_bootstrap(path)
    if loaded.blobs and loaded.chunk_size != chunk_size:
        raise BuildError(f"parent bootstrap {path!r} has chunk size {loaded.chunk_size:#x}, build uses {chunk_size:#x}")
    remap = {i: store.add_blob(rec) for i, rec in enumerate(loaded.blobs)}
    seen: set[int] = set()
    for _, node in loaded.tree.walk():
        if node.is_reg and id(node) not in seen:
            seen.add(id(node))
            node.chunks = [ChunkRef(remap[r.blob_index], r.ci_index) for r in node.chunks]
    return loaded.tree


def _apply_layer(tree: Tree, parent: Tree | None, spec: str) -> Tree:
    if parent is None:
        apply_whiteouts_in_layer(tree, spec)
        return tree
    from rafs.builder.tree import overlay

    return overlay(parent, tree, spec)


def blob_ids_of(boot: bytes) -> list[str]:
    """The blob ids of a v6 bootstrap's blob table, in blob-index order."""
    from rafs.layout import RafsV6Blob, RafsV6SuperBlockExt
    from rafs.layout.constants import RAFSV6_EXT_SUPER_OFFSET

    ext = RafsV6SuperBlockExt.parse(boot, RAFSV6_EXT_SUPER_OFFSET)
    n = ext.s_blob_table_size // RafsV6Blob.SIZE
    return [b.blob_id_str for b in RafsV6Blob.parse_array(boot, ext.s_blob_table_offset, n)]
