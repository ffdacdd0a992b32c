"""Helpers for the tests of ``misc/install.sh`` (integration/test_install.py,
integration/test_install_chroot.py): the wheels it installs from, running it, and listing a tree
to compare before and after.

The ``wheels`` fixture (integration/conftest.py, session scope) calls :func:`build_wheels` once
per test run, however many modules use it."""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess
import sys
from typing import Iterable

REPO = pathlib.Path(__file__).resolve().parent.parent
INSTALL = REPO / "misc" / "install.sh"
CLIS = ["nydus-snapshotter", "containerd-nydus-grpc", "nydusd", "nydus-image", "nydusify", "nydusctl"]


def build_wheels(out: pathlib.Path) -> pathlib.Path:
    """The wheels ``misc/install.sh install`` needs, in ``out``. Dependency wheels and the patched
    pyfuse3 wheel are reused from dist/ when present (the pynydus wheel is always rebuilt from
    this checkout); without them this runs ``misc/install.sh build`` (gcc, libfuse3-dev and the
    package index; about 10 minutes)."""
    dist = REPO / "dist"
    if list(dist.glob("pyfuse3-*+pynydus*.whl")) and list(dist.glob("grpcio-*.whl")):
        for w in dist.glob("*.whl"):
            if not w.name.startswith("pynydus-"):
                shutil.copy(w, out)
        r = subprocess.run([sys.executable, "-m", "build", "-q", "--wheel", "--outdir", str(out), str(REPO)],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        shutil.rmtree(REPO / "build", ignore_errors=True)
    else:
        r = subprocess.run([str(INSTALL), "build", "--dist", str(out)], capture_output=True, text=True, timeout=3000)
        assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(out.glob("pynydus-*.whl"))) == 1
    return out


def install(root: pathlib.Path, wheels: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """``misc/install.sh ARGS --root ROOT --dist WHEELS`` from this host; asserts success."""
    r = subprocess.run([str(INSTALL), *args, "--root", str(root), "--dist", str(wheels)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def tree(root: pathlib.Path, skip: Iterable[str] = (), detail: bool = False) -> list[str]:
    """Every path below ``root``, relative and sorted (symlinks are not followed), without
    descending into the directories named (relative) in ``skip``, e.g. mount points. ``detail``
    adds each entry's mode and owner, and size and mtime for all but directories (whose mtime
    changes with their entries): "path mode uid:gid [size mtime_ns]"."""
    skip = {os.path.normpath(p) for p in skip}
    out = []
    for d, dirs, names in os.walk(root):
        rel = os.path.relpath(d, root)
        for n in dirs + names:
            p = os.path.normpath(os.path.join(rel, n))
            if detail:
                st = os.lstat(os.path.join(d, n))
                p += f" {st.st_mode:o} {st.st_uid}:{st.st_gid}"
                if not stat.S_ISDIR(st.st_mode):
                    p += f" {st.st_size} {st.st_mtime_ns}"
            out.append(p)
        dirs[:] = [n for n in dirs if os.path.normpath(os.path.join(rel, n)) not in skip]
    return sorted(out)
