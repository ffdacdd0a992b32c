"""Upstream's ``PUT /api/v1/config`` (credential rotation of a running instance, what upstream's
snapshotter sends with ``credential_renewal_interval``) against a real docker-registry with
htpasswd auth, a real nydusd and real FUSE / kernel EROFS mounts: an instance mounted with a wrong
password fails its reads, the new ``registry_auth`` makes them succeed without a remount, the
answer of ``GET /api/v1/config`` never holds the secret, bad requests get precise 4xx/501 answers,
a failover successor keeps the new credentials, and ``proxy_url`` routes the instance's reads
through a forward proxy (kept by the successor too)."""

from __future__ import annotations

import base64
import os
import signal

import pytest

from integration.fs_support import require_stack
from integration.snapshotter_support import wait_for
from integration.storage_registry import REGISTRY_BIN, FaultProxy, LocalRegistry
from rafs import erofs
from rafs.daemon.client import ApiError, DaemonClient
from rafs.daemon.manager import DaemonManager

pytestmark = [pytest.mark.fuse, pytest.mark.root]

USER, SECRET = "rotator", "N3w-s3cret-after-rotation"
GOOD = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
STALE = base64.b64encode(f"{USER}:expired-password".encode()).decode()
REPO = "private/rotated"


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_registry_auth_rotates_on_a_running_instance_and_survives_failover(tmp_path, driver):
    require_stack()
    if not REGISTRY_BIN:
        pytest.skip("docker-registry not installed")
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    from rafs.builder import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir()
    files = {name: os.urandom(300_000) for name in ("first", "second", "third")}
    for name, data in files.items():
        (src / name).write_bytes(data)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    # 64 KiB chunks, no amplification: each file is fetched only when it is read
    res = build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(blobs),
                options=BuildOptions(chunk_size=0x10000))
    reg = LocalRegistry(str(tmp_path), auth="htpasswd", users={USER: SECRET})
    manager = proxy = None
    try:
        reg.registry.push_blob(REPO, (blobs / res.blob_ids[0]).read_bytes(), auth=(USER, SECRET))
        cfg = {"device": {"backend": {"type": "registry", "config": {}},
                          "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
               "amplify_io": 0}
        manager = DaemonManager(str(tmp_path / "root"), mode="shared", fs_driver=driver, nydusd_config=cfg,
                                monitor_interval=0.2, recover_policy="failover")
        mp = manager.mount("img1", res.bootstrap, None, {"type": "registry", "config": {
            "scheme": "http", "host": reg.host, "repo": REPO, "auth": STALE, "retry_limit": 0}})
        rec = next(iter(manager._records.values()))
        wait_for(lambda: manager._holders[rec.daemon_id].held, 60, "the FUSE session to reach its keeper")
        client = DaemonClient(rec.apisock)

        with pytest.raises(OSError):  # the mount's password is no longer valid
            (open(os.path.join(mp, "first"), "rb")).read()

        client.update_config("/img1", {"registry_auth": GOOD})
        assert open(os.path.join(mp, "first"), "rb").read() == files["first"]

        fingerprint = client.get_config("/img1")["registry_auth"]
        assert fingerprint.startswith("sha256:") and GOOD not in fingerprint
        everything = client.get_config()
        assert list(everything) == ["/img1:registry_auth"] and SECRET not in repr(everything)

        for body, status, word in (({"registry_auth": "%%%"}, 400, "registry_auth"),
                                   ({"colour": "blue"}, 400, "unknown config key"),
                                   ({"registry_auth": 7}, 400, "JSON object of strings"),
                                   ({"proxy_url": "ftp://x"}, 400, "proxy_url"),
                                   ({"dragonfly_scheduler_endpoint": "http://127.0.0.1:1"}, 501, "Dragonfly")):
            with pytest.raises(ApiError) as err:
                client.update_config("/img1", body)
            assert err.value.status == status and word in err.value.message, (body, err.value)
        with pytest.raises(ApiError) as err:
            client.update_config("/nothing", {"registry_auth": GOOD})
        assert err.value.status == 404
        # the refused requests changed nothing; proxy_url sends the next reads through a proxy
        proxy = FaultProxy()
        client.update_config("/img1", {"proxy_url": proxy.url})
        assert open(os.path.join(mp, "second"), "rb").read() == files["second"]
        assert proxy.blob_gets(), "proxy_url: no blob read went through the proxy"

        # a successor adopts the session and the instance with the rotated credentials, not the
        # mount's stale ones: a file never read before comes from the registry after the failover
        old_pid = rec.pid
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: manager.failovers.snapshot()[0].get("ok", 0) >= 1, 90, "the failover")
        mark, via_proxy = reg.registry.log_mark(), len(proxy.blob_gets())
        assert open(os.path.join(mp, "third"), "rb").read() == files["third"]
        assert reg.registry.blob_fetches(since=mark), "the file was not read from the registry after the failover"
        assert len(proxy.blob_gets()) > via_proxy, "the successor dropped proxy_url"
        successor = DaemonClient(next(iter(manager._records.values())).apisock)
        assert successor.get_config("/img1") == {"registry_auth": fingerprint, "proxy_url": proxy.url}
    finally:
        if manager is not None:
            manager.shutdown(keep_records=False)
        if proxy is not None:
            proxy.close()
        reg.stop()
