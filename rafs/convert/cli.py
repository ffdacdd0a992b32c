"""``nydusify``: convert an OCI image into a nydus image and push it; optimize a nydus image
around its start-up set (a prefetch trace); check a nydus image."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys

from rafs.errors import RafsError
from storage.errors import StorageError

from .converter import ConvertOptions, convert
from .errors import ConvertError
from .layer import LayerOptions
from .reference import parse_reference, parse_source
from rafs.cli_common import OneLineArgumentParser, VersionAction

COMPRESSORS = ("zstd", "lz4_block", "none")


def _prefetch_patterns(arg: str | None) -> tuple[str, ...]:
    """``--prefetch-patterns``: ``-`` (or no value) reads stdin, else a file; one path a line.
    Without the flag the pattern is ``/`` (upstream's default); an empty list means none."""
    if arg is None:
        return ("/",)
    if arg == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(arg, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConvertError(f"--prefetch-patterns: {exc}") from exc
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if not line.startswith("/"):
            raise ConvertError(f"prefetch pattern {line!r} must be an absolute path")
        out.append(line)
    return tuple(out)


def _prefetch_list(patterns: str | None, trace: str | None) -> tuple[str, ...]:
    """The layers' prefetch list: ``--prefetch-trace`` (a recorded trace, paths in access
    order: they also lead the blobs in that order) or ``--prefetch-patterns``."""
    if trace is None:
        return _prefetch_patterns(patterns)
    from rafs.trace import load_trace, trace_paths

    paths = trace_paths(load_trace(trace))
    if not paths:
        raise ConvertError(f"--prefetch-trace {trace}: the trace lists no file")
    return tuple(paths)


def _chunk_dict(arg: str | None) -> tuple[str | None, str | None]:
    """``--chunk-dict``: a bootstrap path, also accepted as upstream's ``bootstrap:local:<path>``."""
    if not arg:
        return None, None
    path = arg
    if arg.startswith("bootstrap:local:"):
        path = arg[len("bootstrap:local:"):]
    elif arg.startswith("bootstrap:registry:"):
        raise ConvertError("--chunk-dict bootstrap:registry:... is not supported; pass a local bootstrap")
    try:
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
    except OSError as exc:
        raise ConvertError(f"--chunk-dict: {exc}") from exc
    return path, digest


def _suffixed(source: str, suffix: str) -> str:
    """``--target-suffix``: ``host/repo:tag`` -> ``host/repo:tag<suffix>`` (registry sources only)."""
    spec = parse_source(source)
    if spec.kind != "registry":
        raise ConvertError("--target-suffix needs a registry source; use --target")
    ref = parse_reference(source)
    if ref.digest and not ref.tag:
        raise ConvertError("--target-suffix cannot be used with a digest-only source reference")
    return str(ref.with_tag(f"{ref.tag}{suffix}"))


def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="nydusify", description=__doc__)
    parser.add_argument("--version", action=VersionAction, prog_name="nydusify")
    parser.add_argument("--log-level", default="warning", type=str.lower,
                        choices=("trace", "debug", "info", "warn", "warning", "error"),
                        help="trace, debug, info, warn(ing), error (default warning)")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert a source image to a nydus image and push it")
    conv.add_argument("--source", required=True,
                      help="registry reference, oci:<layout dir>[:tag] or docker-archive:<file>")
    target = conv.add_mutually_exclusive_group(required=True)
    target.add_argument("--target", help="target registry reference (a tag)")
    target.add_argument("--target-suffix", help="target = source reference with this suffix on its tag")
    conv.add_argument("--source-insecure", action="store_true", help="allow http / unverified TLS to the source")
    conv.add_argument("--target-insecure", action="store_true", help="allow http / unverified TLS to the target")
    conv.add_argument("--work-dir", default="./tmp", help="work directory (kept: reruns resume from it)")
    conv.add_argument("--platform", default=None,
                      help="os/arch[/variant] to convert from an index (default: every platform)")
    conv.add_argument("--fs-version", type=int, default=6, choices=(6,), help="RAFS version (6)")
    conv.add_argument("--compressor", default="zstd", choices=COMPRESSORS, help="chunk compressor")
    conv.add_argument("--chunk-size", type=lambda s: int(s, 0), default=0x100000,
                      help="chunk size, a power of two between 0x1000 and 0x1000000")
    conv.add_argument("--chunk-dict", default=None,
                      help="chunk-dict bootstrap (path or bootstrap:local:<path>) for dedup")
    prefetch = conv.add_mutually_exclusive_group()
    prefetch.add_argument("--prefetch-patterns", nargs="?", const="-", default=None,
                          help="prefetch paths, one a line, from stdin (no value or '-') or a file "
                               "(default without the flag: '/', the whole image; an empty file: none)")
    prefetch.add_argument("--prefetch-trace", default=None, metavar="FILE",
                          help="a prefetch trace (nydusctl trace): its files become the prefetch "
                               "table and lead the blobs, in access order")
    conv.add_argument("--with-referrer", action="store_true",
                      help="attach the nydus image to the source manifest as an OCI referrer (subject); "
                           "the target must be in the source's repository")
    conv.add_argument("--oci-ref", action="store_true",
                      help="OCI-ref (zran) image, upstream's layout: the gzip layers stay the data blobs; "
                           "pushed are a small ref blob per layer (gzip checkpoints + layer bootstrap), the "
                           "bootstrap layer, config and manifest (gzip layers only)")
    conv.add_argument("--zran-spacing", type=lambda s: int(s, 0), default=2 << 20,
                      help="--oci-ref: uncompressed bytes between gzip checkpoints (default 2 MiB: on the "
                           "190 MB Debian bench image 1.49 %% extra stored, cold start 1.35x full nydus; "
                           "4 MiB: 1.38 %%, 1.46x; 1 MiB: 1.72 %%, 1.25x)")
    conv.add_argument("--push-chunk-size", type=lambda s: int(s, 0), default=0,
                      help="upload blobs in PATCH chunks of this size (0: monolithic)")
    conv.add_argument("--no-progress", action="store_true", help="no progress bars")
    conv.add_argument("--output-json", default=None, help="write a JSON summary here")

    opt = sub.add_parser("optimize", help="rebuild a nydus image with its start-up set (a prefetch "
                                          "trace) copied into a new leading blob")
    opt.add_argument("--source", required=True, help="nydus image (registry reference)")
    opt.add_argument("--target", required=True, help="target registry reference (a tag)")
    opt.add_argument("--prefetch-files", required=True, metavar="FILE",
                     help="prefetch trace (nydusctl trace) or a list of absolute paths, one a line")
    opt.add_argument("--policy", default="separated-blob-with-prefetch-files",
                     choices=("separated-blob-with-prefetch-files",), help="upstream's policy name")
    opt.add_argument("--source-insecure", action="store_true", help="allow http / unverified TLS to the source")
    opt.add_argument("--target-insecure", action="store_true", help="allow http / unverified TLS to the target")
    opt.add_argument("--work-dir", default="./tmp", help="work directory")
    opt.add_argument("--platform", default=None, help="os/arch[/variant] when the source is an index")
    opt.add_argument("--push-chunk-size", type=lambda s: int(s, 0), default=0,
                     help="upload blobs in PATCH chunks of this size (0: monolithic)")
    opt.add_argument("--no-progress", action="store_true", help="no progress bars")
    opt.add_argument("--output-json", default=None, help="write a JSON summary here")

    chk = sub.add_parser("check", help="validate a nydus image and compare it with its source")
    chk.add_argument("--source", default=None, help="source image (omit to validate the target only)")
    chk.add_argument("--target", required=True, help="nydus image reference")
    chk.add_argument("--source-insecure", action="store_true")
    chk.add_argument("--target-insecure", action="store_true")
    chk.add_argument("--platform", default=None, help="check only this os/arch")
    chk.add_argument("--work-dir", default=None, help="where to download blobs (default: a temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = {"trace": "DEBUG", "warn": "WARNING"}.get(args.log_level, args.log_level.upper())
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    try:
        if args.command == "convert":
            size = args.chunk_size
            if size < 0x1000 or size > 0x1000000 or size & (size - 1):
                raise ConvertError(f"--chunk-size {size:#x} must be a power of two in [0x1000, 0x1000000]")
            chunk_dict, chunk_dict_digest = _chunk_dict(args.chunk_dict)
            layer = LayerOptions(fs_version=args.fs_version, compressor=args.compressor, chunk_size=size,
                                 chunk_dict=chunk_dict, chunk_dict_digest=chunk_dict_digest,
                                 prefetch_patterns=_prefetch_list(args.prefetch_patterns,
                                                                   args.prefetch_trace),
                                 oci_ref=args.oci_ref, zran_spacing=args.zran_spacing)
            target_ref = args.target or _suffixed(args.source, args.target_suffix)
            opts = ConvertOptions(source=args.source, target=target_ref, work_dir=args.work_dir,
                                  source_insecure=args.source_insecure, target_insecure=args.target_insecure,
                                  platform=args.platform, layer=layer, push_chunk_size=args.push_chunk_size,
                                  with_referrer=args.with_referrer,
                                  progress=False if args.no_progress else None)
            result = convert(opts)
            summary = {"target": result.target, "digest": result.digest, "mediaType": result.media_type,
                       "platforms": [m.platform for m in result.manifests],
                       "uploaded": result.stats.uploaded, "skipped": result.stats.skipped,
                       "uploaded_bytes": result.stats.uploaded_bytes}
            if args.output_json:
                with open(args.output_json, "w", encoding="utf-8") as fh:
                    json.dump(summary, fh, indent=1)
            print(f"converted {args.source} -> {result.target}@{result.digest} "
                  f"({len(result.stats.uploaded)} uploaded, {len(result.stats.skipped)} already present)")
            return 0
        if args.command == "optimize":
            from .optimize import OptimizeOptions, optimize

            result = optimize(OptimizeOptions(
                source=args.source, target=args.target, prefetch_files=args.prefetch_files,
                work_dir=args.work_dir, source_insecure=args.source_insecure,
                target_insecure=args.target_insecure, platform=args.platform,
                push_chunk_size=args.push_chunk_size, progress=False if args.no_progress else None))
            summary = {"target": result.target, "digest": result.digest, "mediaType": result.media_type,
                       "uploaded": result.stats.uploaded, "skipped": result.stats.skipped,
                       "uploaded_bytes": result.stats.uploaded_bytes}
            if args.output_json:
                with open(args.output_json, "w", encoding="utf-8") as fh:
                    json.dump(summary, fh, indent=1)
            print(f"optimized {args.source} -> {result.target}@{result.digest} "
                  f"({len(result.stats.uploaded)} uploaded, {len(result.stats.skipped)} already present)")
            return 0
        from .check import check

        report = check(args.source, args.target, source_insecure=args.source_insecure,
                       target_insecure=args.target_insecure, work_dir=args.work_dir, platform=args.platform)
        print(f"check passed: {', '.join(report.platforms)}; {report.files_compared} paths compared")
        return 0
    except (RafsError, StorageError) as exc:
        print(f"nydusify: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nydusify: interrupted (rerun with the same --work-dir to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
