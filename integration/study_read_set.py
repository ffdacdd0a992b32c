"""Study (not a test): what the real-image workloads' reads weigh in a chunked, compressed image,
by chunk size and zstd level — the bytes floor of any lazy pull, before scheduling.

    python3 -m integration.study_read_set [--chunk-kib 64,256,1024] [--levels 3,9] [--read-ahead-kb 128,512]
                                          [--workloads ...]

Uses ``bench_coldstart_real``'s Debian rootfs (built once into ``.cache/`` by that benchmark).
The rootfs is unpacked into a temporary directory; for each workload every file is evicted from
the page cache, the workload runs once under ``chroot`` (``/dev`` bound, ``/proc`` mounted, both
unmounted after) with the read-ahead of the disk under the tree set to each ``--read-ahead-kb``
(restored after; a lazy mount's own read-ahead plays that part), and ``mincore(2)`` tells which
pages of which files it loaded. Then, per chunk
size, the chunks holding those pages are compressed at each zstd level (stored raw when that is
not smaller) and summed. The whole image's chunks at 1 MiB are compressed too (a sample, with
the single-core speed), so the gain of a level can be set against its conversion cost.

Needs root. Removes its temporary tree on exit.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import zstandard

from integration.bench_coldstart_real import (CACHE, MEASURE_READ_AHEAD_KB, PAGE, WORKLOADS,
                                              debian_rootfs_tar, disk_read_ahead, evict,
                                              newly_resident, regular_files, resident_pages,
                                              weigh_chunks)

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def touched_pages(root: str, files: list[str], argv: list[str]) -> dict[str, bytes]:
    """Run ``argv`` under ``chroot root`` with every file evicted; file -> pages it loaded."""
    os.sync()
    for f in files:
        evict(f)
    before = {f: resident_pages(f) for f in files}
    mounted: list[str] = []
    try:
        for args, where in ((["--bind", "/dev"], "dev"), (["-t", "proc", "proc"], "proc")):
            target = os.path.join(root, where)
            subprocess.run(["mount", *args, target], check=True)
            mounted.append(target)
        r = subprocess.run(["chroot", root, *argv], capture_output=True, text=True, env=ENV, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"workload failed rc={r.returncode}: {r.stderr[-300:]}")
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", target], check=False)
    out = {}
    for f in files:
        fresh = newly_resident(before[f], resident_pages(f))
        if any(fresh):
            out[f] = fresh
    return out


def weigh(pages: dict[str, bytes], chunk: int, compressors: dict[int, zstandard.ZstdCompressor]) -> tuple[int, dict[int, int]]:
    """(raw bytes of the chunks holding the pages, level -> their compressed bytes), all files."""
    fns = {lvl: z.compress for lvl, z in compressors.items()}
    raw, packed = 0, {lvl: 0 for lvl in compressors}
    for path, bits in pages.items():
        r, p = weigh_chunks(path, bits, chunk, fns)
        raw += r
        for lvl in packed:
            packed[lvl] += p[lvl]
    return raw, packed


def whole_image(files: list[str], compressors: dict[int, zstandard.ZstdCompressor], share: float = 0.25) -> None:
    """Every file's 1 MiB chunks; a seeded sample of ``share`` of them compressed per level."""
    chunks = []
    for path in files:
        with open(path, "rb") as f:
            while data := f.read(1 << 20):
                chunks.append(data)
    total = sum(map(len, chunks))
    sample = random.Random(1).sample(chunks, max(1, int(len(chunks) * share)))
    raw = sum(map(len, sample))
    print(f"\nwhole image: {total / 1e6:.1f} MB in {len(chunks)} chunks of <= 1 MiB; "
          f"a sample of {len(sample)} compressed:")
    for lvl, z in compressors.items():
        t = time.perf_counter()
        packed = sum(min(len(c), len(z.compress(c))) for c in sample)
        dt = time.perf_counter() - t
        print(f"  zstd {lvl:2d}: {packed / raw:.4f} of the raw size (≈ {packed / raw * total / 1e6:.1f} MB), "
              f"{raw / dt / 1e6:.0f} MB/s on one core")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m integration.study_read_set", description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk-kib", default="64,256,1024", help="chunk sizes, KiB, comma-separated")
    ap.add_argument("--levels", default="3,9", help="zstd levels, comma-separated (the builder's is 3)")
    ap.add_argument("--read-ahead-kb", default=str(MEASURE_READ_AHEAD_KB),
                    help="read-ahead of the disk under the tree while a workload runs, KiB, comma-separated "
                         "(the kernel's default is 128; kernel EROFS mounts here use 512)")
    ap.add_argument("--workloads", default="python-json,python-numpy,gcc-hello,git,perl")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (chroot, mount)", file=sys.stderr)
        return 2
    chunks = [int(k) * 1024 for k in args.chunk_kib.split(",")]
    if any(c < PAGE or c & (c - 1) for c in chunks):
        print("--chunk-kib: powers of two of at least the page size", file=sys.stderr)
        return 2
    compressors = {int(lvl): zstandard.ZstdCompressor(level=int(lvl)) for lvl in args.levels.split(",")}
    read_aheads = [int(k) for k in args.read_ahead_kb.split(",")]
    tar = debian_rootfs_tar(CACHE)
    tmp = tempfile.mkdtemp(prefix="study-read-set-")
    try:
        root = os.path.join(tmp, "rootfs")
        os.mkdir(root)
        with tarfile.open(tar) as tf:
            tf.extractall(root, filter="fully_trusted")
        files = regular_files([root])
        print(f"rootfs {tar.name}: {len(files)} files")
        print("\n| workload | read-ahead | pages loaded | chunk | chunks' raw size | " +
              " | ".join(f"zstd {lvl}" for lvl in compressors) + " |")
        print("|---|---|---|---|---|" + "---|" * len(compressors))
        for wl in args.workloads.split(","):
            for ra in read_aheads:
                with disk_read_ahead(root, ra) as was:
                    if was is None:
                        print(f"cannot set the read-ahead of the disk under {root}: not a block device's "
                              "filesystem or not writable", file=sys.stderr)
                        return 1
                    pages = touched_pages(root, files, WORKLOADS[wl])
                loaded = sum(sum(b) for b in pages.values()) * PAGE
                for chunk in chunks:
                    raw, packed = weigh(pages, chunk, compressors)
                    print(f"| {wl} | {ra} KiB | {loaded / 1e6:.1f} MB | {chunk >> 10} KiB | {raw / 1e6:.1f} MB | " +
                          " | ".join(f"{packed[lvl] / 1e6:.2f} MB" for lvl in compressors) + " |", flush=True)
        whole_image(files, compressors)
    finally:
        with open("/proc/self/mounts") as m:
            left = [line.split()[1] for line in m if line.split()[1].startswith(tmp)]
        if left:   # never delete through a mount that is still there (a bound /dev)
            print(f"not removing {tmp}: still mounted: {', '.join(left)}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
