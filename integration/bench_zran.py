"""Benchmark (not a test): extra bytes an ``--oci-ref`` (zran) conversion stores in the registry,
against a full nydus conversion of the same image.

    python3 -m integration.bench_zran [--image debian|synthetic] [--cache DIR]
                                      [--spacings 1048576,4194304] [--files 320 --file-kib 256]

``debian``: the multi-layer Debian image of ``bench_coldstart_real`` (4 gzip layers, 190 MB; built
from its cached OCI layout, so ``--cache`` must hold it — run that bench once, or point
``--cache`` at a checkout that has it). ``synthetic``: busybox + ``--files`` poorly compressible
files (``bench_coldstart.build_image``). The OCI image is pushed to a private docker-registry,
then converted into the same repository once in full (defaults) and once per ``--zran-spacing``
with ``--oci-ref``. "Extra stored" = bytes of every blob the nydus manifest references that the
OCI image does not (data blobs, ref blobs, bootstrap layer, config) + the manifest itself — what
the conversion adds to the registry. Prints a table and writes ``integration/results/zran.json``.
Needs docker-registry.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "integration" / "results"


def _manifest(registry, repo: str, tag: str) -> tuple[dict, int]:
    import requests

    resp = requests.get(f"http://{registry.host}/v2/{repo}/manifests/{tag}", timeout=60,
                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    resp.raise_for_status()
    return resp.json(), len(resp.content)


def _blobs(manifest: dict) -> dict[str, int]:
    out = {la["digest"]: int(la["size"]) for la in manifest["layers"]}
    out[manifest["config"]["digest"]] = int(manifest["config"]["size"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", choices=("debian", "synthetic"), default="debian")
    ap.add_argument("--cache", default=str(REPO / ".cache"), help="bench_coldstart_real's cache dir")
    ap.add_argument("--spacings", default=str(1 << 20), help="--zran-spacing values, comma separated")
    ap.add_argument("--files", type=int, default=320, help="synthetic: files under /data")
    ap.add_argument("--file-kib", type=int, default=256, help="synthetic: size of each file, KiB")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from integration.harness.registry import Registry
    from rafs.convert.cli import main as nydusify

    if args.image == "debian":
        from integration.bench_coldstart_real import build_image

        image = build_image(pathlib.Path(args.cache))
    else:
        from integration.bench_coldstart import build_image as synthetic

        image = synthetic(args.files, args.file_kib)
    rows = []
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="bench-zran-") as tmp:
        oci = image.push(registry, "bench/img", "oci")
        src, src_manifest_size = _manifest(registry, "bench/img", "oci")
        src_blobs = _blobs(src)
        layers_size = sum(la["size"] for la in src["layers"])
        print(f"image {args.image}: {len(src['layers'])} gzip layers, {layers_size / 1e6:.1f} MB "
              f"({image.uncompressed_size / 1e6:.1f} MB uncompressed)", flush=True)
        runs = [("full nydus (defaults)", "nydus", [])]
        runs += [(f"--oci-ref --zran-spacing {int(s, 0) >> 10} KiB", f"zran-{int(s, 0)}",
                  ["--oci-ref", "--zran-spacing", s]) for s in args.spacings.split(",") if s]
        for name, tag, extra in runs:
            t0 = time.monotonic()
            rc = nydusify(["convert", "--source", oci.ref, "--target", f"{registry.host}/bench/img:{tag}",
                           "--source-insecure", "--target-insecure", "--work-dir", os.path.join(tmp, tag),
                           "--no-progress", *extra])
            secs = time.monotonic() - t0
            if rc != 0:
                raise SystemExit(f"nydusify convert {name} failed")
            manifest, manifest_size = _manifest(registry, "bench/img", tag)
            added = {d: s for d, s in _blobs(manifest).items() if d not in src_blobs}
            *data, boot = manifest["layers"]
            stored = sum(added.values()) + manifest_size
            rows.append({"conversion": name, "tag": tag, "seconds": round(secs, 1), "extra_bytes": stored,
                         "extra_pct": round(100 * stored / layers_size, 2),
                         "data_or_ref_blobs": sum(la["size"] for la in data if la["digest"] in added),
                         "bootstrap_layer": boot["size"], "config": manifest["config"]["size"],
                         "manifest": manifest_size})
            print(f"  {name}: {secs:.1f} s, {stored / 1e6:.2f} MB extra", flush=True)
    print(f"\nsource: {layers_size:,} B of gzip layers\n")
    print("| conversion | extra stored | % of the OCI layers | data / ref blobs | bootstrap layer | "
          "config + manifest | convert time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['conversion']} | {r['extra_bytes']:,} B | {r['extra_pct']} % | {r['data_or_ref_blobs']:,} B | "
              f"{r['bootstrap_layer']:,} B | {r['config'] + r['manifest']:,} B | {r['seconds']} s |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zran.json").write_text(json.dumps({"image": args.image, "layers_bytes": layers_size,
                                               "source_manifest_bytes": src_manifest_size, "rows": rows},
                                              indent=1) + "\n")
    print(f"\nwrote {out / 'zran.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
