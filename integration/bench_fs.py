"""Read benchmark: native ext4 vs RAFS over fusedev vs kernel EROFS (not a test).

    python3 -m integration.bench_fs [--size-mib 1024] [--files 20000] [--reps 3]

Builds one image (a ``--size-mib`` random file + ``--files`` small files of 1-16 KiB in 40
directories) with this project's builder, then for native and each driver runs

* seq:  ``fio --ioengine=psync --bs=1M --rw=read`` of the big file (MiB/s)
* rand: ``fio --ioengine=psync --bs=4k --rw=randread --time_based`` (IOPS)
* tar:  ``tar -cf - tree | cat >/dev/null`` (seconds)

in two modes: *warm* (page cache warm) and *cached* (blob data complete in the local cache,
page cache dropped before every run). Ratios are speed ratios against native from the same run
(>1 = faster); every configuration runs once per repetition in turn, so drift in the machine's
state hits all of them alike. ``--mkfs-reference`` adds a ``mkfs.erofs`` image of the same tree
mounted file-backed: what kernel EROFS does on its own layout, to tell our layout from the kernel.
Goals (docs/mounts.md): erofs >= 0.95 warm; fusedev warm seq >= 0.45, rand >= 0.65, tar >= 0.12.
Everything mounted is unmounted and the work directory removed, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from integration.fs_support import localfs_config, metric, nydusd


class _Tmp:
    """pytest-tmp_path-like helper for :func:`nydusd`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __truediv__(self, name: str):
        import pathlib

        return pathlib.Path(self.path) / name


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    time.sleep(0.5)


def fio(path: str, rw: str, bs: str, size_mib: int, runtime: int | None) -> dict:
    cmd = ["fio", "--name=bench", f"--filename={path}", "--ioengine=psync", f"--bs={bs}", f"--rw={rw}",
           "--numjobs=1", f"--size={size_mib}m", "--readonly", "--invalidate=0", "--output-format=json"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"MiB/s": job["bw_bytes"] / (1 << 20), "IOPS": job["iops"], "runtime_s": job["runtime"] / 1000}


def tar_full(root: str) -> float:
    start = time.monotonic()
    subprocess.run(f"tar -C '{root}' -cf - tree | cat >/dev/null", shell=True, check=True)
    return time.monotonic() - start


