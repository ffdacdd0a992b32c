"""``nydusify check``: validate a nydus image and compare it with its source file by file.

Checks, in order: the manifest shape and annotations (what nydus-snapshotter relies on), the
config (``rootfs.diff_ids`` and history), the bootstrap layer tar, the bootstrap's blob table
against the manifest's blob layers, and finally every path of the source image (layers applied
with whiteouts) against the nydus filesystem: type and mode, uid/gid, mtime, size and content,
symlink target, xattrs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .bootstrap_layer import BOOTSTRAP_DIR, BOOTSTRAP_NAME
from .errors import CheckError, SourceError
from .layer import LayerDecoder, detect_compression
from .manifest import (ANNOTATION_NYDUS_BLOB, ANNOTATION_NYDUS_BOOTSTRAP, ANNOTATION_NYDUS_FS_VERSION,
                       ANNOTATION_NYDUS_REF_LAYER,
                       ANNOTATION_UNCOMPRESSED, HISTORY_COMMENT, INDEX_TYPES, MEDIA_TYPE_DOCKER_LAYER_GZIP,
                       MEDIA_TYPE_NYDUS_BLOB, MEDIA_TYPE_OCI_LAYER_GZIP, parse_json, platform_matches,
                       platform_string, source_layers)
from .source import ImageSource, open_source
from .tree import FileEntry, Tree, apply_layer


@dataclass(slots=True)
class CheckReport:
    """What was checked; ``problems`` empty means the image passed."""

    platforms: list[str] = field(default_factory=list)
    files_compared: int = 0
    problems: list[str] = field(default_factory=list)


def validate_nydus_manifest(manifest: dict[str, Any], config: dict[str, Any],
                            bootstrap_layer: bytes | None) -> list[str]:
    """Problems with the manifest/config/bootstrap layer (empty list: valid)."""
    problems: list[str] = []
    layers = manifest.get("layers") or []
    if not layers:
        return ["manifest has no layers"]
    *blobs, boot = layers
    ann = boot.get("annotations") or {}
    if boot.get("mediaType") not in (MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_DOCKER_LAYER_GZIP):
        problems.append(f"bootstrap layer media type is {boot.get('mediaType')!r}")
    if ann.get(ANNOTATION_NYDUS_BOOTSTRAP) != "true":
        problems.append("last layer lacks annotation containerd.io/snapshot/nydus-bootstrap=true")
    if ann.get(ANNOTATION_NYDUS_FS_VERSION) not in ("5", "6"):
        problems.append(f"bootstrap fs version annotation is {ann.get(ANNOTATION_NYDUS_FS_VERSION)!r}")
    for i, blob in enumerate(blobs):
        if blob.get("mediaType") != MEDIA_TYPE_NYDUS_BLOB:
            problems.append(f"layer {i} media type is {blob.get('mediaType')!r}, not a nydus blob")
        if (blob.get("annotations") or {}).get(ANNOTATION_NYDUS_BLOB) != "true":
            problems.append(f"layer {i} lacks annotation containerd.io/snapshot/nydus-blob=true")
    for i, layer in enumerate(layers):
        if ANNOTATION_UNCOMPRESSED in (layer.get("annotations") or {}):
            problems.append(f"layer {i} still carries containerd.io/uncompressed")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        problems.append(f"config has {len(diff_ids)} diff_ids for {len(layers)} layers")
    else:
        for i, blob in enumerate(blobs):
            if diff_ids[i] != blob.get("digest"):
                problems.append(f"diff_id {i} {diff_ids[i]} != blob digest {blob.get('digest')}")
    history = config.get("history") or []
    if not history or history[-1].get("comment") != HISTORY_COMMENT:
        problems.append("config history lacks the Nydus Bootstrap Layer entry")
    if bootstrap_layer is not None:
        if "sha256:" + hashlib.sha256(bootstrap_layer).hexdigest() != boot.get("digest"):
            problems.append("bootstrap layer content does not match its digest")
        try:
            raw = gzip.decompress(bootstrap_layer)
        except (OSError, EOFError) as exc:
            return problems + [f"bootstrap layer is not gzip: {exc}"]
        if diff_ids and diff_ids[-1] != "sha256:" + hashlib.sha256(raw).hexdigest():
            problems.append("last diff_id is not the sha256 of the uncompressed bootstrap tar")
        try:
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                members = {t.name.rstrip("/"): t for t in tar.getmembers()}
        except tarfile.TarError as exc:
            return problems + [f"bootstrap layer is not a tar: {exc}"]
        d, f = members.get(BOOTSTRAP_DIR), members.get(BOOTSTRAP_NAME)
        if d is None or not d.isdir() or d.mode != 0o755:
            problems.append("bootstrap layer lacks directory image/ with mode 0755")
        if f is None or not f.isreg() or f.mode != 0o444:
            problems.append("bootstrap layer lacks image/image.boot with mode 0444")
    return problems


def _layer_stream(source: ImageSource, digest: str) -> io.BufferedReader:
    """The uncompressed tar of a source layer, spooled to a temp file."""
    spool = tempfile.TemporaryFile()
    decoder: LayerDecoder | None = None
    with source.open_blob(digest) as fh:
        while chunk := fh.read(1 << 20):
            if decoder is None:
                decoder = LayerDecoder(detect_compression(chunk))
            spool.write(decoder.feed(chunk))
    spool.seek(0)
    return spool  # type: ignore[return-value]


def source_tree(source: ImageSource, manifest: dict[str, Any]) -> Tree:
    """The source image's filesystem: its layers applied in order."""
    tree = Tree()
    for layer in source_layers(manifest):
        with _layer_stream(source, layer["digest"]) as fh:
            apply_layer(tree, fh)
    return tree


