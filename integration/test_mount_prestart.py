"""DaemonManager.prestart: the shared nydusd comes up before the first mount, which then reuses it."""

from __future__ import annotations

import os

import pytest

from integration.test_mount_manager import setup  # noqa: F401  (fixture)

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def test_prestart_shared_daemon_is_reused_by_mount(setup):  # noqa: F811
    tex, make = setup
    m = make(mode="shared", fs_driver="fusedev")
    assert m.prestart() == "shared-fusedev"
    pid = m._records["shared-fusedev"].pid
    assert m._alive(m._records["shared-fusedev"])
    assert m.prestart() == "shared-fusedev" and m._records["shared-fusedev"].pid == pid  # idempotent
    mp = m.mount("v6", str(tex / "bootstrap/rafs-v6-2.2.boot"), None, None)
    assert m._records["shared-fusedev"].pid == pid
    assert len(open(os.path.join(mp, "lib.rs"), "rb").read()) == 16931
    m.umount("v6")


def test_prestart_is_a_no_op_in_dedicated_mode(setup):  # noqa: F811
    _, make = setup
    m = make(mode="dedicated", fs_driver="fusedev")
    assert m.prestart() is None
    assert m._records == {}
