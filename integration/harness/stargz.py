"""The peer stargz-snapshotter (0.12, Debian's Go library) as a real process, and eStargz
conversion with Debian's ``ctr-remote``, for side-by-side benchmarks.

    binary = build_stargz_snapshotter()            # integration/stargz/build.sh, cached
    convert_to_estargz(src_ref, dst_ref)           # OCI image in a registry -> eStargz copy
    with StargzSnapshotter(registries=[reg]) as sz:
        Containerd(snapshotters={"stargz": sz.address}, cri_snapshotter="stargz",
                   registries=[reg])               # CRI pulls are then lazy

Upstream's daemon is not packaged; ``integration/stargz/main.go`` is a short equivalent (see
docs/perf.md). stop() stops the process by PID (SIGTERM: it unmounts its layers itself), then
unmounts whatever is left under its temp dir and removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from integration.harness import HarnessError
from integration.harness.snapshotter import REPO_ROOT, SnapshotterProcess

if TYPE_CHECKING:
    from integration.harness.containerd import Containerd
    from integration.harness.registry import Registry

BUILD_SCRIPT = os.path.join(REPO_ROOT, "integration", "stargz", "build.sh")
CACHE_DIR = os.path.join(REPO_ROOT, ".cache", "stargz")
BINARY = os.path.join(CACHE_DIR, "stargz-snapshotter")


def build_stargz_snapshotter(*, install: bool = False, timeout: float = 1200.0) -> str:
    """Build (or reuse) the stargz-snapshotter binary and return its path.

    Runs ``integration/stargz/build.sh`` (idempotent: a cached build returns at once; the first
    one takes minutes). ``install``: apt-get install missing Debian packages first (root).
    Raises :class:`HarnessError` with the script's reason when it cannot be built (missing
    Debian packages, a failed ``go build``).
    """
    argv = ["bash", BUILD_SCRIPT, *(["--install"] if install else []), CACHE_DIR]
    try:
        r = subprocess.run(argv, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"building stargz-snapshotter took longer than {timeout:.0f}s") from e
    out = r.stdout.strip().splitlines()
    if r.returncode != 0 or not out or not os.access(out[-1], os.X_OK):
        tail = "\n".join(r.stderr.strip().splitlines()[-15:])
        raise HarnessError(f"cannot build stargz-snapshotter (build.sh exit {r.returncode}):\n"
                           f"{tail}")
    return out[-1]


class StargzSnapshotter(SnapshotterProcess):
    """One stargz-snapshotter process with its own root dir and socket (in a private temp dir).

    ``registries``: loopback registries reached over plain HTTP. ``config``: upstream's config
    keys as a dict (written as TOML), e.g. ``{"no_background_fetch": True}`` so that registry
    bytes are only what containers read. ``binary`` defaults to :func:`build_stargz_snapshotter`.
    """

    def __init__(self, *, registries: Sequence["Registry"] = (), plain_http: Sequence[str] = (),
                 config: Mapping[str, Any] | None = None, binary: str | None = None,
                 log_level: str = "info", base_dir: str | None = None,
                 start_timeout: float = 30.0, keep_dir: bool = False) -> None:
        self.binary = binary
        self.log_level = log_level
        self.plain_http = [r.host for r in registries] + list(plain_http)
        super().__init__(config=config, base_dir=base_dir, start_timeout=start_timeout,
                         keep_dir=keep_dir)

    def command(self) -> list[str]:
        argv = [self.binary or BINARY, "--root", self.root, "--address", self.address,
                "--log-level", self.log_level]
        if self.config_path:
            argv += ["--config", self.config_path]
        for host in self.plain_http:
            argv += ["--plain-http", host]
        return argv

    def start(self) -> "StargzSnapshotter":
        if self.binary is None:
            self.binary = build_stargz_snapshotter()
        super().start()
        return self

    def __enter__(self) -> "StargzSnapshotter":
        return self.start()


def _ctr_remote(containerd: "Containerd", *args: str, timeout: float) -> str:
    argv = ["ctr-remote", "--address", containerd.address, "--namespace", containerd.namespace,
            *args]
    try:
        # errors="replace": the workload of ``optimize`` writes its own output to our stdout
        r = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"ctr-remote {' '.join(args[:2])}: no answer after {timeout:.0f}s"
                           ) from e
    if r.returncode != 0:
        raise HarnessError(f"ctr-remote {' '.join(args)} failed ({r.returncode}):\n"
                           f"{(r.stderr or r.stdout).strip()[-3000:]}")
    return r.stdout


def convert_to_estargz(src_ref: str, dst_ref: str, *, optimize: bool = False,
                       workload_argv: Sequence[str] | None = None,
                       containerd: "Containerd | None" = None, linger: float = 1.0,
                       timeout: float = 600.0) -> None:
    """Convert the image ``src_ref`` to eStargz and push it as ``dst_ref`` (both in loopback
    registries, plain HTTP).

    ``ctr-remote`` works on a containerd's content store: the source is pulled into
    ``containerd`` (or into a private one started here without CRI and stopped after), converted
    with ``ctr-remote image convert --estargz --oci`` (no prefetch landmark: every layer is lazy)
    or, with ``optimize``, ``ctr-remote image optimize --oci`` that runs ``workload_argv`` (the
    image's own entrypoint/cmd if None) in a container under runc and puts the files it read first,
    then pushed with ``--plain-http``.

    ``linger``: ctr-remote 0.12 stops its fanotify recorder as soon as the workload exits and
    drops the accesses still queued (the last files a short workload reads are then missing from
    the prefetch list), so ``workload_argv`` runs as ``/bin/sh -c '"$@"; sleep LINGER'`` (exit
    status kept; needs ``/bin/sh`` in the image). ``linger=0`` runs it unwrapped.
    """
    if shutil.which("ctr-remote") is None:
        raise HarnessError("ctr-remote not found (Debian package stargz-snapshotter)")
    if workload_argv is not None and not optimize:
        raise HarnessError("workload_argv is only used with optimize=True")
    if containerd is None:
        from integration.harness.containerd import Containerd

        with Containerd(enable_cri=False) as ctd:
            convert_to_estargz(src_ref, dst_ref, optimize=optimize, workload_argv=workload_argv,
                               containerd=ctd, timeout=timeout)
        return
    _ctr_remote(containerd, "image", "pull", "--plain-http", src_ref, timeout=timeout)
    if optimize:
        args = ["image", "optimize", "--oci"]
        if workload_argv is not None:
            argv = list(workload_argv)
            if linger > 0:
                argv = ["/bin/sh", "-c", f'"$@"; s=$?; sleep {linger:g}; exit $s', "sh", *argv]
            args += ["--entrypoint", json.dumps(argv[:1]), "--args", json.dumps(argv[1:])]
        _ctr_remote(containerd, *args, src_ref, dst_ref, timeout=timeout)
    else:
        _ctr_remote(containerd, "image", "convert", "--estargz", "--oci", src_ref, dst_ref,
                    timeout=timeout)
    try:
        _ctr_remote(containerd, "image", "push", "--plain-http", dst_ref, timeout=timeout)
    except HarnessError as exc:
        # a push is idempotent (blobs already there are skipped); one CI run saw containerd's
        # copy to the loopback registry end in "unexpected EOF" under load: try once more
        if "unexpected EOF" not in str(exc):
            raise
        _ctr_remote(containerd, "image", "push", "--plain-http", dst_ref, timeout=timeout)
