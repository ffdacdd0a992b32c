"""Benchmark (not a test): container cold start, plain OCI (overlayfs) vs nydus (fusedev, erofs).

    python3 -m integration.bench_coldstart [--rate-mib 16] [--files 1280] [--file-kib 256] [--repeat 3]

One realistic image (busybox + ``--files`` poorly compressible files under ``/data``, plus a
small ``/etc/hello.txt``) is pushed as plain OCI and converted with ``nydusify``. Every pull
goes through a rate-limiting loopback proxy started here (fixed ``--rate-mib`` MiB/s shared by
all connections, registry -> client), so the registry link behaves like a slow network.

Per (mode, workload, repeat) a fresh containerd + snapshotter (cold content store and cache)
runs: t0 = CRI pull start; t1 = first byte of the container's stdout (``ctr run``). Workloads:
``small-read`` (``cat /etc/hello.txt``) and ``read-most`` (read 90 % of ``/data`` then
print). Modes: ``oci`` (containerd's overlayfs snapshotter, full layer download),
``nydus-fusedev`` and ``nydus-erofs`` (this project's snapshotter; the image converted with
nydusify's default prefetch list ``/``, so the snapshotter prefetches it in the background),
and ``nydus-fusedev-noprefetch`` (converted with an empty prefetch list: pure on-demand reads).
Bytes fetched are counted
from the registry's access log. Prints the times (medians over ``--repeat``), ratios against ``oci`` measured in the same
run, and writes ``integration/results/coldstart.json`` and ``coldstart.png``.
Needs root, containerd, runc, docker-registry, /dev/fuse.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "integration" / "results"
MODES = ("oci", "nydus-fusedev", "nydus-erofs", "nydus-fusedev-noprefetch")
WORKLOADS = ("small-read", "read-most")


class TokenBucket:
    """A shared byte budget refilled at ``rate`` bytes/s (burst: 64 KiB)."""

    def __init__(self, rate: float, burst: int = 64 << 10) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                wait = (n - self.tokens) / self.rate
            time.sleep(wait)


class ThrottledProxy:
    """A TCP proxy on 127.0.0.1 (free port) to ``upstream``; downstream bytes rate-limited."""

    def __init__(self, upstream: tuple[str, int], rate: float) -> None:
        self.upstream = upstream
        self.bucket = TokenBucket(rate)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            # a link forwards segments as they come: without TCP_NODELAY, Nagle holds the small
            # piece after a response's headers until the client's delayed ACK (~40 ms per GET)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.bucket), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, bucket: TokenBucket | None) -> None:
        try:
            while True:
                data = src.recv(16 << 10)
                if not data:
                    break
                if bucket is not None:
                    bucket.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass


@dataclass
class Trial:
    mode: str
    workload: str
    repeat: int
    seconds: float
    bytes_fetched: int
    output: str
    error: str = ""
    pull_seconds: float = 0.0  #: t0 -> CRI pull done (the rest: Prepare, mount, container start, reads)


def _first_output(argv: list[str], timeout: float) -> tuple[float, str, str]:
    """Run argv; return (time of the first stdout byte, that output, stderr on failure)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = proc.stdout.read(1)
        t = time.monotonic()
        rest = proc.stdout.read()
        proc.wait(timeout)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        return t, (first + rest).decode(errors="replace"), "" if first else err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_trial(mode: str, workload: str, repeat: int, ref: str, registry, proxy_host: str,
              commands: dict[str, list[str]], prefetch: bool = True, log_dir: str = "") -> Trial:
    from integration.harness.containerd import Containerd
    from integration.harness.snapshotter import SnapshotterProcess
    from snapshotter.ctl import CriImageClient

    snap = None
    ctd = None
    try:
        snapshotters = {}
        if mode != "oci":
            driver = mode.split("-")[1]
            snap = SnapshotterProcess(config={"version": 1, "daemon": {"fs_driver": driver},
                                              "remote": {"insecure_registries": [proxy_host]},
                                              "prefetch": {"enable": prefetch}}).start()
            snapshotters = {"nydus": snap.address}
        ctd = Containerd(snapshotters=snapshotters, cri_snapshotter="overlayfs" if mode == "oci" else "nydus",
                         mirrors=[proxy_host]).start()
        mark = registry.log_mark()
        t0 = time.monotonic()
        with CriImageClient(ctd.address, timeout=600) as cri:
            cri.pull_image(ref)
        t_pull = time.monotonic()
        argv = ctd.run_argv(ref, commands[workload], snapshotter="overlayfs" if mode == "oci" else "nydus",
                            namespace="k8s.io")
        t1, out, err = _first_output(argv, 600)
        time.sleep(0.5)   # let the access log catch up
        if log_dir:
            dest = os.path.join(log_dir, f"{mode}-{workload}-{repeat}")
            if snap is not None:
                _keep_logs(snap, dest)
            os.makedirs(dest, exist_ok=True)
            with open(os.path.join(dest, "timeline.txt"), "w") as f:
                f.write(f"t0 {time.time() - (time.monotonic() - t0):.3f} pull {t_pull - t0:.3f} first-output {t1 - t0:.3f}\n")
            with open(os.path.join(dest, "registry.log"), "w") as f:
                f.write(registry.log_text())
        return Trial(mode, workload, repeat, t1 - t0, registry.bytes_fetched(since=mark), out.strip()[:80], err[-500:],
                     t_pull - t0)
    finally:
        if ctd is not None:
            ctd.stop()
        if snap is not None:
            snap.stop()


