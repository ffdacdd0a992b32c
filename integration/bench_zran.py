"""Benchmark (not a test): extra bytes an ``--oci-ref`` (zran) conversion stores in the registry,
against a full nydus conversion of the same image, and (``debian``) cold start per spacing.

    python3 -m integration.bench_zran [--image debian|synthetic] [--cache DIR]
                                      [--spacings 1048576,4194304] [--files 320 --file-kib 256]
                                      [--coldstart-workloads python-json,git] [--rate 20] [--repeat 3]

``debian``: the multi-layer Debian image of ``bench_coldstart_real`` (4 gzip layers, 190 MB; built
from its cached OCI layout, so ``--cache`` must hold it — run that bench once, or point
``--cache`` at a checkout that has it). ``synthetic``: busybox + ``--files`` poorly compressible
files (``bench_coldstart.build_image``). The OCI image is pushed to a private docker-registry,
then converted into the same repository once in full (defaults) and once per ``--zran-spacing``
with ``--oci-ref``. "Extra stored" = bytes of every blob the nydus manifest references that the
OCI image does not (data blobs, ref blobs, bootstrap layer, config) + the manifest itself — what
the conversion adds to the registry. Prints a table and writes ``integration/results/zran.json``.
Needs docker-registry.

Cold start (``debian`` only; ``--coldstart-workloads ''`` skips it): ``bench_coldstart_real``'s
trials for modes oci, nydus (full) and ``zran-<N>m`` per spacing (each a fresh ``--oci-ref``
conversion at that ``--zran-spacing``; spacings must be 1, 2, 4 or 8 MiB), default snapshotter
config (erofs, prefetch on), one link rate, ``--repeat`` trials interleaved (repeat outermost,
then workload, then mode), medians. Its own JSON goes to ``zran_coldstart_spacings.json``;
``zran.json`` gets the per-spacing summary: extra stored, time to first output, link bytes
before it, zran / full nydus, and whether the issue's goal (< 2 % extra and <= 1.5x full nydus on
every workload) holds. Needs root, containerd, runc, docker-registry, /dev/fuse as well.
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
    ap.add_argument("--coldstart-workloads", default="python-json,git",
                    help="debian: bench_coldstart_real workloads per spacing ('' = storage only)")
    ap.add_argument("--rate", default="20", help="cold start: link rate, MB/s")
    ap.add_argument("--repeat", type=int, default=3, help="cold start: trials per (workload, mode)")
    args = ap.parse_args(argv)
    spacings = [int(s, 0) for s in args.spacings.split(",") if s]
    coldstart = args.image == "debian" and bool(args.coldstart_workloads)
    if coldstart and any(s % (1 << 20) or (s >> 20) not in (1, 2, 4, 8) for s in spacings):
        raise SystemExit("cold start: --spacings must be 1, 2, 4 or 8 MiB (bench_coldstart_real's zran-<N>m modes)")
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
        runs += [(f"--oci-ref --zran-spacing {s >> 10} KiB", f"zran-{s}",
                  ["--oci-ref", "--zran-spacing", str(s)]) for s in spacings]
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
            rows.append({"conversion": name, "tag": tag, "spacing": int(extra[-1]) if extra else None, "seconds": round(secs, 1), "extra_bytes": stored,
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
    doc = {"image": args.image, "layers_bytes": layers_size, "source_manifest_bytes": src_manifest_size,
           "rows": rows}
    rc = 0
    if coldstart:
        rc, doc["coldstart"] = _coldstart(args, spacings, rows, out)
    tmp = out / "zran.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.rename(tmp, out / "zran.json")
    print(f"\nwrote {out / 'zran.json'}")
    return rc


def _coldstart(args, spacings: list[int], rows: list[dict], out: pathlib.Path) -> tuple[int, dict]:
    """Run bench_coldstart_real for oci, nydus and one zran mode per spacing; summarize per spacing."""
    from integration import bench_coldstart_real as real

    workloads = [w for w in args.coldstart_workloads.split(",") if w]
    modes = ["oci", "nydus"] + [f"zran-{s >> 20}m" for s in spacings]
    name = "zran_coldstart_spacings"
    rc = real.main(["--rates", args.rate, "--repeat", str(args.repeat), "--workloads", ",".join(workloads),
                    "--modes", ",".join(modes), "--name", name, "--out", str(out)])
    res = json.loads((out / f"{name}.json").read_text())
    per_wl = res["summary"].get(f"{float(args.rate):g}", {})
    extra = {r["spacing"]: r for r in rows}
    table = []
    for mode in modes:
        spacing = int(mode[5:-1]) << 20 if mode.startswith("zran-") else None
        row: dict = {"mode": mode, "spacing": spacing, "workloads": {}}
        if mode == "nydus":
            row["extra_pct"] = next((r["extra_pct"] for r in rows if r["spacing"] is None), None)
        elif spacing:
            row["extra_pct"] = extra[spacing]["extra_pct"]
        for wl in workloads:
            cell, full = per_wl.get(wl, {}).get(mode), per_wl.get(wl, {}).get("nydus")
            if not cell:
                row["workloads"][wl] = None
                continue
            row["workloads"][wl] = {
                "seconds": cell["seconds"], "all_seconds": cell["all_seconds"],
                "link_bytes_first_output": cell["link_bytes_first_output"],
                "registry_bytes": cell["registry_bytes"],
                "vs_nydus": round(cell["seconds"] / full["seconds"], 2) if full else None}
        if spacing:
            ratios = [c["vs_nydus"] for c in row["workloads"].values() if c and c["vs_nydus"]]
            row["meets_goal"] = bool(len(ratios) == len(workloads) and row["extra_pct"] < 2.0
                                     and max(ratios) <= 1.5)
        table.append(row)
    print(f"\n== cold start at {args.rate} MB/s, erofs, medians of {args.repeat} interleaved trials: "
          "time to first output (x full nydus), MB through the link before it\n")
    print("| image | extra stored | " + " | ".join(workloads) + " | goal (< 2 %, <= 1.5x) |")
    print("|---|---|" + "---|" * len(workloads) + "---|")
    for row in table:
        label = {"oci": "OCI", "nydus": "full nydus"}.get(row["mode"]) or \
            f"zran, spacing {row['spacing'] >> 20} MiB"
        cells = []
        for wl in workloads:
            c = row["workloads"][wl]
            cells.append("failed" if c is None else
                         f"{c['seconds']:.2f} s ({c['vs_nydus']}x), {c['link_bytes_first_output'] / 1e6:.1f} MB")
        pct = f"{row['extra_pct']} %" if row.get("extra_pct") is not None else "0 %"
        goal = {True: "**met**", False: "not met"}.get(row.get("meets_goal"), "")
        print(f"| {label} | {pct} | " + " | ".join(cells) + f" | {goal} |")
    return rc, {"rate_mb_s": float(args.rate), "repeat": args.repeat, "driver": "erofs",
                "workloads": workloads, "results_file": f"{name}.json", "load_average": res.get("load_average"),
                "minutes": res.get("minutes"), "table": table}


if __name__ == "__main__":
    raise SystemExit(main())
