"""containerd's own snapshotter conformance suite (containerd 1.6, Debian's Go sources) against
``python3 -m snapshotter serve``, through containerd's gRPC proxy client.

``integration/conformance/build.sh`` compiles the suite driver (``suite_test.go``) into a test
binary; this test runs it and reads go's per-case verdicts.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest

from integration.harness.util import kill_pids, pids_mentioning, short_tempdir, unmount_all

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFORMANCE = REPO / "integration" / "conformance"
GO_SOURCES = "/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite"
#: the 21 cases of containerd 1.6's SnapshotterSuite; Rename is skipped by the suite itself
CASES = {"Basic", "StatActive", "StatComitted", "TransitivityTest", "PreareViewFailingtest",
         "Update", "Remove", "Walk", "LayerFileupdate", "RemoveDirectoryInLowerLayer", "Chown",
         "DirectoryPermissionOnCommit", "RemoveIntermediateSnapshot", "DeletedFilesInChildSnapshot",
         "MoveFileFromLowerLayer", "Rename", "ViewReadonly", "StatInWalk", "CloseTwice",
         "RootPermission", "128LayersMount"}

pytestmark = [pytest.mark.root, pytest.mark.timeout(1200)]


def build_suite() -> pathlib.Path:
    """The compiled suite driver (``build.sh`` into the checkout's ``.cache/conformance``)."""
    if shutil.which("go") is None or not os.path.isdir(GO_SOURCES):
        pytest.skip("needs golang-go and golang-github-containerd-containerd-dev (./run.sh installs them)")
    r = subprocess.run([str(CONFORMANCE / "build.sh")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"build.sh rc={r.returncode}:\n{r.stderr[-3000:]}"
    return pathlib.Path(r.stdout.strip().splitlines()[-1]) / "conformance.test"


def verdicts(output: str) -> dict[str, str]:
    """Case name -> PASS/FAIL/SKIP from ``go test -v`` output."""
    return {m.group(2): m.group(1) for m in re.finditer(
        r"^\s*--- (PASS|FAIL|SKIP): TestContainerdSnapshotterSuite/(\S+)", output, re.M)}


def test_containerd_conformance_suite(tmp_path: pathlib.Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the suite mounts the overlay/bind mounts the snapshotter returns: needs root")
    binary = build_suite()
    logs = tmp_path / "logs"
    logs.mkdir()
    work = short_tempdir("pyn-conf-", str(tmp_path))     # suite dirs and sockets live below it
    env = dict(os.environ, TMPDIR=work, PYTHONPATH=str(REPO), CONFORMANCE_LOG_DIR=str(logs),
               CONFORMANCE_SNAPSHOTTER=json.dumps([sys.executable, "-m", "snapshotter", "serve"]))
    proc = subprocess.Popen([str(binary), "-test.v", "-test.count=1", "-test.timeout=15m"],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=1000)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)     # its snapshotters die with it (PDEATHSIG)
            proc.wait()
        # each case's shared nydusd started with its snapshotter and outlives it by design
        kill_pids(pids_mentioning(work))
        unmount_all(work)
        shutil.rmtree(work, ignore_errors=True)
    got = verdicts(out)
    failed = sorted(name for name, v in got.items() if v == "FAIL")
    assert not failed and set(got) == CASES, f"failed: {failed}, missing: {CASES - set(got)}\n{out[-6000:]}"
    assert [name for name, v in got.items() if v == "SKIP"] == ["Rename"], got
    assert proc.returncode == 0, out[-3000:]
