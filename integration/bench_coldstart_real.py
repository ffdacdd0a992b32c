"""Benchmark (not a test): cold start of real programs from a real Debian image, OCI vs nydus.

    python3 -m integration.bench_coldstart_real [--rates 20,100] [--repeat 3] [--modes ...]
    python3 -m integration.bench_coldstart_real --quick       # one rate, one workload, one trial

The image: ``mmdebstrap --variant=minbase bookworm`` with python3, python3-numpy, gcc, libc6-dev,
git and perl (the rootfs tar is cached in ``.cache/``, keyed by suite + package list), split by
path into four gzip layers (base, ``/usr/share``, python, gcc) and pushed as plain OCI to a local
docker-registry, then converted with ``nydusify convert`` and its default options.

Every pull goes through a loopback proxy that limits registry -> client bytes to the link rate
(``--rates`` in MB/s, 10^6 bytes). Per (rate, workload, mode, trial) a fresh snapshotter (empty
cache) and containerd (empty content store) pull the image through CRI and ``ctr run`` the
workload; t0 = CRI pull start, first output = the first line on the container's stdout.

Modes (``MODES``): ``oci`` (containerd's overlayfs snapshotter: the baseline), ``nydus`` (this
project's snapshotter with its default config: fs_driver erofs, prefetch on), ``nydus-fusedev``
and ``nydus-noprefetch`` (one setting changed each), and ``stargz`` (the peer
stargz-snapshotter on an eStargz copy, when ``integration.harness.stargz`` can build it).
``zran`` (not in the defaults): the ``nydusify convert --oci-ref`` image, default snapshotter config;
``zran-1m`` ... ``zran-8m``: the same at ``--zran-spacing`` 1, 2, 4, 8 MiB (``bench_zran`` runs these).
``nydus-chunk64k`` ... ``nydus-chunk512k`` (not in the defaults): converted with ``--chunk-size``
64 ... 512 KiB instead of the default 1 MiB, default snapshotter config.
``nydus-share1`` / ``nydus-fusedev-share1`` (not in the defaults): the sustained-demand settings
before the read-most tuning (``burst_fraction`` 0.25, ``demand_share`` 1), for A/B runs.
Trace-optimized (not in the defaults; one image per start-up workload, made before the trials):
``nydus-opt`` records what the workload reads on the nydus image (a snapshotter with ``[prefetch]
record_trace = true``, exported with ``nydusctl trace``) and rebuilds it with ``nydusify optimize
--prefetch-files``; ``nydus-trace`` converts the OCI image again with ``--prefetch-trace`` of that
trace; ``stargz-opt`` is the peer's own ``ctr-remote image optimize`` running the same workload.

Per trial: time to first output, registry bytes and blob GETs (registry access log, whole trial),
link bytes before the first output (the proxy's counter), and the critical-path timestamps:
pull done (benchmark clock), the snapshotter's registry probe inside the container's Prepare and
the first blob request after the pull (the proxy's request log), daemon RUNNING and the instance
mount's start and end (the snapshotter's JSON log, nydusd's log), first output.
Bytes the workload really read are measured in the OCI trials, independently of our daemon:
after the timed run the unpacked snapshot files are evicted from the page cache
(``POSIX_FADV_DONTNEED`` after ``sync``), the workload runs once more with the disk's read-ahead
at the kernel's default 128 KiB (``MEASURE_READ_AHEAD_KB``), and ``mincore(2)`` counts the pages
of those files that became resident (docs/perf.md explains the method and its bias).

Writes ``integration/results/coldstart_real.json`` and ``coldstart_real.png`` (``--name``), and
prints the summary as Markdown tables; ``--combine`` merges separate runs (e.g. one per rate).
Needs root, containerd, runc, docker-registry, mmdebstrap, /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import glob
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Callable

from integration.bench_coldstart import ThrottledProxy, TokenBucket

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "integration" / "results"
CACHE = REPO / ".cache"

SUITE = "bookworm"
PACKAGES = ("python3", "python3-numpy", "gcc", "libc6-dev", "git", "perl")
#: (layer name, path prefixes inside the rootfs) — first match wins; "base" takes the rest
LAYER_SPLIT = (("python", ("usr/lib/python3",)),
               ("gcc", ("usr/lib/gcc", "usr/libexec/gcc")),
               ("share", ("usr/share",)))
SPLIT_VERSION = 1

_HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello from gcc"); return 0; }\n'
#: workload -> argv; every one prints its first line only when its work is done
WORKLOADS: dict[str, list[str]] = {
    "python-json": ["python3", "-c", "import json; print(1)"],
    "python-numpy": ["python3", "-c", "import numpy; print(numpy.__version__)"],
    "gcc-hello": ["/bin/sh", "-c", f"printf '%s' '{_HELLO_C}' > /tmp/hello.c && "
                  "gcc -O1 -o /tmp/hello /tmp/hello.c && /tmp/hello"],
    "git": ["/bin/sh", "-c", "v=$(git --version) && git init -q /tmp/repo && echo \"$v\""],
    "perl": ["perl", "-MPOSIX=floor", "-MList::Util=sum", "-e",
             "print sum(1..100), ' ', floor(2.5), qq(\\n)"],
    "read-most": ["/bin/sh", "-c", "find /usr -xdev -type f -print0 | xargs -0 cat > /dev/null; "
                  "echo read /usr"],
}
_MATH_C = ('#include <math.h>\n#include <stdio.h>\n#include <string.h>\n'
           'int main(int c, char **v) { printf("%.1f\\n", sqrt((double)strlen(v[0]) + c)); return 0; }\n')
#: programs the defaults were never tuned on, from the same image (``--workloads held-out``): a
#: check that the tuning holds for the class of start-ups, not for the six above
HELD_OUT: dict[str, list[str]] = {
    "python-stdlib": ["python3", "-c", "import urllib.request, email.parser, sqlite3, decimal, logging, "
                      "argparse; print(1)"],
    "numpy-linalg": ["python3", "-c", "import numpy as np; print(np.linalg.inv(np.eye(3))[0, 0])"],
    "gcc-math": ["/bin/sh", "-c", f"printf '%s' '{_MATH_C}' > /tmp/m.c && gcc -O2 -o /tmp/m /tmp/m.c -lm && /tmp/m"],
    "git-commit": ["/bin/sh", "-c", "cd /tmp && rm -rf r && git init -q r && cd r && echo a > a && git add a && "
                   "git -c user.email=a@b -c user.name=n commit -qm init && git log --oneline | wc -l"],
    "perl-json": ["perl", "-MJSON::PP", "-MData::Dumper", "-MFile::Temp", "-e",
                  "print encode_json([1, 2]), qq(\\n)"],
    "dpkg-query": ["/bin/sh", "-c", "dpkg-query -W -f='${Package}\\n' | wc -l"],
}
BENCHMARKED = tuple(WORKLOADS)
WORKLOADS.update(HELD_OUT)
#: names ``--workloads`` accepts for a group
WORKLOAD_GROUPS = {"benchmarked": BENCHMARKED, "held-out": tuple(HELD_OUT), "all": tuple(WORKLOADS)}
STARTUP_WORKLOADS = tuple(w for w in WORKLOADS if w != "read-most")


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way of running the image: which snapshotter, which image tag, which settings."""

    name: str
    kind: str                       #: "overlayfs" | "nydus" | "stargz"
    tag: str                        #: image tag in the registry
    snapshotter_config: dict = dataclasses.field(default_factory=dict)   #: nydus: changed keys
    label: str = ""
    #: the image is made for each start-up workload from what that workload read (tag
    #: ``<tag>-<workload>``): the trace-optimized modes
    per_workload: bool = False


