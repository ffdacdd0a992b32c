"""``merge``: overlay semantics across per-layer bootstraps, blob table, blob ids, prefetch."""

from __future__ import annotations

import json
import os
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
