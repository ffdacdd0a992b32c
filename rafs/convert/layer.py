"""Per-layer conversion with a resumable work directory.

One source layer (tar, tar+gzip, tar+zstd) becomes one nydus data blob plus a per-layer
bootstrap. Completed outputs live in ``<work_dir>/layers/<key>/`` where ``key`` hashes the
source layer digest, the conversion options and the keys of the layers below (their chunks
are offered for dedup). The directory is filled under a temporary name and renamed when
complete, so an interrupted conversion leaves nothing half-written and a rerun skips every
finished layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import BinaryIO

import zstandard

from storage.atomic import atomic_open

from .errors import ConvertError, SourceError

ProgressFactory = Callable[[str, int], Callable[[int], None]]
RESULT_FILE = "result.json"
LAYOUT_VERSION = 1
#: OCI-ref outputs: 2 = upstream's ref blob per layer (blob.meta + bootstrap + TOC), 1 (unkeyed) =
#: the older layout with the blob.meta in the bootstrap layer
REF_LAYOUT = 2


@dataclass(frozen=True, slots=True)
class LayerOptions:
    """Options that change a layer's output (all part of the resume key).

    Defaults: RAFS v6, zstd chunks, 1 MiB chunks, no chunk dict, prefetch pattern ``/`` (the
    whole image, in breadth-first order — what upstream's converters use when given none).
    """

    fs_version: int = 6
    compressor: str = "zstd"
    chunk_size: int = 0x100000
    chunk_dict: str | None = None          # path of a chunk-dict bootstrap
    chunk_dict_digest: str | None = None   # sha256 of that file (the key uses the content)
    prefetch_patterns: tuple[str, ...] = ("/",)
    #: OCI-ref (zran): the gzip layer stays the data blob; only bootstrap + blob.meta are made
    oci_ref: bool = False
    #: uncompressed bytes between gzip checkpoints: 2 MiB, the measured compromise (docs/perf.md
    #: "OCI-ref (zran): checkpoint spacing"); nydus-image create keeps upstream's ~1 MiB
    zran_spacing: int = 2 << 20

    def key_material(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("chunk_dict")
        return out


@dataclass(frozen=True, slots=True)
class LayerResult:
    """What one converted layer left in its work directory."""

    key: str
    source_digest: str
    diff_id: str                 # sha256 of the uncompressed source tar
    bootstrap: str               # per-layer bootstrap path
    blob_id: str | None          # hex sha256 of the data blob; None if the layer has no data
    blob_size: int
    blob: str | None             # data blob path
    blob_meta: str | None = None  # ``<blob_id>.blob.meta`` cache-format file, if produced
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def layer_key(source_digest: str, options: LayerOptions, parent_keys: Sequence[str]) -> str:
    material = {"v": LAYOUT_VERSION, "layer": source_digest, "options": options.key_material(),
                "parents": list(parent_keys)}
    if options.oci_ref:
        material["ref_layout"] = REF_LAYOUT
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def load_result(work_dir: str, key: str) -> LayerResult | None:
    """A completed layer's result, or None (also when its files have gone missing)."""
    layer_dir = os.path.join(work_dir, "layers", key)
    try:
        with open(os.path.join(layer_dir, RESULT_FILE), encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError):
        return None
    for name in ("bootstrap", "blob", "blob_meta"):
        if raw.get(name):
            raw[name] = os.path.join(layer_dir, raw[name])
            if not os.path.exists(raw[name]):
                return None
    extra = raw.get("extra")
    if isinstance(extra, dict) and extra.get("ref_blob"):
        extra["ref_blob"] = os.path.join(layer_dir, str(extra["ref_blob"]))
        if not os.path.exists(extra["ref_blob"]):
            return None
    try:
        return LayerResult(**raw)
    except TypeError:
        return None


def remove_stale_temp_dirs(work_dir: str) -> None:
    """Drop temp dirs an interrupted run left in ``layers/`` (caller holds the work-dir lock)."""
    layers_dir = os.path.join(work_dir, "layers")
    if os.path.isdir(layers_dir):
        for name in os.listdir(layers_dir):
            if name.startswith("."):
                shutil.rmtree(os.path.join(layers_dir, name), ignore_errors=True)


def detect_compression(head: bytes) -> str:
    """``gzip``, ``zstd`` or ``none`` from the first bytes of a layer."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


class LayerDecoder:
    """Incremental decompressor for gzip (multi-member), zstd or plain data."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "gzip":
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif kind == "zstd":
            self._z = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)  # type: ignore[assignment]

    def feed(self, data: bytes) -> bytes:
        if self.kind == "none":
            return data
        if self.kind == "gzip":
            out = []
            while data:
                out.append(self._z.decompress(data))
                data = self._z.unused_data
                if data and self._z.eof:
                    self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    break
            return b"".join(out)
        out_z = self._z.decompress(data)
        return out_z

    def finish(self) -> None:
        if self.kind == "gzip" and not self._z.eof:
            raise SourceError("gzip layer is truncated")


