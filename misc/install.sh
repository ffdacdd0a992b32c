#!/usr/bin/env bash
# Host install of pynydus into a self-contained virtualenv (see docs/operators.md).
#
#   misc/install.sh build     [--dist DIR] [--python PY]
#   misc/install.sh install   [--prefix DIR] [--root DIR] [--dist DIR] [--python PY]
#   misc/install.sh uninstall [--prefix DIR] [--root DIR] [--purge]
#
# build      wheels of this project (python -m build), of pyfuse3 rebuilt with
#            misc/pyfuse3/read-ino.patch, and of every dependency into --dist (default dist/);
#            needs gcc, pkg-config, libfuse3-dev, patch, python3-dev, python3-venv and the package
#            index once (the packages are checked first).
#            Copy that directory to the nodes: install needs neither a compiler nor the network.
# install    needs python3 (>= 3.11), python3-venv and fuse3 (libfuse3) on the node and checks them
#            first. (Runs build first when --dist holds no pynydus wheel.) Creates or upgrades the
#            virtualenv --prefix (default /opt/pynydus) from the wheels in --dist only; links
#            nydus-snapshotter, containerd-nydus-grpc, nydusd, nydus-image, nydusify and nydusctl into /usr/local/bin;
#            installs /etc/systemd/system/nydus-snapshotter.service, /etc/logrotate.d/nydus-snapshotter
#            and, if absent, /etc/nydus/config.toml (from config.toml.example). Every path it creates
#            outside the prefix is recorded in <prefix>/share/pynydus/installed-files.
# uninstall  stops and disables the unit, removes exactly the recorded files and the prefix. Keeps
#            /etc/nydus/config.toml and the snapshotter's state directory unless --purge (which
#            refuses while anything is mounted under the state directory).
#
# --root DIR installs under DIR instead of / (the prefix and every path above inside DIR; systemctl
# is not called). --python: the interpreter of the virtualenv (default /usr/bin/python3, >= 3.11).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(dirname "$HERE")
CLIS=(nydus-snapshotter containerd-nydus-grpc nydusd nydus-image nydusify nydusctl)
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24

log() { printf '[install.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cmd=${1:-}
shift || true
PREFIX=/opt/pynydus ROOT="" DIST="$SRC/dist" PY=/usr/bin/python3 PURGE=0
while (($#)); do
  case "$1" in
    --prefix) PREFIX=${2:?}; shift 2 ;;
    --root) ROOT=$(realpath -m "${2:?}"); shift 2 ;;
    --dist) DIST=$(realpath -m "${2:?}"); shift 2 ;;
    --python) PY=${2:?}; shift 2 ;;
    --purge) PURGE=1; shift ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
