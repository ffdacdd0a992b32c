"""``nydus-image``: build, merge, inspect, check and unpack RAFS images.

The format subcommands (inspect, check, unpack) live here; ``create`` and ``merge`` are
registered by :mod:`rafs.builder.cli`.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nydus-image", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    try:
        from rafs.builder import cli as builder_cli
    except ImportError:  # builder not landed yet
        builder_cli = None
    if builder_cli is not None:
        builder_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
