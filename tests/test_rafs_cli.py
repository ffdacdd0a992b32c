"""``nydus-image inspect/check/unpack`` run as subprocesses on the upstream vectors."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
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
