"""Build the storage layer's ``BlobDevice`` for an instance from a parsed nydusd config.

``device.backend`` → ``storage.backend.config.backend_from_config``; ``device.cache`` type
``blobcache``/``filecache`` (with ``config.work_dir``) → ``FileCacheManager``, ``dummycache``
or none → ``NoCacheManager``; ``digest_validate`` (re-check digests on every read; chunks are
always checked when they enter the cache), ``amplify_io``, ``device.cache.config.limit_size`` and
``fs_prefetch`` map to the cache and prefetch configs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from rafs.daemon.config import DaemonConfig
from rafs.errors import ConfigError
from storage.backend.base import BlobBackend
from storage.cache.base import BlobCacheManager
from storage.device import BlobDevice, BlobReadDevice, FileMap
from storage.records import BlobInfo, BlobIoDesc, ChunkInfo


class OwnedDevice(BlobReadDevice):
    """A ``BlobDevice`` that also closes its cache manager (and so the backend) on close."""

    def __init__(self, device: BlobDevice, factory: BlobCacheManager) -> None:
        self._device = device
        self._factory = factory
        self.metrics = device.metrics
        self.read = device.read  # type: ignore[method-assign]  # bound once: the hot path
        self.read_ready = device.read_ready  # type: ignore[method-assign]
        self.read_complete = device.read_complete  # type: ignore[method-assign]
        self.amplify_window = device.amplify_window
        self.cache_report = device.cache_report

    def prefetch(self, iovecs: Iterable[Sequence[BlobIoDesc]], *, priority: str = "low", exact: bool = False) -> None:
        self._device.prefetch(iovecs, priority=priority, exact=exact)

    def prefetch_blob(self, blob_index: int) -> bool:
        return self._device.prefetch_blob(blob_index)

    def wait_demand_settled(self, or_sustained: bool = False) -> bool:
        return self._device.wait_demand_settled(or_sustained)

    def blob_data_path(self, blob_index: int, verify: bool = False) -> str | None:
        return self._device.blob_data_path(blob_index, verify)

    def set_chunk_source(self, source: Callable[[], Iterable[ChunkInfo]]) -> None:
        self._device.set_chunk_source(source)

    def set_chunk_lookup(self, lookup: Callable[[int, int], ChunkInfo | None]) -> None:
        self._device.set_chunk_lookup(lookup)

    def set_file_map(self, same_file: "FileMap | None") -> None:
        self._device.set_file_map(same_file)

    @property
    def backend(self) -> "BlobBackend | None":
        """The backend the device reads through (credential and proxy hot reload)."""
        return getattr(self._factory, "backend", None)

    def warm(self) -> None:
        """Open the backend's connection and auth ahead of the first read (``BlobBackend.warm``)."""
        backend = self.backend
        if backend is not None:
            backend.warm()

    def load_chunk_tables(self) -> None:
        """Start fetching every blob's CI table in background threads (``BlobDevice.load_chunk_tables``)."""
        self._device.load_chunk_tables()

    def close(self) -> None:
        try:
            self._device.close()
        finally:
            self._factory.close()


def build_device(blobs: Sequence[BlobInfo], cfg: DaemonConfig) -> OwnedDevice:
    """The device reading ``blobs`` through the configured backend and cache."""
    from storage.backend.config import backend_from_config
    from storage.cache import CacheConfig, FileCacheManager, NoCacheManager
    from storage.errors import StorageError
    from storage.prefetch import PrefetchConfig

    if not cfg.backend_type:
        raise ConfigError("device.backend.type: required (registry or localfs)")
    try:
        backend = backend_from_config({"type": cfg.backend_type, "config": cfg.backend_config})
        # chunks are always checked against their digests when they enter the cache (and cached
        # chunks once per process before first use); digest_validate re-checks every read
        cache_cfg = CacheConfig(validate_digest=True, verify_every_read=cfg.digest_validate,
                                amplify_io=cfg.amplify_io, amplify_neighbours=cfg.amplify_neighbours,
                                limit_size=cfg.cache_limit_size,
                                merging_size=max(cfg.fs_prefetch.merging_size, 1 << 17))
        if cfg.cache_type in ("blobcache", "filecache"):
            if not cfg.cache_work_dir:
                raise ConfigError(f"device.cache.config.work_dir: required for cache type {cfg.cache_type}")
            factory = FileCacheManager(cfg.cache_work_dir, backend, cache_cfg)
        else:
            factory = NoCacheManager(None, backend, cache_cfg)
        prefetch = PrefetchConfig(enable=cfg.fs_prefetch.enable,
                                  threads_count=max(1, cfg.fs_prefetch.threads_count),
                                  merging_size=cfg.fs_prefetch.merging_size,
                                  bandwidth_rate=cfg.fs_prefetch.bandwidth_rate,
                                  burst_cap=cfg.fs_prefetch.burst_cap,
                                  burst_fraction=cfg.fs_prefetch.burst_fraction,
                                  demand_share=cfg.fs_prefetch.demand_share)
        device = BlobDevice(list(blobs), factory, prefetch_config=prefetch)
        # the first read loads all CI tables in the background, unless the mount did already
        device.preload_on_first_read = True
        return OwnedDevice(device, factory)
    except StorageError as exc:
        if isinstance(exc, ValueError):
            raise ConfigError(f"nydusd config: {exc}") from exc
        raise


def seed_blob_metas(bootstrap: str, blobs: Sequence[object], cfg: DaemonConfig) -> int:
    """Copy each blob's ``<blob_id>.blob.meta`` (its CI table) from beside ``image.boot`` into
    the cache dir when the cache lacks it (temp + rename); returns how many were copied.

    The bootstrap layer carries them: for ZRAN blobs of the older OCI-ref layout (unchanged gzip
    layers) it is the only place they are; for native blobs, ``nydusify convert`` here puts them
    there too (docs/convert.md), and seeding spares the mount one range GET per blob — on the
    critical path: no chunk of a blob can be located before its CI table is loaded. The copies
    are as trusted as ``image.boot`` (same digest-checked layer); storage checks each against the
    blob table when it loads it and fetches the blob's own table instead of one it refuses.
    Without a file cache there is nothing to seed."""
    from storage.atomic import atomic_write

    if cfg.cache_type not in ("blobcache", "filecache") or not cfg.cache_work_dir:
        return 0
    src_dir = os.path.dirname(os.path.abspath(bootstrap))
    copied = 0
    for blob in blobs:
        if not isinstance(blob, BlobInfo):
            continue
        name = f"{blob.blob_id}.blob.meta"
        dst = os.path.join(cfg.cache_work_dir, name)
        src = os.path.join(src_dir, name)
        if os.path.exists(dst) or not os.path.isfile(src):
            continue  # a missing one is fetched from the blob (ZRAN: reported) on first use
        with open(src, "rb") as fh:
            data = fh.read()
        os.makedirs(cfg.cache_work_dir, exist_ok=True)
        atomic_write(dst, data)
        copied += 1
    return copied