def fetch_layer_tar(stream: BinaryIO, source_digest: str, tar_out: str,
                    progress: Callable[[int], None] | None = None) -> str:
    """Copy a layer stream to ``tar_out`` uncompressed; verify the digest; return the diff_id."""
    compressed = hashlib.sha256()
    uncompressed = hashlib.sha256()
    decoder: LayerDecoder | None = None
    with atomic_open(tar_out, "wb") as out:  # a bad stream leaves tar_out as it was
        while chunk := stream.read(1 << 20):
            compressed.update(chunk)
            if progress:
                progress(len(chunk))
            if decoder is None:
                decoder = LayerDecoder(detect_compression(chunk))
            try:
                data = decoder.feed(chunk)
            except (zlib.error, zstandard.ZstdError) as exc:
                raise SourceError(f"layer {source_digest}: cannot decompress: {exc}") from exc
            uncompressed.update(data)
            out.write(data)
        if decoder is not None:
            decoder.finish()
        actual = "sha256:" + compressed.hexdigest()
        if actual != source_digest:
            raise SourceError(f"layer {source_digest}: downloaded content has digest {actual}")
    return "sha256:" + uncompressed.hexdigest()


def fetch_layer_gzip(stream: BinaryIO, source_digest: str, out_path: str,
                     progress: Callable[[int], None] | None = None) -> str:
    """Copy a gzip layer unchanged to ``out_path``; verify its digest; return the diff_id.
    A layer that is not gzip is refused (OCI-ref images reference gzip layers only)."""
    compressed = hashlib.sha256()
    uncompressed = hashlib.sha256()
    decoder: LayerDecoder | None = None
    with atomic_open(out_path, "wb") as out:
        while chunk := stream.read(1 << 20):
            compressed.update(chunk)
            if progress:
                progress(len(chunk))
            if decoder is None:
                kind = detect_compression(chunk)
                if kind != "gzip":
                    raise ConvertError(f"layer {source_digest} is {kind}, not gzip: --oci-ref needs gzip "
                                       "layers (convert this image without --oci-ref)")
                decoder = LayerDecoder(kind)
            try:
                uncompressed.update(decoder.feed(chunk))
            except zlib.error as exc:
                raise SourceError(f"layer {source_digest}: cannot decompress: {exc}") from exc
            out.write(chunk)
        if decoder is None:
            raise ConvertError(f"layer {source_digest} is empty, not gzip")
        decoder.finish()
        actual = "sha256:" + compressed.hexdigest()
        if actual != source_digest:
            raise SourceError(f"layer {source_digest}: downloaded content has digest {actual}")
    return "sha256:" + uncompressed.hexdigest()


