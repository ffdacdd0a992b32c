"""Helpers shared by the snapshotter's real-stack tests: live RAFS daemons and leftover mounts."""

from __future__ import annotations

import json
import os
import pathlib
import time


def wait_for(pred, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - keep polling
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def mounts_under(*dirs: str) -> list[str]:
    prefixes = tuple(d.rstrip("/") + "/" for d in dirs)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefixes)]


def live_daemons(root: str) -> dict[str, dict]:
    """``{mountpoint: GET /api/v1/daemon}`` of every RAFS daemon this snapshotter recorded that
    is alive and answers on its API socket."""
    from rafs.daemon.client import DaemonClient  # noqa: PLC0415

    out = {}
    for rec in pathlib.Path(root, "daemons").glob("*.json"):
        d = json.loads(rec.read_text())
        if not d.get("pid") or not os.path.exists(f"/proc/{d['pid']}"):
            continue
        try:
            out[d["mountpoint"]] = DaemonClient(d["apisock"], timeout=5).info()
        except Exception:  # noqa: BLE001 - a daemon that does not answer is not live
            continue
    return out


def daemon_fuse_mount(info: dict) -> str:
    """Where a daemon's own FUSE session is mounted (``GET /api/v1/daemon`` answer): its
    mountpoint under fusedev; its blob-file directory under erofs, where the image mounts are
    kernel EROFS mounts of their own and nothing is mounted at the daemon's mountpoint."""
    return info["blob_dir"] if info.get("fs_driver") == "erofs" and info.get("blob_dir") else info["mountpoint"]


def assert_no_stale_mount(sn, *dirs: str) -> None:
    """Nothing mounted under ``dirs`` except the FUSE mount of a live shared daemon that serves
    no instance any more (a shared daemon outlives its instances, as upstream's does)."""
    def leftovers() -> list[str]:
        idle = {daemon_fuse_mount(d) for d in live_daemons(sn.root).values() if not d.get("instances")}
        return [m for m in mounts_under(sn.dir, *dirs) if m not in idle]

    try:
        wait_for(lambda: leftovers() == [], 30, "no mount left")
    except AssertionError:
        raise AssertionError(f"mounts left: {leftovers()}\n{sn.log()[-3000:]}") from None
    for mp in mounts_under(sn.dir, *dirs):
        os.stat(mp)  # a live FUSE mount answers; a dead one would raise ENOTCONN


def daemon_instance_count(root: str) -> int:
    """RAFS instances served by the live daemons of the snapshotter with this root."""
    return sum(len(d.get("instances") or {}) for d in live_daemons(root).values())


def busybox_nydus_image(tmp: pathlib.Path, files: dict[str, bytes], apps: tuple[str, ...] = ("sh", "cat")):
    """A nydus image (``integration.harness.images.nydus_image``) built by this project's builder
    from a busybox rootfs with ``apps`` linked to busybox and ``files`` (``path`` → bytes)."""
    import shutil

    from integration.harness.images import nydus_image
    from rafs import builder

    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for app in apps:
        (root / "bin" / app).symlink_to("busybox")
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    builder.build(str(root), bootstrap_out=str(tmp / "image.boot"), blob_out=str(tmp / "blob"))
    return nydus_image((tmp / "image.boot").read_bytes(), [(tmp / "blob").read_bytes()])
