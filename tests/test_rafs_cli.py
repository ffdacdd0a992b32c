"""``nydus-image inspect/check/unpack`` run as subprocesses on the upstream vectors."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import stat
import subprocess
import sys
import tarfile

import pytest

from tests._rafs_util import TEXTURE, extract_boot, parse_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
V5_BLOB = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"
V6_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


def run(*args, check_rc=None):
    proc = subprocess.run(
        [sys.executable, "-m", "rafs.cli", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture(scope="module")
def tex(vectors_dir):
    return vectors_dir / TEXTURE


def _md5_tree(root: pathlib.Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = pathlib.Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            out["/" + str(p.relative_to(root))] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


def test_help_and_usage():
    for sub in ([], ["inspect"], ["check"], ["unpack"]):
        proc = run(*sub, "--help", check_rc=0)
        assert "usage: nydus-image" in proc.stdout
    assert run().returncode == 2
    assert run("inspect").returncode == 2  # no bootstrap
    assert run("unpack", "x.boot").returncode == 2  # no --output
    assert run("frobnicate").returncode == 2


def test_inspect(tex, tmp_path):
    boot = tex / "bootstrap/rafs-v6-2.2.boot"
    proc = run("inspect", boot, check_rc=0)
    assert "RAFS version:   v6" in proc.stdout and V6_BLOB in proc.stdout
    data = json.loads(run("inspect", "--json", "--tree", "--chunks", "-B", boot, check_rc=0).stdout)
    assert data["superblock"]["inode_count"] == 3 and data["superblock"]["flags"] == 0x194
    assert data["blobs"][0]["blob_id"] == V6_BLOB and data["blobs"][0]["compressor"] == "zstd"
    assert [e["path"] for e in data["tree"]] == ["/", "/lib.rs", "/sync_io.rs"]
    assert data["tree"][1]["chunks"][0]["uncompressed_size"] == 16931
    assert len(data["chunk_table"]) == 2
    out = tmp_path / "i.json"
    run("inspect", boot, "--path", "/sync_io.rs", "-J", out, check_rc=0)
    node = json.loads(out.read_text())["inode"]
    assert node["size"] == 13400 and node["chunks"][0]["index"] == 1
    proc = run("inspect", boot, "--path", "/nope")
    assert proc.returncode == 1 and "no entry" in proc.stderr
    blobs = json.loads(run("inspect", boot, "-R", "blobs", check_rc=0).stdout)
    assert blobs["blobs"][0]["chunk_count"] == 2


def test_check_ok_and_failures(tex, tmp_path, vectors_dir):
    v5 = tex / "repeatable/sha256-nocompress-repeatable"
    proc = run("check", v5, "--blob-dir", tex / "repeatable/blobs", check_rc=0)
    assert "23 chunks (3508766 bytes) verified" in proc.stdout
    proc = run("check", "-B", tex / "bootstrap/rafs-v6-2.2.boot", "-b", tex / "blobs" / V6_BLOB, "-v", check_rc=0)
    assert "2 chunks (30331 bytes) verified" in proc.stdout and "checking /lib.rs" in proc.stderr
    run("check", extract_boot(vectors_dir, "v6-bootstrap-chunk-pos-438272", tmp_path), check_rc=0)
    # a corrupted blob: the digest check names the chunk
    bad = tmp_path / "blobs"
    bad.mkdir()
    data = bytearray((tex / "blobs" / V6_BLOB).read_bytes())
    data[100] ^= 0xFF
    (bad / V6_BLOB).write_bytes(bytes(data))
    report = tmp_path / "check.json"
    proc = run("check", tex / "bootstrap/rafs-v6-2.2.boot", "-D", bad, "-J", report, check_rc=1)
    assert "FAILED" in proc.stderr and ("digest mismatch" in proc.stderr or "zstd" in proc.stderr)
    assert json.loads(report.read_text())["ok"] is False
    # a missing blob is a problem too
    empty = tmp_path / "none"
    empty.mkdir()
    proc = run("check", tex / "bootstrap/rafs-v6-2.2.boot", "-D", empty, check_rc=1)
    assert "not found" in proc.stderr
    # v5: a flipped chunk digest breaks the inode's Merkle digest
    from rafs.metadata import Rafs

    with Rafs.open(v5) as fs:
        at = fs.lookup_path("/normal-file-test/holefiles/chsum")._chunk_offset
    raw = bytearray(v5.read_bytes())
    raw[at] ^= 1
    (tmp_path / "v5bad.boot").write_bytes(bytes(raw))
    proc = run("check", tmp_path / "v5bad.boot", check_rc=1)
    assert "chsum: v5 inode digest does not match" in proc.stderr
    # not a bootstrap / a pre-v5 bootstrap
    proc = run("check", extract_boot(vectors_dir, "invalid-bootstrap-file-size-133513", tmp_path), check_rc=1)
    assert "not a RAFS bootstrap" in proc.stderr
    proc = run("check", tex / "bootstrap/nydusd_daemon_test_bootstrap", check_rc=1)
    assert "i_mode" in proc.stderr


def test_unpack_v5_dir_matches_result(tex, tmp_path):
    _tree, md5s = parse_result(tex / "repeatable/sha256-nocompress-repeatable.result")
    out = tmp_path / "out"
    run("unpack", tex / "repeatable/sha256-nocompress-repeatable", "--blob-dir", tex / "repeatable/blobs",
        "--output", out, check_rc=0)
    assert _md5_tree(out) == md5s
    foo, sh = out / "hardlink-test/foo", out / "normal-file-test/test.sh"
    assert foo.stat().st_ino == sh.stat().st_ino and foo.stat().st_nlink == 3
    assert os.readlink(out / "symlink-test/root-2") == "/foobar"
    st = (out / "normal-file-test/busybox").stat()
    assert stat.S_IMODE(st.st_mode) == 0o775 and st.st_mtime == 1668232305
    assert stat.S_IMODE((out / "normal-file-test/busybox/1f777dbdd68d1c4d554bc0d20e027bfef9ed2dfe2d8d5f029e958552a0e12475/etc/shadow").stat().st_mode) == 0o600
    # output must not already hold something
    proc = run("unpack", tex / "repeatable/sha256-nocompress-repeatable", "-D", tex / "repeatable/blobs",
               "--output", out)
    assert proc.returncode == 1 and "not an empty directory" in proc.stderr


def test_unpack_tar_and_v6(tex, tmp_path):
    tar_path = tmp_path / "v5.tar"
    run("unpack", tex / "repeatable/blake3-lz4_block-non_repeatable", "-b", tex / "repeatable/blobs" / V5_BLOB,
        "--output", tar_path, check_rc=0)
    _tree, md5s = parse_result(tex / "repeatable/blake3-lz4_block-non_repeatable.result")
    got = {}
    with tarfile.open(tar_path) as tf:
        members = {m.name: m for m in tf.getmembers()}
        for name, m in members.items():
            if m.isreg():
                got[name[1:]] = hashlib.md5(tf.extractfile(m).read()).hexdigest()
        assert members["./hardlink-test/test.sh"].islnk()
        assert members["./symlink-test/root-2"].linkname == "/foobar"
    hard = {p for p in md5s if p not in got}
    assert {p: md5s[p] for p in got} == got and len(hard) == 2  # two hard links stored as links
    out = tmp_path / "v6"
    run("unpack", tex / "bootstrap/rafs-v6-2.2.boot", "-D", tex / "blobs", "--output", out, check_rc=0)
    assert (out / "lib.rs").stat().st_size == 16931 and (out / "sync_io.rs").stat().st_size == 13400
    assert b"Copyright" in (out / "lib.rs").read_bytes()[:200]
    # no blob given: usage error; blob missing: failure and no partial output
    assert run("unpack", tex / "bootstrap/rafs-v6-2.2.boot", "--output", tmp_path / "x").returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("unpack", tex / "bootstrap/rafs-v6-2.2.boot", "-D", empty, "--output", tmp_path / "y")
    assert proc.returncode == 1 and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unpack-")]


def test_unpack_rich_image_restores_everything(tmp_path):
    """Devices, fifos, xattrs, owners, setuid, ns mtimes, hard links: dir and tar output."""
    from tests._rafs_util import build_rich_image

    boot = build_rich_image(tmp_path)
    src = tmp_path / "rich-src"
    out = tmp_path / "out"
    run("unpack", boot, "-b", tmp_path / "rich.blob", "--output", out, check_rc=0)
    root = os.geteuid() == 0
    for p in [src, *src.rglob("*")]:
        q = out / p.relative_to(src)
        a, b = p.lstat(), q.lstat()
        rel = str(p.relative_to(src))
        assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), rel
        if not stat.S_ISLNK(a.st_mode):
            assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), rel
        assert a.st_mtime_ns == b.st_mtime_ns, rel
        if root:
            assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), rel
            assert sorted(os.listxattr(p, follow_symlinks=False)) == sorted(os.listxattr(q, follow_symlinks=False)), rel
        if stat.S_ISREG(a.st_mode):
            assert p.read_bytes() == q.read_bytes(), rel
        elif stat.S_ISLNK(a.st_mode):
            assert os.readlink(p) == os.readlink(q), rel
        elif stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode):
            assert a.st_rdev == b.st_rdev, rel
    assert os.getxattr(out / "attrs", "user.one") == b"1"
    assert (out / "multi").stat().st_ino == (out / "multi-link").stat().st_ino
    # the same as a tar: PAX xattrs, devices, links
    tar_path = tmp_path / "rich.tar"
    run("unpack", boot, "-b", tmp_path / "rich.blob", "--output", tar_path, check_rc=0)
    with tarfile.open(tar_path) as tf:
        m = {x.name: x for x in tf.getmembers()}
        assert m["./attrs"].pax_headers["SCHILY.xattr.user.one"] == "1"
        assert m["./multi-link"].islnk() or m["./multi"].islnk()
        assert m["./fifo"].isfifo()
        assert tf.extractfile(m["./exact"]).read() == b"z" * 8192
        if root:
            assert m["./null"].ischr() and (m["./null"].devmajor, m["./null"].devminor) == (1, 3)
            assert m["./attrs"].uid == 70000


def test_create_check_inspect_unpack_pipeline(tex, tmp_path):
    """nydus-image create (builder) -> check -> unpack on the upstream all-entry-type tar."""
    assert "create" in run("--help").stdout
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "b.boot"
    run("create", "-t", "tar-rafs", "-B", boot, "-D", blobs, "--compressor", "lz4_block",
        "--features", "blob-toc", "--blob-inline-meta", tex / "tar/all-entry-type.tar", check_rc=0)
    proc = run("check", boot, "-D", blobs, check_rc=0)
    assert "1 chunks (15 bytes) verified" in proc.stdout
    data = json.loads(run("inspect", boot, "--json", "--tree", check_rc=0).stdout)
    paths = {e["path"]: e for e in data["tree"]}
    assert paths["/tar/dir2/symlink1.txt"]["target"] == "../dir1/dir3/file1.txt"
    assert paths["/tar/dir1/hardlink2.txt"]["nlink"] == 4
    out = tmp_path / "out"
    run("unpack", boot, "-D", blobs, "--output", out, check_rc=0)
    with tarfile.open(tex / "tar/all-entry-type.tar") as tf:
        for m in tf.getmembers():
            q = out / m.name.rstrip("/")
            assert q.is_symlink() if m.issym() else q.exists(), m.name
            assert int(q.lstat().st_mtime) == m.mtime, m.name
            if m.isfile():
                assert q.read_bytes() == tf.extractfile(m).read()
            if m.islnk():
                assert q.stat().st_ino == (out / m.linkname).stat().st_ino
