"""An image instance served by :class:`rafs.fs.RafsFs`: a metadata tree plus a blob device.

The tree is anything with the :class:`rafs.metadata.Rafs` surface (``root_ino``, ``inode``,
``blobs``...). :class:`BlobFiles` is such a tree too: a directory with one file per blob whose
bytes are the blob's uncompressed data, used as the kernel EROFS ``device=`` files (lazy
loading for the ``erofs`` fs driver).
"""

from __future__ import annotations

import bisect
import logging
import stat
import threading
import time
from dataclasses import dataclass, field
from functools import reduce
from operator import add, eq, gt, le, or_
from typing import Any, Iterator

from rafs.errors import NotADirectory, NotFound, UnsupportedError
from rafs.fileindex import FileChunkIndex
from rafs.metadata import InodeAttr
from rafs.runtime import runtime_files
from storage.device import BlobReadDevice
from storage.records import BlobInfo, BlobIoDesc, BlobIoVec, ChunkInfo

log = logging.getLogger(__name__)

#: kernel EROFS addresses v6 chunk data in 4 KiB blocks of the device file
EROFS_BLOCK_SIZE = 4096


@dataclass
class InstanceMetrics:
    """Counters of one instance (exported as Prometheus text by the daemon, and as upstream's
    ``FsMetric`` read counters: ``block_count_read`` by request size class, ``read_latency_dist``
    by latency class)."""

    read_count: int = 0
    read_bytes: int = 0
    read_errors: int = 0
    read_seconds: float = 0.0
    prefetch_requests: int = 0
    block_count_read: list[int] = field(default_factory=lambda: [0] * BLOCK_READ_SIZES)
    read_latency_dist: list[int] = field(default_factory=lambda: [0] * READ_LATENCY_RANGES)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_read(self, size: int, seconds: float, ok: bool) -> None:
        """One read (``size`` bytes returned; 0 when it failed) that took ``seconds``; as
        upstream, every read counts in the size classes and in the latency classes."""
        micros = int(seconds * 1_000_000)
        with self.lock:
            self.read_count += 1
            self.read_seconds += seconds
            self.block_count_read[request_size_index(size)] += 1
            self.read_latency_dist[latency_range_index(micros)] += 1
            if ok:
                self.read_bytes += size
            else:
                self.read_errors += 1


#: upstream's per-file counters (``InodeIoStats``): FUSE operation slots (StatsFop order), the
#: slot of ``read``, and the request size classes of ``block_count_read``
FILE_FOPS = 15
READ_FOP = 4
BLOCK_READ_SIZES = 8


def request_size_index(size: int) -> int:
    """Upstream's size class of a read of ``size`` bytes (<=1K, 4K, 16K, 64K, 128K, 512K, 1M, more)."""
    leading_zeros = 64 - (size >> 10).bit_length()
    shift = (max(leading_zeros, 53) - 53) << 2
    return (0x0112_2334_5567 >> shift) & 0xF


#: upstream's read latency classes (µs upper bounds; the last class is everything above)
READ_LATENCY_BOUNDS = (200, 1_000, 20_000, 50_000, 500_000, 1_000_000, 2_000_000)
READ_LATENCY_RANGES = len(READ_LATENCY_BOUNDS) + 1


def latency_range_index(micros: int) -> int:
    """Upstream's latency class of a read of ``micros`` µs (<=200us, 1ms, 20ms, 50ms, 500ms, 1s,
    2s, more)."""
    return bisect.bisect_left(READ_LATENCY_BOUNDS, micros)