def _keep_logs(snap, dest: str) -> None:
    """Copy the snapshotter's and its daemons' logs (profiling the cold path)."""
    import shutil

    os.makedirs(dest, exist_ok=True)
    shutil.copy(snap.log_path, dest)
    logs = os.path.join(snap.root, "logs")
    if os.path.isdir(logs):
        shutil.copytree(logs, os.path.join(dest, "logs"), dirs_exist_ok=True)


def build_image(files: int, file_kib: int):
    from integration.harness.images import Layer, busybox_image, generated_files

    data = Layer.from_tree(generated_files(files, file_kib << 10, prefix="data", seed=7))
    return busybox_image({"etc/hello.txt": b"hello from a cold start\n"}, extra_layers=[data])


def plot(trials: list[Trial], path: pathlib.Path, rate_mib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "seconds", "seconds to first output"),
                           (axes[1], "bytes_fetched", "MiB fetched from the registry")):
        width = 0.8 / len(MODES)
        for i, mode in enumerate(MODES):
            vals = []
            for wl in WORKLOADS:
                sel = [getattr(t, key) for t in trials if t.mode == mode and t.workload == wl and not t.error]
                v = statistics.median(sel) if sel else 0.0
                vals.append(v / (1 << 20) if key == "bytes_fetched" else v)
            ax.bar([x + (i - (len(MODES) - 1) / 2) * width for x in range(len(WORKLOADS))], vals, width,
                   label=mode)
        ax.set_xticks(range(len(WORKLOADS)), WORKLOADS)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"Cold start through a {rate_mib:g} MiB/s registry link")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate-mib", type=float, default=16.0, help="registry link rate, MiB/s")
    ap.add_argument("--files", type=int, default=1280, help="files under /data (default: 320 MiB)")
    ap.add_argument("--file-kib", type=int, default=256, help="size of each /data file, KiB")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-prefetch", action="store_true",
                    help="snapshotter prefetch off (default: on, the snapshotter's default)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--keep-logs", default="", help="copy snapshotter/nydusd logs of each trial here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (containerd, mounts)")
    sys.path.insert(0, str(REPO))
    from integration.harness.registry import Registry
    from rafs.convert.cli import main as nydusify

    read_count = max(1, args.files * 9 // 10)
    commands = {
        "small-read": ["/bin/cat", "/etc/hello.txt"],
        "read-most": ["/bin/sh", "-c", f"for i in $(seq 0 {read_count - 1}); do "
                      "cat /data/file$(printf %04d $i).bin; done | md5sum"],
    }
    modes = [m for m in args.modes.split(",") if m]
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials: list[Trial] = []
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp:
        image = build_image(args.files, args.file_kib)
        oci = image.push(registry, "bench/app", "oci")
        empty = os.path.join(tmp, "no-prefetch.txt")
        open(empty, "w").close()
        for tag, extra in (("nydus", []), ("nydus-noprefetch", ["--prefetch-patterns", empty])):
            if nydusify(["convert", "--source", oci.ref, "--target", f"{registry.host}/bench/app:{tag}",
                         "--source-insecure", "--target-insecure", "--work-dir", os.path.join(tmp, tag),
                         "--no-progress", *extra]) != 0:
                raise SystemExit("nydusify convert failed")
        proxy = ThrottledProxy(("127.0.0.1", registry.port), args.rate_mib * (1 << 20))
        try:
            refs = {m: f"{proxy.host}/bench/app:" + ("oci" if m == "oci" else
                                                     "nydus-noprefetch" if m.endswith("noprefetch") else "nydus")
                    for m in MODES}
            for r in range(args.repeat):
                for workload in [w for w in args.workloads.split(",") if w]:
                    for mode in modes:
                        trial = run_trial(mode, workload, r, refs[mode], registry, proxy.host, commands,
                                          prefetch=not args.no_prefetch, log_dir=args.keep_logs)
                        trials.append(trial)
                        status = f"ERROR {trial.error.strip()[-200:]}" if trial.error else repr(trial.output)
                        print(f"{mode:14s} {workload:10s} #{r}: {trial.seconds:7.2f} s  "
                              f"{trial.bytes_fetched / (1 << 20):7.1f} MiB  (pull {trial.pull_seconds:.2f} s)  {status}", flush=True)
        finally:
            proxy.close()
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for workload in WORKLOADS:
        base = [t.seconds for t in trials if t.mode == "oci" and t.workload == workload and not t.error]
        base_s = statistics.median(base) if base else 0.0
        for mode in modes:
            sel = [t for t in trials if t.mode == mode and t.workload == workload and not t.error]
            if not sel:
                continue
            secs = statistics.median(t.seconds for t in sel)
            fetched = statistics.median(t.bytes_fetched for t in sel)
            summary.setdefault(workload, {})[mode] = {
                "seconds": round(secs, 3), "bytes_fetched": int(fetched), "trials": len(sel),
                "pull_seconds": round(statistics.median(t.pull_seconds for t in sel), 3),
                "speedup_vs_oci": round(base_s / secs, 2) if base_s and secs else 0.0}
    print("\nspeed-up vs plain OCI (same run):")
    for workload, per in summary.items():
        print(f"  {workload}: " + ", ".join(f"{m} {v['speedup_vs_oci']}x ({v['bytes_fetched'] / (1 << 20):.1f} MiB)"
                                           for m, v in per.items()))
    result = {"rate_mib_s": args.rate_mib, "prefetch": not args.no_prefetch, "files": args.files, "file_kib": args.file_kib,
              "image_data_mib": args.files * args.file_kib / 1024, "read_most_files": read_count,
              "summary": summary, "trials": [asdict(t) for t in trials]}
    (out_dir / "coldstart.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(trials, out_dir / "coldstart.png", args.rate_mib)
    print(f"wrote {out_dir / 'coldstart.json'} and {out_dir / 'coldstart.png'}")
    return 0 if all(not t.error for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
