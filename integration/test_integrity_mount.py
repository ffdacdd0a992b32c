"""Adversarial end-to-end: a real docker-registry behind a loopback proxy that flips bytes in blob
responses, and a cache changed on disk between two mounts, under the fusedev and erofs drivers.

Rule: every read of a mounted file returns the right bytes or fails with EIO; 0 wrong bytes.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

from integration.fs_support import metric, nydusd, registry_config, require_stack
from integration.storage_registry import REGISTRY_BIN, FaultProxy, LocalRegistry
from rafs import erofs

pytestmark = [pytest.mark.fuse, pytest.mark.root]

REPO = "test/image"  # integration.fs_support.registry_config's repository
DRIVERS = ["fusedev", "erofs"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """An image of incompressible files (stored uncompressed even with zstd: a flipped byte still
    decompresses), pushed to a real registry."""
    require_stack()
    if not REGISTRY_BIN:
        pytest.skip("docker-registry not installed")
    from rafs.builder import BuildOptions, build

    work = tmp_path_factory.mktemp("integrity")
    rnd = random.Random(13)
    src = work / "src"
    src.mkdir()
    files = {f"f{i:02d}": rnd.randbytes(rnd.choice([3000, 70_000, 300_000])) for i in range(24)}
    files["big"] = rnd.randbytes(3 * 1024 * 1024 + 17)
    for name, data in files.items():
        (src / name).write_bytes(data)
    blobs = work / "blobs"
    blobs.mkdir()
    res = build(str(src), bootstrap_out=str(work / "image.boot"), blob_dir=str(blobs), options=BuildOptions())
    reg = LocalRegistry(str(work), quiet=True)
    try:
        for blob_id in res.blob_ids:
            assert reg.push_blob(REPO, (blobs / blob_id).read_bytes()) == blob_id
        yield res.bootstrap, res.blob_ids, files, reg
    finally:
        reg.stop()


@pytest.fixture
def proxy(image):
    p = FaultProxy(image[3].host)
    yield p
    p.close()


def _skip_unless(driver: str) -> None:
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")


def _read_all(mnt: str, files: dict[str, bytes]) -> tuple[int, int]:
    """Read every file; returns (files read right, files failing with EIO). A wrong byte fails."""
    ok = eio = 0
    for name, want in files.items():
        try:
            with open(os.path.join(mnt, name), "rb") as f:
                got = f.read()
        except OSError as exc:
            assert exc.errno == errno.EIO, (name, exc)
            eio += 1
            continue
        assert got == want, f"{name}: wrong bytes served"
        ok += 1
    return ok, eio


@pytest.mark.parametrize("driver", DRIVERS)
def test_flipped_registry_bytes_never_reach_a_reader(image, proxy, tmp_path, driver):
    _skip_unless(driver)
    boot, _, files, _ = image
    cfg = registry_config(proxy.host, str(tmp_path / "cache"))  # default config: digest_validate false
    with nydusd(tmp_path, bootstrap=boot, config=cfg, fs_driver=driver) as (client, mnt, proc):
        proxy.faults.extend(["corrupt"] * 10_000)  # every blob response has a flipped byte
        ok, eio = _read_all(mnt, files)
        assert eio > 0
        assert metric(client.metrics(), "nydus_storage_cache_digest_mismatches_total") >= 2
        proxy.faults.clear()
        # nothing wrong was cached: with the proxy healed every file reads right
        ok, eio = _read_all(mnt, files)
        assert (ok, eio) == (len(files), 0)
        assert proc.poll() is None
    log = (tmp_path / "n.log").read_text()
    assert "wrong data from" in log


@pytest.mark.parametrize("driver", DRIVERS)
def test_one_flipped_response_is_healed_by_the_reread(image, proxy, tmp_path, driver):
    _skip_unless(driver)
    boot, _, files, _ = image
    cfg = registry_config(proxy.host, str(tmp_path / "cache"))
    with nydusd(tmp_path, bootstrap=boot, config=cfg, fs_driver=driver) as (client, mnt, _):
        assert _read_all(mnt, {"f00": files["f00"]}) == (1, 0)  # the CI table is loaded by now
        proxy.faults.append("corrupt")
        assert _read_all(mnt, {"big": files["big"]}) == (1, 0)
        assert metric(client.metrics(), "nydus_storage_cache_digest_mismatches_total") == 1


def _tamper(cache_dir: str, blob_ids: list[str], how: str) -> None:
    path = os.path.join(cache_dir, blob_ids[0] + ".blob.data")
    size = os.path.getsize(path)
    if how == "truncate":
        os.truncate(path, size // 3)
        return
    with open(path, "r+b") as f:
        for off in (size // 5, size // 2, size - 5000):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_cache_changed_between_mounts_is_detected_and_refetched(image, proxy, tmp_path, driver, how):
    _skip_unless(driver)
    boot, blob_ids, files, _ = image
    cache = str(tmp_path / "cache")
    cfg = registry_config(proxy.host, cache)
    with nydusd(tmp_path, bootstrap=boot, config=cfg, fs_driver=driver, name="first") as (client, mnt, _):
        assert _read_all(mnt, files) == (len(files), 0)
    gets = len(proxy.blob_gets())
    _tamper(cache, blob_ids, how)
    with nydusd(tmp_path, bootstrap=boot, config=cfg, fs_driver=driver, name="second") as (client, mnt, _):
        assert _read_all(mnt, files) == (len(files), 0)
        text = client.metrics()
        if how == "flip":
            assert metric(text, "nydus_storage_cache_verify_failures_total") >= 1
        else:
            assert metric(text, "nydus_storage_cache_corrupt_resets_total") >= 1
    assert len(proxy.blob_gets()) > gets  # the damaged chunks were fetched again


@pytest.mark.parametrize("driver", DRIVERS)
def test_full_cache_disk_serves_files_uncached(image, proxy, tmp_path, driver):
    import subprocess

    _skip_unless(driver)
    boot, _, files, _ = image
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        cfg = registry_config(proxy.host, str(small / "cache"))
        with nydusd(tmp_path, bootstrap=boot, config=cfg, fs_driver=driver) as (client, mnt, _):
            assert sum(map(len, files.values())) > 4 << 20  # far more than the 1 MiB cache disk
            assert _read_all(mnt, files) == (len(files), 0)
            assert metric(client.metrics(), "nydus_storage_cache_write_failures_total") > 0
    finally:
        subprocess.run(["umount", str(small)], check=True)
