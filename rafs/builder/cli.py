"""``nydus-image create`` and ``nydus-image merge`` (upstream flag names).

``register(subparsers)`` is called by :mod:`rafs.cli`.  Prefetch patterns for
``--prefetch-policy fs`` are read from stdin, one path per line (as upstream), or a prefetch
trace (:mod:`rafs.trace`; recognized by its ``#`` header or tab-separated ranges).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import sys

from rafs.builder.source import LayerLimits
from rafs.errors import RafsError
from storage.errors import StorageError
from storage.records import Compressor, Digester

VERSION = "pynydus-0.1.0"
_COMPRESSORS = {"none": Compressor.NONE, "lz4_block": Compressor.LZ4_BLOCK, "zstd": Compressor.ZSTD}
_DIGESTERS = {"blake3": Digester.BLAKE3, "sha256": Digester.SHA256}


def _int(value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None


def _read_prefetch(policy: str) -> list[str]:
    try:
        return _read_prefetch_stdin(policy)
    except RafsError as exc:  # a malformed trace: one line, usage error
        print(f"error: prefetch list on stdin: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class _InterruptibleReader(io.RawIOBase):
    """A pipe read that Ctrl-C / SIGTERM always interrupts: it waits in ``select`` with a short
    timeout, so Python runs a pending signal handler between waits. (A plain blocking read of a
    stalled pipe does not return when the signal lands just before the ``read`` call, while the
    buffered reader's C code runs: the handler then never runs.)"""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        while not select.select([self.fd], [], [], 0.25)[0]:
            pass
        return os.readv(self.fd, [buf])


def _interruptible_stdin() -> io.BufferedReader:
    return io.BufferedReader(_InterruptibleReader(sys.stdin.fileno()), 1 << 20)


def _read_prefetch_stdin(policy: str) -> list[str]:
    if policy != "fs":
        return []
    if sys.stdin is None or sys.stdin.isatty():
        return []
    text = sys.stdin.read()
    if "\t" in text or text.lstrip().startswith("#"):  # a prefetch trace (rafs.trace format)
        from rafs.trace import parse_trace, trace_paths

        return trace_paths(parse_trace(text))
    return [line.strip() for line in text.splitlines() if line.strip()]


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",")]


