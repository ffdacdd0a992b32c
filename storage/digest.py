"""Chunk digests: blake3 (default) and sha256, both over the uncompressed chunk data."""

from __future__ import annotations

import hashlib

import blake3

from storage.records import Digester


def digest(algo: Digester, data: bytes | memoryview) -> bytes:
    if algo == Digester.BLAKE3:
        return blake3.blake3(data).digest()
    if algo == Digester.SHA256:
        return hashlib.sha256(data).digest()
    raise ValueError(f"unknown digester {algo!r}")


def hasher(algo: Digester):
    """A streaming hash object with ``update``/``digest``/``hexdigest``."""
    if algo == Digester.BLAKE3:
        return blake3.blake3()
    if algo == Digester.SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown digester {algo!r}")