done
[[ $PREFIX == /* ]] || die "--prefix must be absolute"
P="$ROOT$PREFIX"
MANIFEST="$P/share/pynydus/installed-files"

# what build needs besides the package index; all that is missing is named in one message
check_build() {
  local missing=() t
  for t in gcc pkg-config patch; do command -v "$t" >/dev/null || missing+=("$t (Debian package $t)"); done
  [[ -e /usr/include/fuse3/fuse_lowlevel.h ]] || missing+=("the libfuse3 headers (Debian package libfuse3-dev)")
  [[ -x $PY ]] && "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=("Python.h for $PY (Debian package python3-dev)")
  [[ -x $PY ]] && "$PY" -c 'import venv, ensurepip' 2>/dev/null \
    || missing+=("the venv module with ensurepip for $PY (Debian package python3-venv)")
  ((${#missing[@]} == 0)) || die "build needs: $(printf '%s; ' "${missing[@]}")install them and run again"
}

build() {
  check_build
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  mkdir -p "$DIST"
  "$PY" -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install -q build wheel
  log "building the pynydus wheel"
  "$tmp/venv/bin/python" -m build -q --wheel --outdir "$DIST" "$SRC" >&2
  log "building pyfuse3 $PYFUSE3_VERSION with misc/pyfuse3/read-ino.patch"
  "$tmp/venv/bin/pip" download -q --no-deps --no-binary :all: "pyfuse3==$PYFUSE3_VERSION" -d "$tmp"
  echo "$PYFUSE3_SHA256  $tmp/pyfuse3-$PYFUSE3_VERSION.tar.gz" | sha256sum -c --quiet -
  tar -C "$tmp" -xzf "$tmp/pyfuse3-$PYFUSE3_VERSION.tar.gz"
  patch -s -d "$tmp/pyfuse3-$PYFUSE3_VERSION" -p1 < "$HERE/pyfuse3/read-ino.patch"
  rm -f "$DIST"/pyfuse3-*.whl
  SETUPTOOLS_SCM_PRETEND_VERSION="$PYFUSE3_VERSION+pynydus.1" \
    "$tmp/venv/bin/pip" wheel -q --no-deps -w "$DIST" "$tmp/pyfuse3-$PYFUSE3_VERSION"
  log "collecting dependency wheels"
  "$tmp/venv/bin/pip" wheel -q -w "$DIST" --find-links "$DIST" "$DIST"/pynydus-*.whl "$DIST"/pyfuse3-*.whl
  log "wheels in $DIST"
}

RECORDED=()
record() { RECORDED+=("$1"); }

# mkdir -p DIR (inside $ROOT), recording each directory it creates outside the prefix ("path/")
mkd() {
  local d=$1 missing=()
  while [[ ! -d $d && $d != "$ROOT" ]]; do missing+=("$d"); d=$(dirname "$d"); done
  mkdir -p "$1"
  for d in "${missing[@]}"; do [[ $d == "$P" || $d == "$P"/* ]] || record "${d#"$ROOT"}/"; done
}

# install FILE at DEST (a path inside $ROOT) with @PREFIX@/@ROOT@ replaced; DEST is recorded
put() {
  local src=$1 dest=$2 mode=$3 state_root=${4:-}
  mkd "$(dirname "$dest")"
  sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@ROOT@|$state_root|g" "$src" > "$dest.tmp.$$"
  chmod "$mode" "$dest.tmp.$$"
  mv -f "$dest.tmp.$$" "$dest"
  record "${dest#"$ROOT"}"
}

# what install needs on the node besides the wheels (Debian 12 minbase lacks the last two):
# python3 >= 3.11, its venv module (ensurepip: python3-venv) and libfuse3 (pyfuse3 links it).
# All that is missing is named in one message, before anything is written.
check_node() {
  local missing=()
  if [[ ! -x $PY ]]; then
    missing+=("$PY (Debian package python3)")
  elif ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    missing+=("Python >= 3.11 as $PY (found $("$PY" -V 2>&1))")
  else
    "$PY" -c 'import venv, ensurepip' 2>/dev/null \
      || missing+=("the venv module with ensurepip for $PY (Debian package python3-venv)")
    "$PY" -c 'import ctypes; ctypes.CDLL("libfuse3.so.3")' 2>/dev/null \
      || missing+=("libfuse3.so.3 (Debian package fuse3 or libfuse3-3)")
  fi
  if ((${#missing[@]})); then
    die "missing on this node${ROOT:+ (for --root: on this host)}: $(printf '%s; ' "${missing[@]}")install them and run again"
  fi
  [[ -x $ROOT/sbin/modprobe || -x $ROOT/usr/sbin/modprobe ]] \
    || log "note: no modprobe (Debian package kmod): the unit's ExecStartPre cannot load the fuse module"
}

install() {
  check_node
  compgen -G "$DIST/pynydus-*.whl" >/dev/null || build
  local t
  for t in "${CLIS[@]}"; do  # never clobber what another install put there
    local l="$ROOT/usr/local/bin/$t"
    if [[ -e $l || -L $l ]] && [[ $(readlink "$l") != "$PREFIX/bin/$t" ]]; then
      die "$l exists and is not our link to $PREFIX/bin/$t; remove it first"
    fi
  done
  if [[ -x $P/bin/python ]]; then
    log "upgrading $P"
  else
    log "creating virtualenv $P"
    mkd "$(dirname "$P")"
    "$PY" -m venv "$P"
  fi
  "$P/bin/pip" install -q --no-index --find-links "$DIST" --upgrade pynydus pyfuse3 >&2
  "$P/bin/python" -c 'import pyfuse3; assert pyfuse3.READ_INO_WITHOUT_FH' \
    || die "pyfuse3 in $P lacks the read-ino patch (rebuild: $0 build)"
  mkdir -p "$P/share/doc/pynydus" "$(dirname "$MANIFEST")"
  cp "$SRC/docs/operators.md" "$SRC/config.toml.example" "$P/share/doc/pynydus/"
  mkd "$ROOT/usr/local/bin"
  for t in "${CLIS[@]}"; do
    ln -sfn "$PREFIX/bin/$t" "$ROOT/usr/local/bin/$t"
    record "/usr/local/bin/$t"
  done
  if [[ ! -e $ROOT/etc/nydus/config.toml ]]; then
    mkd "$ROOT/etc/nydus"
    cp "$SRC/config.toml.example" "$ROOT/etc/nydus/config.toml"
    chmod 0644 "$ROOT/etc/nydus/config.toml"
    log "installed /etc/nydus/config.toml (from config.toml.example)"
  fi
  local state
  state=$("$P/bin/python" -c 'import sys; from snapshotter import config; print(config.load(sys.argv[1]).root)' \
    "$ROOT/etc/nydus/config.toml") || die "/etc/nydus/config.toml is invalid (above)"
  put "$HERE/nydus-snapshotter.service" "$ROOT/etc/systemd/system/nydus-snapshotter.service" 0644
  put "$HERE/nydus-snapshotter.logrotate" "$ROOT/etc/logrotate.d/nydus-snapshotter" 0644 "$state"
  # an upgrade keeps what the first install recorded (e.g. directories it created)
  { [[ -f $MANIFEST ]] && cat "$MANIFEST"; printf '%s\n' "${RECORDED[@]}"; } | sort -u > "$MANIFEST.tmp"
  mv -f "$MANIFEST.tmp" "$MANIFEST"
  if [[ -z $ROOT ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
  fi
  log "installed pynydus $("$P/bin/python" -c 'import importlib.metadata as m; print(m.version("pynydus"))') in $PREFIX"
  log "next: configure containerd (docs/operators.md), then: systemctl enable --now nydus-snapshotter"
}

uninstall() {
  [[ -f $MANIFEST ]] || die "nothing installed in $P (no $MANIFEST)"
  local state=""
  if [[ -f $ROOT/etc/nydus/config.toml ]]; then
    state=$("$P/bin/python" -c 'import sys; from snapshotter import config; print(config.load(sys.argv[1]).root)' \
      "$ROOT/etc/nydus/config.toml" 2>/dev/null || true)
  fi
  if ((PURGE)) && [[ -n $state ]]; then command -v awk >/dev/null || die "--purge needs awk (Debian package mawk)"; fi
  if ((PURGE)) && [[ -n $state ]] && awk -v d="$ROOT$state" '$2 == d || index($2, d "/") == 1 {f=1} END {exit !f}' /proc/self/mounts; then
    die "--purge: filesystems are still mounted under $ROOT$state (stop the containers using them first)"
  fi
  if [[ -z $ROOT ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl disable --now nydus-snapshotter.service 2>/dev/null || true
  fi
  local f
  while IFS= read -r f; do
    [[ -n $f && $f != */ ]] || continue
    if [[ $f == /usr/local/bin/* ]] && [[ $(readlink "$ROOT$f" 2>/dev/null) != "$PREFIX/bin/${f##*/}" ]]; then
      log "leaving $f (no longer our link)"
      continue
    fi
    rm -f "$ROOT$f"
  done < "$MANIFEST"
  local dirs
  dirs=$(grep '/$' "$MANIFEST" | sort -r || true)  # deepest first
  rm -rf "$P"
  ((PURGE)) && rm -f "$ROOT/etc/nydus/config.toml" && { rmdir "$ROOT/etc/nydus" 2>/dev/null || true; }
  for f in $dirs; do rmdir "$ROOT$f" 2>/dev/null || true; done  # only if empty
  if [[ -z $ROOT ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
  fi
  if ((PURGE)); then
    if [[ -n $state && $state != / ]]; then rm -rf -- "$ROOT$state"; fi
    log "purged /etc/nydus/config.toml${state:+ and $state}"
  fi
  log "uninstalled pynydus from $PREFIX"
}

case "$cmd" in
  build) build ;;
  install) install ;;
  uninstall) uninstall ;;
  *) die "usage: $0 build|install|uninstall [options] (see the header of $0)" ;;
esac