def make_data(src: str, size_mib: int, files: int) -> None:
    os.makedirs(os.path.join(src, "tree"))
    with open(os.path.join(src, "big.bin"), "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    rnd = random.Random(42)
    per_dir = max(1, files // 40)
    for d in range(-(-files // per_dir)):
        dpath = os.path.join(src, "tree", f"d{d:02d}")
        os.mkdir(dpath)
        for i in range(min(per_dir, files - d * per_dir)):
            with open(os.path.join(dpath, f"f{i:04d}"), "wb") as f:
                f.write(rnd.randbytes(rnd.randint(1024, 16384)))


def build_image(src: str, out: str) -> str:
    from rafs.builder import BuildOptions, build
    from storage.records import Compressor

    os.makedirs(out)
    res = build(src, bootstrap_out=os.path.join(out, "image.boot"), blob_dir=out,
                options=BuildOptions(compressor=Compressor.NONE))
    return res.bootstrap


def run_suite(configs: dict[str, tuple[str, object]], size_mib: int, reps: int, rand_s: int,
              cold: bool) -> dict[str, dict[str, tuple[float, float]]]:
    """{config: {test: (median value, median daemon read requests)}}.

    Configurations are interleaved run by run (native, fusedev, erofs, native, ...) so a change
    in the machine's state during the benchmark hits every column alike."""
    out: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in configs}
    tests = {
        "seq": lambda big: fio(big, "read", "1M", size_mib, None)["MiB/s"],
        "rand": lambda big: fio(big, "randread", "4k", size_mib, rand_s)["IOPS"],
        "tar": lambda big: tar_full(os.path.dirname(big)),
    }
    if not cold:  # prewarm the page cache
        for root, _ in configs.values():
            fio(os.path.join(root, "big.bin"), "read", "1M", size_mib, None)
            tar_full(root)
    for test, fn in tests.items():
        vals: dict[str, list[float]] = {name: [] for name in configs}
        reqs: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(reps):
            for name, (root, counter) in configs.items():
                if cold:
                    drop_caches()
                before = counter() if counter else 0
                vals[name].append(fn(os.path.join(root, "big.bin")))
                reqs[name].append((counter() if counter else 0) - before)
        for name in configs:
            out[name][test] = (statistics.median(vals[name]), statistics.median(reqs[name]))
    return out


def mkfs_reference(src: str, work: str) -> str | None:
    """``mkfs.erofs`` image of the same tree, mounted file-backed: kernel EROFS on its own layout."""
    from rafs import erofs

    if shutil.which("mkfs.erofs") is None:
        print("bench_fs: mkfs.erofs not installed: no erofs-mkfs reference", file=sys.stderr)
        return None
    img, mnt = os.path.join(work, "mkfs.erofs.img"), os.path.join(work, "mnt-erofs-mkfs")
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "--all-root", img, src], check=True)
    os.makedirs(mnt)
    erofs.mount(img, mnt, "erofs", erofs.MS_RDONLY)
    return mnt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--files", type=int, default=20000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rand-seconds", type=int, default=10)
    p.add_argument("--drivers", default="fusedev,erofs")
    p.add_argument("--mkfs-reference", action="store_true",
                   help="add a column for a mkfs.erofs image of the same tree (kernel EROFS alone)")
    p.add_argument("--workdir", default=None, help="parent of the temporary work directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_fs: needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("fio", "tar"):
        if shutil.which(tool) is None:
            print(f"bench_fs: {tool} not installed", file=sys.stderr)
            return 2
    work = tempfile.mkdtemp(prefix="bench-fs-", dir=args.workdir)
    try:
        src = os.path.join(work, "src")
        t0 = time.monotonic()
        make_data(src, args.size_mib, args.files)
        boot = build_image(src, os.path.join(work, "image"))
        print(f"data + image built in {time.monotonic() - t0:.1f} s", flush=True)
        configs: dict[str, tuple[str, object]] = {"native": (src, None)}
        if args.mkfs_reference:
            ref = mkfs_reference(src, work)
            if ref:
                configs["erofs-mkfs"] = (ref, None)
        with contextlib.ExitStack() as stack:
            for driver in args.drivers.split(","):
                cache = os.path.join(work, f"cache-{driver}")
                cfg = localfs_config(os.path.join(work, "image"), cache)
                tmp = _Tmp(work)
                # populate the cache (lazy loading), then remount: erofs then uses the complete .blob.data
                with nydusd(tmp, bootstrap=boot, config=cfg, fs_driver=driver, name=f"{driver}-fill") as (_, mnt, _):
                    subprocess.run(f"cat '{mnt}/big.bin' >/dev/null && tar -C '{mnt}' -cf - tree | cat >/dev/null",
                                   shell=True, check=True)
                client, mnt, _ = stack.enter_context(
                    nydusd(tmp, bootstrap=boot, config=cfg, fs_driver=driver, name=driver))

                def counter(client=client) -> float:
                    return metric(client.metrics(), "nydusd_read_count")

                info = client.info()
                print(f"{driver}: mounted ({info['instances']['/']['fs_driver']}, devices "
                      f"{info['instances']['/']['blob_files']}, FUSE no_open {info.get('fuse_no_open')})",
                      flush=True)
                configs[driver] = (mnt, counter)
            per_mode = {mode: run_suite(configs, args.size_mib, args.reps, args.rand_seconds, mode == "cached")
                        for mode in ("warm", "cached")}
        results = {name: {mode: per_mode[mode][name] for mode in per_mode} for name in configs}
        report(results, args.files)
    finally:
        with open("/proc/self/mountinfo") as f:
            left = [line.split()[4] for line in f if work in line]
        for m in sorted(left, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict, files: int) -> None:
    """Markdown table; overhead columns are extra µs per 1 MiB read / per 4 KiB read / per file."""
    units = {"seq": "MiB/s", "rand": "IOPS", "tar": "s"}
    drivers = [d for d in results if d != "native"]
    print()
    print("| mode | test | unit | native | " + " | ".join(f"{d} (ratio) | {d} µs overhead" for d in drivers)
          + " |")
    print("|---|---|---|---|" + "---|---|" * len(drivers))
    for mode in ("warm", "cached"):
        for test, unit in units.items():
            nat = results["native"][mode][test][0]
            cells = []
            for d in drivers:
                val, reqs = results[d][mode][test]
                if test == "tar":
                    ratio, over = nat / val, (val - nat) / files * 1e6
                    what = "per file"
                else:
                    ratio, over = val / nat, (1 / val - 1 / nat) * 1e6
                    what = "per 1 MiB read" if test == "seq" else "per 4 KiB read"
                cells.append(f"{val:,.2f} ({ratio:.2f}) | {over:,.1f} {what}, {reqs:.0f} daemon reads")
            print(f"| {mode} | {test} | {unit} | {nat:,.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
