"""Convert one source image (every platform, or one) into a nydus image and push it."""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from .bootstrap_layer import pack_bootstrap_layer
from .distribution import client_for
from .errors import ConvertError, PushError, SourceError
from .layer import (LayerOptions, LayerResult, convert_layer, layer_key, load_result, merge_layers,
                    remove_stale_temp_dirs)
from .manifest import (INDEX_TYPES, MANIFEST_TYPES, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX,
                       MEDIA_TYPE_OCI_MANIFEST, Descriptor, blob_descriptor, bootstrap_descriptor,
                       build_index, build_manifest, canonical_json, convertible_platforms,
                       parse_json, platform_matches, platform_string, ref_blob_descriptor, rewrite_config,
                       sha256_digest, source_layers)
from .push import Pusher, PushStats, progress_bar
from .reference import parse_reference
from .source import ImageSource, open_source


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    """Everything ``nydusify convert`` takes. ``platform=None`` converts every platform."""

    source: str
    target: str
    work_dir: str
    source_insecure: bool = False
    target_insecure: bool = False
    platform: str | None = None
    layer: LayerOptions = LayerOptions()
    push_chunk_size: int = 0          # 0: monolithic uploads
    with_referrer: bool = False       # push with ``subject`` = the source root (OCI referrers)
    progress: bool | None = None      # None: bars only on a terminal


@dataclass(frozen=True, slots=True)
class ConvertedManifest:
    """One converted platform image."""

    digest: str
    size: int
    platform: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    bootstrap: str                    # merged bootstrap path in the work dir
    layers: tuple[LayerResult, ...]


@dataclass(slots=True)
class ConvertResult:
    """What ``convert`` pushed."""

    target: str
    digest: str
    media_type: str
    manifests: list[ConvertedManifest] = field(default_factory=list)
    stats: PushStats = field(default_factory=PushStats)
    layers_built: list[str] = field(default_factory=list)     # source layer digests converted now
    layers_reused: list[str] = field(default_factory=list)    # ... taken from the work dir


