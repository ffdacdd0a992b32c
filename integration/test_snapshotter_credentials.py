"""Private registry (htpasswd) whose credentials only a docker credential helper knows, end to end:
``nydusify convert`` pulls and pushes through the helper, containerd pulls the converted image
through our snapshotter (data blobs never downloaded at pull time), the snapshotter's RAFS daemon
reads lazily with the helper's credentials, and the container runs. No secret in any log."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from integration.conftest import HELLO, snapshotter_config_for
from integration.harness.images import busybox_image
from integration.test_snapshotter_containerd import kill_recorded_daemons
from rafs.convert.cli import main as nydusify

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.timeout(300)]

USER, SECRET = "alice", "helper-only-s3cret"


def install_helper(tmp: pathlib.Path, host: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """``docker-credential-test`` (knows ``host`` only) and a docker config naming it:
    (bin dir, docker config dir, helper call log)."""
    bindir, confdir, calls = tmp / "bin", tmp / "docker", tmp / "helper-calls.log"
    bindir.mkdir()
    confdir.mkdir()
    helper = bindir / "docker-credential-test"
    answer = json.dumps({"ServerURL": host, "Username": USER, "Secret": SECRET})
    helper.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
read -r url
echo "$url" >> {calls}
if [ "$url" = "{host}" ]; then echo '{answer}'; exit 0; fi
echo "credentials not found in native keychain"; exit 1
""")
    helper.chmod(0o755)
    # the host is only known through the helper: no auths entry carries a secret
    (confdir / "config.json").write_text(json.dumps({"auths": {host: {}}, "credHelpers": {host: "test"}}))
    return bindir, confdir, calls


def test_private_registry_through_credential_helper(registry_factory, snapshotter_factory, containerd_factory,
                                                    tmp_path, monkeypatch):
    if not os.path.exists("/bin/busybox"):
        pytest.skip("/bin/busybox missing (Debian package busybox-static)")
    reg = registry_factory(users={USER: SECRET})
    bindir, confdir, calls = install_helper(tmp_path, reg.host)
    source = busybox_image({"etc/hello.txt": HELLO}).push(reg, "test/busybox", "v1", auth=reg.auth)
    target = f"{reg.host}/test/busybox:v1-nydus"

    # nydusify: credentials from the helper (DOCKER_CONFIG names the config, PATH has the helper)
    monkeypatch.setenv("DOCKER_CONFIG", str(confdir))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    assert nydusify(["convert", "--source", source.ref, "--target", target, "--source-insecure",
                     "--target-insecure", "--work-dir", str(tmp_path / "work"), "--no-progress"]) == 0
    assert calls.read_text().split().count(reg.host) >= 1, "nydusify did not ask the helper"
    manifest = json.loads(reg.get_manifest("test/busybox", "v1-nydus", auth=reg.auth)[0])
    blobs = [layer["digest"] for layer in manifest["layers"][:-1]]
    assert blobs

    # the snapshotter: same helper, found through its [remote] docker_config
    cfg = snapshotter_config_for(reg)
    cfg["remote"]["docker_config"] = str(confdir / "config.json")
    sn = snapshotter_factory(config=cfg, env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
    cd = containerd_factory(snapshotters={"nydus": sn.address}, cri_snapshotter="nydus", registries=[reg])
    try:
        calls.write_text("")
        mark = reg.log_mark()
        cd.cri.pull_image(target)
        for digest in blobs:
            assert not [e for e in reg.blob_fetches(digest, since=mark) if e.status == 200], \
                "a nydus data blob was downloaded whole at pull time"
        out = cd.run(target, ["/bin/cat", "/etc/hello.txt"], snapshotter="nydus", namespace="k8s.io").stdout
        assert out == HELLO.decode()
        assert any(reg.blob_fetches(d, since=mark) for d in blobs), "no authenticated lazy read"
        # nydusd took the auth challenge when the instance was mounted (the backend warm-up), so
        # its first blob read went out authenticated, without a 401 round trip
        assert not [e for e in reg.access_log()[mark:] if e.blob_digest in blobs and e.status == 401]
        assert reg.host in calls.read_text().split(), "the snapshotter did not ask the helper"
        logs = sn.log() + "".join(p.read_text(errors="replace")
                                  for p in pathlib.Path(sn.root, "logs").glob("**/*") if p.is_file())
        assert SECRET not in logs
    finally:
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)


