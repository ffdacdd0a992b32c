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


class CredentialError(AuthError):
    """Credentials could not be obtained (a docker credential helper missing or failing)."""


class BlobNotFound(BackendError, FileNotFoundError):
    """The backend has no blob with that id."""


class CacheError(StorageError):
    """The local chunk cache is unusable (corrupt state file, I/O error)."""


class ChunkDigestMismatch(StorageError):
    """A chunk's data does not hash to its recorded digest (never cached)."""

    def __init__(self, blob_id: str, chunk_index: int, expected: bytes, actual: bytes) -> None:
        self.blob_id = blob_id
        self.chunk_index = chunk_index
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"blob {blob_id} chunk {chunk_index}: digest mismatch, "
            f"expected {expected.hex()} got {actual.hex()}"
        )


class DecompressError(StorageError):
    """A chunk could not be decompressed to its recorded size."""


class MetaFormatError(StorageError, ValueError):
    """Blob metadata (chunk-info table, TOC, chunk-map header) is malformed."""


class ConfigError(StorageError, ValueError):
    """A backend or cache configuration is invalid (names the bad key and value)."""


class TransientBackendError(BackendError):
    """A backend failure worth retrying: connection reset, timeout, 5xx, truncated body."""


class TruncatedRead(TransientBackendError):
    """The backend returned fewer bytes than requested."""


class BlobRangeError(BackendError, ValueError):
    """A read outside the blob's size was requested."""


class RegistryUnavailable(RegistryError, TransientBackendError):
    """The registry (or mirror/proxy) could not be reached or answered 5xx/429 (retried)."""
