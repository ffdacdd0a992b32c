#!/usr/bin/env bash
# Build the snapshotter's container image (nydus-snapshotter, nydusd, nydus-image, nydusify,
# nydusctl, nydus-containerd-config) from Debian packages and this project's wheels, without a
# Docker daemon: mmdebstrap (Debian bookworm minbase + python3 + fuse3) -> venv /opt/pynydus
# installed from the wheels inside the chroot -> umoci (OCI layout) -> skopeo (push).
#
#   misc/image/build.sh [--dist DIR] [--out DIR] [--tag TAG] [--push REF] [--insecure]
#
# --dist   wheels of `misc/install.sh build` (default dist/; built when it holds none)
# --out    OCI image layout directory (default build/image/oci); the image is <out>:<tag>
# --tag    default: the project version
# --push   push to this reference, e.g. 127.0.0.1:5000/pynydus/nydus-snapshotter:0.1.0
#          (--insecure: plain-HTTP registry)
# Debian packages come from apt's configured mirror (snapshot it with --mirror-free setups by
# pointing apt there). File times are clamped to SOURCE_DATE_EPOCH (default: the last commit's
# time) so the same inputs give the same layer.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
DIST="$SRC/dist" OUT="$SRC/build/image/oci" TAG="" PUSH="" INSECURE=0
SUITE=bookworm
PACKAGES=python3,python3-venv,fuse3,kmod,util-linux,ca-certificates
log() { printf '[image] %s\n' "$*" >&2; }
while (($#)); do
  case "$1" in
    --dist) DIST=$(realpath -m "${2:?}"); shift 2 ;;
    --out) OUT=$(realpath -m "${2:?}"); shift 2 ;;
    --tag) TAG=${2:?}; shift 2 ;;
    --push) PUSH=${2:?}; shift 2 ;;
    --insecure) INSECURE=1; shift ;;
    *) log "unknown argument $1"; exit 2 ;;
  esac
done
for t in mmdebstrap umoci skopeo; do
  command -v "$t" >/dev/null || { log "needs $t (apt-get install $t)"; exit 2; }
done
[[ -n $TAG ]] || TAG=$(sed -n 's/^version = "\(.*\)"/\1/p' "$SRC/pyproject.toml" | head -1)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$SRC" log -1 --format=%ct 2>/dev/null || date +%s)}
compgen -G "$DIST/pynydus-*.whl" >/dev/null || "$SRC/misc/install.sh" build --dist "$DIST"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/wheels"
cp "$DIST"/*.whl "$tmp/wheels/"
install -m 0755 "$SRC/misc/k8s/nydus-containerd-config" "$tmp/nydus-containerd-config"
sed -i '1s|.*|#!/opt/pynydus/bin/python|' "$tmp/nydus-containerd-config"

log "mmdebstrap $SUITE ($PACKAGES)"
mmdebstrap --variant=minbase --mode=root --quiet --include="$PACKAGES" \
  --customize-hook="mkdir -p \"\$1/tmp/wheels\" && cp $tmp/wheels/*.whl \"\$1/tmp/wheels/\"" \
  --customize-hook='chroot "$1" /usr/bin/python3 -m venv /opt/pynydus' \
  --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin /opt/pynydus/bin/pip install -q --no-index --no-cache-dir --find-links /tmp/wheels pynydus pyfuse3' \
  --customize-hook='chroot "$1" /opt/pynydus/bin/python -c "import pyfuse3, snapshotter.cli; assert pyfuse3.READ_INO_WITHOUT_FH"' \
  --customize-hook="install -m 0755 $tmp/nydus-containerd-config \"\$1/opt/pynydus/bin/\"" \
  --customize-hook='for t in nydus-snapshotter nydusd nydus-image nydusify nydusctl nydus-containerd-config; do ln -s /opt/pynydus/bin/$t "$1/usr/local/bin/$t"; done' \
  --customize-hook='rm -rf "$1/tmp/wheels" "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/* "$1"/var/log/* "$1/etc/machine-id"; find "$1/opt/pynydus" -name __pycache__ -prune -exec rm -rf {} +' \
  "$SUITE" "$tmp/rootfs.tar"

log "umoci: $OUT:$TAG"
mkdir -p "$(dirname "$OUT")"
[[ -d $OUT ]] || umoci init --layout "$OUT"
umoci new --image "$OUT:$TAG"
umoci unpack --image "$OUT:$TAG" "$tmp/bundle" >/dev/null
tar -C "$tmp/bundle/rootfs" -xf "$tmp/rootfs.tar"
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
umoci repack --image "$OUT:$TAG" --history.created "$created" --history.created_by "misc/image/build.sh" \
  "$tmp/bundle"
umoci config --image "$OUT:$TAG" --created "$created" --author pynydus \
  --config.entrypoint /opt/pynydus/bin/nydus-snapshotter --config.cmd=--config --config.cmd=/etc/nydus/config.toml \
  --config.env PATH=/opt/pynydus/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.workingdir / --history.created "$created" --history.created_by "misc/image/build.sh config"
umoci gc --layout "$OUT"
log "built $OUT:$TAG"
if [[ -n $PUSH ]]; then
  tls=()
  ((INSECURE)) && tls=(--dest-tls-verify=false)
  skopeo copy -q "${tls[@]}" "oci:$OUT:$TAG" "docker://$PUSH"
  log "pushed $PUSH"
fi