class Converter:
    """Runs one conversion; see :func:`convert`."""

    def __init__(self, opts: ConvertOptions) -> None:
        self.opts = opts
        self.target = parse_reference(opts.target)
        if self.target.digest:
            raise ConvertError(f"target {opts.target} must be a tag, not a digest")
        self.source: ImageSource = open_source(opts.source, insecure=opts.source_insecure)
        if opts.with_referrer:
            src = None if opts.source.startswith(("oci:", "docker-archive:")) else parse_reference(opts.source)
            if src is None or (src.host, src.repository) != (self.target.host, self.target.repository):
                raise ConvertError("--with-referrer needs a registry source in the target's repository "
                                   "(referrers are found per repository)")
        self.subject: dict[str, Any] | None = None
        client = client_for(self.target, insecure=opts.target_insecure)
        self.pusher = Pusher(client, self.target, chunk_size=opts.push_chunk_size, progress=opts.progress)
        os.makedirs(opts.work_dir, exist_ok=True)
        self.built: list[str] = []
        self.reused: list[str] = []

    def run(self) -> ConvertResult:
        lock = open(os.path.join(self.opts.work_dir, ".lock"), "w")  # noqa: SIM115
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise ConvertError(f"work dir {self.opts.work_dir} is in use by another conversion") from exc
            remove_stale_temp_dirs(self.opts.work_dir)
            result = self._run()
            result.layers_built, result.layers_reused = self.built, self.reused
            return result
        finally:
            lock.close()

    def _run(self) -> ConvertResult:
        try:
            data, media_type = self.source.root()
            doc = parse_json(data, f"{self.source.name} root")
            media_type = doc.get("mediaType") or media_type
            if self.opts.with_referrer:
                self.subject = {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}
            if media_type in INDEX_TYPES or "manifests" in doc:
                return self._convert_index(doc)
            if media_type in MANIFEST_TYPES or "layers" in doc:
                if self.opts.platform:
                    self._check_platform(doc)
                converted = self._convert_manifest(doc, platform=None)
                return self._finish_single(converted)
            raise SourceError(f"{self.source.name}: unsupported root media type {media_type!r}")
        finally:
            self.source.close()

    def _check_platform(self, manifest: dict[str, Any]) -> None:
        config = parse_json(self.source.document(manifest["config"]["digest"]), "config")
        have = {"os": config.get("os"), "architecture": config.get("architecture"),
                "variant": config.get("variant")}
        if not platform_matches(have, self.opts.platform or ""):
            raise SourceError(f"{self.source.name} is {platform_string(have)}, "
                              f"not {self.opts.platform}")

    def _convert_index(self, index: dict[str, Any]) -> ConvertResult:
        entries = convertible_platforms(index)
        if self.opts.platform:
            entries = [e for e in entries if platform_matches(e.get("platform"), self.opts.platform)]
            if not entries:
                raise SourceError(f"{self.source.name}: no manifest for platform {self.opts.platform}")
            entries = entries[:1]
        converted = []
        for entry in entries:
            manifest = parse_json(self.source.document(entry["digest"]), f"manifest {entry['digest']}")
            converted.append(self._convert_manifest(manifest, platform=entry.get("platform")))
        if len(converted) == 1:
            return self._finish_single(converted[0])
        descriptors = []
        for entry, conv in zip(entries, converted):
            self.pusher.push_manifest(canonical_json(conv.manifest), MEDIA_TYPE_OCI_MANIFEST, tag=None)
            platform = tuple(sorted((entry.get("platform") or {}).items()))
            descriptors.append(Descriptor(MEDIA_TYPE_OCI_MANIFEST, conv.digest, conv.size, platform=platform))
        new_index = build_index(index, descriptors)
        if self.subject is not None:
            new_index["subject"] = self.subject
        data = canonical_json(new_index)
        digest = self.pusher.push_manifest(data, MEDIA_TYPE_OCI_INDEX, tag=self.target.tag)
        self._attach(MEDIA_TYPE_OCI_INDEX, digest, len(data), None)
        return ConvertResult(str(self.target), digest, MEDIA_TYPE_OCI_INDEX, converted, self.pusher.stats)

    def _finish_single(self, conv: ConvertedManifest) -> ConvertResult:
        if self.subject is not None:
            conv.manifest["subject"] = self.subject
        data = canonical_json(conv.manifest)
        digest = self.pusher.push_manifest(data, MEDIA_TYPE_OCI_MANIFEST, tag=self.target.tag)
        self._attach(MEDIA_TYPE_OCI_MANIFEST, digest, len(data), conv.manifest["config"]["mediaType"])
        return ConvertResult(str(self.target), digest, MEDIA_TYPE_OCI_MANIFEST, [conv], self.pusher.stats)

    def _attach(self, media_type: str, digest: str, size: int, artifact_type: str | None) -> None:
        """``--with-referrer``: make the pushed image findable from the source (see referrers.py)."""
        if self.subject is None:
            return
        from .referrers import attach

        referrer: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
        if artifact_type:
            referrer["artifactType"] = artifact_type
        attach(self.pusher.client, self.target, self.subject["digest"], referrer)

    def _convert_manifest(self, manifest: dict[str, Any], platform: dict[str, Any] | None) -> ConvertedManifest:
        layers = source_layers(manifest)
        config_digest = manifest.get("config", {}).get("digest")
        if not config_digest:
            raise SourceError("manifest has no config")
        config = parse_json(self.source.document(config_digest), f"config {config_digest}")
        results: list[LayerResult] = []
        for layer in layers:
            digest = layer["digest"]

            def opener(d: str = digest):  # noqa: ANN202
                return self.source.open_blob(d)

            def progress(desc: str, _total: int, size: int = int(layer.get("size", 0))):  # noqa: ANN202
                bar, cb = progress_bar(desc, size, self.opts.progress)
                self._bars.append(bar)
                return cb

            self._bars: list[Any] = []
            try:
                done = load_result(self.opts.work_dir, layer_key(digest, self.opts.layer,
                                                                 [r.key for r in results]))
                if done is not None:
                    self.reused.append(digest)
                    results.append(done)
                    continue
                results.append(convert_layer(self.opts.work_dir, digest, opener, self.opts.layer,
                                             results, progress=progress))
                self.built.append(digest)
            finally:
                for bar in self._bars:
                    bar.close()
        image_key = hashlib.sha256("".join(r.key for r in results).encode()).hexdigest()
        image_dir = os.path.join(self.opts.work_dir, "images", image_key)
        os.makedirs(image_dir, exist_ok=True)
        merged = os.path.join(image_dir, "image.boot")
        blob_ids = merge_layers(results, merged, self.opts.layer)
        blob_files = {r.blob_id: r for r in results if r.blob_id}
        blob_descs: list[Descriptor] = []
        metas: list[tuple[str, str]] = []
        for blob_id in blob_ids:
            local = blob_files.get(blob_id)
            if local is not None and local.blob and local.extra.get("oci_ref"):
                # upstream's OCI-ref layout: the manifest layer is the small ref blob (blob.meta +
                # bootstrap + TOC); the original gzip layer stays the data blob, pushed only when
                # the target repository lacks it (nydusd reads it by range under its own digest)
                self.pusher.push_file(f"sha256:{blob_id}", local.blob)
                ref_digest, ref_path = str(local.extra["ref_digest"]), str(local.extra["ref_blob"])
                self.pusher.push_file(ref_digest, ref_path)
                blob_descs.append(ref_blob_descriptor(ref_digest, int(local.extra["ref_size"]),  # type: ignore[call-overload]
                                                      f"sha256:{blob_id}"))
                continue
            if local is not None and local.blob:
                self.pusher.push_file(f"sha256:{blob_id}", local.blob)
                size = local.blob_size
                if local.blob_meta:
                    metas.append((blob_id, local.blob_meta))
            else:
                have = self.pusher.exists(f"sha256:{blob_id}")
                if have is None:
                    raise PushError(f"blob {blob_id} (from the chunk dict) is not in "
                                    f"{self.target.host}/{self.target.repository}; push the chunk-dict "
                                    "image to the same repository first")
                size = have
            blob_descs.append(blob_descriptor(blob_id, size))
        packed = pack_bootstrap_layer(merged, os.path.join(image_dir, "bootstrap.tar.gz"), metas)
        self.pusher.push_file(packed.digest, packed.path)
        new_config = rewrite_config(config, [d.digest for d in blob_descs] + [packed.diff_id])
        config_bytes = canonical_json(new_config)
        config_digest = sha256_digest(config_bytes)
        self.pusher.push_bytes(config_digest, config_bytes)
        config_desc = Descriptor(MEDIA_TYPE_OCI_CONFIG, config_digest, len(config_bytes))
        boot_desc = bootstrap_descriptor(packed.digest, packed.size, self.opts.layer.fs_version)
        new_manifest = build_manifest(manifest, config_desc, blob_descs, boot_desc)
        data = canonical_json(new_manifest)
        return ConvertedManifest(sha256_digest(data), len(data), platform_string(platform),
                                 new_manifest, new_config, merged, tuple(results))


def convert(opts: ConvertOptions) -> ConvertResult:
    """Convert ``opts.source`` and push the nydus image to ``opts.target``."""
    return Converter(opts).run()
