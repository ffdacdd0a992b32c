"""The snapshotter behind a real containerd 1.6 (proxy plugin), registry and runc.

Covers: a plain OCI image pulled (``ctr image pull``) and run with runc through this snapshotter;
CRI ``PullImage`` of a nydus-annotated image (data layers answered with ALREADY_EXISTS and never
downloaded by containerd, the bootstrap layer unpacked and validated); bad input (garbage labels,
bad keys, missing parents, a "bootstrap" layer that is not one, an unreachable registry) giving
precise errors while the service keeps serving.

The fixtures here are self-contained (registry, containerd, snapshotter, images pushed with the
registry HTTP API). Everything is started by PID and stopped by PID; mounts under the test's
tmp dir are unmounted on teardown.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid

import grpc
import pytest

from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from protos.cri import api_pb2 as cri
from protos.cri import api_pb2_grpc as cri_grpc

REPO = pathlib.Path(__file__).resolve().parent.parent
SNAPSHOTTER = "nydus"
NYDUS_BLOB_MEDIA_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.timeout(300)]


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (containerd, mounts)")
    missing = [b for b in ("containerd", "ctr", "runc", "docker-registry", "busybox") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"missing binaries: {', '.join(missing)}")
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            pytest.skip("kernel has no overlayfs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: pathlib.Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - keep polling
            pass
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def stop_pid(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- registry + images


class Registry:
    def __init__(self, base: pathlib.Path) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        cfg = base / "registry.yml"
        cfg.write_text("version: 0.1\nlog: {level: info}\nstorage:\n  filesystem:\n"
                       f"    rootdirectory: {base / 'data'}\n  delete: {{enabled: true}}\n"
                       f"http:\n  addr: {self.host}\n")
        self.log = base / "registry.log"
        self.proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).status == 200, 20,
                 "registry", self.proc, self.log)

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/blobs/uploads/", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as r:
            loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = f"http://{self.host}{loc}"
        sep = "&" if "?" in loc else "?"
        put = urllib.request.Request(f"{loc}{sep}digest={digest}", method="PUT", data=data,
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(put, timeout=10) as r:
            assert r.status == 201
        return digest

    def push_image(self, repo: str, tag: str, layers: list[tuple[bytes, str, str, dict]]) -> str:
        """layers: (blob bytes, media type, diff_id, annotations); returns the image reference."""
        descs = []
        for blob, media_type, _diff, ann in layers:
            d = {"mediaType": media_type, "digest": self.push_blob(repo, blob), "size": len(blob)}
            if ann:
                d["annotations"] = ann
            descs.append(d)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
                             "rootfs": {"type": "layers", "diff_ids": [d for _, _, d, _ in layers]}}).encode()
        cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": self.push_blob(repo, config),
                 "size": len(config)}
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": cdesc, "layers": descs}).encode()
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{tag}", method="PUT", data=manifest,
                                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 201
        return f"{self.host}/{repo}:{tag}"

    def blob_gets(self, digest: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines()
                if f"/blobs/{digest}" in line and ('"GET ' in line or "method=GET" in line)]


def tar_layer(files: dict[str, bytes | tuple[str, str]]) -> tuple[bytes, str]:
    """A gzip'd tar: name → bytes (file, 0755) or ("symlink", target). Returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(pathlib.PurePosixPath(n).parent) for n in files} - {"."})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(ti)
        for name, content in files.items():
            ti = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                ti.type, ti.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(ti)
            else:
                ti.size, ti.mode = len(content), 0o755
                tar.addfile(ti, io.BytesIO(content))
    data = raw.getvalue()
    return gzip.compress(data, mtime=0), "sha256:" + hashlib.sha256(data).hexdigest()


def busybox_layers() -> list[tuple[bytes, str, str, dict]]:
    bb = pathlib.Path(shutil.which("busybox")).read_bytes()
    files: dict[str, bytes | tuple[str, str]] = {"bin/busybox": bb}
    for app in ("sh", "cat", "ls", "echo", "id", "mount", "sleep", "true", "touch", "rm"):
        files[f"bin/{app}"] = ("symlink", "busybox")
    files.update({"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n", "etc/group": b"root:x:0:\n",
                  "etc/probe.txt": b"hello from layer one\n", "tmp/.keep": b""})
    l1, d1 = tar_layer(files)
    l2, d2 = tar_layer({"etc/layer2.txt": b"second layer file\n"})
    return [(l1, LAYER_MEDIA_TYPE, d1, {}), (l2, LAYER_MEDIA_TYPE, d2, {})]


