"""Registry credentials through the real DaemonManager and nydusd against a real docker-registry
with htpasswd auth: the image mounts and reads, the per-daemon config holding the credentials is
0600, and no secret appears in daemon records, daemon logs or the control API's answers."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from integration.fs_support import require_stack
from integration.storage_registry import REGISTRY_BIN, LocalRegistry
from rafs import erofs
from rafs.daemon.client import DaemonClient
from rafs.daemon.manager import DaemonManager

pytestmark = [pytest.mark.fuse, pytest.mark.root]

USER, SECRET = "puller", "Sup3r-s3cret-pw-4711"
AUTH = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
REPO = "private/image"


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_credentials_are_used_but_never_exposed(tmp_path, driver):
    require_stack()
    if not REGISTRY_BIN:
        pytest.skip("docker-registry not installed")
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    from rafs.builder import build

    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(os.urandom(50_000))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    res = build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(blobs))
    reg = LocalRegistry(str(tmp_path), auth="htpasswd", users={USER: SECRET}, quiet=True)
    root = str(tmp_path / "root")
    manager = None
    try:
        reg.registry.push_blob(REPO, (blobs / res.blob_ids[0]).read_bytes(), auth=(USER, SECRET))
        cfg = {"device": {"backend": {"type": "registry", "config": {}},
                          "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}}}
        manager = DaemonManager(root, mode="shared", fs_driver=driver, nydusd_config=cfg, monitor_interval=None)
        mp = manager.mount("img1", res.bootstrap, None, {"type": "registry", "config": {
            "scheme": "http", "host": reg.host, "repo": REPO, "auth": AUTH, "retry_limit": 0}})
        assert open(os.path.join(mp, "file"), "rb").read() == (src / "file").read_bytes()
        answers = []
        for state in manager.instances().values():
            answers.append(repr(state))
        for name in os.listdir(os.path.join(root, "socket")):
            client = DaemonClient(os.path.join(root, "socket", name, "api.sock"))
            answers += [repr(client.info()), client.metrics()]
        assert not any(SECRET in a or AUTH in a for a in answers)
        holders = []
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    continue
                data = open(p, "rb").read()
                if SECRET.encode() in data or AUTH.encode() in data:
                    holders.append(os.path.relpath(p, root))
                    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
        assert holders and all(h.startswith("config" + os.sep) and h.endswith("config.json") for h in holders), holders
    finally:
        if manager is not None:
            manager.shutdown(keep_records=False)
        reg.stop()
