"""Property test: random trees (names up to 255 bytes, sizes around block/chunk edges, long
symlinks, big xattrs, many entries) build into images that fsck.erofs accepts, that our loader
reads back, and — as root with EROFS — that the kernel mounts to the same tree.  Without
root: user.* xattrs only, no kernel mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rafs.builder import BuildOptions, build
from rafs.builder.loader import load_bootstrap
from storage.records import Compressor
from tests.builder_helpers import erofs_supported, expand, kernel_erofs_mount, kernel_umount, snapshot

EXAMPLES = int(os.environ.get("NYDUS_FUZZ_EXAMPLES", "200" if os.environ.get("NYDUS_SLOW") else "10"))

name_st = st.binary(min_size=1, max_size=255).filter(lambda n: b"/" not in n and b"\0" not in n
                                                    and n not in (b".", b".."))
size_st = st.one_of(st.sampled_from([0, 1, 4095, 4096, 4097, 8192, 12289]), st.integers(0, 20000))
#: trusted.* xattrs need root; without it the trees carry user.* xattrs only
_XATTR_NAMES = ["user.a", "user.bb", "user." + "n" * 200] + (["trusted.t"] if os.geteuid() == 0 else [])
xattr_st = st.dictionaries(st.sampled_from(_XATTR_NAMES),
                           st.binary(max_size=1500), max_size=3)


def leaf_st():
    return st.one_of(
        st.tuples(st.just("file"), size_st, xattr_st),
        st.tuples(st.just("link"), st.integers(1, 4095), xattr_st),
        st.tuples(st.just("fifo"), st.just(0), st.just({})),  # user.* xattrs are not allowed on fifos
    )


tree_st = st.recursive(
    leaf_st(),
    lambda children: st.tuples(st.just("dir"), st.dictionaries(name_st, children, max_size=40), xattr_st),
    max_leaves=60,
)


def _materialize(path: bytes, node, counter: list[int]) -> None:
    kind = node[0]
    counter[0] += 1
    if kind == "dir":
        os.mkdir(path)
        for name, child in node[1].items():
            _materialize(os.path.join(path, name), child, counter)
    elif kind == "file":
        with open(path, "wb") as f:
            f.write(bytes((counter[0] + i) % 251 for i in range(node[1])))
    elif kind == "link":
        os.symlink(b"t" * node[1], path)
    else:
        os.mkfifo(path)
    if kind != "link":
        for k, v in node[2].items():
            os.setxattr(path, k, v)
    os.utime(path, ns=(10**18 + counter[0], 10**18 + counter[0]), follow_symlinks=False)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(name_st, tree_st, max_size=30), st.booleans())
def test_random_trees(entries, compact):
    work = tempfile.mkdtemp(prefix="builder-fuzz-")
    mounted = None
    try:
        src = os.path.join(work, "src").encode()
        _materialize(src, ("dir", entries, {}), [0])
        boot, blob = os.path.join(work, "boot"), os.path.join(work, "blob")
        res = build(os.fsdecode(src), bootstrap_out=boot, blob_out=blob,
                    options=BuildOptions(chunk_size=0x1000, compressor=Compressor.LZ4_BLOCK, whiteout_spec="none",
                                         compact_inodes=compact))
        loaded = load_bootstrap(boot)
        assert {p for p, _ in loaded.tree.walk()} == {b"/" + os.path.relpath(os.path.join(d, n), src)
                                                     for d, ds, fs in os.walk(src) for n in ds + fs} | {b"/"}
        devices = []
        if res.blob is not None:
            data = os.path.join(work, "blob.data")
            expand(blob, data, res.blob)
            devices = [data]
        if shutil.which("fsck.erofs"):
            cmd = ["fsck.erofs"] + [f"--device={d}" for d in devices] + [boot]
            proc = subprocess.run(cmd, capture_output=True)
            assert proc.returncode == 0, proc.stderr
        if erofs_supported() and os.geteuid() == 0:  # kernel mounts need root
            mnt = os.path.join(work, "mnt")
            os.mkdir(mnt)
            kernel_erofs_mount(boot, mnt, devices)
            mounted = mnt
            assert snapshot(mnt, times=not compact) == snapshot(os.fsdecode(src), times=not compact)
    finally:
        if mounted:
            kernel_umount(mounted)
        shutil.rmtree(work, ignore_errors=True)
