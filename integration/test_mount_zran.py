"""A multi-layer OCI-ref (zran) image built from gzip layers, mounted by nydusd with both
drivers: every file matches the layers applied in order, and data is read lazily by range
from the unchanged gzip layer files."""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import stat
import tarfile

import pytest

from integration import convert_images as ci
from integration.fs_support import localfs_config, metric, nydusd, require_stack
from rafs import erofs

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def _expected(layers: list[bytes]) -> dict[str, bytes]:
    """Regular files of the layer tars applied bottom-up with OCI whiteouts."""
    files: dict[str, bytes] = {}
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
                    files[name] = tar.extractfile(m).read()
                elif m.islnk():
                    files[name] = files["/" + m.linkname.strip("/")]
                else:
                    files.pop(name, None)
    return files


@pytest.fixture(scope="module")
def zran_image(tmp_path_factory):
    require_stack()
    from rafs.builder import BuildOptions, build
    from rafs.builder.merge import merge

    work = tmp_path_factory.mktemp("zran")
    blobs = work / "blobs"
    image = work / "image"
    blobs.mkdir()
    image.mkdir()
    layers = [ci.compress_layer(tar, "gzip").data for tar, _ in ci.sample_layers()]
    boots = []
    for i, gz in enumerate(layers):
        src = work / f"layer{i}.tar.gz"
        src.write_bytes(gz)
        res = build(str(src), bootstrap_out=str(work / f"layer{i}.boot"), blob_dir=str(image),
                    source_type="targz-ref", options=BuildOptions(whiteout_spec="none", zran_spacing=256 << 10))
        os.replace(src, blobs / res.blob.blob_id)  # the registry/localfs blob is the layer itself
        boots.append(res.bootstrap)
    merge(boots, str(image / "image.boot"), whiteout_spec="oci")
    return layers, str(image / "image.boot"), str(blobs)


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