MODES: tuple[Mode, ...] = (
    Mode("oci", "overlayfs", "oci", label="plain OCI, containerd overlayfs"),
    Mode("nydus", "nydus", "nydus", label="nydus, defaults (erofs, prefetch on)"),
    Mode("nydus-fusedev", "nydus", "nydus", {"daemon": {"fs_driver": "fusedev"}},
         label="nydus, fs_driver fusedev"),
    Mode("nydus-noprefetch", "nydus", "nydus", {"prefetch": {"enable": False}},
         label="nydus, prefetch off"),
    Mode("stargz", "stargz", "estargz", label="stargz-snapshotter, eStargz"),
    # the sustained-demand settings before issue 12's read-most tuning (A/B against the defaults)
    Mode("nydus-share1", "nydus", "nydus", {"prefetch": {"burst_fraction": 0.25, "demand_share": 1}},
         label="nydus, erofs, burst_fraction 0.25, demand_share 1"),
    Mode("nydus-fusedev-share1", "nydus", "nydus",
         {"daemon": {"fs_driver": "fusedev"}, "prefetch": {"burst_fraction": 0.25, "demand_share": 1}},
         label="nydus, fusedev, burst_fraction 0.25, demand_share 1"),
    Mode("zran", "nydus", "zran", label="nydus OCI-ref (zran, --oci-ref), defaults (erofs, prefetch on)"),
) + tuple(Mode(f"zran-{mib}m", "nydus", f"zran-{mib}m",
               label=f"nydus OCI-ref (zran, --oci-ref --zran-spacing {mib} MiB), defaults (erofs, prefetch on)")
          for mib in (1, 2, 4, 8)) + tuple(
    Mode(f"nydus-chunk{kib}k", "nydus", f"chunk-{kib}k",
         label=f"nydus, defaults; converted with --chunk-size {kib} KiB")
    for kib in (64, 128, 256, 512)) + (
    # issue 12's optimized-image goal: one image per start-up workload, rebuilt around what it read
    Mode("nydus-opt", "nydus", "trace-optimize", per_workload=True,
         label="nydus, defaults; image rebuilt around the workload's recorded trace "
               "(record_trace, nydusctl trace, nydusify optimize --prefetch-files)"),
    Mode("nydus-trace", "nydus", "trace-convert", per_workload=True,
         label="nydus, defaults; converted with the workload's recorded trace "
               "(record_trace, nydusctl trace, nydusify convert --prefetch-trace)"),
    Mode("stargz-opt", "stargz", "estargz-opt", per_workload=True,
         label="stargz-snapshotter, eStargz optimized for the workload (ctr-remote image optimize)"),
)
MODES_BY_NAME = {m.name: m for m in MODES}
DEFAULT_MODES = ("oci", "nydus", "nydus-fusedev", "nydus-noprefetch", "stargz")


class BenchError(RuntimeError):
    """The benchmark cannot build its image or run a trial."""


# --- the image ---------------------------------------------------------------------------------
def image_key() -> str:
    spec = f"{SUITE} minbase {','.join(sorted(PACKAGES))}"
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def debian_rootfs_tar(cache: pathlib.Path) -> pathlib.Path:
    """The mmdebstrap rootfs tar, built once per (suite, package list) and kept in ``cache``."""
    path = cache / f"debian-{SUITE}-{image_key()}.tar"
    if path.exists():
        return path
    if shutil.which("mmdebstrap") is None:
        raise BenchError("needs mmdebstrap (apt-get install mmdebstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.tar")   # mmdebstrap picks its output format by suffix
    print(f"building {path.name}: mmdebstrap {SUITE} minbase + {' '.join(PACKAGES)} ...", flush=True)
    r = subprocess.run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
                        "--format=tar", "--mode=root", "--quiet", SUITE, str(tmp)],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BenchError(f"mmdebstrap failed: {r.stderr[-1500:]}")
    os.rename(tmp, path)
    return path


def _norm(name: str) -> str:
    name = name[2:] if name.startswith("./") else name
    return name.lstrip("/").rstrip("/")


def _layer_of(path: str) -> str:
    for layer, prefixes in LAYER_SPLIT:
        if any(path.startswith(pre) for pre in prefixes):     # usr/lib/python3 + python3.11
            return layer
    return "base"


def split_rootfs(tar_path: pathlib.Path) -> list[tuple[str, bytes]]:
    """The rootfs as uncompressed layer tars (base first), split by ``LAYER_SPLIT``.

    Each layer carries the directory entries above its files (same modes/owners as the rootfs);
    hard links stay in the layer of their target."""
    names = ["base"] + [n for n, _ in LAYER_SPLIT]
    bufs = {n: io.BytesIO() for n in names}
    outs = {n: tarfile.open(fileobj=bufs[n], mode="w", format=tarfile.PAX_FORMAT) for n in names}
    dirs: dict[str, tarfile.TarInfo] = {}
    written: dict[str, set[str]] = {n: set() for n in names}
    where: dict[str, str] = {}

    def add(layer: str, norm: str, m: tarfile.TarInfo, data=None) -> None:
        parents = []
        parent = os.path.dirname(norm)
        while parent and parent not in written[layer]:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(parents):
            if d in dirs:
                outs[layer].addfile(dirs[d])
            written[layer].add(d)
        if norm not in written[layer]:
            outs[layer].addfile(m, data)
            written[layer].add(norm)

    with tarfile.open(tar_path, "r:") as src:
        for m in src:
            norm = _norm(m.name)
            if not norm:
                continue
            if m.isdir():
                dirs[norm] = m
                if _layer_of(norm) != "base":
                    continue   # written with the first entry below it (or at the end if empty)
                layer = "base"
            elif m.islnk():
                layer = where.get(_norm(m.linkname), "base")
            else:
                layer = _layer_of(norm)
            where[norm] = layer
            add(layer, norm, m, src.extractfile(m) if m.isreg() else None)
    for norm, m in dirs.items():
        layer = _layer_of(norm)
        if norm not in written[layer]:
            add(layer, norm, m)
    for o in outs.values():
        o.close()
    return [(n, bufs[n].getvalue()) for n in names if written[n]]