def build_ref_layer(gz_path: str, out_dir: str, options: LayerOptions) -> dict[str, object]:
    """targz-ref build of one gzip layer in upstream's OCI-ref layout (``nydus-image create --type
    targz-ref --blob-inline-meta --features blob-toc``): a per-layer bootstrap plus the layer's
    "ref" blob (``ref.blob``: zstd blob.meta with the ZRAN contexts, chunk digests, bootstrap, TOC).
    The gzip layer file is kept as the data blob (pushed only when the target lacks it); the ref
    blob's digest, size and TOC go to ``extra`` for the merge and the manifest."""
    from rafs.builder import BuildOptions
    from rafs.builder.build import build
    from rafs.errors import BuildError

    bootstrap = os.path.join(out_dir, "layer.boot")
    ref_path = os.path.join(out_dir, "ref.blob")
    opts = BuildOptions(chunk_size=options.chunk_size, whiteout_spec="none",
                        prefetch=list(options.prefetch_patterns), zran_spacing=options.zran_spacing,
                        blob_inline_meta=True, blob_toc=True)
    try:
        try:
            result = build(gz_path, bootstrap_out=bootstrap, blob_out=ref_path, source_type="targz-ref",
                           options=opts)
        except BuildError as exc:
            if "no file data" not in str(exc):
                raise
            # no chunk, so no data blob and no ref blob: the layer is its bootstrap alone
            result = build(gz_path, bootstrap_out=bootstrap, blob_dir=out_dir, source_type="targz-ref",
                           options=replace(opts, blob_inline_meta=False, blob_toc=False))
    except BuildError as exc:
        raise ConvertError(f"building the layer failed: {exc}") from exc
    out: dict[str, object] = {"bootstrap": "layer.boot", "blob_id": None, "blob_size": 0, "blob": None,
                              "blob_meta": None, "extra": {"oci_ref": True}}
    if result.blob is not None and os.path.exists(ref_path):
        info = result.blob
        with open(ref_path, "rb") as fh:
            ref_digest = "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
        out.update(blob_id=info.blob_id, blob="layer.gz", blob_size=os.path.getsize(gz_path),
                   extra={"oci_ref": True, "ref_blob": "ref.blob", "ref_digest": ref_digest,
                          "ref_size": os.path.getsize(ref_path),
                          "toc_digest": "sha256:" + bytes(info.blob_toc_digest).hex(),
                          "toc_size": int(info.blob_toc_size)})
    else:
        os.unlink(gz_path)
        if os.path.exists(ref_path):
            os.unlink(ref_path)
    return out


def convert_layer(work_dir: str, source_digest: str, open_stream: Callable[[], BinaryIO],
                  options: LayerOptions, parents: Sequence[LayerResult], *,
                  progress: ProgressFactory | None = None) -> LayerResult:
    """Convert one layer (or reuse its completed output) and return the result."""
    key = layer_key(source_digest, options, [p.key for p in parents])
    done = load_result(work_dir, key)
    if done is not None:
        return done
    layers_dir = os.path.join(work_dir, "layers")
    os.makedirs(layers_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=layers_dir)
    try:
        cb = progress(f"pull {source_digest[7:19]}", 0) if progress else None
        if options.oci_ref:
            gz_path = os.path.join(tmp_dir, "layer.gz")
            with open_stream() as stream:
                diff_id = fetch_layer_gzip(stream, source_digest, gz_path, cb)
            built = build_ref_layer(gz_path, tmp_dir, options)
        else:
            tar_path = os.path.join(tmp_dir, "layer.tar")
            with open_stream() as stream:
                diff_id = fetch_layer_tar(stream, source_digest, tar_path, cb)
            built = build_layer(tar_path, tmp_dir, options, parents)
            os.unlink(tar_path)
        result = {"key": key, "source_digest": source_digest, "diff_id": diff_id, **built}
        with open(os.path.join(tmp_dir, RESULT_FILE), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        final = os.path.join(layers_dir, key)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp_dir, final)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    loaded = load_result(work_dir, key)
    if loaded is None:
        raise ConvertError(f"layer {source_digest}: output in {final} is incomplete")
    return loaded


def _build_options(options: LayerOptions, chunk_dict: str | None, whiteout_spec: str):  # noqa: ANN202
    from rafs.builder import BuildOptions
    from storage.records import Compressor

    compressors = {"zstd": Compressor.ZSTD, "lz4_block": Compressor.LZ4_BLOCK, "none": Compressor.NONE}
    if options.compressor not in compressors:
        raise ConvertError(f"unsupported compressor {options.compressor!r}")
    if options.fs_version != 6:
        raise ConvertError(f"unsupported fs version {options.fs_version} (only 6)")
    return BuildOptions(chunk_size=options.chunk_size, compressor=compressors[options.compressor],
                        whiteout_spec=whiteout_spec, blob_toc=True, prefetch=list(options.prefetch_patterns),
                        chunk_dict=chunk_dict)


