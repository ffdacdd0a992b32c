#!/bin/bash
# Build the peer stargz-snapshotter (main.go here, over Debian's Go source packages of
# stargz-snapshotter 0.12 and containerd 1.6) in GOPATH mode, offline.
#
#   integration/stargz/build.sh [--install] [OUT_DIR]   # default OUT_DIR: .cache/stargz
#
# Prints the path of the binary on its last line. Idempotent: rebuilds only when main.go,
# this script, the Go toolchain or the library package changed (stamp file next to the binary).
# --install: apt-get install the Debian packages it needs when missing (root); without it a
# missing package is an error (`./run.sh bench-setup` installs them and builds).
# Exit status: 0 built (or up to date), 1 build failed, 2 missing packages or tools.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
INSTALL=0
[ "${1:-}" = --install ] && { INSTALL=1; shift; }
OUT=${1:-$REPO/.cache/stargz}
BIN=$OUT/stargz-snapshotter
GOCODE=/usr/share/gocode
STARGZ_SRC=$GOCODE/src/github.com/containerd/stargz-snapshotter
APT_PKGS="golang-go golang-github-containerd-containerd-dev golang-github-containerd-stargz-snapshotter-dev"

die() { echo "build.sh: $*" >&2; exit "${2:-2}"; }

missing=$(for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
done | tr '\n' ' ')
if [ -n "${missing// /}" ]; then
  [ "$INSTALL" = 1 ] || die "missing Debian packages: $missing(build.sh --install or ./run.sh bench-setup)"
  [ "$(id -u)" = 0 ] || die "missing Debian packages (need root to install): $missing"
  echo "[build.sh] apt-get install $missing" >&2
  apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 \
    || die "apt-get install $missing failed"
fi
command -v go >/dev/null || die "go not found (Debian package golang-go)"
[ -d "$STARGZ_SRC/service" ] || die "$STARGZ_SRC/service missing (golang-github-containerd-stargz-snapshotter-dev)"

mkdir -p "$OUT" || die "cannot create $OUT"
want=$( { cat "$HERE/main.go" "$0"; go version; dpkg-query -W golang-github-containerd-stargz-snapshotter-dev; } | sha256sum | cut -d' ' -f1)
if [ -x "$BIN" ] && [ "$(cat "$BIN.stamp" 2>/dev/null)" = "$want" ]; then
  echo "$BIN"
  exit 0
fi

# service/resolver/cri.go (the CRI registry config + keychain helpers) imports k8s.io/cri-api,
# which Debian does not package; nothing this main uses needs it, so the build drops that one
# file with `go build -overlay` instead of patching the installed sources.
overlay=$OUT/overlay.json
printf '{"Replace": {"%s": ""}}\n' "$STARGZ_SRC/service/resolver/cri.go" > "$overlay"

export GO111MODULE=off GOPATH=$GOCODE GOCACHE=$OUT/gocache GOFLAGS= CGO_ENABLED=${CGO_ENABLED:-1}
echo "[build.sh] go build (GOPATH mode, first build takes a few minutes)" >&2
( cd "$HERE" && go build -overlay "$overlay" -o "$BIN.tmp" . ) >&2 || { rm -f "$BIN.tmp"; die "go build failed" 1; }
mv -f "$BIN.tmp" "$BIN" && echo "$want" > "$BIN.stamp"
echo "$BIN"