# ----------------------------------------------------------------------------- services


class SnapshotterProc:
    def __init__(self, base: pathlib.Path, registry_host: str) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.root = base / "root"
        self.address = base / "sn.sock"
        self.config = base / "config.toml"
        self.config.write_text(f'version = 1\n[remote]\ninsecure_registries = ["{registry_host}"]\n'
                               'connect_timeout = 2\n[log]\nlevel = "debug"\n')
        self.log = base / "snapshotter.log"
        self.start()

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-m", "snapshotter", "--config", str(self.config),
                                      "--root", str(self.root), "--address", str(self.address)],
                                     cwd=REPO, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(self.address.exists, 30, "snapshotter socket", self.proc, self.log)

    def stub(self) -> tuple[grpc.Channel, pb_grpc.SnapshotsStub]:
        ch = grpc.insecure_channel(f"unix:{self.address}")
        return ch, pb_grpc.SnapshotsStub(ch)

    def list(self) -> list[pb.Info]:
        ch, stub = self.stub()
        with ch:
            return [i for r in stub.List(pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER)) for i in r.info]


class Containerd:
    def __init__(self, base: pathlib.Path, snapshotter_sock: pathlib.Path, registry_host: str) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.address = base / "state" / "containerd.sock"
        (base / "cni").mkdir(exist_ok=True)
        cfg = base / "containerd.toml"
        cfg.write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  level = "debug"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{base / 'root' / 'opt'}"
  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{SNAPSHOTTER}"
      disable_snapshot_annotations = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{base / 'cni'}"
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry_host}"]
      endpoint = ["http://{registry_host}"]
[proxy_plugins]
  [proxy_plugins.{SNAPSHOTTER}]
    type = "snapshot"
    address = "{snapshotter_sock}"
