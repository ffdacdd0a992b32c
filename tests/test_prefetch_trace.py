"""Prefetch traces: the file format, recording (per inode and per blob range through the reverse
index), and builds that lay the traced files out first, in trace order."""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile

import pytest

from rafs.builder import BuildOptions, build
from rafs.errors import TraceError
from rafs.fileindex import FileChunkIndex
from rafs.fs.instance import BlobFiles
from rafs.metadata import Rafs
from rafs.trace import TraceEntry, TraceRecorder, format_trace, load_trace, parse_trace, trace_paths
from tests.builder_helpers import CHUNK

# ---------------------------------------------------------------------- format


def test_format_round_trip_with_escapes():
    entries = [TraceEntry("/usr/bin/python3", ((0, 4096), (8192, 65536))),
               TraceEntry("/odd\tname\nwith\\slash", ()),
               TraceEntry("/etc/hostname", ((0, 12),))]
    text = format_trace(entries)
    assert text.startswith("# nydus prefetch trace v1\n")
    assert "/usr/bin/python3\t0+4096,8192+65536\n" in text
    assert "/odd\\tname\\nwith\\\\slash\n" in text
    assert parse_trace(text) == entries


def test_plain_path_list_is_a_trace(tmp_path):
    p = tmp_path / "list"
    p.write_text("/usr/bin/env\n\n# comment\n/usr//lib/./x/\n/usr/bin/env\t0+10\n")
    got = load_trace(p)
    assert got == [TraceEntry("/usr/bin/env", ((0, 10),)), TraceEntry("/usr/lib/x", ())]
    assert trace_paths(got) == ["/usr/bin/env", "/usr/lib/x"]


@pytest.mark.parametrize("line, what", [
    ("usr/bin/env", "not absolute"),
    ("/a/../b", "'..' component"),
    ("/a\t0+", "bad range"),
    ("/a\t10", "bad range"),
    ("/a\t-1+5", "bad range"),
    ("/a\t0+0", "bad range"),
    ("/a\\x", "bad escape"),
])
def test_bad_trace_names_the_line(line, what):
    with pytest.raises(TraceError, match=f"line 2: .*{what}"):
        parse_trace("/ok\n" + line + "\n")


