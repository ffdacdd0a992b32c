"""Prefetch traces: which files (and ranges) a container read first, in access order.

A daemon with ``fs_prefetch.record_trace`` keeps a :class:`TraceRecorder` per mounted image and
exports what it saw (``GET /api/v1/trace``); ``nydusify convert --prefetch-trace`` and
``nydus-image create --prefetch-policy fs`` take the result as the image's prefetch list: the
files go to the bootstrap's prefetch table and are laid out first in the blobs, in trace order.

The file format is text, one file a line, in first-access order::

    # nydus prefetch trace v1
    /usr/bin/python3.11\t0+4096,8192+1040384
    /usr/lib/python3.11/os.py\t0+39936

* ``#`` lines and blank lines are ignored;
* a path is absolute; ``\\``, tab and newline in it are written ``\\\\``, ``\\t``, ``\\n``;
* after an optional tab: the byte ranges read, ``offset+size`` separated by commas, merged and
  in the order they were first read.

A plain list of paths (what ``--prefetch-patterns`` reads) is a valid trace without ranges.

Under the ``fusedev`` driver the daemon sees reads per inode. Under ``erofs`` it only sees
reads of the blob files the kernel uses as devices; :class:`rafs.fileindex.FileChunkIndex` maps
those ranges back to files through the chunk lists of the bootstrap.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rafs.errors import TraceError
from rafs.fileindex import FileChunkIndex

TRACE_HEADER = "# nydus prefetch trace v1"
#: recording stops growing after this many distinct files / blob ranges (a container that reads
#: a whole image has no start-up set worth keeping beyond it)
MAX_TRACE_KEYS = 1 << 17
#: ranges kept per file (or per blob); later ranges merge into the last one
MAX_RANGES_PER_KEY = 4096

Range = tuple[int, int]  # (offset, size)


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One file of a trace: its absolute path and the ranges read, in first-read order."""

    path: str
    ranges: tuple[Range, ...] = ()

    @property
    def read_size(self) -> int:
        return sum(size for _, size in self.ranges)


# ---------------------------------------------------------------------- format


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _unescape(text: str, lineno: int) -> str:
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1:i + 2]
            if nxt not in ("\\", "t", "n"):
                raise TraceError(f"line {lineno}: bad escape {text[i:i + 2]!r} in path")
            out.append({"\\": "\\", "t": "\t", "n": "\n"}[nxt])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def format_trace(entries: Iterable[TraceEntry]) -> str:
    """The text of a trace file (header line first)."""
    lines = [TRACE_HEADER]
    for e in entries:
        line = _escape(e.path)
        if e.ranges:
            line += "\t" + ",".join(f"{off}+{size}" for off, size in e.ranges)
        lines.append(line)
    return "\n".join(lines) + "\n"


def parse_trace(text: str) -> list[TraceEntry]:
    """Parse a trace (or a plain path list); :class:`TraceError` names the bad line.

    A path listed twice keeps its first position; its ranges are appended.
    """
    order: list[str] = []
    ranges: dict[str, list[Range]] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path_part, _, range_part = line.partition("\t")
        path = _unescape(path_part.strip(" "), lineno)
        if not path.startswith("/"):
            raise TraceError(f"line {lineno}: path {path!r} is not absolute")
        parts = [p for p in path.split("/") if p and p != "."]
        if ".." in parts:
            raise TraceError(f"line {lineno}: path {path!r} has a '..' component")
        path = "/" + "/".join(parts)
        got: list[Range] = []
        for item in filter(None, (r.strip() for r in range_part.split(","))):
            off_s, plus, size_s = item.partition("+")
            try:
                off, size = int(off_s), int(size_s)
            except ValueError:
                raise TraceError(f"line {lineno}: bad range {item!r} (expected offset+size)") from None
            if not plus or off < 0 or size <= 0:
                raise TraceError(f"line {lineno}: bad range {item!r} (expected offset+size, size > 0)")
            got.append((off, size))
        if path not in ranges:
            order.append(path)
            ranges[path] = []
        ranges[path].extend(got)
    return [TraceEntry(p, tuple(ranges[p])) for p in order]


