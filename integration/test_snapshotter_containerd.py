"""The snapshotter behind a real containerd 1.6 (proxy plugin), registry, runc and RAFS daemons.

Covers: a plain OCI image pulled (``ctr image pull``), run with runc and garbage-collected
through this snapshotter; CRI ``PullImage`` of nydus images (data layers answered with
ALREADY_EXISTS and never downloaded by containerd, the bootstrap layer unpacked and validated);
a builder-made nydus image run lazily (two containers share one RAFS instance; kill -9 of the
snapshotter under load); the container's Prepare fetching the runtime files (user db, loader,
ld.so.cache, libc) and nothing else before the container reads them; bad input (garbage labels, bad keys, missing parents, a "bootstrap"
layer that is not one, an unreachable registry) giving precise errors while the service keeps
serving. Fixtures: ``integration/conftest.py`` (harness in ``integration/harness/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import time

import grpc
import pytest

from integration.conftest import HELLO
from integration.fs_support import cached_chunks
from integration.harness.images import Image, Layer, nydus_image
from integration.snapshotter_support import daemon_instance_count, live_daemons, wait_for
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

SNAPSHOTTER = "nydus"
BLOB_LABEL = "containerd.io/snapshot/nydus-blob"
BOOTSTRAP_LABEL = "containerd.io/snapshot/nydus-bootstrap"

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.timeout(300)]


def kill_recorded_daemons(root: str) -> None:
    """Stop the RAFS daemons this test's snapshotter started (PIDs from its manager records)."""
    for rec in pathlib.Path(root, "daemons").glob("*.json"):
        try:
            pid = int(json.loads(rec.read_text()).get("pid", 0))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if root.encode() not in f.read():
                    continue
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        for _ in range(50):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def stack(registry, nydus_snapshotter, nydus_containerd):
    """(registry, snapshotter process, containerd); RAFS daemons are stopped afterwards."""
    yield registry, nydus_snapshotter, nydus_containerd
    nydus_containerd.stop()
    nydus_snapshotter.terminate()
    kill_recorded_daemons(nydus_snapshotter.root)