""")
        self.log = base / "containerd.log"
        self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: self.ctr("version", check=False).returncode == 0, 30, "containerd", self.proc, self.log)

    def ctr(self, *args: str, ns: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = ["ctr", "--address", str(self.address)] + (["-n", ns] if ns else []) + list(args)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def cri_pull(self, image: str) -> str:
        with grpc.insecure_channel(f"unix:{self.address}") as ch:
            return cri_grpc.ImageServiceStub(ch).PullImage(
                cri.PullImageRequest(image=cri.ImageSpec(image=image)), timeout=120).image_ref

    def stop(self, namespaces: list[str]) -> None:
        for ns in namespaces:
            p = self.ctr("tasks", "ls", "-q", ns=ns, check=False)
            for task in p.stdout.split():
                self.ctr("tasks", "kill", "-s", "KILL", task, ns=ns, check=False)
                time.sleep(0.2)
                self.ctr("tasks", "rm", "-f", task, ns=ns, check=False)
            p = self.ctr("containers", "ls", "-q", ns=ns, check=False)
            for c in p.stdout.split():
                self.ctr("containers", "rm", c, ns=ns, check=False)
        stop_pid(self.proc)
        for d in pathlib.Path("/sys/fs/cgroup").glob("*"):
            for ns in namespaces:
                try:
                    (d / ns).rmdir()
                except OSError:
                    pass


def unmount_under(path: pathlib.Path) -> None:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for mp in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


@pytest.fixture
def env(tmp_path_factory):
    _require()
    base = tmp_path_factory.mktemp("sncd")
    ns = f"sntest-{uuid.uuid4().hex[:8]}"
    started: list = []
    try:
        reg = Registry(base / "reg")
        started.append(reg)
        sn = SnapshotterProc(base / "sn", reg.host)
        started.append(sn)
        cd = Containerd(base / "cd", sn.address, reg.host)
        started.append(cd)
        yield reg, sn, cd, ns
    finally:
        for obj in reversed(started):
            if isinstance(obj, Containerd):
                obj.stop([ns, "k8s.io"])
            else:
                stop_pid(obj.proc)
        unmount_under(base)


def run_ok(cd: Containerd, ns: str, image: str, cid: str, script: str) -> str:
    p = cd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, image, cid, "/bin/sh", "-c", script, ns=ns)
    return p.stdout


# ----------------------------------------------------------------------------- tests


def test_plain_oci_image_pull_run_and_gc(env):
    reg, sn, cd, ns = env
    image = reg.push_image("test/busybox", "v1", busybox_layers())
    cd.ctr("image", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, image, ns=ns)
    committed = [i for i in sn.list() if i.kind == pb.COMMITTED]
    assert len(committed) == 2
    out = run_ok(cd, ns, image, "c1", "cat /etc/probe.txt /etc/layer2.txt; echo written > /tmp/x; cat /tmp/x; "
                                      "mount | head -1")
    assert "hello from layer one" in out and "second layer file" in out and "written" in out
    assert "overlay on / type overlay" in out and str(sn.root) in out
    # a second container sees the image, not the first container's writes
    out = run_ok(cd, ns, image, "c2", "cat /tmp/x 2>&1 || echo absent")
    assert "absent" in out
    # image removal + synchronous GC removes our snapshots and their directories
    cd.ctr("image", "rm", "--sync", image, ns=ns)
    wait_for(lambda: sn.list() == [], 20, "snapshots garbage-collected")
    assert os.listdir(sn.root / "snapshots") == []


def _nydus_image(reg: Registry, bootstrap: bytes, *, tag: str, data_blob: bytes) -> tuple[str, str]:
    """A 2-layer nydus-shaped image: one data blob + a bootstrap layer (image/image.boot)."""
    blob_digest = "sha256:" + hashlib.sha256(data_blob).hexdigest()
    meta, meta_diff = tar_layer({"image/image.boot": bootstrap})
    image = reg.push_image("test/nydus", tag, [
        (data_blob, NYDUS_BLOB_MEDIA_TYPE, blob_digest, {"containerd.io/snapshot/nydus-blob": "true"}),
        (meta, LAYER_MEDIA_TYPE, meta_diff, {"containerd.io/snapshot/nydus-bootstrap": "true"}),
    ])
    return image, blob_digest


def test_cri_pull_of_nydus_image_skips_data_layers(env, vectors_dir):
    reg, sn, cd, _ns = env
    boot = vectors_dir / "dragonflyoss-nydus" / "tests" / "texture" / "bootstrap" / "rafs-v6-2.2.boot"
    if not boot.is_file():
        pytest.skip("bootstrap vector missing")
    data_blob = os.urandom(64 * 1024)  # not a tar: containerd must never try to apply it
    image, blob_digest = _nydus_image(reg, boot.read_bytes(), tag="v1", data_blob=data_blob)
    cd.cri_pull(image)
    assert reg.blob_gets(blob_digest) == [], "containerd downloaded a nydus data blob"
    infos = {i.name: i for i in sn.list()}
    data = [i for i in infos.values() if i.labels.get("containerd.io/snapshot/nydus-blob") == "true"]
    meta = [i for i in infos.values() if i.labels.get("containerd.io/snapshot/nydus-bootstrap") == "true"]
    assert len(data) == 1 and len(meta) == 1
    assert data[0].kind == pb.COMMITTED and data[0].labels["containerd.io/snapshot/cri.image-ref"] == image
    assert data[0].name == data[0].labels["containerd.io/snapshot.ref"]  # committed under the chain id
    assert meta[0].parent == data[0].name
    # the bootstrap landed where the snapshotter looks for it
    boots = list((sn.root / "snapshots").glob("*/fs/image/image.boot"))
    assert len(boots) == 1 and boots[0].read_bytes() == boot.read_bytes()
    # a second pull of the same image is served from the snapshots (CRI: already present)
    cd.cri_pull(image)
    assert reg.blob_gets(blob_digest) == []


def test_bad_input_precise_errors_and_service_keeps_serving(env, vectors_dir):
    reg, sn, cd, ns = env
    ch, stub = sn.stub()
    with ch:
        def code(fn, req):
            try:
                fn(req)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
            raise AssertionError("expected an error")

        c, m = code(stub.Prepare, pb.PrepareSnapshotRequest(key="k", parent="no-such-parent"))
        assert c == grpc.StatusCode.NOT_FOUND and "no-such-parent" in m
        for key in ("", "a/../b", "x\0y"):
            assert code(stub.Prepare, pb.PrepareSnapshotRequest(key=key))[0] == grpc.StatusCode.INVALID_ARGUMENT
        c, m = code(stub.Prepare, pb.PrepareSnapshotRequest(
            key="k", labels={"containerd.io/snapshot/nydus-blob": "\u2603garbage"}))
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "nydus-blob" in m
        c, m = code(stub.Prepare, pb.PrepareSnapshotRequest(
            key="k", labels={"containerd.io/snapshot/cri.image-ref": "not a ref"}))
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "image reference" in m
        c, _ = code(lambda r: list(stub.List(r)), pb.ListSnapshotsRequest(filters=['labels."unterminated']))
        assert c == grpc.StatusCode.INVALID_ARGUMENT
        # unknown labels are accepted and kept
        stub.Prepare(pb.PrepareSnapshotRequest(key="k", labels={"x.example/\u2603": "\u2603"}))
        stub.Remove(pb.RemoveSnapshotRequest(key="k"))

    # through containerd: a layer that claims to be a nydus bootstrap but is not one
    fake, fake_diff = tar_layer({"etc/not-a-bootstrap": b"hello"})
    bad = reg.push_image("test/badboot", "v1", [
        (fake, LAYER_MEDIA_TYPE, fake_diff, {"containerd.io/snapshot/nydus-bootstrap": "true"})])
    with pytest.raises(grpc.RpcError) as ei:
        cd.cri_pull(bad)
    assert "image/image.boot" in ei.value.details() and "invalid argument" in ei.value.details()
    garbage, garbage_diff = tar_layer({"image/image.boot": b"garbage" * 1000})
    bad2 = reg.push_image("test/badboot", "v2", [
        (garbage, LAYER_MEDIA_TYPE, garbage_diff, {"containerd.io/snapshot/nydus-bootstrap": "true"})])
    with pytest.raises(grpc.RpcError) as ei:
        cd.cri_pull(bad2)
    assert "bootstrap" in ei.value.details() and "invalid argument" in ei.value.details()

    # an unreachable registry: the container's Prepare fails with UNAVAILABLE, precisely
    boot = vectors_dir / "dragonflyoss-nydus" / "tests" / "texture" / "bootstrap" / "rafs-v6-2.2.boot"
    if boot.is_file():
        image, _ = _nydus_image(reg, boot.read_bytes(), tag="v9", data_blob=os.urandom(4096))
        cd.cri_pull(image)
        plain = reg.push_image("test/busybox", "v1", busybox_layers())
        cd.ctr("image", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, plain, ns=ns)
        stop_pid(reg.proc)
        p = cd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, image, "nydus-c1", "/bin/true",
                   ns="k8s.io", check=False)
        assert p.returncode != 0
        assert "unreachable" in p.stderr and "unavailable" in p.stderr, p.stderr
        # ... and the service still serves: a plain image runs fine
        out = run_ok(cd, ns, plain, "after-errors", "cat /etc/probe.txt")
        assert "hello from layer one" in out
    assert sn.proc.poll() is None


def test_snapshotter_restart_under_containerd(env):
    reg, sn, cd, ns = env
    image = reg.push_image("test/busybox", "v1", busybox_layers())
    cd.ctr("image", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, image, ns=ns)
    cd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, image, "long", "/bin/sleep", "60", ns=ns)
    sn.proc.kill()  # kill -9: no clean shutdown
    sn.proc.wait()
    sn.start()
    # containerd reconnects; the running container's rootfs is untouched; new containers work
    wait_for(lambda: cd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", ns=ns, check=False).returncode == 0,
             20, "containerd reconnect")
    p = cd.ctr("tasks", "exec", "--exec-id", "e1", "long", "/bin/cat", "/etc/probe.txt", ns=ns)
    assert "hello from layer one" in p.stdout
    out = run_ok(cd, ns, image, "second", "cat /etc/layer2.txt")
    assert "second layer file" in out


def _built_nydus_image(reg: Registry, tmp: pathlib.Path, tag: str) -> tuple[str, str, str]:
    """A real nydus image made by this project's builder from a busybox rootfs.

    Returns (image ref, blob digest, bootstrap path)."""
    builder = pytest.importorskip("rafs.builder", reason="rafs.builder not available")
    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "tmp").mkdir()
    shutil.copy(shutil.which("busybox"), root / "bin" / "busybox")
    for app in ("sh", "cat", "ls", "echo", "sleep", "true", "md5sum"):
        (root / "bin" / app).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "probe.txt").write_text("hello from a nydus image\n")
    res = builder.build(str(root), bootstrap_out=str(tmp / "image.boot"), blob_out=str(tmp / "blob"))
    blob = (tmp / "blob").read_bytes()
    blob_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert res.blob_ids == [blob_digest.split(":", 1)[1]], "builder blob id must be the blob's sha256"
    meta, meta_diff = tar_layer({"image/image.boot": (tmp / "image.boot").read_bytes()})
    image = reg.push_image("test/built", tag, [
        (blob, NYDUS_BLOB_MEDIA_TYPE, blob_digest, {"containerd.io/snapshot/nydus-blob": "true"}),
        (meta, LAYER_MEDIA_TYPE, meta_diff, {"containerd.io/snapshot/nydus-bootstrap": "true"}),
    ])
    return image, blob_digest, str(tmp / "image.boot")


def _manager_available() -> bool:
    try:
        import rafs.daemon.manager  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def test_cri_pull_of_built_nydus_image(env, tmp_path):
    reg, sn, cd, _ns = env
    image, blob_digest, _boot = _built_nydus_image(reg, tmp_path, "v1")
    cd.cri_pull(image)
    assert reg.blob_gets(blob_digest) == [], "containerd downloaded the nydus data blob"
    data = [i for i in sn.list() if i.labels.get("containerd.io/snapshot/nydus-blob") == "true"]
    assert [i.labels["containerd.io/snapshot/cri.layer-digest"] for i in data] == [blob_digest]
    if not _manager_available():
        # without the RAFS daemon manager a container cannot start: the error says exactly why
        p = cd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, image, "nydus-nomgr", "/bin/true",
                   ns="k8s.io", check=False)
        assert p.returncode != 0 and "rafs.daemon.manager" in p.stderr and "unavailable" in p.stderr, p.stderr


def test_run_built_nydus_image_lazily(env, tmp_path):
    if not _manager_available():
        pytest.skip("rafs.daemon.manager (the RAFS daemon manager) has not landed yet")
    reg, sn, cd, _ns = env
    image, blob_digest, _boot = _built_nydus_image(reg, tmp_path, "v2")
    cd.cri_pull(image)
    cd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, image, "lazy1", "/bin/sleep", "120", ns="k8s.io")
    out = run_ok(cd, "k8s.io", image, "lazy2", "cat /etc/probe.txt; mount | head -1")
    assert "hello from a nydus image" in out
    assert any(reg.blob_gets(blob_digest)), "no lazy blob read reached the registry"
    # both containers share one RAFS instance
    mounts = [i for i in sn.list() if i.kind == pb.ACTIVE]
    ch, stub = sn.stub()
    with ch:
        lowers = {[o for o in stub.Mounts(pb.MountsRequest(key=i.name)).mounts[0].options
                   if o.startswith("lowerdir=")][0] for i in mounts}
    assert len(lowers) == 1
    # kill -9 of the snapshotter under a running container: the container keeps reading
    sn.proc.kill()
    sn.proc.wait()
    sn.start()
    p = cd.ctr("tasks", "exec", "--exec-id", "e1", "lazy1", "/bin/md5sum", "/bin/busybox", ns="k8s.io")
    assert p.returncode == 0
    out = run_ok(cd, "k8s.io", image, "lazy3", "cat /etc/probe.txt")
    assert "hello from a nydus image" in out
