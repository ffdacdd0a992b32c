"""Blob backends: where blob bytes come from.

Drivers: :mod:`.registry` (OCI distribution API, with mirrors and a P2P proxy),
:mod:`.localfs` (a directory of blobs or one blob file), :mod:`.memory` (tests).
Every driver implements only ``BlobReader._read_once``/``_blob_size``; the retry loop,
metrics and error record live once in :mod:`.base`. :mod:`.config` builds a backend from
nydusd's JSON ``device.backend``.
"""

from storage.backend.base import BlobBackend, BlobReader

__all__ = ["BlobBackend", "BlobReader"]
