"""Blob data → the files that own it: one walk of a RAFS tree, two questions answered.

:class:`FileChunkIndex` walks every regular file of an image once, through its chunk list, and
answers

* :meth:`FileChunkIndex.files` — which file ranges a range of a blob's uncompressed data holds
  (the prefetch trace recorder under the ``erofs`` driver, :mod:`rafs.trace`);
* :attr:`FileChunkIndex.chunks_by_blob` / :meth:`FileChunkIndex.next_in_file` — each blob's
  chunks by uncompressed offset, and which chunk follows a chunk within its file (the chunk →
  file boundary map the erofs blob files bound read amplification by, :mod:`rafs.fs.instance`).

A chunk shared by several files (de-duplicated) belongs to the first file in walk order.
"""

from __future__ import annotations

import bisect
from typing import Any

from storage.records import ChunkInfo

#: (path, file offset, size)
FileRange = tuple[str, int, int]


class FileChunkIndex:
    """Every chunk of every regular file of ``rafs`` (anything with ``walk()`` yielding
    ``(path, node)`` whose nodes have ``is_reg()``, ``attr().size`` and ``chunks(offset, size)``),
    by its blob and uncompressed offset."""

    def __init__(self, rafs: Any) -> None:
        spans: dict[int, dict[int, tuple[int, str, int]]] = {}  # blob -> start -> (size, path, file off)
        #: (blob index, chunk index) -> chunk, in first-seen (walk) order
        self.chunks: dict[tuple[int, int], ChunkInfo] = {}
        self._next: dict[tuple[int, int], ChunkInfo] = {}
        for path, node in rafs.walk():
            if not node.is_reg():
                continue
            size = node.attr().size
            if not size:
                continue
            file_off = 0
            prev = None
            for desc in node.chunks(0, size):
                c = desc.chunk
                if c is None:
                    prev = None
                else:
                    start = c.uncompressed_offset + desc.offset
                    spans.setdefault(c.blob_index, {}).setdefault(start, (desc.size, path, file_off))
                    if prev is not None and prev.blob_index == c.blob_index and prev.index != c.index:
                        self._next.setdefault((prev.blob_index, prev.index), c)
                    prev = c
                    self.chunks.setdefault((c.blob_index, c.index), c)
                file_off += desc.size
        self._starts: dict[int, list[int]] = {}
        self._spans: dict[int, list[tuple[int, str, int]]] = {}
        for blob_index, by_start in spans.items():
            keys = sorted(by_start)
            self._starts[blob_index] = keys
            self._spans[blob_index] = [by_start[k] for k in keys]

    @property
    def chunks_by_blob(self) -> dict[int, list[ChunkInfo]]:
        """Per blob: its chunks sorted by uncompressed offset (a new dict each call)."""
        tables: dict[int, list[ChunkInfo]] = {}
        for (blob_index, _), c in self.chunks.items():
            tables.setdefault(blob_index, []).append(c)
        for cs in tables.values():
            cs.sort(key=lambda c: c.uncompressed_offset)
        return tables

    @property
    def next_map(self) -> dict[tuple[int, int], ChunkInfo]:
        """``(blob index, chunk index)`` → the next chunk of the same file in the same blob
        (absent for a file's last chunk in that blob); a copy."""
        return dict(self._next)

    def next_in_file(self, blob_index: int, chunk_index: int) -> ChunkInfo | None:
        """The chunk that follows chunk ``chunk_index`` of blob ``blob_index`` in its file."""
        return self._next.get((blob_index, chunk_index))

    def files(self, blob_index: int, offset: int, size: int) -> list[FileRange]:
        """The file ranges ``(path, file offset, size)`` that ``size`` bytes at ``offset`` of the
        blob's uncompressed data hold, in blob order; padding between chunks maps to nothing."""
        starts = self._starts.get(blob_index)
        if not starts:
            return []
        spans = self._spans[blob_index]
        end = offset + size
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        out: list[FileRange] = []
        while i < len(starts) and starts[i] < end:
            span_size, path, file_off = spans[i]
            lo = max(offset, starts[i])
            hi = min(end, starts[i] + span_size)
            if hi > lo:
                piece = (path, file_off + lo - starts[i], hi - lo)
                if out and out[-1][0] == path and out[-1][1] + out[-1][2] == piece[1]:
                    out[-1] = (path, out[-1][1], out[-1][2] + piece[2])
                else:
                    out.append(piece)
            i += 1
        return out