def build_layer(tar_path: str, out_dir: str, options: LayerOptions,
                parents: Sequence[LayerResult]) -> dict[str, object]:
    """Run the RAFS builder on one layer tar; return result fields (paths relative to out_dir).

    This is the converter's single call into ``rafs.builder.build``. Whiteouts stay as marker
    files in the per-layer bootstrap (``whiteout_spec="none"``, as upstream's per-layer
    conversion does); the merge applies them. Chunks of the chunk dict and of every lower
    layer are offered for dedup through one dedup-dictionary bootstrap.
    """
    from rafs.builder.build import build
    from rafs.builder.merge import merge
    from rafs.errors import BuildError

    dedup = options.chunk_dict
    lower = None
    temp: list[str] = []
    try:
        if parents:
            lower = os.path.join(out_dir, "lower.boot")
            temp.append(lower)
            merge([p.bootstrap for p in parents], lower, whiteout_spec="oci")
            dedup = lower
            if options.chunk_dict:
                dedup = os.path.join(out_dir, "dedup.boot")
                temp.append(dedup)
                merge([options.chunk_dict] + [p.bootstrap for p in parents], dedup,
                      whiteout_spec="none")
    except BuildError as exc:
        for path in temp:
            if os.path.exists(path):
                os.unlink(path)
        raise ConvertError(f"cannot merge the lower layers: {exc}") from exc
    bootstrap = os.path.join(out_dir, "layer.boot")
    blob_tmp = os.path.join(out_dir, "layer.blob")
    try:
        result = build(tar_path, bootstrap_out=bootstrap, blob_out=blob_tmp, source_type="tar-rafs",
                       options=_build_options(options, dedup, "none"))
    except BuildError as exc:
        raise ConvertError(f"building the layer failed: {exc}") from exc
    finally:
        for path in temp:
            if os.path.exists(path):
                os.unlink(path)
    out: dict[str, object] = {"bootstrap": "layer.boot", "blob_id": None, "blob_size": 0, "blob": None,
                              "blob_meta": None}
    if result.blob is not None and result.blob_path:
        blob_id = result.blob.blob_id
        name = f"{blob_id}.blob"
        os.replace(result.blob_path, os.path.join(out_dir, name))
        out.update(blob_id=blob_id, blob=name, blob_size=os.path.getsize(os.path.join(out_dir, name)))
        meta_name = f"{blob_id}.blob.meta"
        write_blob_meta(os.path.join(out_dir, name), result.blob, os.path.join(out_dir, meta_name))
        out["blob_meta"] = meta_name
    return out


def write_blob_meta(blob_path: str, info: object, out: str) -> None:
    """Write ``<blob_id>.blob.meta`` (cache-file format) from the blob's CI table."""
    from storage.meta.blob_meta import load_from_blob, write_blob_meta_file

    size = os.path.getsize(blob_path)
    with open(blob_path, "rb") as fh:
        def read_at(offset: int, length: int) -> bytes:
            fh.seek(offset)
            return fh.read(length)

        meta = load_from_blob(read_at, size, ci_offset=info.ci_offset,  # type: ignore[attr-defined]
                              ci_compressed_size=info.ci_compressed_size,  # type: ignore[attr-defined]
                              ci_uncompressed_size=info.ci_uncompressed_size,  # type: ignore[attr-defined]
                              ci_compressor=info.ci_compressor)  # type: ignore[attr-defined]
    write_blob_meta_file(out, meta)


def merge_layers(results: Sequence[LayerResult], out: str, options: LayerOptions) -> list[str]:
    """Merge per-layer bootstraps (lowest first) into ``out`` with OCI whiteouts applied and the
    prefetch list set; return the image's blob ids in blob-table order. This is the
    converter's single call into ``rafs.builder.merge``."""
    from rafs.builder.merge import merge
    from rafs.errors import BuildError

    if not results:
        raise ConvertError("an image needs at least one layer")
    ref: dict[str, list] = {}
    if options.oci_ref:
        # upstream's merge --blob-digests/--blob-sizes/--blob-toc-digests: for the SEPARATE (ZRAN)
        # blob of each layer they name its ref blob (blob_meta_digest/size); the blob id stays
        # the gzip layer's digest. A layer without data has no blob; its entry is never read.
        none = "0" * 64
        extras = [r.extra if r.blob_id else {} for r in results]
        ref = {"blob_digests": [str(e.get("ref_digest") or none) for e in extras],
               "blob_sizes": [int(e.get("ref_size") or 0) for e in extras],   # type: ignore[call-overload]
               "blob_toc_digests": [str(e.get("toc_digest") or none) for e in extras],
               "blob_toc_sizes": [int(e.get("toc_size") or 0) for e in extras]}  # type: ignore[call-overload]
    try:
        merged = merge([r.bootstrap for r in results], out, whiteout_spec="oci",
                       prefetch=list(options.prefetch_patterns), **ref)
    except BuildError as exc:
        raise ConvertError(f"merging the layer bootstraps failed: {exc}") from exc
    return list(merged.blob_ids)
