#!/usr/bin/env bash
# Build pyfuse3 from its sdist with read-ino.patch and install it into the given Python.
#
#   misc/pyfuse3/install.sh [PYTHON]     (default: python3; run.sh passes the venv's python)
#
# The patch is three lines: when a file has no handle (the filesystem answered open() with
# ENOSYS, so the kernel stops sending open/release: FUSE "no_open"), the kernel sends fh 0 in READ
# and stock pyfuse3 drops the inode, leaving read() unable to tell files apart; patched, read()
# gets the inode as fh, and `pyfuse3.READ_INO_WITHOUT_FH` says so. rafs.fs uses no_open only
# when that flag is there: stock pyfuse3 keeps working (with an open + release round trip per
# file). Idempotent: does nothing when the patched build is already installed.
set -euo pipefail
PY=${1:-python3}
VERSION=3.5.0
SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
HERE=$(cd "$(dirname "$0")" && pwd)

if "$PY" -c 'import sys, pyfuse3; sys.exit(0 if getattr(pyfuse3, "READ_INO_WITHOUT_FH", False) else 1)' 2>/dev/null; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[pyfuse3] building pyfuse3 $VERSION with misc/pyfuse3/read-ino.patch" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: "pyfuse3==$VERSION" -d "$tmp"
echo "$SHA256  $tmp/pyfuse3-$VERSION.tar.gz" | sha256sum -c --quiet -
tar -C "$tmp" -xzf "$tmp/pyfuse3-$VERSION.tar.gz"
patch -s -d "$tmp/pyfuse3-$VERSION" -p1 < "$HERE/read-ino.patch"
SETUPTOOLS_SCM_PRETEND_VERSION="$VERSION+pynydus.1" \
  "$PY" -m pip install -q --no-deps --force-reinstall "$tmp/pyfuse3-$VERSION"
"$PY" -c 'import pyfuse3; assert pyfuse3.READ_INO_WITHOUT_FH; print("[pyfuse3] installed", pyfuse3.__version__)' >&2