def load_trace(path: str | os.PathLike) -> list[TraceEntry]:
    """Read and parse a trace file."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            text = fh.read()
    except OSError as exc:
        raise TraceError(f"cannot read trace {os.fspath(path)!r}: {exc}") from exc
    try:
        return parse_trace(text)
    except TraceError as exc:
        raise TraceError(f"{os.fspath(path)}: {exc}") from None


def trace_paths(entries: Iterable[TraceEntry]) -> list[str]:
    """The prefetch list of a trace: its paths in access order."""
    return [e.path for e in entries]


# ---------------------------------------------------------------------- recording


def _add_range(ranges: list[Range], offset: int, size: int) -> None:
    """Add a read in arrival order, merged into every range it touches or overlaps (parallel
    FUSE workers and the kernel's async read-ahead deliver one file's reads out of order: a
    file read whole still records as one range, kept at the place of its first read)."""
    end = offset + size
    hit = -1
    for i, (off, n) in enumerate(ranges):
        if off <= end and offset <= off + n:
            if hit < 0:
                hit = i
                offset, end = min(off, offset), max(off + n, end)
                ranges[i] = (offset, end - offset)
            else:  # the new read bridges two ranges: fold the later one into the first
                offset, end = min(off, offset), max(off + n, end)
                ranges[hit] = (offset, end - offset)
                ranges[i] = (-1, 0)
    if hit >= 0:
        ranges[:] = [r for r in ranges if r[0] >= 0]
        return
    if len(ranges) >= MAX_RANGES_PER_KEY:
        last_off, last_size = ranges[-1]
        lo = min(last_off, offset)
        ranges[-1] = (lo, max(last_off + last_size, end) - lo)
        return
    ranges.append((offset, size))


class TraceRecorder:
    """Records the reads of one mounted image, cheaply, in arrival order; :meth:`entries`
    resolves them to files (inode → path, or blob range → files) only when asked.

    ``tree`` is the instance's tree: a :class:`rafs.metadata.Rafs` (fusedev: reads arrive per
    inode) or a :class:`rafs.fs.instance.BlobFiles` (erofs: reads arrive per blob file; its
    ``rafs`` is the image).
    """

    def __init__(self, tree: Any, *, max_keys: int = MAX_TRACE_KEYS) -> None:
        self._tree = tree
        self._blob_mode = hasattr(tree, "rafs") and hasattr(tree, "blob_range")
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._reads: dict[int, list[Range]] = {}  # ino (fusedev) or blob index (erofs), first-read order
        self._events: list[tuple[int, int, int]] = []  # erofs: (blob index, offset, size) in order
        self.dropped = 0  #: reads not recorded because the trace was full

    def record(self, inode: Any, offset: int, size: int) -> None:
        """One read that returned ``size`` bytes at ``offset`` of ``inode``."""
        if size <= 0:
            return
        if self._blob_mode:
            blob = getattr(inode, "blob", None)
            if blob is None:
                return
            with self._lock:
                if len(self._events) >= self._max_keys:
                    self.dropped += 1
                    return
                ev = self._events
                if ev and ev[-1][0] == blob.blob_index and ev[-1][1] + ev[-1][2] == offset:
                    ev[-1] = (blob.blob_index, ev[-1][1], ev[-1][2] + size)  # a sequential read goes on
                else:
                    ev.append((blob.blob_index, offset, size))
            return
        key = inode.ino
        with self._lock:
            ranges = self._reads.get(key)
            if ranges is None:
                if len(self._reads) >= self._max_keys:
                    self.dropped += 1
                    return
                ranges = self._reads[key] = []
            _add_range(ranges, offset, size)

    def entries(self) -> list[TraceEntry]:
        """The trace so far: files in first-access order with the ranges read."""
        with self._lock:
            reads = {k: list(v) for k, v in self._reads.items()}
            events = list(self._events)
        files: dict[str, list[Range]] = {}
        if self._blob_mode:
            index = FileChunkIndex(self._tree.rafs)
            for blob_index, offset, size in events:
                for path, file_off, n in index.files(blob_index, offset, size):
                    _add_range(files.setdefault(path, []), file_off, n)
        elif reads:
            paths = self._paths(set(reads))
            for ino, ranges in reads.items():
                path = paths.get(ino)
                if path is not None:
                    dst = files.setdefault(path, [])
                    for off, n in ranges:
                        _add_range(dst, off, n)
        return [TraceEntry(p, tuple(r)) for p, r in files.items()]

    def _paths(self, wanted: set[int]) -> dict[int, str]:
        """First path of each wanted inode (one walk of the image)."""
        out: dict[int, str] = {}
        for path, node in self._tree.walk():
            if node.ino in wanted and node.ino not in out:
                out[node.ino] = path
                if len(out) == len(wanted):
                    break
        return out

    def text(self) -> str:
        return format_trace(self.entries())
