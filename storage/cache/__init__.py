"""Chunk caches on top of a backend.

Drivers: :mod:`.filecache` (``FileCacheManager``: uncompressed chunks on local disk, persisted
chunk map), :mod:`.nocache` (``NoCacheManager``: straight to the backend). :mod:`.state` holds
the ``ChunkMap`` contract and its drivers; :mod:`.base` the shared merge/process code.
"""

from storage.cache.base import BlobCache, BlobCacheManager, CacheConfig
from storage.cache.filecache import FileBlobCache, FileCacheManager
from storage.cache.nocache import NoCacheManager

__all__ = ["BlobCache", "BlobCacheManager", "CacheConfig", "FileBlobCache", "FileCacheManager", "NoCacheManager"]
