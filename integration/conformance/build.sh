#!/bin/sh
# Build containerd's snapshotter conformance suite (suite_test.go) and the reference
# overlayfs proxy snapshotter (refsnapshotter/) in GOPATH mode against Debian's Go source
# packages (golang-go, golang-github-containerd-containerd-dev): no module download.
#
#   integration/conformance/build.sh [OUTDIR]
#
# OUTDIR (default: .cache/conformance in the checkout, not in git) gets conformance.test
# and refsnapshotter; each is written under a temporary name and renamed, so concurrent
# builds never expose a half-written binary. Prints OUTDIR.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../.cache/conformance}
mkdir -p "$out"
out=$(cd "$out" && pwd)
gopath=/usr/share/gocode
if ! command -v go >/dev/null || [ ! -d "$gopath/src/github.com/containerd/containerd/snapshots/testsuite" ]; then
    echo "build.sh: needs the Debian packages golang-go and golang-github-containerd-containerd-dev" >&2
    exit 2
fi
export GO111MODULE=off GOPATH=$gopath GOFLAGS=
cd "$here"
go test -c -o "$out/conformance.test.tmp.$$" .
mv -f "$out/conformance.test.tmp.$$" "$out/conformance.test"
go build -o "$out/refsnapshotter.tmp.$$" ./refsnapshotter
mv -f "$out/refsnapshotter.tmp.$$" "$out/refsnapshotter"
echo "$out"
