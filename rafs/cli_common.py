"""What every CLI shares: the installed distribution's version (package metadata) for
``--version``, and one-line usage errors."""

from __future__ import annotations

import argparse
import importlib.metadata
from typing import NoReturn

DISTRIBUTION = "pynydus"


def version() -> str:
    """``pynydus`` version from the installed package metadata; "unknown" when not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def version_string(prog: str) -> str:
    return f"{prog} {version()} ({DISTRIBUTION})"


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line (``prog: error: ... (see prog --help)``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