def build_image(cache: pathlib.Path):
    """The OCI image (layers gzip'd), from an OCI layout cached next to the rootfs tar."""
    from integration.harness.images import Image, Layer

    layout = cache / f"debian-{SUITE}-{image_key()}-oci-v{SPLIT_VERSION}"
    cmd = ("/bin/sh",)
    if not (layout / "index.json").exists():
        tar = debian_rootfs_tar(cache)
        print(f"splitting {tar.name} into layers ...", flush=True)
        layers = tuple(Layer.from_tar(data) for _, data in split_rootfs(tar))
        img = Image(layers=layers, cmd=cmd)
        tmp = pathlib.Path(str(layout) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        img.write_oci_layout(str(tmp), "oci")
        os.rename(tmp, layout)
        return img
    index = json.loads((layout / "index.json").read_text())
    blob = lambda d: (layout / "blobs" / "sha256" / d.split(":", 1)[1]).read_bytes()  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    layers = tuple(Layer(data=blob(d["digest"]), diff_id=diff, media_type=d["mediaType"])
                   for d, diff in zip(manifest["layers"], config["rootfs"]["diff_ids"]))
    return Image(layers=layers, cmd=cmd)


# --- page-cache residency (bytes the workload read) --------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
PAGE = os.sysconf("SC_PAGE_SIZE")
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: str) -> bytes:
    """One byte per page of ``path``: 1 if the page is in the page cache (mincore over a
    read-only shared mapping); empty for an empty or unreadable file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
    except OSError:
        return b""
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return b""
        addr = _libc.mmap(None, size, 1, 1, fd, 0)        # PROT_READ, MAP_SHARED
        if addr in (None, _MAP_FAILED):
            return b""
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                return b""
            return bytes(b & 1 for b in vec.raw)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_bytes(path: str) -> int:
    """Bytes of ``path`` in the page cache."""
    return sum(resident_pages(path)) * PAGE


def newly_resident(before: bytes, after: bytes) -> bytes:
    """One byte per page of ``after``: 1 where the page is resident now and was not ``before``."""
    return bytes(a & (0 if i < len(before) and before[i] else 1) for i, a in enumerate(after))


def weigh_chunks(path: str, pages: bytes, chunk_size: int,
                 compressors: dict[Any, Callable[[bytes], bytes]]) -> tuple[int, dict[Any, int]]:
    """The ``chunk_size`` chunks of ``path`` holding a page marked in ``pages``: (their raw bytes,
    compressor key -> their bytes each compressed on its own, stored raw when that is not
    smaller, as the builder stores chunks)."""
    per = chunk_size // PAGE
    raw, packed = 0, {k: 0 for k in compressors}
    hit = sorted({i // per for i, b in enumerate(pages) if b})
    if not hit:
        return raw, packed
    with open(path, "rb") as f:
        for c in hit:
            f.seek(c * chunk_size)
            data = f.read(chunk_size)
            raw += len(data)
            for k, fn in compressors.items():
                packed[k] += min(len(data), len(fn(data)))
    return raw, packed


def compressed_read_bytes(path: str, before: bytes, after: bytes, chunk_size: int = 1 << 20) -> int:
    """What the pages that became resident (``after`` but not ``before``) weigh in a chunked,
    compressed image: the chunks of ``chunk_size`` holding any of them, zstd at the builder's
    level (:func:`weigh_chunks`) — the bytes a lazy pull of this file must move for the read,
    whatever its scheduling."""
    from storage.compress import compress
    from storage.records import Compressor

    _, packed = weigh_chunks(path, newly_resident(before, after), chunk_size,
                             {"zstd": lambda data: compress(Compressor.ZSTD, data)})
    return packed["zstd"]


#: the read-ahead (KiB) of the disk under the unpacked image while a read set is measured: the
#: kernel's default. A disk set higher (this VM's virtio disk: 8 MiB) reads that much around
#: every page fault of a mapped file and inflates the read set (docs/perf.md, 2026-12-07 eighth)
MEASURE_READ_AHEAD_KB = 128


def _queue_read_ahead(path: str) -> str | None:
    """``/sys/.../queue/read_ahead_kb`` of the block device holding ``path`` (the whole disk's
    for a partition), or None (no block device: tmpfs, overlay, ...)."""
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for cand in (os.path.join(dev, "queue", "read_ahead_kb"), os.path.join(dev, "..", "queue", "read_ahead_kb")):
        if os.path.exists(cand):
            return os.path.realpath(cand)
    return None


@contextlib.contextmanager
def disk_read_ahead(path: str, kb: int) -> Iterator[int | None]:
    """Set the read-ahead of the disk holding ``path`` to ``kb`` KiB, restore it after; yields the
    value it had (None when ``path`` is on no block device or the knob cannot be written)."""
    knob = _queue_read_ahead(path)
    old = None
    if knob is not None:
        try:
            with open(knob) as f:
                old = int(f.read())
            with open(knob, "w") as f:
                f.write(str(kb))
        except OSError:
            old = None
    try:
        yield old
    finally:
        if knob is not None and old is not None:
            with open(knob, "w") as f:
                f.write(str(old))


def evict(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def regular_files(roots: list[str]) -> list[str]:
    """Regular files below ``roots``, one path per inode (hard links share their pages)."""
    out, seen = [], set()
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = os.path.join(dirpath, f)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    out.append(p)
    return out


# --- critical-path timestamps from the logs ----------------------------------------------------
def _snapshotter_events(path: str) -> list[tuple[float, str]]:
    """(unix time, message) of the snapshotter's JSON log lines."""
    out = []
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            e = json.loads(line)
            t = datetime.datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        out.append((t, str(e.get("msg", ""))))
    return out


_DAEMON_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \[[^\]]*\] (.*)$")


def _daemon_events(paths: list[str]) -> list[tuple[float, str]]:
    """(unix time, message) of nydusd log lines (``asctime``: local time, milliseconds)."""
    out = []
    for path in paths:
        try:
            lines = open(path, errors="replace").read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = _DAEMON_LINE.match(line)
            if m:
                t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((t, m.group(2)))
    return sorted(out)


_INSTANCE = re.compile(r"^RAFS instance \S+ for \S+ mounted at \S+ in ([\d.]+)s$")


