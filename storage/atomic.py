"""Atomic file replacement: write a temp file beside the target, fsync it, rename it over.

A reader sees the old file or the complete new one, never a half-written one, and a crash leaves
at most a stray ``.<name>.<random>.tmp`` beside the target (never the target half-written).
Used for every file this project writes whole: cache metadata, daemon records, builder outputs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, perms: int = 0o666,
                encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file for writing; on a clean exit it is fsynced and renamed to ``path``,
    on an exception it is removed and ``path`` is left as it was.

    ``perms`` are the permission bits of the new file before the umask (as ``open()`` uses).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perms)
    try:
        with open(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, *, perms: int = 0o666) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically and durably."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_open(path, "wb", perms=perms) as f:
        f.write(data)
