"""Per-request cost of the two FUSE sessions, ``ll`` (rafs/fs/fuse_ll.py) vs ``pyfuse3`` (not a test).

    python3 -m integration.bench_fuse_loop [--reads 20000]

Mounts one image whose blob data is a complete local cache file (so every read is answered by
the complete-file fast path, no fetch) once with each implementation, in the same run, and
times 4 KiB reads at random offsets of a 64 MiB file:

* odirect: ``O_DIRECT`` preads, every one a FUSE READ request: microseconds per request (the
  native row: warm buffered preads of the cache file, what the fast path does per request);
* cached:  buffered preads after dropping the file's pages once (readahead fills the page
  cache through FUSE, most reads then stay in the kernel): microseconds per read.

Everything mounted is unmounted and the work directory removed, also on failure.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import sys
import tempfile
import time

SIZE = 64 << 20


def _odirect(path: str, offsets: list[int]) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        start = time.perf_counter()
        for off in offsets:
            os.preadv(fd, [buf], off)
        return (time.perf_counter() - start) / len(offsets) * 1e6
    finally:
        os.close(fd)


def _warm(path: str, offsets: list[int]) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return (time.perf_counter() - start) / len(offsets) * 1e6
    finally:
        os.close(fd)


def _cached(path: str, offsets: list[int]) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return (time.perf_counter() - start) / len(offsets) * 1e6
    finally:
        os.close(fd)


def measure(reads: int) -> dict[str, tuple[float, float]]:
    """``{"native"|"ll"|"pyfuse3": (O_DIRECT us/request, cached random us/read)}`` (needs root)."""
    from tests.fs_fakes import make_image
    from tests.fs_harness import running_daemon

    work = tempfile.mkdtemp(prefix="bench-fuse-loop-")
    try:
        import pathlib

        tmp = pathlib.Path(work)
        data = os.urandom(1 << 20) * (SIZE >> 20)
        boot = make_image(work, {"/big": data}, name="image")
        spec = json.load(open(boot))
        spec["complete"] = True
        json.dump(spec, open(boot, "w"))
        rng = random.Random(7)
        offsets = [rng.randrange(SIZE // 4096) * 4096 for _ in range(reads)]
        native = str(tmp / "image.blob")
        # the fast path preads the cache file through the page cache: that (warm) is the floor
        _warm(native, offsets)
        rows = {"native": (_warm(native, offsets), _cached(native, offsets))}
        for impl in ("ll", "pyfuse3"):
            with running_daemon(tmp, bootstrap=boot, fuse_impl=impl, name=impl) as (_, mnt, _):
                path = os.path.join(mnt, "big")
                _cached(path, offsets[:100])  # warm up lookups
                rows[impl] = (_odirect(path, offsets), _cached(path, offsets))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reads", type=int, default=20000)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (FUSE mounts)", file=sys.stderr)
        return 2
    rows = measure(args.reads)
    print(f"{'':8} {'O_DIRECT 4 KiB us/req':>22} {'cached random 4 KiB us/read':>28}")
    for name, (od, ca) in rows.items():
        print(f"{name:8} {od:22.1f} {ca:28.1f}")
    print(f"ll saves {rows['pyfuse3'][0] - rows['ll'][0]:.1f} us per request "
          f"({rows['ll'][0] - rows['native'][0]:.1f} vs {rows['pyfuse3'][0] - rows['native'][0]:.1f} "
          "us above native)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
