#!/usr/bin/env bash
# The project's front door (see README.md).
#
#   ./run.sh demo [ARGS]   install what is missing, then run the lazy-pull demo; without ARGS it
#                          builds a Debian+python3 image (mmdebstrap, cached in .cache/);
#                          ARGS go to `python3 -m integration.demo` (see --help there)
#   ./run.sh test [ARGS]   install what is missing, then run the whole test suite (ARGS go to pytest)
#   ./run.sh setup         only install (Debian packages + a virtualenv in .venv)
#   ./run.sh bench-setup   setup plus what the benchmarks alone need: the peer stargz-snapshotter's
#                          Debian packages, then build it (integration/stargz/build.sh)
#
# Needs root on Debian 12 (apt-get, mounts, containerd). Idempotent: a second run
# installs nothing.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  containerd runc docker-registry erofs-utils fuse3 libfuse3-dev pkg-config
  skopeo umoci fio busybox-static curl iproute2 gcc python3-dev python3-venv
  golang-go golang-github-containerd-containerd-dev patch
  mmdebstrap  # the snapshotter image (integration/test_image.py) and the clean-root install test
)
DEMO_APT_PACKAGES=(mmdebstrap)
# the peer stargz-snapshotter (Go library + ctr-remote), benchmarks only; tests skip without it
BENCH_APT_PACKAGES=(mmdebstrap golang-github-containerd-stargz-snapshotter-dev stargz-snapshotter)
VENV=${NYDUS_VENV:-.venv}

log() { printf '[run.sh] %s\n' "$*" >&2; }

install_debian() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.pynydus-installed" want
  want=$(cat pyproject.toml misc/pyfuse3/* | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    local pip_log="$VENV/pip-install.log"
    log "installing Python dependencies into $VENV (log: $pip_log)"
    if ! {
      "$VENV/bin/pip" install -q --upgrade pip &&
      "$VENV/bin/pip" install -q -e '.[test,bench]'
    } >"$pip_log" 2>&1; then
      cat "$pip_log" >&2
      log "installing Python dependencies failed (above)"
      exit 1
    fi
    # pyfuse3 rebuilt with a 3-line patch so FUSE no_open works (misc/pyfuse3/install.sh); stock
    # pyfuse3 works too (an open/release round trip per file), so a failed build only warns and
    # is retried on the next run
    if misc/pyfuse3/install.sh "$VENV/bin/python" >>"$pip_log" 2>&1; then
      echo "$want" > "$stamp"
    else
      tail -n 20 "$pip_log" >&2
      log "WARNING: building the patched pyfuse3 failed (above); FUSE no_open stays off"
    fi
  fi
}

setup() {
  if [ "$(id -u)" != 0 ]; then
    log "not root: skipping Debian packages (tests needing root will skip)"
  else
    install_debian "$@"
  fi
  install_python
  # bytecode for the checkout's own packages, as an installed wheel has: each process the
  # snapshotter starts (nydusd, fd keepers) would otherwise compile ~50 modules (~0.12 s of CPU)
  # whenever PYTHONDONTWRITEBYTECODE keeps Python from caching them itself; up-to-date files
  # are skipped
  "$VENV/bin/python" -m compileall -q -j0 rafs storage snapshotter protos integration >/dev/null ||
    log "WARNING: byte-compiling the packages failed; each process compiles them at start instead"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  bench-setup)
    setup "${BENCH_APT_PACKAGES[@]}"
    integration/stargz/build.sh >/dev/null ;;
  demo)
    setup "${DEMO_APT_PACKAGES[@]}"
    if (($# == 0)); then
      mkdir -p .cache
      set -- --debian --debian-cache .cache/demo-debian-rootfs.tar
    fi
    exec "$VENV/bin/python" -m integration.demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest -q -rs "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
