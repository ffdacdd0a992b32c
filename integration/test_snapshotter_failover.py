"""``[daemon] recover_policy = "failover"`` through real containerd + runc: a container streams
and md5s files of a lazily-read nydus image while its nydusd is SIGKILLed several times at random
moments; the snapshotter's fd holder keeps the FUSE connection, the liveness monitor starts an
``--upgrade`` successor, and the container sees no read error and right md5s (fusedev and erofs)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import threading
import time

import pytest

from integration.harness.images import nydus_image
from integration.test_snapshotter_containerd import SNAPSHOTTER, kill_recorded_daemons

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.timeout(400)]

N_FILES = 48
KILLS = 5


def _image(tmp: pathlib.Path):
    from rafs import builder

    root = tmp / "rootfs"
    for d in ("bin", "etc", "tmp", "data"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for app in ("sh", "cat", "echo", "sleep", "md5sum", "seq"):
        (root / "bin" / app).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    rnd = random.Random(14)
    sums = {}
    for i in range(N_FILES):
        data = rnd.randbytes(512 * 1024 + i * 4096)
        (root / "data" / f"f{i:02d}").write_bytes(data)
        sums[f"/data/f{i:02d}"] = hashlib.md5(data).hexdigest()
    res = builder.build(str(root), bootstrap_out=str(tmp / "image.boot"), blob_out=str(tmp / "blob"))
    assert res.blob_ids
    return nydus_image((tmp / "image.boot").read_bytes(), [(tmp / "blob").read_bytes()]), sums


def _daemon_pid(root: str) -> int:
    for rec in pathlib.Path(root, "daemons").glob("*.json"):
        pid = int(json.loads(rec.read_text()).get("pid", 0))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if root.encode() in f.read():
                    return pid
        except OSError:
            continue
    return 0


@pytest.mark.parametrize("fs_driver", ["fusedev", "erofs"])
def test_container_reads_through_repeated_nydusd_sigkill(registry, snapshotter_factory, containerd_factory,
                                                         tmp_path, fs_driver):
    from integration.conftest import snapshotter_config_for

    cfg = snapshotter_config_for(registry)
    cfg["daemon"] = {"daemon_mode": "shared", "fs_driver": fs_driver, "recover_policy": "failover"}
    sn = snapshotter_factory(config=cfg)
    cd = containerd_factory(snapshotters={SNAPSHOTTER: sn.address}, cri_snapshotter=SNAPSHOTTER,
                            registries=[registry])
    try:
        img, sums = _image(tmp_path)
        image = img.push(registry, "test/failover", fs_driver)
        cd.cri.pull_image(image.ref)
        # every file once (first reads go to the daemon and the registry), slowly, then again
        script = ("for r in 1 2; do for i in $(seq -w 0 %d); do "
                  "md5sum /data/f$i 2>&1 || echo ERR /data/f$i; sleep 0.2; done; done; echo DONE") % (N_FILES - 1)
        result = {}

        def run():
            result["p"] = cd.run(image.ref, ["/bin/sh", "-c", script], snapshotter=SNAPSHOTTER,
                                 namespace="k8s.io", check=False, timeout=300)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 60
        while not _daemon_pid(sn.root) or not any(pathlib.Path(sn.root, "supervisor").glob("*.sock")):
            assert time.monotonic() < deadline, "no nydusd started"
            time.sleep(0.1)
        time.sleep(1.0)
        killed = []
        rnd = random.Random()
        for _ in range(KILLS):
            pid = _daemon_pid(sn.root)
            if pid and pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            deadline = time.monotonic() + 60  # the successor is up before the next kill
            while _daemon_pid(sn.root) in (0, pid):
                assert time.monotonic() < deadline, f"no successor after killing {pid}\n{sn.log()[-3000:]}"
                time.sleep(0.05)
            time.sleep(rnd.uniform(0.5, 2.5))
        t.join(320)
        p = result["p"]
        out = p.stdout
        assert "DONE" in out, (p.returncode, out[-2000:], p.stderr[-2000:])
        assert "ERR" not in out and "rror" not in out, out
        lines = [line.split() for line in out.splitlines() if line.startswith(tuple("0123456789abcdef"))]
        assert len(lines) == 2 * N_FILES
        for md5, path in lines:
            assert sums[path] == md5, path
        log = sn.log()
        assert log.count("failover of daemon") >= len(killed) and "restarting it instead" not in log, log[-3000:]
        assert len(killed) == KILLS
    finally:
        keep = os.environ.get("FAILOVER_TEST_ARTIFACTS")  # keep the logs for a post-mortem
        if keep:
            shutil.copytree(os.path.join(sn.root, "logs"), os.path.join(keep, fs_driver, "logs"), dirs_exist_ok=True)
            shutil.copy(sn.log_path, os.path.join(keep, fs_driver, "snapshotter.log"))
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)
