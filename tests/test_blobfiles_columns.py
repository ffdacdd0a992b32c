"""The erofs blob files (``BlobFiles``) built from the v6 chunk table read as columns, with each
``ChunkInfo`` made on first use: the same chunks, file map, iovecs and errors as building every
``ChunkInfo`` up front from ``Rafs.chunk_table()`` (the reference below), on images made by the
project's builder."""

from __future__ import annotations

import bisect
import pathlib
import random
import shutil

import pytest

from rafs.base import ChunkColumns
from rafs.builder import BuildOptions, build
from rafs.builder.merge import merge
from rafs.errors import FormatError, UnsupportedError
from rafs.fileindex import FileChunkIndex
from rafs.fs.instance import BlobFiles, blob_chunk_tables
from rafs.layout.v5 import RafsV5ChunkInfo
from rafs.metadata import Rafs
from storage import structs
from storage.records import BlobIoDesc
from storage.structs import StructTooShort
from tests.builder_helpers import CHUNK, make_tree

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIELDS = ("blob_index", "index", "flags", "compressed_size", "uncompressed_size",
          "compressed_offset", "uncompressed_offset", "file_offset", "crc32")


def _layer(root, seed: int, n: int) -> None:
    rnd = random.Random(seed)
    root.mkdir()
    for i in range(n):  # sizes across 4 KiB blocks and chunks: full, short and multi-chunk files
        size = rnd.choice([0, 1, 4095, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, rnd.randrange(1, 5 * CHUNK)])
        (root / f"l{seed}-{i:03d}").write_bytes(rnd.randbytes(size))
    (root / f"l{seed}-dup").write_bytes((root / f"l{seed}-000").read_bytes())  # a de-duplicated file


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """{name: bootstrap}: one layer with every file type, two merged layers (two blobs), and
    this repository's source in 4 KiB chunks (many files of several chunks)."""
    d = tmp_path_factory.mktemp("cols")
    (d / "blobs").mkdir()
    out = {}
    make_tree(str(d / "tree"), with_devices=False)
    out["tree"] = str(d / "tree.boot")
    build(str(d / "tree"), bootstrap_out=out["tree"], blob_dir=str(d / "blobs"),
          options=BuildOptions(chunk_size=CHUNK))
    layers = []
    for k in (1, 2):
        _layer(d / f"l{k}", k, 40)
        layers.append(str(d / f"l{k}.boot"))
        build(str(d / f"l{k}"), bootstrap_out=layers[-1], blob_dir=str(d / "blobs"),
              options=BuildOptions(chunk_size=CHUNK))
    out["merged"] = str(d / "merged.boot")
    merge(layers, out["merged"])
    out["source"] = str(d / "source.boot")  # a real tree: this repository's own packages
    shutil.copytree(ROOT / "rafs", d / "source" / "rafs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "storage", d / "source" / "storage", ignore=shutil.ignore_patterns("__pycache__"))
    build(str(d / "source"), bootstrap_out=out["source"], blob_dir=str(d / "blobs"),
          options=BuildOptions(chunk_size=0x1000))
    return out


# --- the reference: every ChunkInfo made up front (the code before the columns) ---------------


def _eager(rafs):
    seen = {}
    for c in rafs.chunk_table():
        seen.setdefault((c.blob_index, c.index), c)
    tables = {}
    for (b, _), c in seen.items():
        tables.setdefault(b, []).append(c)
    for cs in tables.values():
        cs.sort(key=lambda c: c.uncompressed_offset)
    nxt = {}
    for b, cs in tables.items():
        for a, c in zip(cs, cs[1:]):
            if a.uncompressed_size == rafs.chunk_size and c.index == a.index + 1:
                nxt[(b, a.index)] = c
    return tables, nxt


def _materialize(tables):
    chunks = {b: [t.chunk(k) for k in range(len(t))] for b, t in tables.items()}
    nxt = {(b, t.chunk(k).index): t.next_chunk(k) for b, t in tables.items() for k in range(len(t))
           if t.next_chunk(k) is not None}
    return chunks, nxt


def _eager_range(files, chunks, blob_index, offset, size):
    chunks = chunks.get(blob_index, [])
    starts = [c.uncompressed_offset for c in chunks]
    blob = files.blobs[blob_index]
    end = min(offset + size, files.data_size(blob_index))
    out, pos = [], offset
    i = max(bisect.bisect_right(starts, pos) - 1, 0)
    while pos < end:
        chunk = chunks[i] if i < len(chunks) else None
        if chunk is None or pos < chunk.uncompressed_offset:
            gap_end = end if chunk is None else min(end, chunk.uncompressed_offset)
            out.append(BlobIoDesc(None, None, 0, gap_end - pos))
            pos = gap_end
            continue
        chunk_end = chunk.uncompressed_offset + chunk.uncompressed_size
        if pos >= chunk_end:
            i += 1
            continue
        n = min(end, chunk_end) - pos
        out.append(BlobIoDesc(blob, chunk, pos - chunk.uncompressed_offset, n))
        pos += n
        i += 1
    return out


@pytest.mark.parametrize("name", ["tree", "merged", "source"])
def test_lazy_chunks_equal_the_eager_ones_on_a_built_image(images, name):
    with Rafs.open(images[name]) as rafs:
        chunks, nxt = _eager(rafs)
        files = BlobFiles(rafs)
        assert all(c is None for t in files.tables.values() for c in t.infos)  # nothing made yet
        assert len(files.tables) == (2 if name == "merged" else 1)
        assert sum(map(len, chunks.values())) > (200 if name == "source" else 50)
        got_chunks, got_next = _materialize(files.tables)
        assert got_chunks == chunks
        assert got_next == nxt and nxt  # files of several chunks continue
        for b, cs in chunks.items():
            assert files.data_end(b) == max(c.uncompressed_offset + c.uncompressed_size for c in cs)
            for a in cs:
                for c in cs:
                    assert files.same_file(b, a.index, c.index) == (nxt.get((b, a.index)) == c)
        assert not files.same_file(0, 1 << 23, 0) and not files.same_file(7, 0, 1)


@pytest.mark.parametrize("name", ["tree", "merged", "source"])
def test_blob_range_and_file_ahead_equal_the_eager_ones(images, name):
    rnd = random.Random(5)
    with Rafs.open(images[name]) as rafs:
        chunks, nxt = _eager(rafs)
        files = BlobFiles(rafs)
        for b in chunks:
            size = files.data_size(b)
            starts = [c.uncompressed_offset for c in chunks[b]]
            probes = [(0, size), (0, 1), (size - 1, 10), (size, 4096)]
            probes += [(rnd.randrange(size), rnd.choice([1, 4096, 70000, 1 << 20])) for _ in range(300)]
            for off, n in probes:
                assert list(files.blob_range(b, off, n)) == _eager_range(files, chunks, b, off, n), (b, off, n)
                i = bisect.bisect_right(starts, max(off + n - 1, 0)) - 1
                want, c, total = [], (chunks[b][i] if i >= 0 else None), 0
                c = nxt.get((b, c.index)) if c is not None else None
                while c is not None and total < 3 * CHUNK:
                    want.append(BlobIoDesc(files.blobs[b], c, 0, c.uncompressed_size))
                    total += c.uncompressed_size
                    c = nxt.get((b, c.index))
                assert list(files.file_ahead(b, off, n, 3 * CHUNK)) == want, (b, off, n)


class _Columns:
    """The image with its chunk table columns rearranged (same entries, other order/repeats)."""

    def __init__(self, rafs, order):
        self._rafs = rafs
        self._order = order

    def __getattr__(self, name):
        return getattr(self._rafs, name)

    def chunk_columns(self):
        cols = self._rafs.chunk_columns()
        pick = lambda col: [col[p] for p in self._order]  # noqa: E731
        return ChunkColumns(pick(cols.blob_index), pick(cols.index), pick(cols.uncompressed_offset),
                            pick(cols.uncompressed_size), lambda pos: cols.entry(self._order[pos]))


def test_unsorted_repeated_and_incomplete_tables(images):
    with Rafs.open(images["merged"]) as rafs:
        want = _materialize(blob_chunk_tables(rafs))
        n = rafs.chunk_table_count
        shuffled = list(range(n))
        random.Random(3).shuffle(shuffled)
        assert _materialize(blob_chunk_tables(_Columns(rafs, shuffled))) == want  # sorted here
        repeated = list(range(n)) + [n - 1, 0, n // 2]
        assert _materialize(blob_chunk_tables(_Columns(rafs, repeated))) == want  # first entry counts
        # a chunk missing from the table: the files are walked instead (the exact file map,
        # where the table's guess joins a file ending on a whole chunk to the next chunk)
        walked = _materialize(blob_chunk_tables(_Columns(rafs, list(range(1, n)))))
        assert walked[0] == want[0]
        assert walked[1] == FileChunkIndex(rafs).next_map


def _patched(images, tmp_path, pos, **fields):
    """A copy of the one-layer image with chunk table entry ``pos`` changed."""
    path = tmp_path / "patched.boot"
    shutil.copy(images["tree"], path)
    with Rafs.open(images["tree"]) as rafs:
        off = rafs.ext.s_chunk_table_offset + pos * RafsV5ChunkInfo.SIZE
    data = bytearray(path.read_bytes())
    ent = RafsV5ChunkInfo.parse(data, off)
    ent.replace(**{k: (v(getattr(ent, k)) if callable(v) else v) for k, v in fields.items()}).pack_into(data, off)
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("fields", [{"flags": 0x8000}, {"uncompressed_size": 0},
                                    {"uncompressed_size": CHUNK + 1}, {"blob_index": 5},
                                    {"index": 1 << 24}])
def test_a_bad_entry_raises_what_the_chunk_table_raises(images, tmp_path, fields):
    boot = _patched(images, tmp_path, 2, **fields)
    with Rafs.open(boot) as rafs:
        with pytest.raises(FormatError) as want:
            list(rafs.chunk_table())
        with pytest.raises(FormatError) as got:
            BlobFiles(rafs)
        assert str(got.value) == str(want.value) and "chunk table entry 2" in str(got.value)


def test_unaligned_and_overlapping_chunks_name_the_chunk(images, tmp_path):
    with Rafs.open(images["tree"]) as rafs:
        cs = _eager(rafs)[0][0]
        blob_id = rafs.blobs[0].blob_id
        table = list(rafs.chunk_table())
    # the table entry of the third chunk by offset
    third = cs[2]
    pos = next(p for p, c in enumerate(table) if (c.blob_index, c.index) == (0, third.index))
    boot = _patched(images, tmp_path, pos, uncompressed_offset=lambda v: v + 0x200)
    with Rafs.open(boot) as rafs, pytest.raises(UnsupportedError) as err:
        BlobFiles(rafs)
    assert str(err.value) == (f"kernel EROFS needs 4 KiB aligned chunks: chunk {third.index} of blob "
                              f"{blob_id} is at uncompressed offset {third.uncompressed_offset + 0x200:#x}")
    boot = _patched(images, tmp_path, pos, uncompressed_offset=cs[1].uncompressed_offset)
    with Rafs.open(boot) as rafs, pytest.raises(UnsupportedError) as err:
        BlobFiles(rafs)
    first, second = sorted([cs[1], third], key=lambda c: next(
        p for p, t in enumerate(table) if (t.blob_index, t.index) == (0, c.index)))
    assert str(err.value) == f"chunks {first.index} and {second.index} overlap in the uncompressed blob"


def test_chunks_out_of_index_order_end_the_file_map(images, tmp_path):
    """Two whole chunks of different files swap places in the blob: sorted by offset their ci
    indexes no longer follow each other there, which ends a file in the table's file map."""
    with Rafs.open(images["tree"]) as rafs:
        table = list(rafs.chunk_table())
    full = [p for p, c in enumerate(table) if c.uncompressed_size == CHUNK]
    a, b = full[1], full[-2]
    boot = _patched(images, tmp_path, a, uncompressed_offset=table[b].uncompressed_offset)
    shutil.copy(boot, tmp_path / "once.boot")
    images = {"tree": str(tmp_path / "once.boot")}
    boot = _patched(images, tmp_path, b, uncompressed_offset=table[a].uncompressed_offset)
    with Rafs.open(boot) as rafs:
        chunks, nxt = _eager(rafs)
        assert [c.index for c in chunks[0]] != sorted(c.index for c in chunks[0])
        assert _materialize(blob_chunk_tables(rafs)) == (chunks, nxt)


def test_parse_columns_equals_parse_array_both_ways(images, monkeypatch):
    with Rafs.open(images["merged"]) as rafs:
        buf = rafs._img.buffer()
        off, n = rafs.ext.s_chunk_table_offset, rafs.chunk_table_count
        rows = RafsV5ChunkInfo.parse_array(buf, off, n)
        want = [[getattr(r, f) for r in rows] for f in FIELDS]
        assert RafsV5ChunkInfo.parse_columns(buf, off, n, *FIELDS) == want
        monkeypatch.setattr(structs, "_COLUMNS_BY_CAST", False)  # big-endian machines: unpacked rows
        assert RafsV5ChunkInfo.parse_columns(buf, off, n, *FIELDS) == want
        assert RafsV5ChunkInfo.parse_columns(buf, off, 0, "index") == [[]]
        with pytest.raises(TypeError, match="block_id"):
            RafsV5ChunkInfo.parse_columns(buf, off, n, "block_id")
        with pytest.raises(StructTooShort):
            RafsV5ChunkInfo.parse_columns(buf, len(buf) - 100, 2, "index")


def test_chunk_info_lookup_index_built_from_columns(images, tmp_path):
    """``chunk_info(blob, index)`` (the storage layer's digest lookup): its index is built from
    the table's columns, answers every entry as ``chunk_table()`` has it, and a bad entry is
    still named as the entry-by-entry reader names it."""
    with Rafs.open(images["merged"]) as rafs:
        table = list(rafs.chunk_table())
        first = {}
        for c in table:
            first.setdefault((c.blob_index, c.index), c)
        assert all(rafs.chunk_info(b, i) == c for (b, i), c in first.items())
        with pytest.raises(FormatError, match="missing from the chunk table"):
            rafs.chunk_info(0, rafs.blobs[0].chunk_count + 7)
    for fields, words in (({"blob_index": 5}, "blob_index 5 out of range"), ({"index": 1 << 20}, "index 1048576 >=")):
        with Rafs.open(_patched(images, tmp_path, 2, **fields)) as rafs:
            with pytest.raises(FormatError, match=f"chunk table entry 2: {words}"):
                rafs.chunk_info(0, 0)