def test_private_registry_through_kubelet_credential_provider(registry_factory, snapshotter_factory,
                                                             containerd_factory, tmp_path, monkeypatch):
    """The snapshotter gets the registry's credentials only from a kubelet exec credential provider
    (``[remote.auth]``); the docker config it could see knows nothing."""
    if not os.path.exists("/bin/busybox"):
        pytest.skip("/bin/busybox missing (Debian package busybox-static)")
    import sys

    reg = registry_factory(users={USER: SECRET})
    bindir, confdir, _ = install_helper(tmp_path, reg.host)
    source = busybox_image({"etc/hello.txt": HELLO}).push(reg, "test/busybox", "v1", auth=reg.auth)
    target = f"{reg.host}/test/busybox:v1-nydus"
    monkeypatch.setenv("DOCKER_CONFIG", str(confdir))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    assert nydusify(["convert", "--source", source.ref, "--target", target, "--source-insecure",
                     "--target-insecure", "--work-dir", str(tmp_path / "work"), "--no-progress"]) == 0

    plugdir, calls = tmp_path / "plugins", tmp_path / "provider-calls.log"
    plugdir.mkdir()
    plugin = plugdir / "test-provider"
    plugin.write_text(f"""#!{sys.executable}
import json, sys
req = json.load(sys.stdin)
open({str(calls)!r}, "a").write(req["image"] + "\\n")
json.dump({{"apiVersion": req["apiVersion"], "kind": "CredentialProviderResponse", "cacheKeyType": "Registry",
           "cacheDuration": "5m", "auth": {{{reg.host!r}: {{"username": {USER!r}, "password": {SECRET!r}}}}}}}, sys.stdout)
""")
    plugin.chmod(0o755)
    provcfg = tmp_path / "providers.json"
    provcfg.write_text(json.dumps({"apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig",
                                   "providers": [{"name": "test-provider", "matchImages": [reg.host],
                                                  "defaultCacheDuration": "1m",
                                                  "apiVersion": "credentialprovider.kubelet.k8s.io/v1"}]}))
    empty = tmp_path / "empty-docker"
    empty.mkdir()
    cfg = snapshotter_config_for(reg)
    cfg["remote"]["docker_config"] = str(empty / "config.json")
    cfg["remote"]["auth"] = {"enable_kubelet_credential_providers": True,
                             "credential_provider_config": str(provcfg),
                             "credential_provider_bin_dir": str(plugdir)}
    sn = snapshotter_factory(config=cfg, env={"DOCKER_CONFIG": str(empty)})
    cd = containerd_factory(snapshotters={"nydus": sn.address}, cri_snapshotter="nydus", registries=[reg])
    try:
        cd.cri.pull_image(target)
        out = cd.run(target, ["/bin/cat", "/etc/hello.txt"], snapshotter="nydus", namespace="k8s.io").stdout
        assert out == HELLO.decode()
        assert target in calls.read_text().split(), "the snapshotter did not ask the provider"
        logs = sn.log() + "".join(p.read_text(errors="replace")
                                  for p in pathlib.Path(sn.root, "logs").glob("**/*") if p.is_file())
        assert SECRET not in logs
    finally:
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)