class FileAccess:
    """Which files of an instance are read, as upstream nydusd records them: the access pattern
    (``access_pattern``: per inode the reads and the first read's wall-clock time), the files
    read since the last export (``latest_read_files``) and per-file read counters
    (``iostats_files``). Inode numbers are the image's."""

    def __init__(self, *, pattern: bool, latest: bool, files: bool = False) -> None:
        self.pattern = pattern
        self.latest = latest
        self.files = files
        self._lock = threading.Lock()
        self._patterns: dict[int, list[int]] = {}  # ino -> [reads, first secs, first nanos]
        self._latest: set[int] = set()
        self._files: dict[int, dict[str, Any]] = {}  # ino -> upstream's InodeIoStats

    def record_file(self, ino: int, size: int, ok: bool) -> None:
        """One read of ``ino`` for ``iostats_files`` (``size`` bytes returned; failed: 0)."""
        with self._lock:
            rec = self._files.get(ino)
            if rec is None:
                rec = self._files[ino] = {"total_fops": 0, "data_read": 0,
                                          "block_count_read": [0] * BLOCK_READ_SIZES,
                                          "fop_hits": [0] * FILE_FOPS, "fop_errors": [0] * FILE_FOPS}
            rec["total_fops"] += 1
            if ok:
                rec["fop_hits"][READ_FOP] += 1
                rec["data_read"] += size
                rec["block_count_read"][request_size_index(size)] += 1
            else:
                rec["fop_errors"][READ_FOP] += 1

    def file_stats(self) -> dict[str, dict[str, Any]]:
        """Upstream's ``/metrics/files`` answer: inode number (a string key) -> counters."""
        with self._lock:
            return {str(ino): {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()}
                    for ino, rec in sorted(self._files.items())}

    def record(self, ino: int, size: int = 0) -> None:
        """One successful read of ``ino`` returning ``size`` bytes."""
        if self.files:
            self.record_file(ino, size, True)
        with self._lock:
            if self.pattern:
                rec = self._patterns.get(ino)
                if rec is None:
                    now = time.time_ns()
                    self._patterns[ino] = [1, now // 1_000_000_000, now % 1_000_000_000]
                else:
                    rec[0] += 1
            if self.latest:
                self._latest.add(ino)

    def patterns(self) -> list[dict[str, int]]:
        """Upstream's ``AccessPattern`` list (files read at least once)."""
        with self._lock:
            return [{"ino": ino, "nr_read": n, "first_access_time_secs": s, "first_access_time_nanos": ns}
                    for ino, (n, s, ns) in sorted(self._patterns.items())]

    def take_latest(self) -> list[int]:
        """The inodes read since the previous call, ascending (upstream clears them too)."""
        with self._lock:
            out = sorted(self._latest)
            self._latest.clear()
            return out


class Instance:
    """One mounted image: ``tree`` (Rafs-like metadata) and ``device`` (a ``BlobDevice``)."""

    def __init__(self, name: str, tree: Any, device: BlobReadDevice, *, bootstrap: str = "",
                 config: dict | None = None, enable_xattr: bool = True) -> None:
        self.name = name
        self.tree = tree
        self.device = device
        self.bootstrap = bootstrap
        self.config = config or {}
        self.enable_xattr = enable_xattr
        self.metrics = InstanceMetrics()
        self.mounted_at = time.time()
        #: a :class:`rafs.trace.TraceRecorder` while the instance records its prefetch trace
        self.recorder: Any = None
        #: a :class:`FileAccess` with ``access_pattern`` / ``latest_read_files``
        self.access: FileAccess | None = None

    def read(self, inode: Any, offset: int, size: int, iovec: BlobIoVec | None = None) -> bytes:
        """Blocking read of a regular file range through the device (run in a worker thread);
        ``iovec``: ``inode.chunks(offset, size)`` when the caller has it already."""
        if iovec is None:
            iovec = inode.chunks(offset, size)
        if not iovec:
            return b""
        start = time.monotonic()
        try:
            data = self.device.read_complete(iovec)
            if data is None:
                ahead = self._ahead(inode, offset, size)
                data = self.device.read(iovec) if ahead is None else self.device.read(iovec, ahead)
        except Exception:
            self.metrics.add_read(0, time.monotonic() - start, False)
            if self.access is not None and self.access.files:
                self.access.record_file(inode.ino, 0, False)
            raise
        self.metrics.add_read(len(data), time.monotonic() - start, True)
        if self.recorder is not None:
            self.recorder.record(inode, offset, len(data))
        if self.access is not None:
            self.access.record(inode.ino, len(data))
        return data

    def _ahead(self, inode: Any, offset: int, size: int) -> BlobIoVec | None:
        """What a demand read may amplify into: the next ``amplify_window`` bytes of the same
        file (for a blob file: of the image file whose chunk ends the range), never chunks of
        other files. None when the device does not amplify."""
        window = self.device.amplify_window
        if window <= 0:
            return None
        file_ahead = getattr(inode, "file_ahead", None)
        if file_ahead is not None:
            return file_ahead(offset, size, window)
        return inode.chunks(offset + size, window)

    def read_ready(self, inode: Any, offset: int, size: int, iovec: BlobIoVec | None = None) -> bytes | None:
        """Read from the event loop without a thread hop when the data is local: every chunk of
        the range lies in a blob whose complete cache file is already open
        (``BlobDevice.read_complete``), or the device says every chunk is cached
        (``BlobDevice.read_ready``).
        Never fetches and never waits; None = use :meth:`read` (with the same ``iovec``) in a
        worker thread."""
        if iovec is None:
            iovec = inode.chunks(offset, size)
        if not iovec:
            return b""
        start = time.monotonic()
        try:
            data = self.device.read_complete(iovec, open_new=False)
            if data is None:
                data = self.device.read_ready(iovec)
        except Exception:
            self.metrics.add_read(0, time.monotonic() - start, False)
            if self.access is not None and self.access.files:
                self.access.record_file(inode.ino, 0, False)
            raise
        if data is not None:
            self.metrics.add_read(len(data), time.monotonic() - start, True)
            if self.recorder is not None:
                self.recorder.record(inode, offset, len(data))
            if self.access is not None:
                self.access.record(inode.ino, len(data))
        return data

    def prefetch_iovecs(self, paths: list[str] | None = None) -> list[BlobIoVec]:
        """Whole-file iovecs for ``paths``, else the image's prefetch table, else every file.

        Blob files (the erofs driver) answer with the files of the RAFS image they present.
        """
        tree = getattr(self.tree, "rafs", self.tree)
        inodes = []
        if paths:
            inodes = [tree.lookup_path(p) for p in paths]
        elif getattr(tree, "prefetch_inos", None):
            inodes = [tree.inode(i) for i in tree.prefetch_inos]
        else:
            inodes = [ino for _, ino in tree.walk()]
        return _whole_files(tree, inodes)

    def runtime_iovecs(self) -> list[BlobIoVec]:
        """Whole-file iovecs of the files nearly every start reads first (:mod:`rafs.runtime`)."""
        tree = getattr(self.tree, "rafs", self.tree)
        return _whole_files(tree, runtime_files(tree))

    def close(self) -> None:
        for obj in (self.device, self.tree):
            close = getattr(obj, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # closing must not stop the others from closing
                    log.warning("instance %s: close %r failed: %s", self.name, obj, exc)


def _whole_files(tree: Any, inodes: list[Any]) -> list[BlobIoVec]:
    """One whole-file iovec per non-empty regular file in or below ``inodes``, each file once."""
    out: list[BlobIoVec] = []
    seen: set[int] = set()
    for node in _expand(tree, inodes):
        if node.ino in seen:
            continue
        seen.add(node.ino)
        size = node.attr().size
        if size:
            out.append(node.chunks(0, size))
    return out


def _expand(tree: Any, inodes: list[Any]) -> Iterator[Any]:
    stack = list(reversed(inodes))
    while stack:
        node = stack.pop()
        if node.is_reg():
            yield node
        elif node.is_dir():
            stack.extend(child for _, _, child in node.readdir(0))


# ------------------------------------------------------------------ blob files (erofs)


class _BlobNode:
    def __init__(self, owner: "BlobFiles", ino: int, blob: BlobInfo | None) -> None:
        self._owner = owner
        self.ino = ino
        self.blob = blob

    def attr(self) -> InodeAttr:
        if self.blob is None:
            return InodeAttr(self.ino, stat.S_IFDIR | 0o555, 0, 0, 4096, 2, 0, 0, 0, 8)
        size = self._owner.data_size(self.blob.blob_index)
        return InodeAttr(self.ino, stat.S_IFREG | 0o444, 0, 0, size, 1, 0, 0, 0,
                            (size + 511) // 512)

    def is_dir(self) -> bool:
        return self.blob is None

    def is_reg(self) -> bool:
        return self.blob is not None

    def is_symlink(self) -> bool:
        return False

    def lookup(self, name: bytes) -> "_BlobNode":
        if self.blob is not None:
            raise NotADirectory(f"blob file {self.blob.blob_id} is not a directory")
        for node in self._owner.files:
            if node.blob.blob_id.encode() == name:
                return node
        raise NotFound(f"no blob {name!r}")

    def readdir(self, offset: int = 0) -> Iterator[tuple[int, bytes, "_BlobNode"]]:
        if self.blob is not None:
            raise NotADirectory(f"blob file {self.blob.blob_id} is not a directory")
        for i, node in enumerate(self._owner.files[offset:], start=offset):
            yield i + 1, node.blob.blob_id.encode(), node

    def readlink(self) -> bytes:
        raise NotFound("not a symlink")

    def xattrs(self) -> dict[bytes, bytes]:
        return {}

    def chunks(self, offset: int, size: int) -> BlobIoVec:
        assert self.blob is not None
        return self._owner.blob_range(self.blob.blob_index, offset, size)

    def file_ahead(self, offset: int, size: int, window: int) -> BlobIoVec:
        assert self.blob is not None
        return self._owner.file_ahead(self.blob.blob_index, offset, size, window)


class BlobFiles:
    """A Rafs-like tree: ``/`` holds one file per blob presenting its uncompressed data.

    Built from a v6 image whose chunks are all 4 KiB aligned in their blob's uncompressed
    address space (kernel EROFS reads chunk ``n`` of a file at ``blkaddr * 4096`` of the
    device); anything else raises :class:`UnsupportedError` naming why.
    """

    root_ino = 1
    prefetch_inos: list[int] = []
    #: opened with FOPEN_DIRECT_IO: kernel EROFS caches the image files it reads and reads ahead
    #: within them, so a page cache and a read-ahead of the blob file would hold the data twice
    #: and read past the end of an image file into its neighbours in the blob
    direct_io = True

    def __init__(self, rafs: Any) -> None:
        self.rafs = rafs
        self.version = rafs.version
        self.blobs: list[BlobInfo] = list(rafs.blobs)
        #: per blob: its chunks by uncompressed offset and the chunk → file boundary map
        self.tables = blob_chunk_tables(rafs)
        self.root = _BlobNode(self, 1, None)
        self.files = [_BlobNode(self, i + 2, b) for i, b in enumerate(self.blobs)]
        self.inode_count = 1 + len(self.files)

    def data_end(self, blob_index: int) -> int:
        """End of the last chunk's uncompressed data (the bytes a complete cache file holds)."""
        table = self.tables.get(blob_index)
        return 0 if table is None else table.data_end

    def data_size(self, blob_index: int) -> int:
        """Size of the blob file: the data rounded up to whole 4 KiB EROFS blocks."""
        end = max(self.data_end(blob_index), self.blobs[blob_index].uncompressed_size)
        return -(-end // EROFS_BLOCK_SIZE) * EROFS_BLOCK_SIZE

    def inode(self, ino: int) -> _BlobNode:
        if ino == 1:
            return self.root
        if 2 <= ino < 2 + len(self.files):
            return self.files[ino - 2]
        raise NotFound(f"no inode {ino}")

    def lookup_path(self, path: str) -> _BlobNode:
        name = path.strip("/")
        return self.root if not name else self.root.lookup(name.encode())

    def walk(self) -> Iterator[tuple[str, _BlobNode]]:
        yield "/", self.root
        for node in self.files:
            yield "/" + node.blob.blob_id, node

    def blob_range(self, blob_index: int, offset: int, size: int) -> BlobIoVec:
        """The iovec of ``size`` bytes at ``offset`` of the blob's uncompressed data; gaps are holes."""
        blob = self.blobs[blob_index]
        table = self.tables.get(blob_index, _EMPTY_TABLE)
        starts, sizes, infos = table.starts, table.sizes, table.infos
        count = len(starts)
        end = min(offset + size, self.data_size(blob_index))
        out = BlobIoVec()
        pos = offset
        i = max(bisect.bisect_right(starts, pos) - 1, 0)
        while pos < end:
            start = starts[i] if i < count else end
            if pos < start:
                gap_end = min(end, start)
                out.append(BlobIoDesc(None, None, 0, gap_end - pos))
                pos = gap_end
                continue
            chunk_end = start + sizes[i]
            if pos >= chunk_end:
                i += 1
                continue
            n = min(end, chunk_end) - pos
            chunk = infos[i] or table.chunk(i)
            out.append(BlobIoDesc(blob, chunk, pos - start, n))
            pos += n
            i += 1
        return out

    def file_ahead(self, blob_index: int, offset: int, size: int, window: int) -> BlobIoVec:
        """The chunks (up to ``window`` bytes) that follow, in the same image file, the chunk
        holding the last byte of ``[offset, offset+size)`` of the blob file: the chunk → file
        boundary map read amplification of kernel EROFS reads is bounded by."""
        table = self.tables.get(blob_index, _EMPTY_TABLE)
        i = bisect.bisect_right(table.starts, max(offset + size - 1, 0)) - 1
        out = BlobIoVec()
        if i < 0:
            return out
        blob = self.blobs[blob_index]
        nxt, sizes = table.nxt, table.sizes
        j = nxt[i]
        total = 0
        while j >= 0 and total < window:
            out.append(BlobIoDesc(blob, table.infos[j] or table.chunk(j), 0, sizes[j]))
            total += sizes[j]
            j = nxt[j]
        return out

    def same_file(self, blob_index: int, first: int, then: int) -> bool:
        """True when chunk ``then`` of the blob continues the image file of chunk ``first`` (the
        file map ``storage.device.BlobDevice.set_file_map`` bounds read-ahead with)."""
        table = self.tables.get(blob_index)
        if table is None:
            return False
        k = table.rank.get(first)
        if k is None:
            return False
        j = table.nxt[k]
        return j >= 0 and table.index[j] == then

    def close(self) -> None:
        self.rafs.close()


class BlobChunks:
    """One blob's chunks sorted by uncompressed offset, as columns: ``starts`` (uncompressed
    offsets), ``sizes``, ``index`` (ci index), ``nxt`` (the position of the next chunk of the same
    image file, -1 after a file's last chunk) and ``rank`` (ci index → position). The
    :class:`ChunkInfo` of position ``k`` is made on first use (:meth:`chunk`) from the chunk
    table entry ``pos[k]``; ``infos`` holds those made so far."""

    __slots__ = ("starts", "sizes", "index", "nxt", "rank", "infos", "data_end", "_pos", "_entry")

    def __init__(self, starts: list[int], sizes: list[int], index: list[int], nxt: list[int],
                 infos: list[ChunkInfo | None], pos: list[int] | None = None,
                 entry: Any = None) -> None:
        self.starts = starts
        self.sizes = sizes
        self.index = index
        self.nxt = nxt
        self.infos = infos
        self.rank = dict(zip(index, range(len(index))))
        #: end of the last chunk's data (asked on every read: not a pass over the chunks; the
        #: chunks are checked not to overlap before anything reads it)
        self.data_end = starts[-1] + sizes[-1] if starts else 0
        self._pos = pos
        self._entry = entry

    def __len__(self) -> int:
        return len(self.starts)

    def chunk(self, k: int) -> ChunkInfo:
        """The ChunkInfo at position ``k`` (made once; two threads making it at once make equal ones)."""
        c = self.infos[k]
        if c is None:
            c = self.infos[k] = self._entry(self._pos[k])
        return c

    def next_chunk(self, k: int) -> ChunkInfo | None:
        """The chunk after position ``k`` in the same image file, None after a file's last."""
        j = self.nxt[k]
        return None if j < 0 else self.chunk(j)


_EMPTY_TABLE = BlobChunks([], [], [], [], [])


def blob_chunk_tables(rafs: Any) -> dict[int, BlobChunks]:
    """Every blob's chunks sorted by uncompressed offset (:class:`BlobChunks`), checked for
    EROFS-compatible layout, with the chunk → file boundary map (the next chunk of the same file
    in the same blob; none for a file's last chunk).

    From the v6 chunk table read as columns when it lists every chunk of every blob (no walk of
    the inode tree and no :class:`ChunkInfo` per chunk: this runs on the critical path of every
    erofs mount); a file's chunks are then the consecutive ones up to the first shorter than the
    image's chunk size (fixed-size chunking: only a file's last chunk is short). Otherwise from a
    walk of every file (exact).
    Raises :class:`UnsupportedError` when the image is not v6 or a chunk is not 4 KiB aligned.
    """
    if rafs.version != 6:
        raise UnsupportedError(f"kernel EROFS needs a RAFS v6 image, this bootstrap is v{rafs.version}")
    tables = _chunk_table_by_blob(rafs)
    if tables is None:
        tables = _walk_chunk_tables(rafs)
    else:
        for blob_index, t in tables.items():
            if reduce(or_, t.starts, 0) % EROFS_BLOCK_SIZE:
                k = next(k for k, s in enumerate(t.starts) if s % EROFS_BLOCK_SIZE)
                raise UnsupportedError(
                    f"kernel EROFS needs 4 KiB aligned chunks: chunk {t.index[k]} of blob "
                    f"{rafs.blobs[blob_index].blob_id} is at uncompressed offset {t.starts[k]:#x}")
    for t in tables.values():
        ends = list(map(add, t.starts, t.sizes))
        if any(map(gt, ends, t.starts[1:])):
            k = next(k for k, (e, s) in enumerate(zip(ends, t.starts[1:])) if e > s)
            raise UnsupportedError(
                f"chunks {t.index[k]} and {t.index[k + 1]} overlap in the uncompressed blob"
            )
    return tables


def _chunk_table_by_blob(rafs: Any) -> dict[int, BlobChunks] | None:
    """The v6 chunk table per blob, when it holds exactly chunks ``0..chunk_count-1`` of every
    blob; else None (then only a walk of the files finds every chunk)."""
    if not getattr(rafs, "chunk_table_count", 0):
        return None
    cols = rafs.chunk_columns()
    if cols is None:
        return None
    bidx, idx, uoff, usize = cols.blob_index, cols.index, cols.uncompressed_offset, cols.uncompressed_size
    count = len(idx)
    # table positions per blob (blobs in order of first appearance), a (blob, ci index) repeated
    # in the table counting once: its first entry
    keys = [(b << 24) | i for b, i in zip(bidx, idx)]
    first: Any = range(count)
    if len(set(keys)) != count:
        seen: dict[int, int] = {}
        for p, key in enumerate(keys):
            seen.setdefault(key, p)
        first = sorted(seen.values())
    by_blob: dict[int, list[int]] = {}
    if count and min(bidx) == max(bidx):
        by_blob[bidx[0]] = list(first)
    else:
        for p in first:
            by_blob.setdefault(bidx[p], []).append(p)
    for blob in rafs.blobs:
        ps = by_blob.get(blob.blob_index, [])
        if blob.chunk_count and len(ps) != blob.chunk_count:
            return None
        if ps:
            ci = [idx[p] for p in ps]
            if min(ci) != 0 or max(ci) != len(ps) - 1:
                return None
    chunk_size = rafs.chunk_size
    tables: dict[int, BlobChunks] = {}
    for blob_index, ps in by_blob.items():
        if len(ps) == count:  # one blob, no repeated entry: the columns are its chunks
            starts, sizes, index = uoff, usize, idx
        else:
            starts = [uoff[p] for p in ps]
            sizes = [usize[p] for p in ps]
            index = [idx[p] for p in ps]
        if not all(map(le, starts, starts[1:])):  # builders write them in offset order
            ps.sort(key=uoff.__getitem__)  # stable: table order among equal offsets
            starts = [uoff[p] for p in ps]
            sizes = [usize[p] for p in ps]
            index = [idx[p] for p in ps]
        # the next position continues the file: this chunk is full and the next is the next ci
        full = [s == chunk_size for s in sizes]
        follows = list(map(eq, index[1:], [i + 1 for i in index]))
        nxt = [k + 1 if f and g else -1 for k, (f, g) in enumerate(zip(full, follows))]
        if ps:
            nxt.append(-1)  # the last chunk ends its file
        tables[blob_index] = BlobChunks(starts, sizes, index, nxt, [None] * len(ps), ps, cols.entry)
    return tables


def _walk_chunk_tables(rafs: Any) -> dict[int, BlobChunks]:
    """The chunk tables and chunk → file boundary map from a walk of every file (exact)."""
    index = FileChunkIndex(rafs)
    for c in index.chunks.values():  # walk order: the first unaligned chunk a file reaches
        if c.uncompressed_offset % EROFS_BLOCK_SIZE:
            owner = index.files(c.blob_index, c.uncompressed_offset, 1)
            where = f"{owner[0][0]} " if owner else ""
            raise UnsupportedError(
                f"kernel EROFS needs 4 KiB aligned chunks: {where}chunk {c.index} of blob "
                f"{rafs.blobs[c.blob_index].blob_id} is at uncompressed offset "
                f"{c.uncompressed_offset:#x}"
            )
    next_map = index.next_map
    tables: dict[int, BlobChunks] = {}
    for blob_index, cs in index.chunks_by_blob.items():
        rank = {c.index: k for k, c in enumerate(cs)}
        nxt = []
        for c in cs:
            n = next_map.get((blob_index, c.index))
            nxt.append(-1 if n is None else rank[n.index])
        tables[blob_index] = BlobChunks([c.uncompressed_offset for c in cs],
                                        [c.uncompressed_size for c in cs],
                                        [c.index for c in cs], nxt, list(cs))
    return tables
