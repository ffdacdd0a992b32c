"""``merge``: overlay semantics across per-layer bootstraps, blob table, blob ids, prefetch."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from rafs.builder import BuildOptions, build
from rafs.builder.loader import load_bootstrap
from rafs.builder.merge import merge
from rafs.errors import BuildError
from storage.meta.toc import extract_entry, read_toc
from tests.builder_helpers import CHUNK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layer(tmp_path, name, files, **kw):
    """files: path -> bytes | None (directory) | ("link", target) | ("chr", 0) (overlay whiteout)."""
    src = tmp_path / f"{name}.src"
    src.mkdir()
    for path, data in files.items():
        p = src / path
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            p.mkdir(exist_ok=True)
        elif isinstance(data, tuple) and data[0] == "link":
            os.symlink(data[1], p)
        elif isinstance(data, tuple) and data[0] == "chr":
            os.mknod(p, stat.S_IFCHR | 0o600, 0)
        elif isinstance(data, tuple) and data[0] == "opaque":
            p.mkdir(exist_ok=True)
            os.setxattr(p, "trusted.overlay.opaque", b"y")
        else:
            p.write_bytes(data)
    kw.setdefault("whiteout_spec", "none")
    kw.setdefault("chunk_size", CHUNK)
    res = build(str(src), bootstrap_out=str(tmp_path / f"{name}.boot"), blob_out=str(tmp_path / f"{name}.blob"),
                options=BuildOptions(**kw))
    return res


def _files(boot):
    loaded = load_bootstrap(boot)
    return loaded, {p: n for p, n in loaded.tree.walk()}


def test_oci_whiteouts_and_opaque(tmp_path):
    l1 = _layer(tmp_path, "l1", {"etc/a": b"a1", "etc/b": b"b1", "opq/x": b"x1", "opq/sub/y": b"y1",
                                 "gone_dir/z": b"z", "keep": b"k" * 100000})
    l2 = _layer(tmp_path, "l2", {"etc/.wh.b": b"", "etc/c": b"c2", "opq/.wh..wh..opq": b"", "opq/new": b"n2",
                                 ".wh.gone_dir": b"", "etc/a": b"a2"})
    out = str(tmp_path / "m.boot")
    res = merge([l1.bootstrap, l2.bootstrap], out)
    loaded, files = _files(out)
    assert sorted(files) == [b"/", b"/etc", b"/etc/a", b"/etc/c", b"/keep", b"/opq", b"/opq/new"]
    assert res.blob_ids == [l1.blob.blob_id, l2.blob.blob_id]
    # etc/a from the upper layer points at the upper blob
    assert files[b"/etc/a"].chunks[0].blob_index == 1
    assert files[b"/keep"].chunks[0].blob_index == 0


def test_whiteout_and_recreate_in_same_layer(tmp_path):
    """``.wh.x`` plus a new ``x`` in one layer: the lower x is hidden, the upper x is kept."""
    l1 = _layer(tmp_path, "l1", {"x/old": b"old", "y": b"lower y"})
    l2 = _layer(tmp_path, "l2", {".wh.x": b"", "x/new": b"new", ".wh.y": b"", "y": b"upper y"})
    res = merge([l1.bootstrap, l2.bootstrap], str(tmp_path / "m.boot"))
    loaded, files = _files(res.bootstrap)
    assert sorted(files) == [b"/", b"/x", b"/x/new", b"/y"]
    assert res.blob_ids == [l2.blob.blob_id]  # nothing of l1 is visible any more


def test_lower_blob_dropped_when_unreferenced(tmp_path):
    l1 = _layer(tmp_path, "l1", {"f": b"only in lower"})
    l2 = _layer(tmp_path, "l2", {".wh.f": b"", "g": b"upper"})
    res = merge([l1.bootstrap, l2.bootstrap], str(tmp_path / "m.boot"))
    assert res.blob_ids == [l2.blob.blob_id]
    loaded, files = _files(str(tmp_path / "m.boot"))
    assert files[b"/g"].chunks[0].blob_index == 0


def test_upper_replaces_type(tmp_path):
    l1 = _layer(tmp_path, "l1", {"x/inner": b"i", "y": b"file"})
    l2 = _layer(tmp_path, "l2", {"x": b"now a file", "y/inner2": b"now a dir"})
    _, files = _files(merge([l1.bootstrap, l2.bootstrap], str(tmp_path / "m.boot")).bootstrap)
    assert files[b"/x"].is_reg and files[b"/y"].is_dir and b"/x/inner" not in files and b"/y/inner2" in files


@pytest.mark.skipif(os.geteuid() != 0, reason="overlayfs whiteouts (0/0 char devices, trusted xattrs) need root")
def test_overlayfs_spec(tmp_path):
    l1 = _layer(tmp_path, "l1", {"a": b"a", "b": b"b", "d/x": b"x"})
    l2 = _layer(tmp_path, "l2", {"a": ("chr", 0), "d": ("opaque",), "d/y": b"y"})
    _, files = _files(merge([l1.bootstrap, l2.bootstrap], str(tmp_path / "m.boot"), whiteout_spec="overlayfs").bootstrap)
    assert sorted(files) == [b"/", b"/b", b"/d", b"/d/y"]
    assert b"trusted.overlay.opaque" not in files[b"/d"].xattrs


def test_inline_placeholder_ids_and_blob_digests(tmp_path):
    l1 = _layer(tmp_path, "l1", {"a": b"a" * 5000}, blob_inline_meta=True, blob_toc=True)
    l2 = _layer(tmp_path, "l2", {"b": b"b" * 5000}, blob_inline_meta=True, blob_toc=True)
    # extract each layer's image.boot from its blob, as the snapshotter's converter does
    boots = []
    for i, res in enumerate((l1, l2)):
        data = open(res.blob_path, "rb").read()
        read = lambda o, s, d=data: d[o:o + s]  # noqa: E731
        entries, _ = read_toc(read, len(data))
        boot = extract_entry(read, next(e for e in entries if e.entry_name == "image.boot"))
        path = tmp_path / f"inline{i}.boot"
        path.write_bytes(boot)
        assert load_bootstrap(str(path)).blobs[0].info.blob_id == "x" * 64
        boots.append(str(path))
    with pytest.raises(BuildError, match="placeholder"):
        merge(boots, str(tmp_path / "m.boot"))
    res = merge(boots, str(tmp_path / "m.boot"), blob_digests=["sha256:" + l1.blob.blob_id, l2.blob.blob_id])
    assert res.blob_ids == [l1.blob.blob_id, l2.blob.blob_id]
    # named by layer digest instead
    named = []
    for i, res_ in enumerate((l1, l2)):
        p = tmp_path / res_.blob.blob_id
        os.link(boots[i], p)
        named.append(str(p))
    assert merge(named, str(tmp_path / "m2.boot")).blob_ids == [l1.blob.blob_id, l2.blob.blob_id]
    with pytest.raises(BuildError):
        merge(boots, str(tmp_path / "m3.boot"), blob_digests=["nothex"] * 2)
    with pytest.raises(BuildError):
        merge(boots, str(tmp_path / "m3.boot"), blob_digests=[l1.blob.blob_id])


def test_prefetch_and_reproducible(tmp_path):
    l1 = _layer(tmp_path, "l1", {"usr/bin/sh": b"sh", "etc/conf": b"c"})
    l2 = _layer(tmp_path, "l2", {"usr/bin/ls": b"ls"})
    a = merge([l1.bootstrap, l2.bootstrap], str(tmp_path / "a.boot"), prefetch=["/usr/bin", "/etc/conf"])
    b = merge([l1.bootstrap, l2.bootstrap], str(tmp_path / "b.boot"), prefetch=["/usr/bin", "/etc/conf"])
    assert open(a.bootstrap, "rb").read() == open(b.bootstrap, "rb").read()
    from rafs.layout import RafsV6SuperBlockExt

    ext = RafsV6SuperBlockExt.parse(open(a.bootstrap, "rb").read(), 1152)
    assert ext.s_prefetch_table_size == 8


def test_merge_upstream_bootstrap(vectors_dir, tmp_path):
    """An upstream 2.2 bootstrap loads and re-merges with the same files and chunks."""
    src = vectors_dir / "dragonflyoss-nydus/tests/texture/bootstrap/rafs-v6-2.2.boot"
    res = merge([str(src)], str(tmp_path / "m.boot"))
    assert res.blob_ids == ["be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"]
    orig, new = load_bootstrap(str(src)), load_bootstrap(res.bootstrap)
    ow = {p: (n.mode, n.size, n.chunks) for p, n in orig.tree.walk()}
    nw = {p: (n.mode, n.size, n.chunks) for p, n in new.tree.walk()}
    assert ow == nw and sorted(ow) == [b"/", b"/lib.rs", b"/sync_io.rs"]
    assert [c for c in new.blobs[0].chunks] == [c for c in orig.blobs[0].chunks]


def test_cli_merge(tmp_path):
    l1 = _layer(tmp_path, "l1", {"a": b"1"})
    l2 = _layer(tmp_path, "l2", {"b": b"2"})
    out = tmp_path / "o.json"
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "merge", "--bootstrap", str(tmp_path / "m.boot"),
                           "--prefetch-policy", "fs", "--output-json", str(out), l1.bootstrap, l2.bootstrap],
                          input=b"/a\n", capture_output=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["blobs"] == [l1.blob.blob_id, l2.blob.blob_id] and doc["bootstrap"] == str(tmp_path / "m.boot")
    proc = subprocess.run([sys.executable, "-m", "rafs.cli", "merge", "-B", str(tmp_path / "x.boot"),
                           str(tmp_path / "l1.blob")], capture_output=True, cwd=ROOT)
    assert proc.returncode == 1 and b"error" in proc.stderr


def test_create_with_parent_bootstrap(tmp_path):
    """``create --parent-bootstrap``: same tree and blobs as building the layer alone and merging."""
    l1 = _layer(tmp_path, "l1", {"etc/a": b"a1", "etc/b": b"b1" * 40000, "keep": b"k"})
    src = tmp_path / "l2.src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / ".wh.a").write_bytes(b"")
    (src / "etc" / "c").write_bytes(b"b1" * 40000)  # same content as lower etc/b: deduplicated
    res = build(str(src), bootstrap_out=str(tmp_path / "p.boot"), blob_out=str(tmp_path / "p.blob"),
                options=BuildOptions(chunk_size=CHUNK, parent_bootstrap=l1.bootstrap))
    loaded, files = _files(res.bootstrap)
    assert sorted(files) == [b"/", b"/etc", b"/etc/b", b"/etc/c", b"/keep"]
    assert res.blob_ids == [l1.blob.blob_id]  # the new layer's only chunk deduplicated into l1's blob
    assert res.blob is None or res.blob.chunk_count == 0
    assert files[b"/etc/c"].chunks == files[b"/etc/b"].chunks


def _tar_layer(tmp_path, name, members):
    """members: (name, kind, attrs) with kind "dir" | bytes (a file); attrs: TarInfo fields."""
    import io
    import tarfile

    path = tmp_path / f"{name}.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for mname, kind, attrs in members:
            ti = tarfile.TarInfo(mname)
            pax = attrs.pop("pax", None)
            for k, v in attrs.items():
                setattr(ti, k, v)
            if pax:
                ti.pax_headers = pax
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(kind)
                tf.addfile(ti, io.BytesIO(kind))
    return build(str(path), bootstrap_out=str(tmp_path / f"{name}.boot"), blob_out=str(tmp_path / f"{name}.blob"),
                 source_type="tar-rafs", options=BuildOptions(whiteout_spec="none", chunk_size=CHUNK))


def test_implicit_dirs_keep_lower_attributes(tmp_path):
    """A layer listing ``a/b/f2`` without ``a/`` (common in OCI layers) must not reset the lower
    ``a``'s attributes in merge; an implicit directory with nothing below keeps the defaults,
    and an explicit upper directory still wins."""
    d = dict(mode=0o750, uid=1234, gid=56, mtime=1_600_000_000, pax={"SCHILY.xattr.user.k": "v"})
    l1 = _tar_layer(tmp_path, "l1", [
        ("./", "dir", dict(mode=0o711, uid=7, gid=8, mtime=1_500_000_000)),
        ("a/", "dir", dict(d)),
        ("a/b/", "dir", dict(mode=0o700, uid=99, gid=98, mtime=1_600_000_001)),
        ("a/b/f1", b"one", dict(mode=0o644)),
        ("x", b"file", dict(mode=0o644)),
        ("e/", "dir", dict(mode=0o705, uid=3, gid=3, mtime=1_600_000_002)),
    ])
    l2 = _tar_layer(tmp_path, "l2", [
        ("a/b/f2", b"two", dict(mode=0o600)),   # no ./, a/, a/b/ entries
        ("c/d/f3", b"three", dict(mode=0o644)),  # nothing below: defaults
        ("x/y", b"under a former file", dict(mode=0o644)),
        ("e/", "dir", dict(mode=0o755, uid=0, gid=0, mtime=1_700_000_000)),  # explicit: wins
    ])
    # the per-layer bootstrap records which directories are implicit
    _, layer2 = _files(l2.bootstrap)
    assert {p for p, n in layer2.items() if n.implicit} == {b"/", b"/a", b"/a/b", b"/c", b"/c/d", b"/x"}
    assert not layer2[b"/e"].implicit
    if shutil.which("fsck.erofs"):  # the mark sits in a reserved field: erofs-utils accepts it
        from tests.builder_helpers import expand

        data = tmp_path / "l2.data"
        expand(l2.blob_path, str(data), l2.blob)
        proc = subprocess.run(["fsck.erofs", f"--device={data}", l2.bootstrap], capture_output=True)
        assert proc.returncode == 0, proc.stderr
    out = str(tmp_path / "m.boot")
    merge([l1.bootstrap, l2.bootstrap], out)
    _, files = _files(out)

    def attrs(p):
        n = files[p]
        return stat.S_IMODE(n.mode), n.uid, n.gid, n.mtime, n.xattrs

    assert attrs(b"/") == (0o711, 7, 8, 1_500_000_000, {})
    assert attrs(b"/a") == (0o750, 1234, 56, 1_600_000_000, {b"user.k": b"v"})
    assert attrs(b"/a/b") == (0o700, 99, 98, 1_600_000_001, {})
    assert sorted(files[b"/a/b"].entries) == [b"f1", b"f2"]
    assert attrs(b"/c") == attrs(b"/c/d") == (0o755, 0, 0, 0, {})
    assert files[b"/x"].is_dir and attrs(b"/x") == (0o755, 0, 0, 0, {})
    assert attrs(b"/e") == (0o755, 0, 0, 1_700_000_000, {})
    assert not files[b"/a"].implicit and files[b"/c"].implicit
    # the same through the reader and through create --parent-bootstrap
    from rafs.metadata import Rafs

    with Rafs.open(out) as fs:
        a = fs.lookup_path("/a").attr()
        assert (stat.S_IMODE(a.mode), a.uid, a.gid, a.mtime) == (0o750, 1234, 56, 1_600_000_000)
    res = build(str(tmp_path / "l2.tar"), bootstrap_out=str(tmp_path / "p.boot"), blob_out=str(tmp_path / "p.blob"),
                source_type="tar-rafs", options=BuildOptions(chunk_size=CHUNK, parent_bootstrap=l1.bootstrap))
    _, viaparent = _files(res.bootstrap)
    assert (stat.S_IMODE(viaparent[b"/a"].mode), viaparent[b"/a"].uid) == (0o750, 1234)
    # three layers: an implicit a/ over an implicit a/ over the real one still keeps it
    l3 = _tar_layer(tmp_path, "l3", [("a/g", b"g", dict(mode=0o644))])
    merge([l1.bootstrap, l2.bootstrap, l3.bootstrap], out)
    _, files = _files(out)
    assert attrs(b"/a") == (0o750, 1234, 56, 1_600_000_000, {b"user.k": b"v"})