def test_rotated_password_reaches_a_running_container_through_credential_renewal(
        registry_factory, snapshotter_factory, containerd_factory, tmp_path):
    """``[remote.auth] credential_renewal_interval`` (upstream's): the registry password is rotated
    while a container runs (htpasswd rewritten, the credential helper answers the new one); the
    snapshotter's renewal hands the new credentials to the running nydusd (``PUT
    /api/v1/config``) and the container's first read of a file after the rotation succeeds."""
    import hashlib
    import random
    import threading

    from integration.harness.registry import htpasswd_line
    from integration.snapshotter_support import busybox_nydus_image, wait_for

    if not os.path.exists("/bin/busybox"):
        pytest.skip("/bin/busybox missing (Debian package busybox-static)")
    old, new = "before-rotation-pw", "after-rotation-pw"
    reg = registry_factory(users={USER: old})
    bindir, confdir, secret_file = tmp_path / "bin", tmp_path / "docker", tmp_path / "helper-secret"
    bindir.mkdir()
    confdir.mkdir()
    secret_file.write_text(old)
    helper = bindir / "docker-credential-rotating"
    helper.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
read -r url
[ "$url" = "{reg.host}" ] || {{ echo "credentials not found in native keychain"; exit 1; }}
printf '{{"ServerURL": "%s", "Username": "{USER}", "Secret": "%s"}}\\n' "$url" "$(cat {secret_file})"
""")
    helper.chmod(0o755)
    (confdir / "config.json").write_text(json.dumps({"auths": {reg.host: {}}, "credHelpers": {reg.host: "rotating"}}))

    rnd = random.Random(15)  # 3 MiB each: amplification cannot fetch "after" with "before"
    files = {f"data/{name}": rnd.randbytes(3 << 20) for name in ("before", "after")}
    sums = {name: hashlib.md5(files[f"data/{name}"]).hexdigest() for name in ("before", "after")}
    image = busybox_nydus_image(tmp_path, files, ("sh", "md5sum", "sleep", "cat")).push(
        reg, "test/rotating", "v1", auth=reg.auth)

    cfg = snapshotter_config_for(reg, prefetch=False)
    cfg["remote"]["docker_config"] = str(confdir / "config.json")
    cfg["remote"]["auth"] = {"credential_renewal_interval": "1s"}
    sn = snapshotter_factory(config=cfg, env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
    cd = containerd_factory(snapshotters={"nydus": sn.address}, cri_snapshotter="nydus", registries=[reg])
    try:
        cd.cri.pull_image(image.ref)
        mark = reg.log_mark()
        # the first file read whole before the rotation, its sum left in the container's upper dir
        script = "md5sum /data/before > /before.md5; sleep 8; cat /before.md5; md5sum /data/after 2>&1 || echo ERR; echo DONE"
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("p", cd.run(
            image.ref, ["/bin/sh", "-c", script], snapshotter="nydus", namespace="k8s.io", check=False, timeout=120)))
        t.start()
        wait_for(lambda: [p for p in pathlib.Path(sn.root, "snapshots").glob("*/fs/before.md5") if p.stat().st_size],
                 60, "the container to read /data/before", interval=0.05)
        assert [e for e in reg.access_log()[mark:] if e.blob_digest and e.status in (200, 206)]
        # rotate: the registry only takes the new password from now on (docker-registry reloads its
        # htpasswd file), the helper answers the new one
        with open(os.path.join(reg.dir, "htpasswd"), "w") as f:
            f.write(htpasswd_line(USER, new) + "\n")
        secret_file.write_text(new)
        rotated = reg.log_mark()
        t.join(150)
        p = result["p"]
        assert "DONE" in p.stdout, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
        lines = dict(reversed(line.split()) for line in p.stdout.splitlines() if line.startswith(tuple("0123456789abcdef")))
        assert lines == {"/data/before": sums["before"], "/data/after": sums["after"]}, p.stdout
        assert "ERR" not in p.stdout
        assert [e for e in reg.access_log()[rotated:] if e.blob_digest and e.status in (200, 206)], \
            "no blob read after the rotation"
        log = sn.log()
        assert "renewed from docker" in log, log[-3000:]
        assert new not in log and old not in log
    finally:
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)
