"""Crash safety: SIGKILL of a process in the middle of snapshot calls leaves, for every call,
either the old or the new state. After each kill the metastore is intact, every snapshot it
lists has its directories (and a committed layer keeps the data written before Commit), every
parent exists, Cleanup removes only directories no snapshot owns, and the store keeps working."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import time

from snapshotter.config import Config
from snapshotter.snapshot import Snapshotter

REPO = pathlib.Path(__file__).resolve().parent.parent

WORKER = r"""
import os, sys
from snapshotter.config import Config
from snapshotter.snapshot import Snapshotter
root, seed = sys.argv[1], int(sys.argv[2])
sn = Snapshotter(Config(root=root))
sn.start()
tops = [i.name for i in sn.walk() if i.kind.name == "COMMITTED"]
parent = max(tops, key=lambda n: int(n.split("-")[1])) if tops else ""
i = seed * 100000
while True:
    i += 1
    key = f"active-{i}"
    sn.prepare(key, parent, {"n": str(i)})
    upper = [o for o in sn.mounts(key)[0].options if o.startswith("upperdir=")]
    fs = upper[0].split("=", 1)[1] if upper else sn.mounts(key)[0].source
    with open(os.path.join(fs, f"file-{i}"), "w") as f:
        f.write(str(i))
    if i % 3 == 0:
        sn.remove(key)
        continue
    sn.commit(f"layer-{i}", key, {"n": str(i)})
    parent = f"layer-{i}"
    if i % 5 == 0:
        sn.prepare(f"extra-{i}", parent)
        sn.remove(f"extra-{i}")
"""


def _rows(root: pathlib.Path) -> list[tuple[int, str, str, int, str]]:
    con = sqlite3.connect(root / "metadata.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return con.execute("SELECT id, key, parent, kind, labels FROM snapshots").fetchall()
    finally:
        con.close()


def _check_invariants(root: pathlib.Path) -> None:
    sn = Snapshotter(Config(root=str(root)))
    sn.start()
    try:
        infos = {i.name: i for i in sn.walk()}
        rows = _rows(root)
        assert {r[1] for r in rows} == set(infos)
        for sid, key, parent, _kind, labels in rows:
            assert (root / "snapshots" / str(sid) / "fs").is_dir(), f"{key}: directory missing"
            assert not parent or parent in infos, f"{key}: parent {parent} missing"
            info = infos[key]
            if info.kind.name == "COMMITTED":
                n = key.split("-")[1]
                assert json.loads(labels).get("n") == n
                assert (root / "snapshots" / str(sid) / "fs" / f"file-{n}").read_text() == n
            elif info.kind.name == "ACTIVE":
                assert (root / "snapshots" / str(sid) / "work").is_dir()
        sn.cleanup()
        dirs = set(os.listdir(root / "snapshots"))
        assert dirs == {str(r[0]) for r in rows}, f"strays after Cleanup: {dirs - {str(r[0]) for r in rows}}"
        # the store keeps working: remove leftover actives, stack one more layer
        for key, info in infos.items():
            if info.kind.name == "ACTIVE":
                sn.remove(key)
        committed = [k for k, i in infos.items() if i.kind.name == "COMMITTED"]
        top = max(committed, key=lambda k: int(k.split("-")[1])) if committed else ""
        sn.prepare("probe", top)
        sn.remove("probe")
    finally:
        sn.close()


def test_sigkill_mid_calls_leaves_old_or_new_state(tmp_path):
    root = tmp_path / "root"
    rnd = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    kills = 0
    for seed in range(1, 9):
        p = subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(seed)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.6 + rnd.random() * 0.8)  # past start-up, somewhere inside the call loop
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
            p.wait(10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == -signal.SIGKILL, p.stderr.read()
        _check_invariants(root)
    assert kills == 8
    assert any(r[1].startswith("layer-") for r in _rows(root)), "the workers never committed anything"