def test_missing_trace_file(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(tmp_path / "nope")


# ---------------------------------------------------------------------- an image to trace


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


FILES = {  # path -> content; sizes cross chunk (64 KiB) and block boundaries
    "bin/app": _rand(3 * CHUNK + 100, 1),
    "etc/conf": b"conf\n" * 10,
    "lib/a.so": _rand(CHUNK, 2),
    "lib/b.so": _rand(5000, 3),
    "lib/dup.so": _rand(CHUNK, 2),          # same chunk as lib/a.so (deduplicated)
    "share/big": _rand(6 * CHUNK, 4),
    "share/doc/readme": b"read me\n" * 300,
    "zz/last": _rand(9000, 5),
}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    src = d / "src"
    for rel, data in FILES.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    boot, blob = str(d / "image.boot"), str(d / "image.blob")
    build(str(src), bootstrap_out=boot, blob_out=blob, options=BuildOptions(chunk_size=CHUNK))
    return boot, blob


def test_reverse_index_maps_every_chunk_back_to_its_file(image):
    boot, _ = image
    with Rafs.open(boot) as rafs:
        index = FileChunkIndex(rafs)
        for rel, data in FILES.items():
            node = rafs.lookup_path("/" + rel)
            file_off = 0
            for desc in node.chunks(0, len(data)):
                start = desc.chunk.uncompressed_offset + desc.offset
                got = index.files(desc.chunk.blob_index, start, desc.size)
                owner = "/lib/a.so" if rel == "lib/dup.so" else "/" + rel  # first in walk order
                assert got == [(owner, file_off, desc.size)]
                file_off += desc.size
        # one blob range over several files, with the 4 KiB padding between them
        node = rafs.lookup_path("/lib/b.so")
        c = node.chunks(0, 5000)[0].chunk
        got = index.files(c.blob_index, c.uncompressed_offset + 100, 8192)
        assert got[0] == ("/lib/b.so", 100, 4900)
        assert all(size > 0 for _, _, size in got)
        assert index.files(c.blob_index, 1 << 40, 4096) == []
        assert index.files(99, 0, 4096) == []


def test_recorder_per_inode_keeps_first_access_order_and_merges_ranges(image):
    boot, _ = image
    with Rafs.open(boot) as rafs:
        rec = TraceRecorder(rafs)
        conf, app, big = (rafs.lookup_path(p) for p in ("/etc/conf", "/bin/app", "/share/big"))
        rec.record(big, 0, 4096)
        rec.record(conf, 0, 50)
        rec.record(big, 4096, 4096)        # sequential: merges
        rec.record(app, CHUNK, 100)
        rec.record(big, 0, 100)            # re-read inside the first range
        rec.record(app, 0, 0)              # nothing read: ignored
        got = rec.entries()
        assert got == [TraceEntry("/share/big", ((0, 8192),)),
                       TraceEntry("/etc/conf", ((0, 50),)),
                       TraceEntry("/bin/app", ((CHUNK, 100),))]
        assert parse_trace(rec.text()) == got


def test_recorder_merges_one_files_reads_that_arrive_out_of_order(image):
    """Parallel FUSE workers answer the kernel's read-ahead out of order: a file read whole is
    still one range (seen in CI: (0, 16K), (80K, 112K), (16K, 64K) for one 192 KiB file)."""
    boot, _ = image
    with Rafs.open(boot) as rafs:
        rec = TraceRecorder(rafs)
        big = rafs.lookup_path("/share/big")
        rec.record(big, 0, 16384)
        rec.record(big, 81920, 114688)
        rec.record(big, 300000, 10)        # a separate range stays separate, in arrival order
        rec.record(big, 16384, 65536)      # bridges the first two
        assert rec.entries() == [TraceEntry("/share/big", ((0, 196608), (300000, 10)))]


def test_recorder_per_blob_range_resolves_files_through_the_bootstrap(image):
    """The erofs driver: the kernel reads the blob files; the trace still names files in order."""
    boot, _ = image
    with Rafs.open(boot) as rafs:
        files = BlobFiles(rafs)
        rec = TraceRecorder(files)
        blob_node = files.files[0]

        def where(path: str, off: int = 0) -> int:
            node = rafs.lookup_path(path)
            desc = node.chunks(off, 1)[0]
            return desc.chunk.uncompressed_offset + desc.offset

        rec.record(blob_node, where("/zz/last"), 9000)
        rec.record(blob_node, where("/bin/app", 2 * CHUNK), CHUNK)
        rec.record(blob_node, where("/etc/conf"), 4096)    # the file is 50 bytes: padding ignored
        rec.record(files.root, 0, 10)                      # not a blob file: ignored
        got = rec.entries()
        assert got == [TraceEntry("/zz/last", ((0, 9000),)),
                       TraceEntry("/bin/app", ((2 * CHUNK, CHUNK),)),
                       TraceEntry("/etc/conf", ((0, 50),))]


def test_recorder_is_bounded(image):
    boot, _ = image
    with Rafs.open(boot) as rafs:
        rec = TraceRecorder(rafs, max_keys=2)
        for p in ("/etc/conf", "/bin/app", "/zz/last"):
            rec.record(rafs.lookup_path(p), 0, 10)
        assert [e.path for e in rec.entries()] == ["/etc/conf", "/bin/app"]
        assert rec.dropped == 1


# ---------------------------------------------------------------------- layout in trace order


def _tar(compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rel in sorted(FILES):
            info = tarfile.TarInfo("./" + rel)
            info.size = len(FILES[rel])
            tf.addfile(info, io.BytesIO(FILES[rel]))
        link = tarfile.TarInfo("./bin/app-link")
        link.type, link.linkname = tarfile.LNKTYPE, "./bin/app"
        tf.addfile(link)
    data = buf.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


TRACE = ["/zz/last", "/etc/conf", "/bin/app-link", "/share/doc", "/lib/b.so", "/missing"]
ORDER = ["/zz/last", "/etc/conf", "/bin/app", "/share/doc/readme", "/lib/b.so"]


def _first_offsets(boot: str) -> dict[str, int]:
    with Rafs.open(boot) as rafs:
        out = {}
        for path, node in rafs.walk():
            if node.is_reg() and node.attr().size:
                out[path] = node.chunks(0, 1)[0].chunk.compressed_offset
        return out


def _read_all(boot: str, blob: str) -> dict[str, bytes]:
    from rafs._blobfile import LocalBlobs

    with Rafs.open(boot) as rafs, LocalBlobs(list(rafs.blobs), blob=blob) as blobs:
        return {p: b"".join(blobs.iter_file(n)) for p, n in rafs.walk() if n.is_reg() and n.attr().size}


@pytest.mark.parametrize("compress", [False, True], ids=["tar", "tar.gz"])
def test_tar_layer_lays_out_traced_files_first_in_trace_order(tmp_path, compress):
    src = tmp_path / "layer.tar"
    src.write_bytes(_tar(compress))
    boot, blob = str(tmp_path / "l.boot"), str(tmp_path / "l.blob")
    build(str(src), bootstrap_out=boot, blob_out=blob, source_type="tar-rafs",
          options=BuildOptions(chunk_size=CHUNK, prefetch=TRACE))
    offsets = _first_offsets(boot)
    traced = [offsets[p] for p in ORDER]
    assert traced == sorted(traced) and traced[0] == 0, offsets
    rest = [o for p, o in offsets.items() if p not in ORDER and p != "/bin/app-link"]
    assert min(rest) > max(traced)
    # the data is right and nothing was stored twice (the second walk deduplicated)
    got = _read_all(boot, blob)
    for rel, data in FILES.items():
        assert got["/" + rel] == data
    plain_boot, plain_blob = str(tmp_path / "p.boot"), str(tmp_path / "p.blob")
    build(str(src), bootstrap_out=plain_boot, blob_out=plain_blob, source_type="tar-rafs",
          options=BuildOptions(chunk_size=CHUNK))
    with Rafs.open(boot) as a, Rafs.open(plain_boot) as b:
        assert [(x.chunk_count, x.uncompressed_size) for x in a.blobs] == \
            [(x.chunk_count, x.uncompressed_size) for x in b.blobs]
    # the prefetch table lists the traced inodes in trace order (upstream: u32 nids)
    with Rafs.open(boot) as rafs:
        want = [rafs.lookup_path(p).ino for p in TRACE[:5]]
        assert rafs.prefetch_inos == want
    # the pattern "/" (whole image) keeps tar order
    all_boot, all_blob = str(tmp_path / "a.boot"), str(tmp_path / "a.blob")
    build(str(src), bootstrap_out=all_boot, blob_out=all_blob, source_type="tar-rafs",
          options=BuildOptions(chunk_size=CHUNK, prefetch=["/"]))
    assert _first_offsets(all_boot) == _first_offsets(plain_boot)


def test_tar_stream_that_cannot_seek_keeps_tar_order(tmp_path):
    r, w = os.pipe()
    data = _tar()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    boot, blob = str(tmp_path / "s.boot"), str(tmp_path / "s.blob")
    with os.fdopen(r, "rb") as stream:
        build(stream, bootstrap_out=boot, blob_out=blob, source_type="tar-rafs",
              options=BuildOptions(chunk_size=CHUNK, prefetch=TRACE))
    os.waitpid(pid, 0)
    offsets = _first_offsets(boot)
    assert offsets["/bin/app"] == 0  # first in the tar
    assert _read_all(boot, blob)["/zz/last"] == FILES["zz/last"]


def test_nydus_image_create_takes_a_trace_on_stdin(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "layer.tar"
    src.write_bytes(_tar())
    trace = format_trace([TraceEntry(p, ((0, 1),)) for p in ORDER])
    boot, blob = str(tmp_path / "c.boot"), str(tmp_path / "c.blob")
    argv = [sys.executable, "-m", "rafs.cli", "create", "--type", "tar-rafs", "--chunk-size", hex(CHUNK),
            "--prefetch-policy", "fs", "--bootstrap", boot, "--blob", blob, str(src)]
    r = subprocess.run(argv, input=trace, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    offsets = _first_offsets(boot)
    traced = [offsets[p] for p in ORDER]
    assert traced == sorted(traced) and traced[0] == 0
    with Rafs.open(boot) as rafs:
        assert rafs.prefetch_inos == [rafs.lookup_path(p).ino for p in ORDER]
    r = subprocess.run(argv, input="# nydus prefetch trace v1\n/a\t1+\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "line 2: bad range" in r.stderr


# ---------------------------------------------------------------------- nydusify optimize


def test_optimize_rebuild_moves_the_startup_set_into_a_new_leading_blob(image, tmp_path):
    from rafs._blobfile import LocalBlobs
    from rafs.convert.optimize import rebuild

    boot, blob = image
    with Rafs.open(boot) as rafs:
        old_id = rafs.blobs[0].blob_id
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    os.link(blob, blob_dir / old_id)
    reads: list[tuple[int, int]] = []

    def read_range(blob_id: str, offset: int, size: int) -> bytes:
        assert blob_id == old_id
        reads.append((offset, size))
        with open(blob, "rb") as f:
            f.seek(offset)
            return f.read(size)

    paths = ["/zz/last", "/share/doc", "/bin/app", "/lib/dup.so", "/nope"]
    work = tmp_path / "work"
    work.mkdir()
    built = rebuild(boot, paths, str(work), read_range, merging_size=1 << 20)
    assert built.startup_files == 4 and built.blob_ids == [old_id, built.new_blob_id]
    assert len(reads) <= 3  # merged range reads, not one per chunk
    os.link(built.new_blob, blob_dir / built.new_blob_id)
    with Rafs.open(built.bootstrap) as rafs:
        assert rafs.prefetch_inos == [rafs.lookup_path(p).ino for p in paths[:4]]
        order = ["/zz/last", "/share/doc/readme", "/bin/app", "/lib/dup.so"]
        firsts = []
        for p in order:
            descs = list(rafs.lookup_path(p).chunks(0, len(FILES[p[1:]])))
            assert {d.chunk.blob_index for d in descs} == {1}, p
            firsts.append(descs[0].chunk.compressed_offset)
        assert firsts == sorted(firsts) and firsts[0] == 0
        assert {d.chunk.blob_index for d in rafs.lookup_path("/etc/conf").chunks(0, 50)} == {0}
        with LocalBlobs(list(rafs.blobs), blob_dir=str(blob_dir)) as blobs:
            for rel, data in FILES.items():
                assert b"".join(blobs.iter_file(rafs.lookup_path("/" + rel))) == data, rel
        # the chunk table keeps every chunk of the reused blob (the moved ones too), so an erofs
        # mount takes each blob's layout from it instead of walking every file
        from rafs.fs.instance import _chunk_table_by_blob, _walk_chunk_tables

        tables = _chunk_table_by_blob(rafs)
        assert tables is not None and set(tables) == {0, 1}
        assert len(tables[0].index) == rafs.blobs[0].chunk_count
        for blob_index, walked in _walk_chunk_tables(rafs).items():
            rows = set(zip(tables[blob_index].starts, tables[blob_index].sizes, tables[blob_index].index))
            assert set(zip(walked.starts, walked.sizes, walked.index)) <= rows


def test_optimize_rebuild_rejects_a_trace_of_another_image(image, tmp_path):
    from rafs.convert.errors import ConvertError
    from rafs.convert.optimize import rebuild

    with pytest.raises(ConvertError, match="no file of the prefetch list"):
        rebuild(image[0], ["/not/here"], str(tmp_path), lambda *a: b"")
