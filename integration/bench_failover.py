"""Failover time and the own session loop's per-request cost, in the same run (not a test).

    python3 -m integration.bench_failover [--kills 30] [--reads 20000] [--fs-driver fusedev|erofs]
                                          [--out integration/results/failover.json]

1. Failover: a ``DaemonManager`` (``recover_policy = "failover"``, the snapshotter's 0.5 s
   liveness period, the real nydusd, a real RAFS v6 image on a ``localfs`` backend) serves one
   16 MiB file, read once so its blob is cached; a reader process does O_DIRECT 4 KiB reads at
   random offsets without pause (under ``erofs``: buffered reads after dropping the file's pages,
   so each goes through kernel EROFS to the blob file on FUSE) while nydusd is SIGKILLed
   ``--kills`` times, 0.3–1.0 s apart. Per kill: ``detect_to_running`` (the manager's own
   measure: death noticed -> successor RUNNING), ``reader_stall`` (what a reader sees: the longest
   read that ended between this kill and the next, i.e. the read the failover held up: the
   monitor's detection delay + detect_to_running + the first request's own time), and the
   reader's errors (must be 0).
2. Per request: ``integration.bench_fuse_loop.measure`` (``ll`` vs ``pyfuse3`` on a completely
   cached 64 MiB file: O_DIRECT 4 KiB random reads, one FUSE READ each, and buffered ones).

Prints both and writes them as JSON. Everything mounted is unmounted, every process started is
stopped (by PID) and the work directory removed, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

FILE_SIZE = 16 << 20


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))
    return v[k]


#: The reader runs as a process of its own: the manager's process forks nydusd successors, and a
#: child of a process that has a file of the FUSE mount open closes it (FLUSH) before exec, which
#: waits for a daemon that does not exist yet (docs/mounts.md) — a deadlock.
_READER = r"""
import json, mmap, os, random, sys, time
path, direct, stop, out, size = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4], int(sys.argv[5])
rng = random.Random(14)
fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
buf = mmap.mmap(-1, 4096)
reads, errors = [], []
while not os.path.exists(stop):
    off = rng.randrange(size // 4096) * 4096
    t0 = time.monotonic()
    try:
        if direct:
            n = os.preadv(fd, [buf], off)
        else:
            os.posix_fadvise(fd, off, 4096, os.POSIX_FADV_DONTNEED)
            n = len(os.pread(fd, 4096, off))
        if n != 4096:
            errors.append(f"short read {n} at {off}")
    except OSError as exc:
        errors.append(f"{exc} at {off}")
    reads.append((t0, time.monotonic()))
os.close(fd)
with open(out + ".tmp", "w") as f:
    json.dump({"reads": reads, "errors": errors}, f)
os.replace(out + ".tmp", out)
"""


def measure_failover(kills: int, fs_driver: str) -> dict:
    from integration.fs_support import localfs_config
    from rafs.builder import BuildOptions, build
    from rafs.daemon.manager import DaemonManager
    from tests.fs_harness import cleanup_mounts

    work = tempfile.mkdtemp(prefix="bench-failover-")
    root = os.path.join(work, "root")
    m = None
    reader = None
    try:
        src = os.path.join(work, "src")
        os.makedirs(src)
        data = random.Random(1).randbytes(FILE_SIZE)
        with open(os.path.join(src, "big"), "wb") as f:
            f.write(data)
        blobs = os.path.join(work, "blobs")
        os.makedirs(blobs)
        res = build(src, bootstrap_out=os.path.join(work, "image.boot"), blob_dir=blobs, options=BuildOptions())
        m = DaemonManager(root, mode="shared", fs_driver=fs_driver,  # type: ignore[arg-type]
                          nydusd_config=localfs_config(blobs, os.path.join(work, "cache")),
                          recover_policy="failover", monitor_interval=0.5)
        mnt = m.mount("img", res.bootstrap, None, None)
        path = os.path.join(mnt, "big")
        with open(path, "rb") as f:  # the whole blob into the cache
            assert f.read() == data, "image content differs"
        rec = next(iter(m._records.values()))
        deadline = time.monotonic() + 10
        while not m._holders[rec.daemon_id].held:
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon never handed its FUSE session over")
            time.sleep(0.05)
        stop, out = os.path.join(work, "stop"), os.path.join(work, "reads.json")
        reader = subprocess.Popen([sys.executable, "-c", _READER, path, "1" if rec.fs_driver == "fusedev" else "0",
                                   stop, out, str(FILE_SIZE)])
        time.sleep(0.5)
        rnd = random.Random()
        kill_times: list[float] = []
        for i in range(kills):
            time.sleep(rnd.uniform(0.3, 1.0))
            pid = next(iter(m._records.values())).pid
            kill_times.append(time.monotonic())
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while m.failovers.snapshot()[0].get("ok", 0) + m.failovers.snapshot()[0].get("restarted", 0) < i + 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no failover after kill {i + 1}")
                time.sleep(0.01)
        time.sleep(0.5)
        open(stop, "w").close()
        reader.wait(60)
        with open(out, encoding="utf-8") as f:
            got = json.load(f)
        reads, errors = got["reads"], got["errors"]
        counts, _, _, events = m.failovers.snapshot()
        detect = [e.seconds for e in events if e.outcome == "ok"]
        served = []  # per kill: the longest read that ended between it and the next kill
        bounds = kill_times + [float("inf")]
        for t, t_next in zip(bounds, bounds[1:]):
            served.append(max((end - start for start, end in reads if t <= end < t_next), default=float("nan")))
        lat = [end - start for start, end in reads]
        return {
            "fs_driver": rec.fs_driver, "kills": kills, "outcomes": counts,
            "reads": len(reads), "read_errors": len(errors), "first_errors": errors[:5],
            "monitor_interval_s": 0.5,
            "detect_to_running_s": {"p50": _pct(detect, 50), "p99": _pct(detect, 99), "max": max(detect or [0]),
                                    "mean": statistics.fmean(detect) if detect else None},
            "reader_stall_s": {"p50": _pct(served, 50), "p99": _pct(served, 99), "max": max(served or [0])},
            "longest_read_s": max(lat or [0]),
            "all_detect_to_running_s": detect, "all_reader_stall_s": served,
        }
    finally:
        if reader is not None and reader.poll() is None:
            open(os.path.join(work, "stop"), "w").close()
            try:
                reader.wait(30)
            except subprocess.TimeoutExpired:
                reader.kill()
                reader.wait(10)
        if m is not None:
            m.shutdown(keep_records=False)
        cleanup_mounts(root)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--reads", type=int, default=20000)
    p.add_argument("--fs-driver", choices=("fusedev", "erofs"), default="fusedev")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "failover.json"))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (FUSE mounts)", file=sys.stderr)
        return 2
    from integration.bench_fuse_loop import measure

    failover = measure_failover(args.kills, args.fs_driver)
    rows = measure(args.reads)
    d, s = failover["detect_to_running_s"], failover["reader_stall_s"]
    print(f"failover ({failover['fs_driver']}, {failover['kills']} SIGKILLs, {failover['outcomes']}): "
          f"detect->RUNNING p50 {d['p50']:.3f} s p99 {d['p99']:.3f} s; longest read per kill "
          f"p50 {s['p50']:.3f} s p99 {s['p99']:.3f} s; {failover['reads']} reads, "
          f"{failover['read_errors']} errors")
    print(f"{'':8} {'O_DIRECT 4 KiB us/req':>22} {'cached random 4 KiB us/read':>28}")
    for name, (od, ca) in rows.items():
        print(f"{name:8} {od:22.1f} {ca:28.1f}")
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
           "kernel": platform.release(), "failover": failover,
           "per_request_us": {k: {"odirect": v[0], "cached": v[1]} for k, v in rows.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0 if failover["read_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