def nydus_timeline(snap_log: str, daemon_logs: list[str]) -> dict[str, float]:
    """Unix times of the critical-path events in the snapshotter's JSON log and nydusd's log:
    ``daemon_started`` (the snapshotter saw its daemon RUNNING), ``daemon_running`` (the daemon's
    own RUNNING line), ``mount_requested`` / ``instance_mounted`` (the instance mount inside the
    container's Prepare: start, end)."""
    tl: dict[str, float] = {}
    for t, msg in _snapshotter_events(snap_log):
        m = _INSTANCE.match(msg)
        if m and "instance_mounted" not in tl:
            tl["mount_requested"] = t - float(m.group(1))
            tl["instance_mounted"] = t
        if msg.startswith("started nydusd") and "daemon_started" not in tl:
            tl["daemon_started"] = t
    for t, msg in _daemon_events(daemon_logs):
        if " RUNNING " in f" {msg} " and "daemon_running" not in tl:
            tl["daemon_running"] = t
    return tl


# --- one trial ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Trial:
    rate_mb_s: float
    workload: str
    mode: str
    repeat: int
    seconds: float = 0.0               #: pull start -> first output line
    pull_seconds: float = 0.0
    registry_bytes: int = 0            #: blob bytes served by the registry during the trial
    blob_gets: int = 0                 #: blob GET requests served (backend requests)
    link_bytes_first_output: int = 0   #: bytes through the throttled link until the first output
    read_bytes: int = -1               #: image bytes the workload read (OCI trials; -1 = not measured)
    #: the 1 MiB chunks holding those bytes, zstd-compressed as the builder does (-1 = not measured)
    read_zstd_bytes: int = -1
    timeline: dict = dataclasses.field(default_factory=dict)   #: event -> seconds after t0
    #: seconds the link sat idle before the first output: during the pull, from the pull to the
    #: first blob GET (Prepare, mount, container start), and from there on (the reads)
    link_idle: dict = dataclasses.field(default_factory=dict)
    output: str = ""
    error: str = ""


class Link:
    """The throttled proxy plus a log of the requests it forwarded and the bytes it sent back."""

    def __init__(self, registry_port: int, rate: float) -> None:
        self.proxy = ThrottledProxy(("127.0.0.1", registry_port), rate)
        self.rate = rate
        # a 50 ms burst: with the default 64 KiB one, every oversleep of the pump thread on a
        # loaded machine is lost (the bucket cannot bank it) and the link runs well below rate
        self.proxy.bucket = TokenBucket(rate, burst=max(256 << 10, int(rate * 0.05)))
        self.requests: list[tuple[float, str]] = []
        self.sends: list[tuple[float, int]] = []   #: (time, bytes) of each piece sent back
        self.sent = 0
        self._lock = threading.Lock()
        link = self

        def pump(src, dst, b):      # same as ThrottledProxy._pump, observing both directions
            try:
                while True:
                    data = src.recv(64 << 10)
                    if not data:
                        break
                    if b is None:
                        if data[:4] in (b"GET ", b"HEAD"):
                            line = data.split(b"\r\n", 1)[0].decode(errors="replace")
                            rng = re.search(rb"\r\nrange: *bytes=([0-9]+-[0-9]*)", data, re.I)
                            if rng:                    # the range a lazy read asked for
                                line += " range=" + rng.group(1).decode()
                            with link._lock:
                                link.requests.append((time.time(), line))
                    else:
                        b.take(len(data))
                        with link._lock:
                            link.sent += len(data)
                            link.sends.append((time.time(), len(data)))
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(2)
                    except OSError:
                        pass

        self.proxy._pump = pump     # type: ignore[method-assign]

    @property
    def host(self) -> str:
        return self.proxy.host

    def first_request(self, after: float, path_part: str) -> float | None:
        """Time of the first request after ``after`` whose request line contains ``path_part``."""
        with self._lock:
            return next((t for t, line in self.requests if t >= after and path_part in line), None)

    def idle_seconds(self, start: float, end: float) -> float:
        """Seconds of ``[start, end]`` in which the link carried nothing. The link is modelled as
        a queue drained at ``rate``: a piece sent at ``t`` occupies it for ``size / rate`` from
        ``t`` or from the end of the piece before it, whichever is later (so a burst the token
        bucket lets through at once still counts the link time its bytes take)."""
        with self._lock:
            sends = [s for s in self.sends if s[0] <= end]
        busy, free_at = 0.0, float("-inf")
        for t, n in sends:
            a = max(t, free_at)
            free_at = a + n / self.rate
            busy += max(0.0, min(free_at, end) - max(a, start))
        return max(0.0, (end - start) - busy)

    def forget(self, before: float) -> None:
        with self._lock:
            self.sends = [s for s in self.sends if s[0] >= before]

    def close(self) -> None:
        self.proxy.close()


