"""The bootstrap of an unpacked nydus meta layer: where containerd's unpack leaves it, whether it
is a RAFS bootstrap (``rafs.metadata.Rafs.open``), which blobs it references."""

from __future__ import annotations

import logging
import os

from rafs.errors import RafsError
from rafs.metadata import Rafs
from snapshotter.errors import BootstrapError
from storage.errors import StorageError

log = logging.getLogger("snapshotter")

#: where containerd's unpack of the bootstrap layer leaves the bootstrap (new, legacy)
BOOTSTRAP_PATHS = (os.path.join("image", "image.boot"), "image.boot")


def find_bootstrap(fs_dir: str) -> str | None:
    """The bootstrap file in an unpacked meta layer, or None."""
    for rel in BOOTSTRAP_PATHS:
        path = os.path.join(fs_dir, rel)
        if os.path.isfile(path):
            return path
    return None


def check_bootstrap(path: str) -> int:
    """Check that ``path`` is a RAFS bootstrap (full superblock validation); returns its version."""
    try:
        with Rafs.open(path) as rafs:
            return int(rafs.version)
    except (RafsError, StorageError, OSError, ValueError) as exc:
        raise BootstrapError(f"{path} is not a valid RAFS bootstrap: {exc}") from exc


def bootstrap_blob_ids(path: str) -> set[str]:
    """The blob ids in a bootstrap's blob table; empty (with a warning) when it cannot be read."""
    try:
        with Rafs.open(path) as rafs:
            return {b.blob_id for b in rafs.blobs}
    except (RafsError, StorageError, OSError, ValueError):  # an unreadable bootstrap protects nothing; labels still do
        log.warning("cannot read blob table of %s", path, exc_info=True)
        return set()
