"""The end-to-end demo (``./run.sh demo`` -> ``python3 -m integration.demo``).

Starts, in a private temp dir, a local docker-registry, containerd 1.6 and the pynydus
snapshotter; builds an image with no internet (busybox-static plus generated data files, or with
``--debian`` a Debian rootfs from apt's configured mirror), pushes it as OCI, converts it to
nydus, then runs a container from each variant and prints side by side the time to the
container's first output and the bytes fetched from the registry; last, it pulls an image built
by the upstream nydus tools (``tests/vectors``) lazily. A step that fails is reported as FAILED.
Everything started is stopped (by PID) and removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from integration.harness import HarnessError
from integration.harness.containerd import Containerd
from integration.harness.images import Image, Layer, busybox_image, busybox_layer, generated_files
from integration.harness.registry import Registry
from integration.harness.snapshotter import REPO_ROOT, SnapshotterProcess

SNAPSHOTTER = "nydus"


@dataclasses.dataclass
class RunResult:
    """One way of running the workload container."""

    label: str
    pull_s: float = 0.0
    first_output_s: float = 0.0      # from the start of the pull to the first output line
    total_s: float = 0.0
    bytes_fetched: int = 0
    blob_gets: int = 0
    output: str = ""
    ok: bool = False
    note: str = ""


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.step_no = 0
        self.timings: list[tuple[str, float, str]] = []
        self.results: list[RunResult] = []
        self.cleanups: list[tuple[str, Callable[[], None]]] = []

    # -- output ------------------------------------------------------------------------------
    def say(self, msg: str = "") -> None:
        print(msg, flush=True)

    def step(self, title: str, fn: Callable[[], Any]) -> Any:
        self.step_no += 1
        self.say(f"[{self.step_no:2d}] {title} ...")
        t = time.monotonic()
        try:
            res = fn()
        except Exception as e:
            dt = time.monotonic() - t
            self.timings.append((title, dt, "FAILED"))
            self.say(f"     FAILED after {dt:.2f}s: {e}")
            raise
        dt = time.monotonic() - t
        self.timings.append((title, dt, "ok"))
        self.say(f"     done in {dt:.2f}s")
        return res

    # -- pieces ------------------------------------------------------------------------------
    def build_image(self, workdir: str) -> Image:
        a = self.args
        app = {
            "app/hello.txt": b"hello from the pynydus demo image\n",
            "app/run.sh": b"#!/bin/sh\necho first-output\ncat /app/hello.txt\n"
                          b"wc -c /data/file0000.bin\n",
        }
        if a.debian:
            base = Layer.from_tar(self.debian_rootfs_tar(workdir))
            data = Layer.from_tree(generated_files(a.files, a.file_kb * 1024, prefix="data"))
            layers = (base, busybox_layer(), data, Layer.from_tree(app))
            cmd = ("/bin/sh", "-c", "echo first-output; python3 -c 'import json, sys; "
                   "print(\"python\", sys.version.split()[0])'; cat /app/hello.txt")
            img = Image(layers=layers, cmd=cmd)
        else:
            data = Layer.from_tree(generated_files(a.files, a.file_kb * 1024, prefix="data"))
            img = busybox_image(extra_layers=[data, Layer.from_tree(app)],
                                cmd=("/bin/sh", "/app/run.sh"))
        size = sum(la.size for la in img.layers)
        self.say(f"     {len(img.layers)} layers, {size / 1e6:.1f} MB compressed")
        return img

    def debian_rootfs_tar(self, workdir: str) -> bytes:
        cache = self.args.debian_cache
        if cache and os.path.exists(cache):
            self.say(f"     reusing Debian rootfs tar {cache}")
            with open(cache, "rb") as f:
                return f.read()
        if shutil.which("mmdebstrap") is None:
            raise HarnessError("--debian needs mmdebstrap (apt-get install mmdebstrap)")
        out = os.path.join(workdir, "debian.tar")
        r = subprocess.run(["mmdebstrap", "--variant=minbase", "--include=python3",
                            "--mode=root", "--quiet", self.args.suite, out],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise HarnessError(f"mmdebstrap failed: {r.stderr[-1500:]}")
        if cache:
            shutil.copyfile(out, cache + ".tmp")
            os.rename(cache + ".tmp", cache)
        with open(out, "rb") as f:
            return f.read()

    def timed_container(self, res: RunResult, registry: Registry, repo: str,
                        pull: Callable[[], None], run_argv: list[str]) -> RunResult:
        mark = registry.log_mark()
        t = time.monotonic()
        pull()
        res.pull_s = time.monotonic() - t
        # unbuffered: communicate() reads the fd directly and would miss buffered bytes
        proc = subprocess.Popen(run_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        res.first_output_s = time.monotonic() - t
        rest, err = proc.communicate(timeout=600)
        res.total_s = time.monotonic() - t
        res.output = (first + rest).decode(errors="replace")
        res.ok = proc.returncode == 0 and bool(first)
        if not res.ok:
            res.note = f"rc={proc.returncode} {err.decode(errors='replace').strip()[-300:]}"
        fetches = registry.blob_fetches(since=mark, repo=repo)
        res.bytes_fetched = sum(e.size for e in fetches)
        res.blob_gets = len(fetches)
        for line in res.output.splitlines()[:6]:
            self.say(f"     | {line}")
        self.say(f"     first output after {res.first_output_s:.2f}s, "
                 f"{res.bytes_fetched / 1e6:.2f} MB in {res.blob_gets} blob GETs")
        if not res.ok:
            raise HarnessError(f"container failed: {res.note}")
        return res

    def convert(self, registry: Registry, src: str, dst: str, workdir: str) -> None:
        argv = [sys.executable, "-c", "import sys; from rafs.convert.cli import main; "
                "sys.exit(main())", "convert", "--source", src, "--target", dst,
                "--source-insecure", "--target-insecure", "--work-dir",
                os.path.join(workdir, "convert"), "--no-progress"]
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                           timeout=1800)
        if r.returncode != 0:
            raise HarnessError(f"nydusify convert rc={r.returncode}: "
                               f"{(r.stderr or r.stdout).strip()[-1500:]}")

    # -- the whole demo ----------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        self.say("pynydus demo — local registry + containerd + pynydus snapshotter, no internet")
        self.say()
        workdir = tempfile.mkdtemp(prefix="pyn-demo-")
        self.cleanups.append(("work dir", lambda: shutil.rmtree(workdir, ignore_errors=True)))
        failed = False
        try:
            registry = self.step("start docker-registry", lambda: self._start(Registry()))
            self.say(f"     {registry.url}")
            img = self.step("build image (busybox-static + generated files"
                            + (", Debian rootfs" if a.debian else "") + ")",
                            lambda: self.build_image(workdir))
            pushed = self.step("push OCI image",
                               lambda: img.push(registry, "demo/app", "oci"))
            self.say(f"     {pushed.ref}")

            snap_config = a.snapshotter_config or {
                "version": 1, "remote": {"insecure_registries": [registry.host]},
                # off by default so the byte counts show what the container actually read; with
                # it on, nydusd keeps fetching the rest of the image in the background
                "prefetch": {"enable": bool(a.prefetch)}}
            if not a.snapshotter_config:
                self.say(f"     snapshotter background prefetch: {'on' if a.prefetch else 'off'}"
                         f"{'' if a.prefetch else ' (--prefetch turns it on)'}")

            def fresh_containerd() -> Containerd:
                # a fresh snapshotter + containerd pair per run: empty content store, snapshots
                # and blob cache, so every run fetches what it needs from the registry (a fair
                # byte count), and no run sees another containerd's snapshots
                for name, fn in list(self.cleanups):
                    if name in ("Containerd", "SnapshotterProcess"):
                        fn()
                        self.cleanups.remove((name, fn))

                def start() -> Containerd:
                    sock = self._start(SnapshotterProcess(config=snap_config)).address
                    return self._start(Containerd(snapshotters={SNAPSHOTTER: sock},
                                                  cri_snapshotter=SNAPSHOTTER, registries=[registry]))
                return self.step("start a fresh pynydus snapshotter + containerd (CRI snapshotter "
                                 "'nydus')", start)

            nydus_ref = f"{registry.host}/demo/app:nydus"
            converted = False
            try:
                self.step("convert OCI -> nydus (nydusify convert)",
                          lambda: self.convert(registry, pushed.ref, nydus_ref, workdir))
                converted = True
            except Exception:
                failed = True

            cmd: list[str] = []      # the image's own CMD
            res = RunResult("OCI image, containerd overlayfs")
            self.results.append(res)
            try:
                ctd = fresh_containerd()
                self.step("run OCI image via stock overlayfs (ctr pull + ctr run)",
                          lambda: self.timed_container(
                              res, registry, "demo/app",
                              lambda: ctd.pull(pushed.ref, snapshotter="overlayfs"),
                              ctd.run_argv(pushed.ref, cmd, snapshotter="overlayfs")))
            except Exception:
                failed = True

            res2 = RunResult("OCI image, pynydus snapshotter (CRI)")
            self.results.append(res2)
            try:
                ctd = fresh_containerd()
                self.step("run OCI image via pynydus snapshotter (CRI pull + ctr run)",
                          lambda: self.timed_container(
                              res2, registry, "demo/app",
                              lambda: ctd.cri.pull_image(pushed.ref),
                              ctd.run_argv(pushed.ref, cmd, snapshotter=SNAPSHOTTER,
                                           namespace="k8s.io")))
            except Exception:
                failed = True
            if converted:
                res3 = RunResult("nydus image, pynydus snapshotter (lazy)")
                self.results.append(res3)
                try:
                    ctd = fresh_containerd()
                    self.step("run nydus image lazily (CRI pull + ctr run)",
                              lambda: self.timed_container(
                                  res3, registry, "demo/app",
                                  lambda: ctd.cri.pull_image(nydus_ref),
                                  ctd.run_argv(nydus_ref, cmd, snapshotter=SNAPSHOTTER,
                                               namespace="k8s.io")))
                except Exception:
                    failed = True
            try:
                self.vector_step(registry, fresh_containerd, workdir)
            except Exception:
                failed = True
        except KeyboardInterrupt:
            self.say("interrupted")
            failed = True
        except Exception as e:
            failed = True
            if a.verbose:
                traceback.print_exc()
            else:
                self.say(f"stopped: {e}")
        finally:
            self.cleanup()
        self.summary()
        return 1 if failed else 0

    def vector_step(self, registry: Registry, fresh_containerd: Callable[[], Containerd],
                    workdir: str) -> None:
        """Lazy loading shown with an image built by the real upstream nydus tools (the RAFS v5
        test vector, pushed in nydus layout): CRI pull, then read two files from a view."""
        import hashlib
        import json
        import pathlib

        from integration.harness.containerd import mount_all
        from integration.harness.images import chain_ids, nydus_image
        from integration.harness.util import unmount_all

        title = "upstream-built nydus image (RAFS v5 vector): pull lazily + read 2 files"
        rep = pathlib.Path(REPO_ROOT) / "tests/vectors/dragonflyoss-nydus/tests/texture/repeatable"
        blob_path = next((rep / "blobs").glob("7334a259*"))
        img = nydus_image((rep / "sha256-nocompress-repeatable").read_bytes(),
                          [blob_path.read_bytes()], fs_version="5")
        pushed = img.push(registry, "demo/vector", "nydus")
        ctd = fresh_containerd()
        res = RunResult("nydus vector image, view + read 2 files")
        self.results.append(res)

        def run() -> None:
            mark = registry.log_mark()
            t = time.monotonic()
            ctd.cri.pull_image(pushed.ref)
            res.pull_s = time.monotonic() - t
            top = chain_ids(json.loads(img.config_json())["rootfs"]["diff_ids"])[-1]
            target = os.path.join(workdir, "view")
            os.makedirs(target)
            mount_all(ctd.view_mounts("demo-view", top, snapshotter=SNAPSHOTTER), target)
            try:
                lines = []
                for rel in ("normal-file-test/test.sh", "normal-file-test/holefiles/mid-non-hole-4096"):
                    with open(os.path.join(target, rel), "rb") as f:
                        data = f.read()
                    if not lines:
                        res.first_output_s = time.monotonic() - t
                    lines.append(f"{hashlib.md5(data).hexdigest()}  /{rel} ({len(data)} bytes)")
            finally:
                unmount_all(target)
            res.total_s = time.monotonic() - t
            res.output = "\n".join(lines)
            fetches = registry.blob_fetches(since=mark, repo="demo/vector")
            res.bytes_fetched = sum(e.size for e in fetches)
            res.blob_gets = len(fetches)
            res.ok = True
            for line in lines:
                self.say(f"     | {line}")
            self.say(f"     data blob is {len(blob_path.read_bytes()) / 1e6:.2f} MB; fetched "
                     f"{res.bytes_fetched / 1e6:.3f} MB in {res.blob_gets} blob GETs "
                     f"(bootstrap layer included)")

        self.step(title, run)

    def _start(self, obj: Any) -> Any:
        obj.start()
        self.cleanups.append((type(obj).__name__, obj.stop))
        return obj

    def cleanup(self) -> None:
        self.say()
        t = time.monotonic()
        for name, fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep cleaning up the rest
                self.say(f"cleanup of {name} failed: {e}")
        self.cleanups.clear()
        self.say(f"cleaned up (processes stopped by PID, mounts and temp dirs removed) "
                 f"in {time.monotonic() - t:.2f}s")

    def summary(self) -> None:
        self.say()
        self.say("steps:")
        for title, dt, status in self.timings:
            self.say(f"  {dt:7.2f}s  {status:13s}  {title}")
        if self.results:
            self.say()
            self.say(f"  {'container run':42s} {'pull':>7s} {'1st output':>11s} {'total':>7s} "
                     f"{'registry bytes':>15s} {'blob GETs':>9s}")
            for r in self.results:
                if not r.ok:
                    self.say(f"  {r.label:42s} FAILED {r.note}")
                    continue
                self.say(f"  {r.label:42s} {r.pull_s:6.2f}s {r.first_output_s:10.2f}s "
                         f"{r.total_s:6.2f}s {r.bytes_fetched / 1e6:12.2f} MB {r.blob_gets:9d}")
        self.say(f"\ntotal {time.monotonic() - self.t0:.2f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m integration.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=32, help="generated data files (default 32)")
    p.add_argument("--file-kb", type=int, default=1024, help="size of each, KiB (default 1024)")
    p.add_argument("--debian", action="store_true",
                   help="add a Debian minbase+python3 rootfs layer (mmdebstrap, apt's mirror)")
    p.add_argument("--suite", default="bookworm", help="Debian suite for --debian")
    p.add_argument("--debian-cache", metavar="FILE",
                   help="reuse this Debian rootfs tar if it exists, else save it there")
    p.add_argument("--snapshotter-config", default=None,
                   help="TOML config file for the snapshotter (default: built-in defaults "
                        "plus plain HTTP to the demo registry)")
    p.add_argument("--prefetch", action="store_true",
                   help="let nydusd prefetch image data in the background (default off, so the "
                        "byte counts show only what was read)")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (containerd, mounts)", file=sys.stderr)
        return 2
    missing = [b for b in ("docker-registry", "containerd", "ctr", "runc") if shutil.which(b) is None]
    if missing or not os.path.exists("/bin/busybox"):
        print(f"missing: {' '.join(missing + ([] if os.path.exists('/bin/busybox') else ['busybox-static']))}"
              " (./run.sh setup installs them)", file=sys.stderr)
        return 2
    if args.snapshotter_config:
        with open(args.snapshotter_config) as f:
            args.snapshotter_config = f.read()
    return Demo(args).run()


if __name__ == "__main__":
    sys.exit(main())