def _run_first_line(argv: list[str], timeout: float) -> tuple[float, str, str, int]:
    """Run argv; (time of the first stdout line, all output, stderr, rc)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        t = time.time()
        rest, err = proc.communicate(timeout=timeout)
        return t, (first + rest).decode(errors="replace"), err.decode(errors="replace"), proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def measure_read(ctd, ref: str, argv: list[str], timeout: float) -> tuple[int, int]:
    """Run the workload again on the unpacked OCI image with its files evicted from the page
    cache; return the bytes of image files that became resident, and what the 1 MiB chunks
    holding them weigh compressed (:func:`compressed_read_bytes`)."""
    roots = glob.glob(os.path.join(ctd.root, "io.containerd.snapshotter.v1.overlayfs", "snapshots",
                                   "*", "fs"))
    files = regular_files(roots)
    os.sync()
    for f in files:
        evict(f)
    before = {f: resident_pages(f) for f in files}
    with disk_read_ahead(ctd.root, MEASURE_READ_AHEAD_KB):
        run = ctd.run_argv(ref, argv, snapshotter="overlayfs", namespace="k8s.io")
        _, _, err, rc = _run_first_line(run, timeout)
    if rc != 0:
        raise BenchError(f"read measurement run failed rc={rc}: {err[-300:]}")
    after = {f: resident_pages(f) for f in files}
    read = sum(max(0, sum(after[f]) - sum(before[f])) for f in files) * PAGE
    return read, sum(compressed_read_bytes(f, before[f], after[f]) for f in files if sum(after[f]))


def run_trial(mode: Mode, workload: str, rate_mb_s: float, repeat: int, ref: str, registry,
              link: Link, *, measure: bool, log_dir: str = "", timeout: float = 300, settle: float = 0.0) -> Trial:
    from integration.harness.containerd import Containerd
    from integration.harness.snapshotter import SnapshotterProcess

    trial = Trial(rate_mb_s, workload, mode.name, repeat)
    argv = WORKLOADS[workload]
    snap: Any = None
    ctd = None
    try:
        snapshotters: dict[str, str] = {}
        if mode.kind == "nydus":
            # defaults, plus plain HTTP to the link and JSON logs (for the timeline)
            cfg: dict[str, Any] = {"version": 1, "remote": {"insecure_registries": [link.host]},
                                   "log": {"format": "json"}}
            for k, v in mode.snapshotter_config.items():
                cfg.setdefault(k, {}).update(v)
            snap = SnapshotterProcess(config=cfg).start()
            snapshotters = {"nydus": snap.address}
        elif mode.kind == "stargz":
            from integration.harness.stargz import StargzSnapshotter

            # the peer's defaults (background fetch on), plain HTTP to the link
            snap = StargzSnapshotter(plain_http=[link.host]).start()
            snapshotters = {"stargz": snap.address}
        sn_name = {"overlayfs": "overlayfs", "nydus": "nydus", "stargz": "stargz"}[mode.kind]
        ctd = Containerd(snapshotters=snapshotters, cri_snapshotter=sn_name, mirrors=[link.host]).start()
        ctd.cri  # noqa: B018 - connect before t0
        if settle:  # as on a node up for a while: the snapshotter's pre-started daemon is RUNNING
            time.sleep(settle)
        mark = registry.log_mark()
        sent0 = link.sent
        t0 = time.time()
        link.forget(t0)
        ctd.cri.pull_image(ref)
        t_pull = time.time()
        run = ctd.run_argv(ref, argv, snapshotter=sn_name, namespace="k8s.io")
        t1, out, err, rc = _run_first_line(run, timeout)
        trial.link_bytes_first_output = link.sent - sent0
        trial.seconds, trial.pull_seconds = t1 - t0, t_pull - t0
        trial.output = out.strip().splitlines()[0][:80] if out.strip() else ""
        if rc != 0 or not out.strip():
            trial.error = f"rc={rc} {err.strip()[-400:]}"
        time.sleep(0.5)   # let the access log catch up
        fetches = registry.blob_fetches(since=mark)
        trial.registry_bytes = sum(e.size for e in fetches)
        trial.blob_gets = len(fetches)
        tl = {"pull_done": t_pull}
        if mode.kind == "nydus":
            tl.update(nydus_timeline(snap.log_path, glob.glob(os.path.join(snap.root, "logs", "*", "*.log"))))
        for event, part in (("registry_ping", "GET /v2/ "), ("first_backend_request", "/blobs/")):
            ts = link.first_request(t_pull, part)
            if ts is not None and ts <= t1:
                tl[event] = ts
        tl["first_output"] = t1
        trial.timeline = {k: round(v - t0, 3) for k, v in sorted(tl.items(), key=lambda kv: kv[1])}
        t_get = tl.get("first_backend_request", t1)
        trial.link_idle = {"pull": round(link.idle_seconds(t0, t_pull), 3),
                           "to_first_get": round(link.idle_seconds(t_pull, t_get), 3),
                           "reads": round(link.idle_seconds(t_get, t1), 3)}
        if log_dir:
            _keep_logs(log_dir, trial, snap, registry, link, t0)
        if measure and mode.kind == "overlayfs" and not trial.error:
            trial.read_bytes, trial.read_zstd_bytes = measure_read(ctd, ref, argv, timeout)
        return trial
    except Exception as exc:  # noqa: BLE001 - a failed trial is reported, the run goes on
        trial.error = trial.error or f"{type(exc).__name__}: {exc}"[-600:]
        return trial
    finally:
        if ctd is not None:
            ctd.stop()
        if snap is not None:
            snap.stop()


def _keep_logs(log_dir: str, trial: Trial, snap, registry, link: Link, t0: float) -> None:
    dest = os.path.join(log_dir, f"{trial.rate_mb_s:g}-{trial.workload}-{trial.mode}-{trial.repeat}")
    os.makedirs(dest, exist_ok=True)
    if snap is not None and getattr(snap, "log_path", None) and os.path.exists(snap.log_path):
        shutil.copy(snap.log_path, dest)
        logs = os.path.join(snap.root, "logs")
        if os.path.isdir(logs):
            shutil.copytree(logs, os.path.join(dest, "logs"), dirs_exist_ok=True)
    with open(os.path.join(dest, "registry.log"), "w") as f:
        f.write(registry.log_text())
    with open(os.path.join(dest, "link.log"), "w") as f:
        f.writelines(f"{t - t0:8.3f} {line}\n" for t, line in link.requests if t >= t0)
    with open(os.path.join(dest, "link-sends.log"), "w") as f:   # seconds after t0, bytes
        f.writelines(f"{t - t0:8.4f} {n}\n" for t, n in list(link.sends) if t >= t0)
    with open(os.path.join(dest, "trial.json"), "w") as f:
        json.dump(dataclasses.asdict(trial), f, indent=1)


# --- images in the registry --------------------------------------------------------------------
def record_trace(registry, ref: str, workload: str, path: str, timeout: float = 300) -> int:
    """Run ``workload`` once on the nydus image ``ref`` (registry address) under a snapshotter
    with ``[prefetch] record_trace = true`` (background prefetch off, as the recording node of
    docs/convert.md) and write what it read to ``path`` with ``nydusctl trace``; returns the
    number of files in the trace."""
    from integration.harness.containerd import Containerd
    from integration.harness.snapshotter import SnapshotterProcess
    from rafs.trace import load_trace

    cfg = {"version": 1, "remote": {"insecure_registries": [registry.host]},
           "prefetch": {"enable": False, "record_trace": True}}
    with SnapshotterProcess(config=cfg) as snap, \
            Containerd(snapshotters={"nydus": snap.address}, cri_snapshotter="nydus",
                       registries=[registry]) as ctd:
        ctd.cri.pull_image(ref)
        _, _, err, rc = _run_first_line(ctd.run_argv(ref, WORKLOADS[workload], snapshotter="nydus",
                                                       namespace="k8s.io"), timeout)
        if rc != 0:
            raise BenchError(f"trace recording of {workload} failed rc={rc}: {err[-300:]}")
        deadline = time.monotonic() + 30
        while True:  # written when the image's instance goes (ctr run --rm) or read from it live
            r = subprocess.run([sys.executable, "-m", "snapshotter.ctl", "trace", "--root", snap.root,
                                "-o", path], capture_output=True, text=True, cwd=REPO, timeout=60,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if r.returncode != 0:
            raise BenchError(f"nydusctl trace after {workload}: {r.stderr.strip()[-300:]}")
    return len(load_trace(path))


def prepare_images(registry, modes: list[Mode], work: str,
                   workloads: list[str] | None = None) -> dict[tuple[str, str], str]:
    """Push the OCI image and make the other tags the modes need (per-workload modes: for each
    start-up workload of ``workloads``, default all); returns (mode name, workload) -> repo:tag
    for every pair that has an image."""
    workloads = list(WORKLOADS) if workloads is None else workloads
    from rafs.convert.cli import main as nydusify

    img = build_image(CACHE)
    print(f"image: {len(img.layers)} layers, {sum(la.size for la in img.layers) / 1e6:.1f} MB gzip",
          flush=True)
    oci = img.push(registry, "bench/debian", "oci")
    tags = {"oci"}
    traced = [w for w in workloads if w in STARTUP_WORKLOADS] if any(m.per_workload for m in modes) else []

    def convert(tag: str, options: list[str]) -> None:
        """``nydusify convert`` of the OCI image to ``bench/debian:<tag>`` with ``options``."""
        what = " ".join(options) or "(defaults)"
        t = time.monotonic()
        if nydusify(["convert", "--source", oci.ref, "--target", f"{registry.host}/bench/debian:{tag}",
                     "--source-insecure", "--target-insecure", "--work-dir", os.path.join(work, tag),
                     "--no-progress", *options]) != 0:
            raise BenchError(f"nydusify convert {what} failed")
        print(f"nydusify convert {what}: {time.monotonic() - t:.1f} s", flush=True)
        tags.add(tag)

    if any(m.tag == "nydus" for m in modes) or any(m.per_workload and m.kind == "nydus" for m in modes):
        convert("nydus", [])
    for tag in sorted({m.tag for m in modes if m.tag.startswith("chunk-")}):
        # "chunk-<N>k": the converter's defaults but --chunk-size N KiB
        convert(tag, ["--chunk-size", hex(int(tag[6:-1]) << 10)])
    for tag in sorted({m.tag for m in modes if m.tag.startswith("zran")}):
        # "zran": the converter's default spacing; "zran-<N>m": --zran-spacing N MiB
        convert(tag, ["--oci-ref", *(["--zran-spacing", str(int(tag[5:-1]) << 20)] if tag != "zran" else [])])
    if any(m.tag == "estargz" for m in modes):
        from integration.harness.stargz import convert_to_estargz

        t = time.monotonic()
        convert_to_estargz(oci.ref, f"{registry.host}/bench/debian:estargz")
        print(f"ctr-remote image convert --estargz: {time.monotonic() - t:.1f} s", flush=True)
        tags.add("estargz")
    nydus_trace_tags = {m.tag for m in modes if m.per_workload and m.kind == "nydus"}
    for wl in traced if nydus_trace_tags else []:
        trace = os.path.join(work, f"{wl}.trace")
        t = time.monotonic()
        n = record_trace(registry, f"{registry.host}/bench/debian:nydus", wl, trace)
        print(f"{wl}: trace recorded, {n} files ({time.monotonic() - t:.1f} s)", flush=True)
        # the two rebuilds: from the nydus image (start-up chunks moved into one new blob), or a
        # conversion of the OCI image again (traced files first in every layer's blob)
        for tag, source, how in (("trace-optimize", f"{registry.host}/bench/debian:nydus",
                                  ["optimize", "--prefetch-files", trace]),
                                 ("trace-convert", oci.ref, ["convert", "--prefetch-trace", trace])):
            if tag not in nydus_trace_tags:
                continue
            t = time.monotonic()
            if nydusify([how[0], "--source", source, "--target", f"{registry.host}/bench/debian:{tag}-{wl}",
                         "--source-insecure", "--target-insecure", "--no-progress",
                         "--work-dir", os.path.join(work, f"{tag}-{wl}"), *how[1:]]) != 0:
                raise BenchError(f"nydusify {' '.join(how[:2])} ({wl}) failed")
            print(f"{wl}: nydusify {' '.join(how[:2])}: {time.monotonic() - t:.1f} s", flush=True)
            tags.add(f"{tag}-{wl}")
    if any(m.tag == "estargz-opt" for m in modes):
        from integration.harness.stargz import convert_to_estargz

        for wl in traced:
            t = time.monotonic()
            convert_to_estargz(oci.ref, f"{registry.host}/bench/debian:estargz-opt-{wl}", optimize=True,
                               workload_argv=WORKLOADS[wl])
            print(f"{wl}: ctr-remote image optimize: {time.monotonic() - t:.1f} s", flush=True)
            tags.add(f"estargz-opt-{wl}")
    out = {}
    for m in modes:
        for wl in workloads:
            tag = f"{m.tag}-{wl}" if m.per_workload else m.tag
            if tag in tags:
                out[(m.name, wl)] = f"bench/debian:{tag}"
    return out


def stargz_available() -> str:
    """"" when the stargz peer can run here, else why not."""
    from integration.harness import stargz

    try:
        stargz.build_stargz_snapshotter()
    except Exception as exc:  # noqa: BLE001 - HarnessError with the reason
        return f"stargz-snapshotter cannot be built: {exc}"
    return ""


# --- summary, output ---------------------------------------------------------------------------
def read_medians(trials: list[Trial], field: str = "read_bytes") -> dict[str, int]:
    """Workload -> median of the bytes it read, or of ``field`` (the OCI trials that measured it)."""
    out = {}
    for wl in WORKLOADS:
        reads = [getattr(t, field) for t in trials if t.workload == wl and getattr(t, field) >= 0]
        if reads:
            out[wl] = int(statistics.median(reads))
    return out


def summarize(trials: list[Trial], modes: list[str], read_trials: list[Trial] | None = None) -> dict:
    """Medians per (rate, workload, mode); the bytes each workload read come from ``read_trials``
    (default: ``trials`` themselves)."""
    summary: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    measured = trials if read_trials is None else read_trials
    read_by_wl = read_medians(measured)
    zstd_by_wl = read_medians(measured, "read_zstd_bytes")
    for rate in sorted({t.rate_mb_s for t in trials}):
        for wl in WORKLOADS:
            ok = lambda m: [t for t in trials if t.rate_mb_s == rate and t.workload == wl  # noqa: E731
                            and t.mode == m and not t.error]
            base = ok("oci")
            base_s = statistics.median(t.seconds for t in base) if base else 0.0
            for m in modes:
                sel = ok(m)
                if not sel:
                    continue
                secs = statistics.median(t.seconds for t in sel)
                link_b = statistics.median(t.link_bytes_first_output for t in sel)
                events = {k for t in sel for k in t.timeline}
                read = read_by_wl.get(wl, 0)
                summary.setdefault(f"{rate:g}", {}).setdefault(wl, {})[m] = {
                    "seconds": round(secs, 3), "trials": len(sel),
                    "all_seconds": [round(t.seconds, 3) for t in sel],
                    "pull_seconds": round(statistics.median(t.pull_seconds for t in sel), 3),
                    "registry_bytes": int(statistics.median(t.registry_bytes for t in sel)),
                    "blob_gets": int(statistics.median(t.blob_gets for t in sel)),
                    "link_bytes_first_output": int(link_b),
                    "read_bytes": read,
                    "fetched_over_read": round(link_b / read, 2) if read else None,
                    # ... and over the read set's compressed chunks (what any chunked lazy pull moves)
                    "fetched_over_read_zstd": round(link_b / zstd_by_wl[wl], 2) if zstd_by_wl.get(wl) else None,
                    # what the link alone needs for those bytes, and where it sat idle
                    "link_seconds": round(link_b / (rate * 1e6), 3),
                    "link_idle": {k: round(statistics.median(t.link_idle.get(k, 0.0) for t in sel), 3)
                                  for k in ("pull", "to_first_get", "reads")
                                  if any(k in t.link_idle for t in sel)},
                    "speedup_vs_oci": round(base_s / secs, 2) if base_s and secs else None,
                    "timeline": dict(sorted(
                        ((k, round(statistics.median(t.timeline[k] for t in sel if k in t.timeline), 3))
                         for k in events), key=lambda kv: kv[1])),
                }
    return {"summary": summary, "read_bytes": read_by_wl, "read_zstd_bytes": zstd_by_wl}


def print_tables(result: dict, modes: list[str]) -> None:
    mb = lambda b: f"{b / 1e6:.1f}"  # noqa: E731
    for rate, per_wl in result["summary"].items():
        print(f"\n== {rate} MB/s link: time to first output (median), speed-up vs OCI, "
              f"MB through the link before first output / MB the workload read")
        print(f"{'workload':13s} " + " ".join(f"{m:>24s}" for m in modes))
        for wl, per in per_wl.items():
            cells = []
            for m in modes:
                v = per.get(m)
                if v is None:
                    cells.append(f"{'-':>24s}")
                    continue
                sp = f"{v['speedup_vs_oci']}x" if v["speedup_vs_oci"] and m != "oci" else ""
                ratio = f"/{v['fetched_over_read']}" if v["fetched_over_read"] is not None else ""
                cells.append(f"{v['seconds']:6.2f}s {sp:>6s} {mb(v['link_bytes_first_output']):>6s}{ratio:>5s}")
            print(f"{wl:13s} " + " ".join(f"{c:>24s}" for c in cells))
        print(f"-- critical path (seconds after pull start, medians):")
        for wl, per in per_wl.items():
            for m in modes:
                v = per.get(m)
                if v and m != "oci":
                    print(f"  {wl:13s} {m:17s} " + "  ".join(f"{k} {s:.2f}" for k, s in v["timeline"].items()))
        print("-- the link (medians): seconds its bytes need at the rate; seconds it sat idle "
              "during the pull / to the first blob GET / after it:")
        for wl, per in per_wl.items():
            for m in modes:
                v = per.get(m)
                if v and v.get("link_idle"):
                    idle = v["link_idle"]
                    print(f"  {wl:13s} {m:17s} first output {v['seconds']:.2f}  link {v['link_seconds']:.2f}  "
                          f"idle {idle.get('pull', 0):.2f} / {idle.get('to_first_get', 0):.2f} / "
                          f"{idle.get('reads', 0):.2f}")
    print("\n" + markdown_table(result, modes))
    print("\nfetched before first output / read:\n" + markdown_fetched_table(result, modes))
    print("\nbytes the workload read (page cache residency in OCI runs): "
          + ", ".join(f"{wl} {mb(b)} MB" for wl, b in result["read_bytes"].items()))
    if result.get("read_zstd_bytes"):
        print("... the 1 MiB chunks holding them, zstd as built (the least a chunked lazy pull moves): "
              + ", ".join(f"{wl} {mb(b)} MB" for wl, b in result["read_zstd_bytes"].items()))


def markdown_table(result: dict, modes: list[str]) -> str:
    """The summary as the Markdown table of the README (time to first output, speed-up vs OCI,
    MB through the link before the first output; OCI: MB the workload read)."""
    lines = ["| workload | link | " + " | ".join(modes) + " |", "|---" * (len(modes) + 2) + "|"]
    for rate, per_wl in result["summary"].items():
        for wl, per in per_wl.items():
            cells = []
            for m in modes:
                v = per.get(m)
                if v is None:
                    cells.append("–")
                elif m == "oci":
                    read = f", read {v['read_bytes'] / 1e6:.1f} MB" if v["read_bytes"] else ""
                    cells.append(f"{v['seconds']:.2f} s, {v['link_bytes_first_output'] / 1e6:.0f} MB{read}")
                else:
                    cells.append(f"{v['seconds']:.2f} s ({v['speedup_vs_oci']}×), "
                                 f"{v['link_bytes_first_output'] / 1e6:.1f} MB")
            lines.append(f"| {wl} | {rate} MB/s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_fetched_table(result: dict, modes: list[str]) -> str:
    """Bytes through the link before the first output ÷ bytes the workload read, per cell."""
    lines = ["| workload | read | link | " + " | ".join(modes) + " |", "|---" * (len(modes) + 3) + "|"]
    for rate, per_wl in result["summary"].items():
        for wl, per in per_wl.items():
            read = result["read_bytes"].get(wl, 0)
            cells = [f"{per[m]['fetched_over_read']}×" if m in per and per[m]["fetched_over_read"] is not None
                     else "–" for m in modes]
            lines.append(f"| {wl} | {read / 1e6:.1f} MB | {rate} MB/s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, modes: list[str], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rates = list(result["summary"])
    width_in = max(11, 1.1 * max(len(per_wl) for per_wl in result["summary"].values()))
    fig, axes = plt.subplots(len(rates), 1, figsize=(width_in, 3.9 * len(rates)), squeeze=False)
    for ax, rate in zip(axes[:, 0], rates):
        per_wl = result["summary"][rate]
        wls = list(per_wl)
        width = 0.8 / max(1, len(modes))
        for i, m in enumerate(modes):
            vals = [per_wl[wl].get(m, {}).get("seconds", 0.0) for wl in wls]
            bars = ax.bar([x + (i - (len(modes) - 1) / 2) * width for x in range(len(wls))], vals, width,
                          label=m)
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set_xticks(range(len(wls)), wls, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("s to first output (log scale)")
        ax.set_title(f"{rate} MB/s registry link")
        ax.set_ylim(top=ax.get_ylim()[1] * 3)
        ax.legend(fontsize=8, ncol=len(modes), loc="upper center")
    fig.suptitle("Cold start of a Debian image (python3, numpy, gcc, git, perl)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def combine(paths: list[str], out_dir: pathlib.Path, name: str, read_from: str = "") -> int:
    """One summary over the trials of several runs (each keeps its own OCI baseline per rate);
    ``read_from``: take the bytes each workload read from that run's trials instead."""
    docs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    trials = [Trial(**t) for d in docs for t in d["trials"]]
    modes: dict[str, str] = {}
    for d in docs:
        modes.update(d["modes"])
    read = None
    if read_from:
        read = [Trial(**t) for t in json.loads(pathlib.Path(read_from).read_text())["trials"]]
    result = summarize(trials, list(modes), read)
    doc = {**docs[0], "rates_mb_s": sorted({r for d in docs for r in d["rates_mb_s"]}),
           "combined_from": [os.path.basename(p) for p in paths],
           "read_bytes_from": os.path.basename(read_from) if read_from else "the runs' own OCI trials",
           "complete": all(d.get("complete") for d in docs), "modes": modes,
           "runs": [{k: d.get(k) for k in ("rates_mb_s", "settle_seconds", "started", "minutes", "load_average",
                                           "complete")}
                    for d in docs], **result, "trials": [dataclasses.asdict(t) for t in trials]}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{name}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.rename(tmp, out_dir / f"{name}.json")
    print_tables(result, list(modes))
    plot(result, list(modes), out_dir / f"{name}.png")
    print(f"wrote {out_dir / (name + '.json')} and {out_dir / (name + '.png')}")
    return 0