def _write_json(path: str | None, bootstrap: str, blobs: list[str], compressor: str,
                trace: dict[str, float] | None = None) -> None:
    if not path:
        return
    data = {"version": VERSION, "bootstrap": bootstrap, "blobs": blobs, "external_bootstrap": "",
            "external_blobs": [], "trace": trace or {}, "fs_version": "6", "compressor": compressor}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def cmd_create(args: argparse.Namespace) -> int:
    from rafs.builder.build import BuildOptions, build

    if str(args.fs_version) != "6":
        print("error: only --fs-version 6 can be built", file=sys.stderr)
        return 2
    features = set(_csv(args.features) or [])
    unknown = features - {"blob-toc", ""}
    if unknown:
        print(f"error: unknown --features {sorted(unknown)}", file=sys.stderr)
        return 2
    ref_blob_only = args.type == "targz-ref" and args.blob_inline_meta and args.blob
    if not args.bootstrap and not args.blob_dir and not ref_blob_only:
        print("error: one of --bootstrap or --blob-dir is required", file=sys.stderr)
        return 2
    if not args.blob and not args.blob_dir and args.type != "targz-ref":
        print("error: one of --blob or --blob-dir is required", file=sys.stderr)
        return 2
    for flag, directory in (("--blob-dir", args.blob_dir),
                            ("--bootstrap", os.path.dirname(os.path.abspath(args.bootstrap)) if args.bootstrap else None),
                            ("--blob", os.path.dirname(os.path.abspath(args.blob)) if args.blob else None)):
        if directory and not os.path.isdir(directory):
            print(f"error: {flag}: directory {directory} does not exist; create it first (mkdir -p {directory})",
                  file=sys.stderr)
            return 2
    opts = BuildOptions(chunk_size=args.chunk_size, compressor=_COMPRESSORS[args.compressor],
                        digester=_DIGESTERS[args.digester], whiteout_spec=args.whiteout_spec,
                        blob_inline_meta=args.blob_inline_meta, blob_toc="blob-toc" in features,
                        prefetch=_read_prefetch(args.prefetch_policy), chunk_dict=args.chunk_dict,
                        parent_bootstrap=args.parent_bootstrap, compact_inodes=args.compact_inodes,
                        zran_spacing=args.zran_spacing, progress=True,
                        limits=LayerLimits(args.max_file_size, args.max_layer_size, args.max_entries))
    source = args.SOURCE
    if source == "-":
        source = _interruptible_stdin()
    try:
        result = build(source, bootstrap_out=args.bootstrap, blob_out=args.blob, blob_dir=args.blob_dir,
                       source_type=args.type, options=opts)
    except (RafsError, StorageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _write_json(args.output_json, result.bootstrap, result.blob_ids, args.compressor, result.trace)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from rafs.builder.merge import merge

    try:
        sizes = [int(v) for v in _csv(args.blob_sizes)] if args.blob_sizes else None
        toc_sizes = [int(v) for v in _csv(args.blob_toc_sizes)] if args.blob_toc_sizes else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = merge(args.SOURCE, args.bootstrap, blob_digests=_csv(args.blob_digests), blob_sizes=sizes,
                       blob_toc_digests=_csv(args.blob_toc_digests), blob_toc_sizes=toc_sizes,
                       prefetch=_read_prefetch(args.prefetch_policy), parent_bootstrap=args.parent_bootstrap)
    except (RafsError, StorageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from rafs.builder.loader import load_bootstrap

    comp = {v: k for k, v in _COMPRESSORS.items()}.get(load_bootstrap(result.bootstrap).compressor, "zstd")
    _write_json(args.output_json, result.bootstrap, result.blob_ids, comp)
    return 0


def register(subparsers) -> None:
    """Add ``create`` and ``merge`` to the ``nydus-image`` parser."""
    p = subparsers.add_parser("create", help="build a RAFS v6 bootstrap and data blob from a directory or tar")
    p.add_argument("SOURCE", help="source directory, tar file, or '-' for a tar stream on stdin")
    p.add_argument("-t", "--type", "--source-type", dest="type", default="dir-rafs",
                   help="dir-rafs | tar-rafs | targz-rafs | targz-ref (also: directory); targz-ref: the gzip "
                        "layer stays the blob, writes the bootstrap and <blob_id>.blob.meta (--blob-dir, "
                        "else beside the bootstrap)")
    p.add_argument("--zran-spacing", type=_int, default=1 << 20,
                   help="targz-ref: uncompressed bytes between gzip checkpoints (default 1 MiB)")
    p.add_argument("-B", "--bootstrap", help="output bootstrap file")
    p.add_argument("-b", "--blob", help="output data blob file")
    p.add_argument("-D", "--blob-dir", help="directory for the blob (named by its id)")
    p.add_argument("--blob-inline-meta", "--inline-bootstrap", dest="blob_inline_meta", action="store_true",
                   help="store the bootstrap inside the blob (image.boot section)")
    p.add_argument("--chunk-size", type=_int, default=0x100000, help="power of two, 0x1000..0x1000000")
    p.add_argument("--compressor", choices=sorted(_COMPRESSORS), default="zstd")
    p.add_argument("--digester", choices=sorted(_DIGESTERS), default="blake3")
    p.add_argument("-v", "--fs-version", default="6", choices=["5", "6"])
    p.add_argument("--features", help="comma list: blob-toc")
    p.add_argument("--whiteout-spec", choices=["oci", "overlayfs", "none"], default="oci")
    p.add_argument("--prefetch-policy", choices=["fs", "blob", "none"], default="none")
    p.add_argument("--chunk-dict", help="bootstrap=<path> of a chunk dictionary")
    p.add_argument("--parent-bootstrap", help="bootstrap of the lower layers; output = parent + this layer")
    p.add_argument("--compact-inodes", action="store_true",
                   help="32-byte inodes where upstream's directory builder uses them (no mtime)")
    lim = LayerLimits()
    p.add_argument("--max-file-size", type=_int, default=lim.max_file_size, metavar="BYTES",
                   help=f"refuse a file declaring more bytes (0 = no cap; default {lim.max_file_size})")
    p.add_argument("--max-layer-size", type=_int, default=lim.max_layer_size, metavar="BYTES",
                   help=f"refuse a layer whose files declare more bytes (0 = no cap; default {lim.max_layer_size})")
    p.add_argument("--max-entries", type=_int, default=lim.max_entries, metavar="N",
                   help=f"refuse a layer with more entries (0 = no cap; default {lim.max_entries})")
    p.add_argument("-J", "--output-json")
    p.add_argument("-l", "--log-level", default="info")
    p.add_argument("--repeatable", action="store_true", help="accepted; builds are always repeatable")
    p.add_argument("--aligned-chunk", action="store_true", help="accepted; chunks are always 4K aligned")
    p.add_argument("--disable-check", action="store_true", help="accepted; no effect")
    p.set_defaults(func=cmd_create)

    m = subparsers.add_parser("merge", help="merge per-layer bootstraps into one image bootstrap")
    m.add_argument("SOURCE", nargs="+", help="per-layer bootstraps, bottom layer first")
    m.add_argument("-B", "--bootstrap", required=True, help="output bootstrap")
    m.add_argument("--parent-bootstrap")
    m.add_argument("--blob-digests", help="comma list, one per source")
    m.add_argument("--blob-sizes", help="comma list, one per source")
    m.add_argument("--blob-toc-digests", help="comma list, one per source")
    m.add_argument("--blob-toc-sizes", help="comma list, one per source")
    m.add_argument("--prefetch-policy", choices=["fs", "blob", "none"], default="none")
    m.add_argument("--chunk-dict", help="accepted for compatibility")
    m.add_argument("-J", "--output-json")
    m.add_argument("-l", "--log-level", default="info")
    m.set_defaults(func=cmd_merge)
