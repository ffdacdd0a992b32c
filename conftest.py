"""Shared pytest fixtures: where the team's shared vectors and tools live."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent


def find_shared_dir() -> pathlib.Path | None:
    """``$NYDUS_SHARED_DIR``, else a ``shared/`` beside the checkout (or one level further up)."""
    env = os.environ.get("NYDUS_SHARED_DIR")
    candidates = [pathlib.Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared", REPO_ROOT.parent.parent / "shared"]
    for cand in candidates:
        if (cand / "vectors").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    found = find_shared_dir()
    if found is None:
        pytest.skip("shared/ (vectors, conformance) not found beside the checkout; set NYDUS_SHARED_DIR")
    return found


@pytest.fixture(scope="session")
def vectors_dir(shared_dir: pathlib.Path) -> pathlib.Path:
    return shared_dir / "vectors"