def expand_workloads(arg: str) -> list[str]:
    """``--workloads``: names and group names (``WORKLOAD_GROUPS``), each workload once, in order."""
    out: list[str] = []
    for w in (x for x in arg.split(",") if x):
        out.extend(x for x in WORKLOAD_GROUPS.get(w, (w,)) if x not in out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m integration.bench_coldstart_real",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="20,100", help="link rates, MB/s (10^6 bytes), comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="trials per (rate, workload, mode)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"comma-separated, from {', '.join(MODES_BY_NAME)}")
    ap.add_argument("--workloads", default="benchmarked",
                    help="comma-separated names or groups: benchmarked (default: "
                         f"{', '.join(BENCHMARKED)}), held-out ({', '.join(HELD_OUT)}), all")
    ap.add_argument("--quick", action="store_true",
                    help="one rate (the first), one workload (python-json), one trial")
    ap.add_argument("--no-read-measure", action="store_true",
                    help="skip the page-cache measurement of the bytes each workload read")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="", help="output file stem (default coldstart_real, "
                                                "coldstart_real_quick with --quick)")
    ap.add_argument("--keep-logs", default="", help="copy each trial's logs under this directory")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds between starting the snapshotter/containerd and the pull (default 0: "
                         "the daemon the snapshotter pre-starts may still be starting when the pull begins)")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="no trials: merge the trials of earlier runs' JSON files (e.g. one run per "
                         "rate) into one summary, JSON and chart (--name)")
    ap.add_argument("--read-from", default="", metavar="JSON",
                    help="with --combine: the bytes each workload read come from this run")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, pathlib.Path(args.out), args.name or "coldstart_real", args.read_from)
    if os.geteuid() != 0:
        raise SystemExit("needs root (containerd, mounts)")
    rates = [float(r) for r in args.rates.split(",") if r]
    workloads = expand_workloads(args.workloads)
    repeat = args.repeat
    if args.quick:
        rates, workloads, repeat = rates[:1], ["python-json"] if args.workloads == "benchmarked" \
            else workloads[:1], 1
    unknown = [w for w in workloads if w not in WORKLOADS] + \
        [m for m in args.modes.split(",") if m and m not in MODES_BY_NAME]
    if unknown:
        raise SystemExit(f"unknown workload/mode: {', '.join(unknown)}")
    modes = [MODES_BY_NAME[m] for m in args.modes.split(",") if m]
    if any(m.kind == "stargz" for m in modes):
        why = stargz_available()
        if why:
            print(f"mode stargz: NOT AVAILABLE — {why}", flush=True)
            modes = [m for m in modes if m.kind != "stargz"]
    mode_names = [m.name for m in modes]
    from integration.harness.registry import Registry

    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or ("coldstart_real_quick" if args.quick else "coldstart_real")
    trials: list[Trial] = []
    started = time.time()

    def write(final: bool) -> dict:
        """The JSON (rewritten after every trial, so an interrupted run keeps what it measured)."""
        result = summarize(trials, mode_names)
        doc = {"image": {"suite": SUITE, "packages": list(PACKAGES),
                         "layers": ["base"] + [n for n, _ in LAYER_SPLIT]},
               "rates_mb_s": rates, "repeat": repeat, "settle_seconds": args.settle, "complete": final,
               "modes": {m.name: m.label for m in modes}, "workloads": {w: WORKLOADS[w] for w in workloads},
               "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
               "minutes": round((time.time() - started) / 60, 1), "load_average": os.getloadavg(), **result,
               "trials": [dataclasses.asdict(t) for t in trials]}
        tmp = out_dir / f"{name}.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.rename(tmp, out_dir / f"{name}.json")
        return result

    with Registry() as registry, tempfile.TemporaryDirectory(prefix="bench-real-") as work:
        repos = prepare_images(registry, modes, work, workloads)
        # repeats outermost: an interrupted run still has every (rate, workload, mode) cell
        links = {rate: Link(registry.port, rate * 1e6) for rate in rates}
        try:
            for r in range(repeat):
                for rate, link in links.items():
                    refs = {key: f"{link.host}/{repo}" for key, repo in repos.items()}
                    for wl in workloads:
                        for mode in modes:
                            if (mode.name, wl) not in refs:
                                continue
                            t = run_trial(mode, wl, rate, r, refs[mode.name, wl], registry, link,
                                          measure=not args.no_read_measure and r == 0 and rate == rates[0],
                                          log_dir=args.keep_logs, settle=args.settle)
                            trials.append(t)
                            write(False)
                            status = f"ERROR {t.error.strip()[-300:]}" if t.error else repr(t.output)
                            read = f" read {t.read_bytes / 1e6:.1f} MB" if t.read_bytes >= 0 else ""
                            print(f"{rate:g} MB/s {wl:12s} {mode.name:17s} #{r}: {t.seconds:7.2f} s "
                                  f"(pull {t.pull_seconds:5.2f}) link {t.link_bytes_first_output / 1e6:7.1f} MB "
                                  f"registry {t.registry_bytes / 1e6:7.1f} MB / {t.blob_gets} GETs{read}  {status}",
                                  flush=True)
        finally:
            for link in links.values():
                link.close()
    result = write(True)
    print_tables(result, mode_names)
    plot(result, mode_names, out_dir / f"{name}.png")
    print(f"wrote {out_dir / (name + '.json')} and {out_dir / (name + '.png')} "
          f"({(time.time() - started) / 60:.1f} min)")
    return 0 if all(not t.error for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
