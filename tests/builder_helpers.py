"""Helpers for the builder tests: a generated tree with every file type, tree comparison,
and expanding a data blob to the uncompressed form the kernel reads."""

from __future__ import annotations

import ctypes
import os
import random
import socket
import stat

from storage.meta.blob_meta import expand_blob, load_from_blob

CHUNK = 0x10000  # small chunk size for tests (64 KiB)


def make_tree(root: str, *, seed: int = 1, with_devices: bool = True) -> None:
    """Regular files (empty, tiny, block and chunk boundaries, multi-chunk, duplicates, sparse),
    nested and large directories, symlinks (short and long), hard links, devices, fifo,
    socket, xattrs incl. security.capability, odd modes/ids, nsec mtimes, 255-byte and
    non-UTF-8 names.  Without root: no devices, security.*/trusted.* xattrs or foreign owners."""
    rnd = random.Random(seed)
    os.makedirs(root, exist_ok=True)

    def put(rel: str | bytes, data: bytes, mode: int = 0o644) -> str:
        path = os.path.join(os.fsencode(root), os.fsencode(rel))
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return os.fsdecode(path)

    for d in ("a", "a/b", "a/b/c", "big", "empty_dir", "links"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    put("empty", b"")
    put("one", b"x")
    put("blk4095", rnd.randbytes(4095))
    put("blk4096", rnd.randbytes(4096))
    put("chunk", rnd.randbytes(CHUNK))
    put("chunk_plus1", rnd.randbytes(CHUNK + 1))
    multi = rnd.randbytes(5 * CHUNK + 123)
    put("a/multi", multi)
    put("a/b/dup_of_multi", multi)              # whole-file dedup
    put("a/b/c/text", b"hello world\n" * 20000)  # compressible, repeated chunks
    put("exec", b"#!/bin/sh\necho hi\n", 0o4755)
    put("sticky_file", b"s", 0o1600)
    sparse = os.path.join(root, "sparse")
    with open(sparse, "wb") as f:
        f.seek(3 * CHUNK + 100)
        f.write(b"tail")
        f.truncate(6 * CHUNK)
    for i in range(300):                          # multi-block directory
        put(f"big/{'n' * 180}{i:04d}", str(i).encode())
    put("a/" + "L" * 255, b"long name")
    put(b"a/non-utf8-\xff\xfe", b"bytes name")
    os.symlink("one", os.path.join(root, "links/short"))
    os.symlink("/" + "t" * 3000, os.path.join(root, "links/long"))   # > inline, FLAT_PLAIN data block
    os.symlink("../a/multi", os.path.join(root, "links/rel"))
    os.symlink("dangling/target", os.path.join(root, "links/dangling"))
    os.link(os.path.join(root, "a/multi"), os.path.join(root, "links/hard1"))
    os.link(os.path.join(root, "a/multi"), os.path.join(root, "links/hard2"))
    os.mkfifo(os.path.join(root, "fifo"))
    sock_path = os.path.join(root, "sock")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(sock_path)
    finally:
        s.close()
    if with_devices:
        os.mknod(os.path.join(root, "cdev"), stat.S_IFCHR | 0o620, os.makedev(4, 67))
        os.mknod(os.path.join(root, "bdev"), stat.S_IFBLK | 0o660, os.makedev(259, 300000))
        os.mknod(os.path.join(root, "null0"), stat.S_IFCHR | 0o666, os.makedev(0, 0))
    os.setxattr(os.path.join(root, "one"), "user.comment", b"first")
    os.setxattr(os.path.join(root, "one"), "user.empty", b"")
    os.setxattr(os.path.join(root, "a"), "user.dir", b"d" * 300)
    if os.geteuid() == 0:  # security.*/trusted.* xattrs and foreign owners need root
        os.setxattr(os.path.join(root, "exec"), "security.capability",
                    bytes.fromhex("0100000200200000000000000000000000000000"))
        os.setxattr(os.path.join(root, "a/b"), "trusted.overlay.opaque", b"y")
        os.chown(os.path.join(root, "one"), 1000, 1001)
        os.chown(os.path.join(root, "a/multi"), 70000, 80000)
        os.chown(os.path.join(root, "links/short"), 5, 6, follow_symlinks=False)
    # fixed, distinct timestamps with nanoseconds (directories last)
    paths = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for n in filenames + dirnames:
            paths.append(os.path.join(dirpath, n))
    for i, p in enumerate(sorted(paths, key=lambda p: -p.count(b"/"))):
        t = 1_600_000_000_000_000_000 + i * 1_000_000_123
        os.utime(p, ns=(t, t), follow_symlinks=False)
    os.utime(root, ns=(1_500_000_000_123_456_789,) * 2)


def snapshot(root: str, *, xattrs: bool = True, times: bool = True, dir_times: bool = True) -> dict:
    """Everything a faithful image must reproduce, keyed by relative path (bytes)."""
    out = {}
    broot = os.fsencode(root)
    paths = [broot]
    for dirpath, dirnames, filenames in os.walk(broot):
        paths += [os.path.join(dirpath, n) for n in dirnames + filenames]
    for p in paths:
        rel = os.path.relpath(p, broot)
        st = os.lstat(p)
        rec = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
        isdir = stat.S_ISDIR(st.st_mode)
        if not isdir:
            rec["nlink"] = st.st_nlink
        if times and (dir_times or not isdir):
            rec["mtime"] = st.st_mtime_ns
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                rec["data"] = f.read()
        elif stat.S_ISLNK(st.st_mode):
            rec["target"] = os.readlink(p)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if xattrs and not stat.S_ISLNK(st.st_mode) and not stat.S_ISSOCK(st.st_mode):
            rec["xattrs"] = {k: os.getxattr(p, k) for k in sorted(os.listxattr(p))}
        out[rel] = rec
    return out


def expand(blob_path: str, out_path: str, info) -> None:
    """Write the uncompressed (cache-file) form of a data blob described by ``info`` (BlobInfo)."""
    with open(blob_path, "rb") as f:
        data = f.read()
    read = lambda off, size: data[off:off + size]  # noqa: E731
    meta = load_from_blob(read, len(data), ci_offset=info.ci_offset, ci_compressed_size=info.ci_compressed_size)
    expand_blob(read, meta, info.compressor, out_path)


def kernel_erofs_mount(bootstrap: str, mnt: str, devices: list[str]) -> None:
    """mount(2) a v6 bootstrap (file-backed) with its blob devices; raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    opts = ",".join(f"device={d}" for d in devices).encode()
    if libc.mount(os.fsencode(bootstrap), os.fsencode(mnt), b"erofs", 1, opts or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount erofs {bootstrap}: {os.strerror(err)}")


def kernel_umount(mnt: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mnt), 2) != 0:  # MNT_DETACH
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def erofs_supported() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "erofs" for line in f if line.strip())
    except OSError:
        return False
