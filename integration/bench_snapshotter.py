"""Benchmark (not a test): Prepare + Mounts + Commit latency, this snapshotter vs containerd's overlayfs.

    python3 -m integration.bench_snapshotter [-n 1000] [--chain 10]

Both servers are driven through the same Python gRPC client over a unix socket. The baseline is
containerd's built-in overlay snapshotter behind ``contrib/snapshotservice``
(``integration/conformance/refsnapshotter``), built by ``integration/conformance/build.sh``. Snapshot i
has as parent the committed snapshot i-1 except at every ``--chain``-th one (image-like chains).
Prints p50/p99 per op and the ratio ours / containerd.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

REPO = pathlib.Path(__file__).resolve().parent.parent
OPS = ("prepare", "mounts", "commit", "total")


def build_reference() -> pathlib.Path:
    r = subprocess.run([str(REPO / "integration" / "conformance" / "build.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"building the reference snapshotter failed:\n{r.stderr[-2000:]}")
    return pathlib.Path(r.stdout.strip().splitlines()[-1]) / "refsnapshotter"


def start(cmd: list[str], sock: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{cmd[0]} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def drive(sock: pathlib.Path, n: int, chain: int) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {op: [] for op in OPS}
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        grpc.channel_ready_future(ch).result(timeout=10)
        stub.List(pb.ListSnapshotsRequest(snapshotter="bench"))  # warm the connection
        parent = ""
        for i in range(n):
            if i % chain == 0:
                parent = ""
            key, name = f"bench/{i}/active", f"bench/{i}/committed"
            t0 = time.perf_counter()
            stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="bench", key=key, parent=parent))
            t1 = time.perf_counter()
            stub.Mounts(pb.MountsRequest(snapshotter="bench", key=key))
            t2 = time.perf_counter()
            stub.Commit(pb.CommitSnapshotRequest(snapshotter="bench", name=name, key=key))
            t3 = time.perf_counter()
            for op, v in zip(OPS, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                lat[op].append(v)
            parent = name
    return lat


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000, help="snapshots per server")
    ap.add_argument("--chain", type=int, default=10, help="parent chain length")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("note: not root; containerd's overlay snapshotter may refuse to start", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-snap-") as d:
        tmp = pathlib.Path(d)
        ref_bin = build_reference()
        results = {}
        servers = {
            "containerd-overlayfs": [str(ref_bin), "--root", str(tmp / "ref-root"),
                                     "--address", str(tmp / "ref.sock")],
            "nydus-snapshotter(py)": [sys.executable, "-m", "snapshotter", "serve", "--root", str(tmp / "py-root"),
                                      "--address", str(tmp / "py.sock"), "--log-level", "warn"],
        }
        for label, cmd in servers.items():
            sock = pathlib.Path(cmd[cmd.index("--address") + 1])
            proc = start(cmd, sock, tmp / f"{sock.stem}.log")
            try:
                t0 = time.perf_counter()
                results[label] = drive(sock, args.n, args.chain)
                wall = time.perf_counter() - t0
            finally:
                stop(proc)
            print(f"{label}: {args.n} x Prepare+Mounts+Commit in {wall:.2f}s")
        ref, ours = results["containerd-overlayfs"], results["nydus-snapshotter(py)"]
        print(f"\n{'op':<8} {'containerd p50':>15} {'p99':>9} {'ours p50':>10} {'p99':>9} {'ratio p50':>10} {'p99':>7}")
        for op in OPS:
            r50, r99, o50, o99 = pct(ref[op], .5), pct(ref[op], .99), pct(ours[op], .5), pct(ours[op], .99)
            print(f"{op:<8} {r50 * 1e3:>13.3f}ms {r99 * 1e3:>7.3f}ms {o50 * 1e3:>8.3f}ms {o99 * 1e3:>7.3f}ms"
                  f" {o50 / r50:>9.2f}x {o99 / r99:>6.2f}x")
        print(f"\nmean total: containerd {statistics.mean(ref['total']) * 1e3:.3f}ms, "
              f"ours {statistics.mean(ours['total']) * 1e3:.3f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
