"""A multi-layer OCI-ref (zran) image built from gzip layers, mounted by nydusd with both
drivers: every file matches the layers applied in order, and data is read lazily by range
from the unchanged gzip layer files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pathlib
import posixpath
import shutil
import stat
import tarfile

import pytest

from integration import convert_images as ci
from integration.fs_support import localfs_config, metric, nydusd, require_stack
from rafs import erofs

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def _expected(layers: list[bytes], value=lambda data: data) -> dict:
    """Regular files of the layer tars applied bottom-up with OCI whiteouts: path -> value(data)."""
    files: dict = {}
    for gz in layers:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(gz))) as tar:
            members = tar.getmembers()
            for m in members:  # whiteouts hide lower layers' entries only
                name = "/" + m.name.strip("/").removeprefix("./")
                base = posixpath.basename(name)
                parent = posixpath.dirname(name)
                if base == ".wh..wh..opq":
                    files = {p: d for p, d in files.items() if not p.startswith(parent.rstrip("/") + "/")}
                elif base.startswith(".wh."):
                    gone = posixpath.join(parent, base[4:])
                    files = {p: d for p, d in files.items() if p != gone and not p.startswith(gone + "/")}
            for m in members:
                name = "/" + m.name.strip("/").removeprefix("./")
                if posixpath.basename(name).startswith(".wh."):
                    continue
                if m.isreg():
                    files[name] = value(tar.extractfile(m).read())
                elif m.islnk():
                    files[name] = files["/" + m.linkname.strip("/").removeprefix("./")]
                else:
                    files.pop(name, None)
    return files


@pytest.fixture(scope="module")
def zran_image(tmp_path_factory):
    require_stack()
    layers = [ci.compress_layer(tar, "gzip").data for tar, _ in ci.sample_layers()]
    boot, blobs = _build_zran(layers, tmp_path_factory.mktemp("zran"), spacing=256 << 10)
    return layers, boot, blobs


def _build_zran(layers: list[bytes], work: pathlib.Path, *, spacing: int) -> tuple[str, str]:
    """A targz-ref build of each gzip layer, merged: (bootstrap, dir of the layers as blobs)."""
    from rafs.builder import BuildOptions, build
    from rafs.builder.merge import merge

    blobs, image = work / "blobs", work / "image"
    blobs.mkdir()
    image.mkdir()
    boots = []
    for i, gz in enumerate(layers):
        src = work / f"layer{i}.tar.gz"
        src.write_bytes(gz)
        res = build(str(src), bootstrap_out=str(work / f"layer{i}.boot"), blob_dir=str(image),
                    source_type="targz-ref", options=BuildOptions(whiteout_spec="none", zran_spacing=spacing))
        if res.blob is not None:  # a layer without file data has no blob
            os.replace(src, blobs / res.blob.blob_id)  # the registry/localfs blob is the layer itself
        boots.append(res.bootstrap)
    merge(boots, str(image / "image.boot"), whiteout_spec="oci")
    return str(image / "image.boot"), str(blobs)


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_zran_image_mounts_and_matches_the_layers(zran_image, tmp_path, driver):
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    layers, boot, blobs = zran_image
    expect = _expected(layers)
    cache = tmp_path / "cache"
    with nydusd(tmp_path, bootstrap=boot, config=localfs_config(blobs, str(cache)), fs_driver=driver) as (
            client, mnt, _):
        assert metric(client.metrics(), "nydus_storage_backend_read_requests_total") == 0  # lazy
        assert sorted(n for n in os.listdir(cache) if n.endswith(".blob.meta")) == sorted(
            f"{n}.blob.meta" for n in os.listdir(blobs))  # seeded from beside the bootstrap
        with open(os.path.join(mnt, "etc/passwd"), "rb") as f:
            assert f.read() == expect["/etc/passwd"]
        first = metric(client.metrics(), "nydus_storage_backend_read_bytes_total")
        assert 0 < first < sum(len(x) for x in layers) / 2  # a range, not the layers
        got = {}
        for dirpath, _, filenames in os.walk(mnt):
            for name in filenames:
                p = os.path.join(dirpath, name)
                if stat.S_ISREG(os.lstat(p).st_mode):
                    with open(p, "rb") as f:
                        got["/" + os.path.relpath(p, mnt)] = f.read()
    assert set(got) == set(expect)
    for path in sorted(expect):
        assert got[path] == expect[path], path


# -- a real multi-layer Debian image ----------------------------------------------------------------

def _debian_layers(root_tar: pathlib.Path) -> list[bytes]:
    """The mmdebstrap minbase root cut into three gzip layers (directories, /usr but /usr/share,
    /usr/share and the rest; a hard link goes with its target) plus a top layer that whites out
    one file and replaces another, gzip level 6 as docker and containerd write them."""
    with tarfile.open(root_tar) as tar:
        members = tar.getmembers()
        where: dict[str, int] = {}
        parts: list[list[tuple[tarfile.TarInfo, bytes | None]]] = [[], [], []]
        for m in members:
            name = m.name.removeprefix("./")
            if m.isdir():
                k = 0
            elif m.islnk():
                k = where[m.linkname.removeprefix("./")]
            elif name.startswith("usr/share/"):
                k = 2
            elif name.startswith("usr/"):
                k = 1
            else:
                k = 2
            where[name] = k
            parts[k].append((m, tar.extractfile(m).read() if m.isreg() else None))
    layers = []
    for part in parts:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
            for m, data in part:
                t.addfile(m, io.BytesIO(data) if data is not None else None)
        layers.append(out.getvalue())
    top = io.BytesIO()
    with tarfile.open(fileobj=top, mode="w") as t:
        for name, data in (("etc/.wh.issue", b""), ("etc/hostname", b"zran-layer-4\n")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    layers.append(top.getvalue())
    return [gzip.compress(x, compresslevel=6, mtime=0) for x in layers]


@pytest.fixture(scope="module")
def debian_zran(tmp_path_factory):
    require_stack()
    if shutil.which("mmdebstrap") is None:
        pytest.skip("the Debian image needs mmdebstrap (./run.sh test installs it)")
    from integration.install_support import REPO
    from integration.test_install_chroot import root_tar

    layers = _debian_layers(root_tar(REPO / ".cache"))
    boot, blobs = _build_zran(layers, tmp_path_factory.mktemp("zran-debian"), spacing=2 << 20)
    expect = _expected(layers, lambda data: hashlib.sha256(data).hexdigest())
    return layers, boot, blobs, expect


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_a_multi_layer_debian_zran_image_matches_the_oci_layers_byte_for_byte(debian_zran, tmp_path, driver):
    """Checkpoints at the converter's default spacing (2 MiB) with trimmed windows, on real
    Debian data: every regular file read through the mount has the layers' sha256."""
    if driver == "erofs" and not erofs.detect_support().usable:
        pytest.skip(f"kernel EROFS unusable: {erofs.detect_support().reason}")
    layers, boot, blobs, expect = debian_zran
    assert len(expect) > 3000 and "/etc/issue" not in expect and "/usr/bin/python3.11" in expect
    got = {}
    with nydusd(tmp_path, bootstrap=boot, config=localfs_config(blobs, str(tmp_path / "cache")),
                fs_driver=driver) as (client, mnt, _):
        assert metric(client.metrics(), "nydus_storage_backend_read_requests_total") == 0  # lazy
        for dirpath, _, filenames in os.walk(mnt):
            for name in filenames:
                p = os.path.join(dirpath, name)
                if stat.S_ISREG(os.lstat(p).st_mode):
                    with open(p, "rb") as f:
                        got["/" + os.path.relpath(p, mnt)] = hashlib.sha256(f.read()).hexdigest()
        with open(os.path.join(mnt, "etc/hostname"), "rb") as f:
            assert f.read() == b"zran-layer-4\n"
    assert set(got) == set(expect)
    bad = [path for path in sorted(expect) if got[path] != expect[path]]
    assert not bad, f"{len(bad)} files differ from the layers, e.g. {bad[:5]}"
