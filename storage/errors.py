"""The storage package's error hierarchy (one base, families under it)."""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error raised by :mod:`storage`."""


class BackendError(StorageError):
    """A blob backend could not serve a request."""


class RegistryError(BackendError):
    """The OCI registry answered with an error or could not be reached."""


class AuthError(RegistryError):
    """Authentication with the registry failed."""


class BlobNotFound(BackendError, FileNotFoundError):
    """The backend has no blob with that id."""


class CacheError(StorageError):
    """The local chunk cache is unusable (corrupt state file, I/O error)."""


class ChunkDigestMismatch(StorageError):
    """A chunk's data does not hash to its recorded digest."""


class DecompressError(StorageError):
    """A chunk could not be decompressed to its recorded size."""


class MetaFormatError(StorageError, ValueError):
    """Blob metadata (chunk-info table, TOC, chunk-map header) is malformed."""
