"""Root pytest fixtures: the upstream test vectors kept in ``tests/vectors``."""

from __future__ import annotations

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent
VECTORS_DIR = REPO_ROOT / "tests" / "vectors"


@pytest.fixture(scope="session")
def vectors_dir() -> pathlib.Path:
    """``tests/vectors``: upstream-built images and blobs (sources listed in its README.md)."""
    return VECTORS_DIR