def compare_trees(expected: Tree, actual: dict[str, FileEntry]) -> list[str]:
    """Differences between the source tree and the nydus tree (implicit dirs: existence only)."""
    problems: list[str] = []
    for path, want in sorted(expected.entries.items()):
        have = actual.get(path)
        if have is None:
            problems.append(f"{path}: missing in nydus image")
            continue
        if want.implicit:
            if not stat.S_ISDIR(have.mode):
                problems.append(f"{path}: expected a directory")
            continue
        if path != "/" and want.mode != have.mode:
            problems.append(f"{path}: mode {oct(have.mode)} != source {oct(want.mode)}")
        if (want.uid, want.gid) != (have.uid, have.gid):
            problems.append(f"{path}: owner {have.uid}:{have.gid} != source {want.uid}:{want.gid}")
        if path != "/" and want.mtime != have.mtime:
            problems.append(f"{path}: mtime {have.mtime} != source {want.mtime}")
        if stat.S_ISREG(want.mode) and (want.size, want.sha256) != (have.size, have.sha256):
            problems.append(f"{path}: content differs (size {have.size} vs {want.size})")
        if stat.S_ISLNK(want.mode) and want.link_target != have.link_target:
            problems.append(f"{path}: symlink -> {have.link_target!r} != source {want.link_target!r}")
        if (stat.S_ISCHR(want.mode) or stat.S_ISBLK(want.mode)) and want.rdev != have.rdev:
            problems.append(f"{path}: rdev {have.rdev} != source {want.rdev}")
        if dict(want.xattrs) != dict(have.xattrs):
            problems.append(f"{path}: xattrs {dict(have.xattrs)} != source {dict(want.xattrs)}")
    for path in sorted(set(actual) - set(expected.entries)):
        problems.append(f"{path}: not in the source image")
    return problems


def _resolve(source: ImageSource) -> Iterator[tuple[str, dict[str, Any], str]]:
    data, media_type = source.root()
    doc = parse_json(data, f"{source.name} root")
    if (doc.get("mediaType") or media_type) in INDEX_TYPES or "manifests" in doc:
        for entry in doc.get("manifests") or []:
            yield (platform_string(entry.get("platform")),
                   parse_json(source.document(entry["digest"]), entry["digest"]), entry["digest"])
    else:
        yield "", doc, ""


