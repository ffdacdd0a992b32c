"""Uploading blobs, configs and manifests to the target repository (each blob once)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from .distribution import Distribution
from .errors import PushError
from .reference import ImageReference


def progress_bar(desc: str, total: int, enabled: bool | None) -> tuple[tqdm, Callable[[int], None]]:
    """A per-layer tqdm bar on stderr (``enabled=None``: only on a terminal)."""
    bar = tqdm(total=total or None, desc=desc, unit="B", unit_scale=True, leave=False,
               file=sys.stderr, disable=(not sys.stderr.isatty()) if enabled is None else not enabled)
    return bar, bar.update


@dataclass(slots=True)
class PushStats:
    """Which blobs were uploaded and which the target already had."""

    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0


class Pusher:
    """Pushes into one repository; ``HEAD`` first so nothing is uploaded twice."""

    def __init__(self, client: Distribution, target: ImageReference, *, chunk_size: int = 0,
                 progress: bool | None = None) -> None:
        self.client, self.target = client, target
        self.chunk_size = chunk_size
        self.progress = progress
        self.stats = PushStats()
        self._seen: set[str] = set()

    def exists(self, digest: str) -> int | None:
        return self.client.blob_size(self.target.repository, digest)

    def push_file(self, digest: str, path: str) -> bool:
        """Upload the file as blob ``digest`` unless present; True when it was uploaded."""
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            return self._push(digest, fh, size)

    def push_bytes(self, digest: str, data: bytes) -> bool:
        return self._push(digest, io.BytesIO(data), len(data))

    def _push(self, digest: str, fh: io.RawIOBase | io.BufferedReader | io.BytesIO, size: int) -> bool:
        if digest in self._seen:
            return False
        have = self.exists(digest)
        if have is not None:
            if have != size:
                raise PushError(f"target has {digest} with size {have}, expected {size}")
            self._seen.add(digest)
            self.stats.skipped.append(digest)
            return False
        bar, cb = progress_bar(f"push {digest[7:19]}", size, self.progress)
        try:
            self.client.push_blob(self.target.repository, digest, fh, size,  # type: ignore[arg-type]
                                  chunk_size=self.chunk_size, progress=cb)
        finally:
            bar.close()
        self._seen.add(digest)
        self.stats.uploaded.append(digest)
        self.stats.uploaded_bytes += size
        return True

    def push_manifest(self, data: bytes, media_type: str, *, tag: str | None) -> str:
        """Push a manifest/index by tag (or by its digest when ``tag`` is None)."""
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        ref = self.target.with_tag(tag) if tag else ImageReference(
            self.target.host, self.target.repository, None, digest)
        return self.client.put_manifest(ref, data, media_type)
