"""storage.atomic: whole-file replacement that never leaves a half-written target."""

from __future__ import annotations

import os
import stat

import pytest

from storage.atomic import atomic_open, atomic_write


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, b"one")
    atomic_write(path, "two\n")
    assert path.read_bytes() == b"two\n"
    assert os.listdir(tmp_path) == ["f"]


def test_perms_are_those_of_open_unless_given(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "default", b"x")
        atomic_write(tmp_path / "private", b"x", perms=0o600)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "default").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "records.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write("half of the new")
            raise RuntimeError("crash in the middle")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["records.json"]


def test_only_whole_file_write_modes(tmp_path):
    with pytest.raises(ValueError):
        with atomic_open(tmp_path / "f", "ab"):
            pass
