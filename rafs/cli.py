"""``nydus-image``: build, merge, inspect, check and unpack RAFS images.

The format subcommands (inspect, check, unpack) live here; ``create`` and ``merge`` are
registered by :mod:`rafs.builder.cli`.  Exit codes: 0 ok, 1 problems found / operation failed,
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from rafs.errors import RafsError
from storage.atomic import atomic_write
from storage.errors import StorageError
from rafs.cli_common import VersionAction


def _add_bootstrap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("BOOTSTRAP", nargs="?", help="file path of the RAFS bootstrap (metadata)")
    p.add_argument("-B", "--bootstrap", dest="bootstrap_opt", metavar="PATH",
                   help="file path of the RAFS bootstrap (same as the positional argument)")
    p.add_argument("--blob-id-hint", metavar="ID",
                   help="blob id substituted for an inline bootstrap's placeholder blob id")


def _bootstrap(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    if args.BOOTSTRAP and args.bootstrap_opt:
        parser.error("give the bootstrap either positionally or with --bootstrap, not both")
    path = args.BOOTSTRAP or args.bootstrap_opt
    if not path:
        parser.error("a bootstrap is required (BOOTSTRAP or --bootstrap)")
    return path


def _add_blob_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-b", "--blob", metavar="PATH", help="path to the RAFS data blob file")
    p.add_argument("-D", "--blob-dir", metavar="DIR",
                   help="directory holding the data blobs, named by blob id")


def _open(args, parser):
    from rafs.metadata import Rafs

    return Rafs.open(_bootstrap(args, parser), blob_id_hint=args.blob_id_hint)


def _write_json(data: dict, path: str | None) -> None:
    text = json.dumps(data, indent=2, sort_keys=False)
    if path in (None, "-"):
        print(text)
        return
    atomic_write(path, text + "\n")


def cmd_inspect(args: argparse.Namespace) -> int:
    from rafs import inspect

    with _open(args, args.parser) as fs:
        request = args.request
        data = inspect.report(
            fs,
            path=args.path,
            tree=args.tree or request == "tree",
            chunks=args.chunks or request == "chunks",
        )
        if request == "blobs":
            data = {"blobs": data["blobs"]}
        elif request == "prefetch":
            data = {"prefetch_inos": fs.prefetch_inos}
        elif request == "stats":
            data = {"superblock": data["superblock"]}
        if args.output_json:
            _write_json(data, args.output_json)
        if args.json:
            _write_json(data, None)
        elif not args.output_json or request:
            if request in ("blobs", "prefetch", "stats"):
                _write_json(data, None)
            else:
                print(inspect.render(data))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from rafs._blobfile import LocalBlobs
    from rafs.check import CheckReport, check

    try:
        fs = _open(args, args.parser)
    except RafsError as exc:
        report = CheckReport()
        report.add(f"bootstrap: {exc}")
        return _check_result(report, args)
    with fs:
        blobs = None
        if args.blob or args.blob_dir:
            blobs = LocalBlobs(fs.blobs, blob=args.blob, blob_dir=args.blob_dir)
        try:
            verbose = (lambda p: print(f"checking {p}", file=sys.stderr)) if args.verbose else None
            report = check(fs, blobs, verbose=verbose)
        finally:
            if blobs is not None:
                blobs.close()
    return _check_result(report, args)


def _check_result(report, args) -> int:
    if args.output_json:
        _write_json(report.as_dict(), args.output_json)
    if report.ok:
        what = f"{report.chunks_verified} chunks ({report.bytes_verified} bytes) verified" if report.data_checked \
            else "metadata only (no --blob/--blob-dir)"
        print(f"OK: RAFS v{report.version}, {report.inodes} inodes, {report.files} files, "
              f"{report.chunks_referenced} chunks referenced, {what}")
        return 0
    print(f"FAILED: {len(report.problems)} problem(s):", file=sys.stderr)
    for p in report.problems[:20]:
        print(f"  {p}", file=sys.stderr)
    if len(report.problems) > 20:
        print(f"  ... {len(report.problems) - 20} more", file=sys.stderr)
    return 1


def cmd_unpack(args: argparse.Namespace) -> int:
    from rafs._blobfile import LocalBlobs
    from rafs.unpack import print_warnings, unpack

    with _open(args, args.parser) as fs:
        if not (args.blob or args.blob_dir) and any(True for _ in fs.blobs):
            args.parser.error("--blob or --blob-dir is required to unpack file data")
        with LocalBlobs(fs.blobs, blob=args.blob, blob_dir=args.blob_dir) as blobs:
            if blobs.missing:
                raise RafsError(f"data blob {blobs.missing[0].blob_id} not found")
            report = unpack(fs, blobs, args.output)
    print_warnings(report)
    print(f"unpacked {report.entries} entries ({report.files} files, {report.bytes} bytes, "
          f"{report.hardlinks} hard links) to {args.output}")
    return 0


def register(sub) -> None:
    """Add inspect, check and unpack to the ``nydus-image`` subparsers."""
    p = sub.add_parser("inspect", help="inspect RAFS filesystem metadata",
                       description="Describe a RAFS bootstrap: superblock, blobs, tree, one inode, chunks.")
    _add_bootstrap_args(p)
    _add_blob_args(p)
    p.add_argument("-R", "--request", choices=["stats", "blobs", "prefetch", "tree", "chunks"],
                   help="print only one section")
    p.add_argument("--path", metavar="PATH", help="describe one inode (attrs, xattrs, entries, chunks)")
    p.add_argument("--tree", action="store_true", help="list every inode of the tree")
    p.add_argument("--chunks", action="store_true", help="include chunk lists / the chunk table")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("-J", "--output-json", metavar="FILE", help="write the JSON report to FILE")
    p.set_defaults(func=cmd_inspect, parser=p)

    p = sub.add_parser("check", help="validate a RAFS image (metadata and, with blobs, data)",
                       description="Full consistency check; exits 1 listing the first problems.")
    _add_bootstrap_args(p)
    _add_blob_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="print every checked path")
    p.add_argument("-J", "--output-json", metavar="FILE", help="write the check report as JSON to FILE")
    p.set_defaults(func=cmd_check, parser=p)

    p = sub.add_parser("unpack", help="unpack a RAFS filesystem to a directory or tar file",
                       description="Write the image's tree (content, modes, owners, mtimes, xattrs, "
                                   "links, devices) to --output DIR, or a tar archive if it ends in .tar.")
    _add_bootstrap_args(p)
    _add_blob_args(p)
    p.add_argument("--output", required=True, metavar="PATH", help="output directory, or a .tar file path")
    p.set_defaults(func=cmd_unpack, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nydus-image", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action=VersionAction, prog_name="nydus-image")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    from rafs.builder import cli as builder_cli

    builder_cli.register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so temporary outputs are removed on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main else None
    try:
        return int(args.func(args) or 0)
    except (RafsError, StorageError, OSError) as exc:
        print(f"nydus-image {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"nydus-image {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"nydus-image {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
