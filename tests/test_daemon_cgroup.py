"""rafs.daemon.cgroup: daemons moved into a cgroup of their own (``[daemon] cgroup``), on this
host's real cgroup filesystem (needs root); the path checks need nothing."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from rafs.daemon.cgroup import DaemonCgroup
from rafs.errors import ConfigError


@pytest.mark.parametrize("path", ["", "/", "a/../b", "./x"])
def test_bad_paths_are_refused(path):
    with pytest.raises(ConfigError, match="daemon.cgroup"):
        DaemonCgroup(path)


def test_no_hierarchy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no cgroup hierarchy"):
        DaemonCgroup("pynydus-daemons", str(tmp_path))


def test_attach_moves_the_process_in_every_hierarchy_and_remove_cleans_up():
    if os.geteuid() != 0:
        pytest.skip("moving a process between cgroups needs root")
    if not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("no /sys/fs/cgroup")
    cg = DaemonCgroup(f"pynydus-test-{uuid.uuid4().hex[:8]}/daemons")
    proc = subprocess.Popen(["sleep", "60"])
    try:
        cg.attach(proc.pid)
        lines = DaemonCgroup.of(proc.pid)
        for d in cg.dirs():
            with open(os.path.join(d, "cgroup.procs")) as f:
                assert str(proc.pid) in f.read().split()
        assert lines and all(line.endswith(":/" + cg.path) for line in lines), lines
        assert cg.remove() == cg.dirs()  # busy: left in place, reported
    finally:
        proc.kill()
        proc.wait()
    for _ in range(50):  # the kernel drops an exited task from cgroup.procs asynchronously
        if not cg.remove():
            break
        time.sleep(0.1)
    assert not any(os.path.exists(os.path.join(h, cg.path.split("/")[0])) for h in cg.hierarchies)
