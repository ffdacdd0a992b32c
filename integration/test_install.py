"""misc/install.sh: wheels -> self-contained virtualenv under a prefix, CLI links, systemd unit,
logrotate, config; the installed snapshotter serves and tells systemd it is ready; uninstall
removes exactly what install added.

Installs under a temporary --root (never into this machine's /usr/local or /etc). Needs the wheels
of `misc/install.sh build` (the session's ``wheels`` fixture, integration/conftest.py: dependency
wheels and the patched pyfuse3 wheel are reused from dist/ when present, the pynydus wheel is
always rebuilt from this checkout; without them the whole build runs first, about 10 minutes).
integration/test_install_chroot.py runs the same install inside a clean Debian root."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess

import grpc
import pytest
import toml

from integration.harness.util import stop_state_root
from integration.install_support import CLIS, INSTALL, REPO, install, tree
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs Debian's /usr/bin/python3")


def test_install_serve_upgrade_uninstall(wheels, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    install(root, wheels, "install")
    prefix = root / "opt" / "pynydus"
    for cli in CLIS:
        link = root / "usr" / "local" / "bin" / cli
        assert os.readlink(link) == f"/opt/pynydus/bin/{cli}"
        assert os.access(prefix / "bin" / cli, os.X_OK)
    py = prefix / "bin" / "python"
    assert subprocess.run([str(py), "-c", "import pyfuse3; assert pyfuse3.READ_INO_WITHOUT_FH"]).returncode == 0
    for cli in CLIS:  # every entry point starts from the prefix alone (not from this checkout)
        r = subprocess.run([str(prefix / "bin" / cli), "--help"], capture_output=True, text=True, cwd="/",
                           env={"PATH": "/usr/bin:/bin"}, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (cli, r.stderr[-2000:])
    loc = subprocess.run([str(py), "-c", "import snapshotter; print(snapshotter.__file__)"], capture_output=True,
                         text=True, cwd="/", env={}).stdout
    assert loc.startswith(str(prefix))

    unit = (root / "etc/systemd/system/nydus-snapshotter.service").read_text()
    assert "ExecStart=/opt/pynydus/bin/nydus-snapshotter --config /etc/nydus/config.toml" in unit
    doc = unit.split("Documentation=file:", 1)[1].split("\n", 1)[0]
    assert (root / doc.lstrip("/")).is_file() and "@" not in unit
    cfg = toml.loads((root / "etc/nydus/config.toml").read_text())
    assert (root / "etc/nydus/config.toml").read_text() == (REPO / "config.toml.example").read_text()
    assert f"{cfg['root']}/logs/*/nydusd.log {{" in (root / "etc/logrotate.d/nydus-snapshotter").read_text()

    # the installed snapshotter serves and sends READY=1 (Type=notify) once its socket listens
    sock, notify = tmp_path / "s.sock", tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify))
        ns.settimeout(60)
        p = subprocess.Popen([str(prefix / "bin/nydus-snapshotter"), "--root", str(tmp_path / "state"),
                              "--address", str(sock)], cwd="/", env={"PATH": "/usr/bin:/bin",
                                                                      "NOTIFY_SOCKET": str(notify)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert ns.recv(4096).startswith(b"READY=1\n")
            with grpc.insecure_channel(f"unix:{sock}") as ch:
                pb_grpc.SnapshotsStub(ch).Prepare(pb.PrepareSnapshotRequest(key="a"), timeout=10)
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=30) == 0
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
            stop_state_root(str(tmp_path / "state"))  # the shared nydusd outlives its snapshotter

    # upgrade in place keeps an edited config; uninstall keeps config, removes everything else
    (root / "etc/nydus/config.toml").write_text((REPO / "config.toml.example").read_text() + "\n# edited\n")
    install(root, wheels, "install")
    assert (root / "etc/nydus/config.toml").read_text().endswith("# edited\n")
    r = subprocess.run([str(INSTALL), "uninstall", "--root", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert tree(root) == ["etc", "etc/nydus", "etc/nydus/config.toml"]
    r = subprocess.run([str(INSTALL), "uninstall", "--root", str(root)], capture_output=True, text=True)
    assert r.returncode == 1 and "nothing installed" in r.stderr


def test_uninstall_purge_leaves_an_empty_root_and_install_never_clobbers(wheels, tmp_path):
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/nydusd").write_text("someone else's\n")
    r = subprocess.run([str(INSTALL), "install", "--root", str(root), "--dist", str(wheels)], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "usr/local/bin/nydusd exists" in r.stderr
    assert tree(root) == ["usr", "usr/local", "usr/local/bin", "usr/local/bin/nydusd"]
    shutil.rmtree(root / "usr")
    install(root, wheels, "install")
    state = root / toml.loads((root / "etc/nydus/config.toml").read_text())["root"].lstrip("/")
    (state / "logs").mkdir(parents=True)
    r = subprocess.run([str(INSTALL), "uninstall", "--purge", "--root", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert tree(root) == ["var", "var/lib", "var/lib/containerd"]  # the state root's parents are not ours
