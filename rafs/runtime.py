"""What nearly every container start reads first: the user database, the dynamic loader and the
C library.

Before the container's program runs, the runtime looks its user up in the image's
``/etc/group`` and ``/etc/passwd`` (containerd while it builds the container's spec, runc's init
in ``setupUser``). Then the program: it is almost always dynamically linked, so ``execve``
loads its ELF interpreter (the dynamic loader); the loader reads ``/etc/ld.so.cache`` and maps
the C library, which glibc and musl keep beside the loader. Measured on a Debian image at
20 MB/s, each of these was a demand miss in every start (``/etc/group`` 15–20 ms after the
mount, ``/etc/passwd`` 45–60 ms after it; the loader and libc, ≈ 1 MB compressed, right after
the program's first pages), while the link sat idle for most of the 50–100 ms runc spends
setting the container up. Fetched at mount they ride in that idle time (:func:`runtime_files`,
``fs_prefetch.runtime_files``).

Only files the image has are named: a path is kept when it resolves (symlinks followed inside
the image) to a regular file; the C library is looked for in the loader's directory, and
``/etc/ld.so.cache`` only when the image has a loader.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

from rafs.errors import NotADirectory, NotFound

if TYPE_CHECKING:
    from rafs.base import Inode, Rafs

#: the ELF interpreters of the architectures containers run on (glibc, then musl)
LOADERS = (
    "/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1", "/lib/ld-linux-armhf.so.3",
    "/lib64/ld64.so.2", "/lib/ld64.so.1", "/lib/ld-linux-riscv64-lp64d.so.1", "/lib/ld-linux.so.2",
    "/lib/ld-musl-x86_64.so.1", "/lib/ld-musl-aarch64.so.1", "/lib/ld-musl-armhf.so.1",
)
#: the C library's name beside a glibc loader (musl's loader is its C library)
LIBC = "libc.so.6"
LD_CACHE = "/etc/ld.so.cache"
#: the user database, in the order a start reads it (containerd's spec, then runc's init)
USER_DB = ("/etc/group", "/etc/passwd")


def _resolved(tree: "Rafs", path: str) -> "tuple[str, Inode] | None":
    """(directory the file really is in, inode) for a regular file at ``path``, else None."""
    try:
        real, node = tree.resolve_path(path)
    except (NotFound, NotADirectory):
        return None
    if not node.is_reg():
        return None
    return posixpath.dirname(real), node


def runtime_files(tree: "Rafs") -> "list[Inode]":
    """The image's user database (:data:`USER_DB`), dynamic loaders, ``/etc/ld.so.cache`` and
    the C library beside each glibc loader, in the order a container's start reads them; each
    file once, only those the image has."""
    out: list[Inode] = []
    seen: set[int] = set()

    def add(node: "Inode") -> None:
        if node.ino not in seen:
            seen.add(node.ino)
            out.append(node)

    for path in USER_DB:
        found = _resolved(tree, path)
        if found is not None:
            add(found[1])
    libcs = []
    loaders = False
    for loader in LOADERS:
        found = _resolved(tree, loader)
        if found is None:
            continue
        loaders = True
        add(found[1])
        libc = _resolved(tree, posixpath.join(found[0], LIBC))
        if libc is not None:
            libcs.append(libc[1])
    if loaders:  # only a dynamic loader reads it
        cache = _resolved(tree, LD_CACHE)
        if cache is not None:
            add(cache[1])
    for node in libcs:
        add(node)
    return out
