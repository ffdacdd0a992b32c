"""FileChunkIndex: one walk of an image answers which file ranges a blob range holds and which
chunk follows a chunk within its file (the trace recorder and the erofs blob files use it)."""

from __future__ import annotations

import random

import pytest

from rafs.builder import BuildOptions, build
from rafs.fileindex import FileChunkIndex
from rafs.fs.instance import blob_chunk_tables
from rafs.metadata import Rafs
from tests.builder_helpers import CHUNK


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


FILES = {  # path -> content; sizes cross chunk and 4 KiB block boundaries
    "a": _rand(3 * CHUNK + 1000, 1),
    "b": _rand(5000, 2),
    "c": _rand(2 * CHUNK, 3),
    "d": _rand(CHUNK, 1),          # the first chunk of a, de-duplicated
    "e": b"",
}


@pytest.fixture(scope="module")
def rafs(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    src = d / "src"
    src.mkdir()
    for rel, data in FILES.items():
        (src / rel).write_bytes(data)
    boot = str(d / "image.boot")
    build(str(src), bootstrap_out=boot, blob_out=str(d / "image.blob"), options=BuildOptions(chunk_size=CHUNK))
    with Rafs.open(boot) as r:
        yield r


def _chunks(rafs, name):
    return [d.chunk for d in rafs.lookup_path("/" + name).chunks(0, 1 << 30)]


def test_files_maps_every_chunk_back_to_its_first_file(rafs):
    index = FileChunkIndex(rafs)
    for name, data in FILES.items():
        file_off = 0
        for c in _chunks(rafs, name):
            owner = "/a" if name == "d" else "/" + name
            got = index.files(c.blob_index, c.uncompressed_offset, c.uncompressed_size)
            assert got == [(owner, file_off, c.uncompressed_size)]
            file_off += c.uncompressed_size
    # a range across a whole file merges into one piece; padding maps to nothing
    a = _chunks(rafs, "a")
    end = a[-1].uncompressed_offset + a[-1].uncompressed_size
    assert index.files(0, a[0].uncompressed_offset, end - a[0].uncompressed_offset) == [("/a", 0, len(FILES["a"]))]
    assert index.files(0, 1 << 40, 4096) == [] and index.files(9, 0, 4096) == []


def test_next_in_file_follows_a_file_and_stops_at_its_end(rafs):
    index = FileChunkIndex(rafs)
    for name in ("a", "b", "c"):
        cs = _chunks(rafs, name)
        for cur, nxt in zip(cs, cs[1:]):
            assert index.next_in_file(cur.blob_index, cur.index) == nxt
        assert index.next_in_file(cs[-1].blob_index, cs[-1].index) is None
    assert index.next_in_file(0, 1 << 20) is None
    assert index.next_map == {(c.blob_index, c.index): n for name in ("a", "c")
                              for c, n in zip(_chunks(rafs, name), _chunks(rafs, name)[1:])}


def test_chunks_by_blob_holds_each_chunk_once_by_offset(rafs):
    index = FileChunkIndex(rafs)
    tables = index.chunks_by_blob
    assert list(tables) == [0]
    offsets = [c.uncompressed_offset for c in tables[0]]
    assert offsets == sorted(offsets)
    assert {c.index for c in tables[0]} == {c.index for n in FILES for c in _chunks(rafs, n)}
    assert len(tables[0]) == rafs.blobs[0].chunk_count


class _NoChunkTable:
    """The image without its v6 chunk table: blob_chunk_tables must walk the files."""

    chunk_table_count = 0

    def __init__(self, rafs):
        self._rafs = rafs

    def __getattr__(self, name):
        return getattr(self._rafs, name)


def _materialize(tables):
    chunks = {b: [t.chunk(k) for k in range(len(t))] for b, t in tables.items()}
    nxt = {(b, t.chunk(k).index): t.next_chunk(k) for b, t in tables.items() for k in range(len(t))
           if t.next_chunk(k) is not None}
    return chunks, nxt


def test_erofs_chunk_tables_from_the_walk_match_the_v6_chunk_table(rafs):
    fast_tables, fast_next = _materialize(blob_chunk_tables(rafs))
    walk_tables, walk_next = _materialize(blob_chunk_tables(_NoChunkTable(rafs)))
    assert walk_tables == fast_tables
    assert walk_next == fast_next and fast_next
    assert fast_tables == FileChunkIndex(rafs).chunks_by_blob