def check(source_ref: str | None, target_ref: str, *, source_insecure: bool = False,
          target_insecure: bool = False, work_dir: str | None = None,
          platform: str | None = None) -> CheckReport:
    """Validate the nydus image ``target_ref`` and (with ``source_ref``) compare its files."""
    report = CheckReport()
    target = open_source(target_ref, insecure=target_insecure)
    source = open_source(source_ref, insecure=source_insecure) if source_ref else None
    try:
        source_by_platform: dict[str, dict[str, Any]] = {}
        if source is not None:
            for plat, man, _ in _resolve(source):
                if plat and plat != "unknown/unknown":
                    source_by_platform[plat] = man
                elif not plat:
                    source_by_platform[""] = man
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            for plat, manifest, _ in _resolve(target):
                if platform and plat and not platform_matches(
                        dict(zip(("os", "architecture", "variant"), plat.split("/"))), platform):
                    continue
                report.platforms.append(plat or "default")
                _check_one(report, target, manifest, plat, source, source_by_platform, tmp)
    finally:
        target.close()
        if source is not None:
            source.close()
    if report.problems:
        raise CheckError(report.problems)
    return report


def _check_one(report: CheckReport, target: ImageSource, manifest: dict[str, Any], plat: str,
               source: ImageSource | None, source_by_platform: dict[str, dict[str, Any]], tmp: str) -> None:
    prefix = f"[{plat}] " if plat else ""
    config = parse_json(target.document(manifest["config"]["digest"]), "target config")
    layers = manifest.get("layers") or []
    boot_bytes = None
    if layers:
        with target.open_blob(layers[-1]["digest"]) as fh:
            boot_bytes = fh.read()
    problems = validate_nydus_manifest(manifest, config, boot_bytes)
    report.problems += [prefix + p for p in problems]
    if problems or source is None or boot_bytes is None:
        return
    src_manifest = source_by_platform.get(plat) or (
        next(iter(source_by_platform.values())) if len(source_by_platform) == 1 else None)
    if src_manifest is None:
        report.problems.append(f"{prefix}no source manifest for this platform")
        return
    src_config = parse_json(source.document(src_manifest["config"]["digest"]), "source config")
    for key in ("os", "architecture", "config"):
        if src_config.get(key) != config.get(key):
            report.problems.append(f"{prefix}config {key!r} differs from the source")
    plat_dir = tempfile.mkdtemp(dir=tmp)
    from .bootstrap_layer import extract_blob_metas, extract_bootstrap

    bootstrap = os.path.join(plat_dir, "image.boot")
    with open(bootstrap, "wb") as fh:
        fh.write(extract_bootstrap(boot_bytes))
    for blob_id, meta in extract_blob_metas(boot_bytes).items():  # ZRAN blobs need theirs to be read
        with open(os.path.join(plat_dir, f"{blob_id}.blob.meta"), "wb") as fh:
            fh.write(meta)
    manifest_blobs = []
    for blob in layers[:-1]:
        # an OCI-ref layer is its ref blob (blob.meta + bootstrap); the data blob is the original
        # gzip layer named by nydus-ref, which must be in the target repository too
        data = (blob.get("annotations") or {}).get(ANNOTATION_NYDUS_REF_LAYER)
        for digest in [blob["digest"]] + ([data] if data and data != blob["digest"] else []):
            path = os.path.join(plat_dir, digest[7:])
            h = hashlib.sha256()
            try:
                with target.open_blob(digest) as fh, open(path, "wb") as out:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                        out.write(chunk)
            except SourceError as exc:
                report.problems.append(f"{prefix}blob {digest}: {exc}")
                return
            if "sha256:" + h.hexdigest() != digest:
                report.problems.append(f"{prefix}blob {digest} content does not match its digest")
        manifest_blobs.append((data or blob["digest"])[7:])
    try:
        actual, blob_ids = nydus_tree_and_blobs(bootstrap, plat_dir)
    except (SourceError, OSError) as exc:
        report.problems.append(f"{prefix}cannot read the nydus image: {exc}")
        return
    if sorted(blob_ids) != sorted(manifest_blobs):
        report.problems.append(f"{prefix}bootstrap blob table {blob_ids} != manifest blobs {manifest_blobs}")
    expected = source_tree(source, src_manifest)
    diffs = compare_trees(expected, actual)
    report.files_compared += len(expected.entries)
    report.problems += [prefix + d for d in diffs]


def nydus_tree_and_blobs(bootstrap: str, blob_dir: str) -> tuple[dict[str, FileEntry], list[str]]:
    from .reader import read_nydus_image

    return read_nydus_image(bootstrap, blob_dir)
