"""What every CLI shares: the installed distribution's version (package metadata) for
``--version``, and one-line usage errors."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

DISTRIBUTION = "pynydus"


def version() -> str:
    """``pynydus`` version from the installed package metadata; "unknown" when not installed."""
    import importlib.metadata  # noqa: PLC0415 (only for --version: see VersionAction)

    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def version_string(prog: str) -> str:
    return f"{prog} {version()} ({DISTRIBUTION})"


class VersionAction(argparse.Action):
    """``--version``: print :func:`version_string` of ``prog_name`` and exit 0. Unlike argparse's
    ``action="version"``, which needs the string when the parser is built, the package metadata
    is read only when the flag is given: importing ``importlib.metadata`` and looking the
    distribution up cost every CLI start 10-40 ms here."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, *, prog_name: str,
                 help: str = "show program's version number and exit") -> None:  # noqa: A002
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)
        self.prog_name = prog_name

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        print(version_string(self.prog_name))
        parser.exit()


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line (``prog: error: ... (see prog --help)``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