def snapshots(sn) -> list[pb.Info]:
    with grpc.insecure_channel(f"unix:{sn.address}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        return [i for r in stub.List(pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER)) for i in r.info]


def run_detached(cd, ref: str, cid: str, *cmd: str, namespace: str) -> None:
    ns = cd.use_namespace(namespace)
    cd.ctr("-n", ns, "run", "-d", "--cgroup", f"/{cd.cgroup_prefix}/{cid}", "--snapshotter", SNAPSHOTTER,
           ref, cid, *cmd)


def stop_detached(cd, cid: str, *, namespace: str, check: bool = True) -> None:
    """SIGKILL a :func:`run_detached` container's task, wait until it is gone, remove the
    container (containerd's GC then removes its snapshot)."""
    cd.ctr("-n", namespace, "tasks", "kill", "-s", "SIGKILL", cid, check=check)
    wait_for(lambda: cd.ctr("-n", namespace, "tasks", "rm", cid, check=False).returncode == 0
             or cid not in cd.ctr("-n", namespace, "tasks", "ls").stdout, 60, f"task {cid} gone")
    cd.ctr("-n", namespace, "containers", "rm", cid, check=check)


def vector_bootstrap(vectors_dir) -> bytes:
    return (vectors_dir / "dragonflyoss-nydus" / "tests" / "texture" / "bootstrap" / "rafs-v6-2.2.boot").read_bytes()


def built_nydus_image(tmp: pathlib.Path, text: bytes):
    """A real nydus image made by this project's builder from a busybox rootfs: (Image, blob)."""
    from rafs import builder

    root = tmp / "rootfs"
    for d in ("bin", "etc", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for app in ("sh", "cat", "ls", "echo", "sleep", "true", "md5sum"):
        (root / "bin" / app).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "probe.txt").write_bytes(text)
    res = builder.build(str(root), bootstrap_out=str(tmp / "image.boot"), blob_out=str(tmp / "blob"))
    blob = (tmp / "blob").read_bytes()
    assert res.blob_ids == [hashlib.sha256(blob).hexdigest()], "builder blob id must be the blob's sha256"
    return nydus_image((tmp / "image.boot").read_bytes(), [blob]), blob


# ----------------------------------------------------------------------------- plain OCI images


def test_plain_oci_image_pull_run_and_gc(stack, busybox_image):
    reg, sn, cd = stack
    cd.pull(busybox_image.ref, snapshotter=SNAPSHOTTER)
    assert len([i for i in snapshots(sn) if i.kind == pb.COMMITTED]) == len(busybox_image.layers)
    out = cd.run(busybox_image.ref, ["/bin/sh", "-c", "cat /etc/hello.txt; echo written > /tmp/x; cat /tmp/x;"
                                     " mount | head -1"], snapshotter=SNAPSHOTTER).stdout
    assert HELLO.decode() in out and "written" in out
    assert "overlay on / type overlay" in out and sn.root in out
    # a second container sees the image, not the first container's writes
    out = cd.run(busybox_image.ref, ["/bin/sh", "-c", "cat /tmp/x 2>&1 || echo absent"], snapshotter=SNAPSHOTTER).stdout
    assert "absent" in out
    # image removal + synchronous GC removes our snapshots and their directories
    cd.ctr("-n", cd.namespace, "image", "rm", "--sync", busybox_image.ref)
    wait_for(lambda: snapshots(sn) == [], 60, "snapshots garbage-collected")
    assert os.listdir(os.path.join(sn.root, "snapshots")) == []


def test_snapshotter_kill9_restart_with_running_container(stack, busybox_image):
    reg, sn, cd = stack
    cd.pull(busybox_image.ref, snapshotter=SNAPSHOTTER)
    run_detached(cd, busybox_image.ref, "long", "/bin/sleep", "60", namespace=cd.namespace)
    sn.restart(kill=True)
    cd.wait_snapshotter(SNAPSHOTTER)
    p = cd.ctr("-n", cd.namespace, "tasks", "exec", "--exec-id", "e1", "long", "/bin/cat", "/etc/hello.txt")
    assert HELLO.decode() in p.stdout
    out = cd.run(busybox_image.ref, ["/bin/cat", "/etc/hello.txt"], snapshotter=SNAPSHOTTER).stdout
    assert HELLO.decode() in out


# ----------------------------------------------------------------------------- nydus images


def test_cri_pull_of_nydus_image_skips_data_layers(stack, vectors_dir):
    reg, sn, cd = stack
    data_blob = os.urandom(64 * 1024)  # not a tar: containerd must never try to apply it
    image = nydus_image(vector_bootstrap(vectors_dir), [data_blob]).push(reg, "test/nydus", "v1")
    blob_digest = "sha256:" + hashlib.sha256(data_blob).hexdigest()
    cd.cri.pull_image(image.ref)
    assert reg.blob_fetches(blob_digest) == [], "containerd downloaded a nydus data blob"
    infos = snapshots(sn)
    data = [i for i in infos if i.labels.get(BLOB_LABEL) == "true"]
    meta = [i for i in infos if i.labels.get(BOOTSTRAP_LABEL) == "true"]
    assert len(data) == 1 and len(meta) == 1
    assert data[0].kind == pb.COMMITTED and data[0].labels["containerd.io/snapshot/cri.image-ref"] == image.ref
    assert data[0].name == data[0].labels["containerd.io/snapshot.ref"]  # committed under the chain id
    assert meta[0].parent == data[0].name
    boots = list(pathlib.Path(sn.root, "snapshots").glob("*/fs/image/image.boot"))
    assert len(boots) == 1 and boots[0].read_bytes() == vector_bootstrap(vectors_dir)
    cd.cri.pull_image(image.ref)  # again: served from the snapshots
    assert reg.blob_fetches(blob_digest) == []


def test_cri_pull_of_built_nydus_image(stack, tmp_path):
    reg, sn, cd = stack
    img, blob = built_nydus_image(tmp_path, b"hello from a nydus image\n")
    image = img.push(reg, "test/built", "v1")
    blob_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    cd.cri.pull_image(image.ref)
    assert reg.blob_fetches(blob_digest) == [], "containerd downloaded the nydus data blob"
    data = [i for i in snapshots(sn) if i.labels.get(BLOB_LABEL) == "true"]
    assert [i.labels["containerd.io/snapshot/cri.layer-digest"] for i in data] == [blob_digest]


def test_run_built_nydus_image_lazily_shared_instance_and_kill9(stack, tmp_path):
    reg, sn, cd = stack
    img, blob = built_nydus_image(tmp_path, b"hello from a nydus image\n")
    image = img.push(reg, "test/built", "v2")
    blob_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    cd.cri.pull_image(image.ref)
    mark = len(reg.access_log())
    # lazy1 keeps reading the image (load during the snapshotter kill below)
    run_detached(cd, image.ref, "lazy1", "/bin/sh", "-c", "while true; do cat /bin/busybox > /dev/null; done",
                 namespace="k8s.io")
    out = cd.run(image.ref, ["/bin/sh", "-c", "cat /etc/probe.txt"], snapshotter=SNAPSHOTTER,
                 namespace="k8s.io").stdout
    assert "hello from a nydus image" in out
    assert reg.blob_fetches(blob_digest, since=mark), "no lazy blob read reached the registry"
    # every container of the image sits on the same RAFS instance
    with grpc.insecure_channel(f"unix:{sn.address}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        actives = [i.name for i in snapshots(sn) if i.kind == pb.ACTIVE]
        lowers = set()
        for k in actives:
            try:
                mounts = stub.Mounts(pb.MountsRequest(key=k)).mounts
            except grpc.RpcError as exc:  # the exited run's snapshot, removed by containerd meanwhile
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                continue
            lowers |= {o for o in mounts[0].options if o.startswith("lowerdir=")}
    assert len(actives) >= 1 and len(lowers) == 1
    # kill -9 of the snapshotter under load: the running container keeps reading correct data
    sn.restart(kill=True)
    cd.wait_snapshotter(SNAPSHOTTER)
    p = cd.ctr("-n", "k8s.io", "tasks", "exec", "--exec-id", "e1", "lazy1", "/bin/md5sum", "/bin/busybox")
    assert p.stdout.split()[0] == hashlib.md5(pathlib.Path("/bin/busybox").read_bytes()).hexdigest()
    out = cd.run(image.ref, ["/bin/cat", "/etc/probe.txt"], snapshotter=SNAPSHOTTER, namespace="k8s.io").stdout
    assert "hello from a nydus image" in out


def test_container_prepare_fetches_the_runtime_files_before_the_container_reads(stack, tmp_path):
    """With the snapshotter's defaults, the container's Prepare (``ctr containers create``, no
    task yet) mounts the image and fetches what containerd, runc and the loader read first —
    ``/etc/group``, ``/etc/passwd``, the dynamic loader (through Debian's ``/lib64`` link),
    ``/etc/ld.so.cache`` and the C library — and nothing else of the blob; the container then
    reads them from the cache, not the registry."""
    from rafs import builder
    from rafs.metadata import Rafs

    reg, sn, cd = stack
    root = tmp_path / "rootfs"
    multi = "usr/lib/x86_64-linux-gnu"
    for d in ("usr/bin", multi, "usr/lib64", "etc", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "usr" / "bin" / "busybox")  # static: runs without the loader
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    (root / "lib64").symlink_to("usr/lib64")
    for app in ("sh", "cat"):
        (root / "usr" / "bin" / app).symlink_to("busybox")
    rnd = random.Random(23)
    files = {"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n", "etc/group": b"root:x:0:\n",
             "etc/ld.so.cache": rnd.randbytes(30000), f"{multi}/ld-linux-x86-64.so.2": rnd.randbytes(200 << 10),
             f"{multi}/libc.so.6": rnd.randbytes(300 << 10), f"{multi}/libm.so.6": rnd.randbytes(100 << 10),
             "etc/hostname.txt": b"not read at start\n"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    (root / "usr" / "lib64" / "ld-linux-x86-64.so.2").symlink_to("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    res = builder.build(str(root), bootstrap_out=str(tmp_path / "image.boot"), blob_out=str(tmp_path / "blob"))
    blob_bytes = (tmp_path / "blob").read_bytes()
    with Rafs.open(str(tmp_path / "image.boot")) as rafs:
        [blob] = rafs.blobs

        def descs(rel: str) -> list:
            return list(rafs.lookup_path("/" + rel).chunks(0, (root / rel).stat().st_size))

        def chunks(rel: str) -> set[int]:
            return {d.chunk.index for d in descs(rel)}

        runtime = set().union(*(chunks(r) for r in ("etc/passwd", "etc/group", "etc/ld.so.cache",
                                                     f"{multi}/ld-linux-x86-64.so.2", f"{multi}/libc.so.6")))
        others = chunks("usr/bin/busybox") | chunks(f"{multi}/libm.so.6") | chunks("etc/hostname.txt")
        busybox_bytes = sum(d.chunk.compressed_size for d in descs("usr/bin/busybox"))
    assert res.blob_ids == [blob.blob_id] and not runtime & others
    image = nydus_image((tmp_path / "image.boot").read_bytes(), [blob_bytes]).push(reg, "test/runtime", "v1")
    cd.cri.pull_image(image.ref)
    blob_digest = "sha256:" + blob.blob_id
    assert reg.blob_fetches(blob_digest) == [], "the pull fetched data"

    def cached() -> set[int]:
        return cached_chunks(os.path.join(sn.root, "cache"), blob)

    ns = cd.use_namespace("k8s.io")
    cd.ctr("-n", ns, "containers", "create", "--snapshotter", SNAPSHOTTER, image.ref, "rt1")
    try:
        wait_for(lambda: runtime <= cached(), 30, "the runtime files cached after the container's Prepare")
        time.sleep(0.5)  # anything else would be on its way by now
        assert cached() == runtime, f"fetched at Prepare: {sorted(cached())}, want {sorted(runtime)}"
    finally:
        cd.ctr("-n", ns, "containers", "rm", "rt1", check=False)
    mark = len(reg.access_log())
    out = cd.run(image.ref, ["/bin/sh", "-c", "cat /etc/passwd /etc/group; cat /lib64/ld-linux-x86-64.so.2 "
                             "/etc/ld.so.cache /lib/x86_64-linux-gnu/libc.so.6 | md5sum"],
                 snapshotter=SNAPSHOTTER, namespace="k8s.io").stdout
    want = hashlib.md5(files[f"{multi}/ld-linux-x86-64.so.2"] + files["etc/ld.so.cache"]
                       + files[f"{multi}/libc.so.6"]).hexdigest()
    assert out.startswith("root:x:0:0:root:/root:/bin/sh\nroot:x:0:\n") and want in out, out
    time.sleep(0.3)  # the access log is written after the response
    sizes = [e.size for e in reg.blob_fetches(blob_digest, since=mark)]
    # busybox (exec'd) at most: the files read above came from the cache
    assert sum(sizes) <= busybox_bytes, f"the run fetched {sizes}, busybox's chunks are {busybox_bytes} bytes"


# ----------------------------------------------------------------------------- bad input


def test_bad_input_precise_errors_and_service_keeps_serving(stack, busybox_image, vectors_dir):
    reg, sn, cd = stack
    with grpc.insecure_channel(f"unix:{sn.address}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)

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
        c, m = code(stub.Prepare, pb.PrepareSnapshotRequest(key="k", labels={BLOB_LABEL: "\u2603garbage"}))
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "nydus-blob" in m
        c, m = code(stub.Prepare, pb.PrepareSnapshotRequest(
            key="k", labels={"containerd.io/snapshot/cri.image-ref": "not a ref"}))
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "image reference" in m
        c, _ = code(lambda r: list(stub.List(r)), pb.ListSnapshotsRequest(filters=['labels."unterminated']))
        assert c == grpc.StatusCode.INVALID_ARGUMENT
        stub.Prepare(pb.PrepareSnapshotRequest(key="k", labels={"x.example/\u2603": "\u2603"}))  # kept as is
        stub.Remove(pb.RemoveSnapshotRequest(key="k"))

    # through containerd: a garbage nydus label on a container's snapshot (ctr --snapshotter-label)
    cd.pull(busybox_image.ref, snapshotter=SNAPSHOTTER)
    p = cd.run(busybox_image.ref, ["/bin/true"], snapshotter=SNAPSHOTTER, check=False,
               extra_args=["--snapshotter-label", f"{BLOB_LABEL}=garbage"])
    assert p.returncode != 0 and "nydus-blob" in p.stderr and "invalid argument" in p.stderr, p.stderr

    # through containerd: layers that claim to be a nydus bootstrap but are not
    fake = Layer.from_tree({"etc/not-a-bootstrap": b"hello"}).with_annotations({BOOTSTRAP_LABEL: "true"})
    bad = image_of(fake).push(reg, "test/badboot", "v1")
    with pytest.raises(Exception) as ei:
        cd.cri.pull_image(bad.ref)
    assert "image/image.boot" in str(ei.value) and "invalid argument" in str(ei.value)
    garbage = Layer.from_tree({"image/image.boot": b"garbage" * 1000}).with_annotations({BOOTSTRAP_LABEL: "true"})
    bad2 = image_of(garbage).push(reg, "test/badboot", "v2")
    with pytest.raises(Exception) as ei:
        cd.cri.pull_image(bad2.ref)
    assert "not a valid RAFS bootstrap" in str(ei.value) and "invalid argument" in str(ei.value)

    # an unreachable registry: the container's Prepare fails with UNAVAILABLE, saying so
    image = nydus_image(vector_bootstrap(vectors_dir), [os.urandom(4096)]).push(reg, "test/nydus", "v9")
    cd.cri.pull_image(image.ref)
    reg.stop()
    p = cd.run(image.ref, ["/bin/true"], snapshotter=SNAPSHOTTER, namespace="k8s.io", check=False)
    assert p.returncode != 0
    assert "unreachable" in p.stderr and "unavailable" in p.stderr, p.stderr
    # ... and the service still serves: a plain image runs fine
    out = cd.run(busybox_image.ref, ["/bin/cat", "/etc/hello.txt"], snapshotter=SNAPSHOTTER).stdout
    assert HELLO.decode() in out
    assert sn.pid is not None and os.path.exists(f"/proc/{sn.pid}")


def image_of(layer: Layer) -> Image:
    return Image(layers=(layer,), cmd=("/bin/sh",))


def _mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(path.rstrip("/") + "/")]


@pytest.mark.parametrize("daemon_mode,fs_driver", [("shared", "fusedev"), ("dedicated", "fusedev"),
                                                   ("shared", "erofs")])
def test_nydus_instance_lifecycle_and_cache_gc(registry, snapshotter_factory, containerd_factory, tmp_path,
                                               daemon_mode, fs_driver):
    from integration.conftest import snapshotter_config_for

    cfg = snapshotter_config_for(registry)
    cfg["daemon"] = {"daemon_mode": daemon_mode, "fs_driver": fs_driver}
    sn = snapshotter_factory(config=cfg)
    cd = containerd_factory(snapshotters={SNAPSHOTTER: sn.address}, cri_snapshotter=SNAPSHOTTER,
                            registries=[registry])
    try:
        img, blob = built_nydus_image(tmp_path, b"lifecycle\n")
        image = img.push(registry, "test/life", "v1")
        blob_id = hashlib.sha256(blob).hexdigest()
        cd.cri.pull_image(image.ref)
        # only the shared daemon's own FUSE mount (it starts with the snapshotter, as upstream's):
        # no instance is mounted before a container needs it
        shared = {os.path.join(sn.root, "mnt"), os.path.join(sn.root, "blobfs", "shared-erofs")}
        assert not set(_mounts_under(sn.root)) - shared, "nothing is mounted before a container needs it"
        if daemon_mode == "dedicated":
            assert not _mounts_under(sn.root)

        def rafs_mounts() -> list[str]:
            return [m for m in _mounts_under(sn.root) if "/snapshots/" in m or m.rsplit("/", 1)[-1].isdigit()]

        # two containers of the image share one RAFS instance; removing both unmounts it.
        # fusedev: instances served by the live daemons (a shared daemon has one FUSE mount and
        # its instances are directories below it); erofs: one kernel mount per instance.
        def instances() -> int:
            return daemon_instance_count(sn.root) if fs_driver == "fusedev" else len(rafs_mounts())

        for cid in ("twin1", "twin2"):
            run_detached(cd, image.ref, cid, "/bin/sh", "-c", "cat /etc/probe.txt; sleep 60", namespace="k8s.io")
        wait_for(lambda: instances() >= 1, 60, "the RAFS instance mounted")
        assert instances() == 1  # mounted once, not once per container
        if fs_driver == "fusedev":  # the containers' files came through FUSE no_open where it works
            from rafs.fs.ops import no_open_unsupported_reason  # noqa: PLC0415

            daemons = list(live_daemons(sn.root).values())
            want = [no_open_unsupported_reason(d.get("fuse_impl") == "ll") is None for d in daemons]
            assert [d.get("fuse_no_open") for d in daemons] == want and len(daemons) == 1
        if daemon_mode == "dedicated":
            assert len(rafs_mounts()) == 1
        with grpc.insecure_channel(f"unix:{sn.address}") as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            actives = [i.name for i in snapshots(sn) if i.kind == pb.ACTIVE]
            lowers = {o for k in actives for o in stub.Mounts(pb.MountsRequest(key=k)).mounts[0].options
                      if o.startswith("lowerdir=")}
        assert len(actives) == 2 and len(lowers) == 1, (actives, lowers)
        for n, cid in enumerate(("twin1", "twin2")):
            stop_detached(cd, cid, namespace="k8s.io")
            if n == 0:
                wait_for(lambda: len([i for i in snapshots(sn) if i.kind == pb.ACTIVE]) == 1, 60,
                         "the first container's snapshot removed")
                assert instances() == 1, "unmounted while a container still uses the instance"
        try:
            wait_for(lambda: instances() == 0 and rafs_mounts() == [], 60,
                     "RAFS instance unmounted after both containers")
        except AssertionError:
            raise AssertionError(f"still mounted: {rafs_mounts()}, {instances()} instances\n"
                                 f"{sn.log()[-3000:]}") from None
        with grpc.insecure_channel(f"unix:{sn.address}") as ch:
            pb_grpc.SnapshotsStub(ch).Cleanup(pb.CleanupRequest())
        assert rafs_mounts() == [] and instances() == 0

        out = cd.run(image.ref, ["/bin/sh", "-c", "cat /etc/probe.txt; md5sum /bin/busybox"],
                     snapshotter=SNAPSHOTTER, namespace="k8s.io").stdout
        assert "lifecycle" in out
        assert hashlib.md5(pathlib.Path("/bin/busybox").read_bytes()).hexdigest() in out
        cache = pathlib.Path(sn.root, "cache")
        assert any(p.name.startswith(blob_id) for p in cache.iterdir()), "no cache file for the blob"
        # the container is gone (--rm; containerd's GC removes its snapshot): the RAFS instance
        # is unmounted
        try:
            wait_for(lambda: rafs_mounts() == [] and instances() == 0, 60, "RAFS instance unmounted")
        except AssertionError:
            raise AssertionError(f"still mounted: {rafs_mounts()}\n{sn.log()[-3000:]}") from None
        # Usage of the data layer = its cache bytes
        with grpc.insecure_channel(f"unix:{sn.address}") as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            (data,) = [i for i in snapshots(sn) if i.labels.get(BLOB_LABEL) == "true"]
            assert stub.Usage(pb.UsageRequest(key=data.name)).size > 0
        # removing the image: containerd's GC removes the snapshots and calls Cleanup → cache GC
        cd.cri.remove_image(image.ref)  # all of CRI's references (tag, digest, id)
        wait_for(lambda: snapshots(sn) == [], 60, "snapshots garbage-collected")
        wait_for(lambda: not any(p.name.startswith(blob_id) for p in cache.iterdir()), 60, "blob cache GC")
    finally:
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)


@pytest.mark.parametrize("source", ["config", "docker_config"])
def test_lazy_run_from_registry_with_auth(registry_factory, snapshotter_factory, containerd_factory, tmp_path,
                                          source):
    from integration.conftest import snapshotter_config_for

    reg = registry_factory(users={"alice": "s3cret"})
    cfg = snapshotter_config_for(reg)
    if source == "config":
        cfg["remote"]["auths"] = {reg.host: {"username": "alice", "password": "s3cret"}}
    else:
        docker = tmp_path / "docker-config.json"
        docker.write_text(json.dumps({"auths": {reg.host: {"auth": "YWxpY2U6czNjcmV0"}}}))  # alice:s3cret
        cfg["remote"]["docker_config"] = str(docker)
    sn = snapshotter_factory(config=cfg)
    cd = containerd_factory(snapshotters={SNAPSHOTTER: sn.address}, cri_snapshotter=SNAPSHOTTER, registries=[reg])
    try:
        img, blob = built_nydus_image(tmp_path, b"behind auth\n")
        image = img.push(reg, "test/private", "v1", auth=reg.auth)
        cd.cri.pull_image(image.ref)
        out = cd.run(image.ref, ["/bin/cat", "/etc/probe.txt"], snapshotter=SNAPSHOTTER, namespace="k8s.io").stdout
        assert "behind auth" in out
        assert reg.blob_fetches("sha256:" + hashlib.sha256(blob).hexdigest()), "no authenticated lazy read"
    finally:
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)

