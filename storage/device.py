"""Blob device: reads :class:`~storage.records.BlobIoVec` ranges through the blob caches.

``rafs`` turns a file range into a ``BlobIoVec``; the device runs it through the cache.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from storage.cache.base import BlobCache, BlobCacheManager
from storage.demand import DemandGate
from storage.errors import StorageError
from storage.metrics import StorageMetrics
from storage.prefetch import PrefetchConfig, Prefetcher
from storage.records import BlobInfo, BlobIoDesc, BlobIoVec, ChunkInfo

log = logging.getLogger(__name__)

#: how often a read re-asks whether a blob's cache file became complete
COMPLETE_RECHECK_SECONDS = 1.0

#: ``same_file(blob_index, i, j)``: True when chunk ``j`` of the blob continues, in the same
#: image file, the data of chunk ``i`` (the filesystem above knows; storage does not)
FileMap = Callable[[int, int, int], bool]


class BlobReadDevice(Protocol):
    """What a filesystem needs from a blob device: :class:`BlobDevice` is the implementation,
    ``rafs`` codes against this (and tests put small fakes in its place)."""

    metrics: StorageMetrics
    #: bytes of a file a read may fetch beyond what it asked for (size of ``read``'s ``ahead``)
    amplify_window: int

    def read(self, iovec: "BlobIoVec | Sequence[BlobIoDesc]",
             ahead: "Sequence[BlobIoDesc] | None" = None) -> bytes:
        """The bytes of ``iovec`` in order, holes as zeros; may fetch; blocking, thread-safe.
        ``ahead``: what may be fetched along (the rest of the same file), see :class:`BlobDevice`.
        Raises :class:`~storage.errors.StorageError` (or ``OSError``) when the data cannot be read."""
        ...

    def read_ready(self, iovec: "BlobIoVec | Sequence[BlobIoDesc]") -> bytes | None:
        """The bytes of ``iovec`` if all of it is local, else None; never fetches or waits."""
        ...

    def read_complete(self, iovec: "BlobIoVec | Sequence[BlobIoDesc]", open_new: bool = True) -> bytes | None:
        """The bytes of ``iovec`` when every blob it touches has a complete, checked cache file
        (one ``pread`` per contiguous range), else None. ``open_new=False``: only files already
        open (never blocks; for an event loop). Raises ``OSError`` when such a file fails."""
        ...

    def prefetch(self, iovecs: "Iterable[Sequence[BlobIoDesc]]", *, priority: str = "low",
                 exact: bool = False) -> None:
        """Make the chunks of ``iovecs`` local in the background (``exact``: no others)."""
        ...

    def prefetch_blob(self, blob_index: int) -> bool:
        """Queue a whole blob for background prefetch; False when its chunk list is unknown."""
        ...

    def wait_demand_settled(self, or_sustained: bool = False) -> bool:
        """Block until on-demand reads have settled (True) or the device closes (False);
        ``or_sustained``: or until demand is sustained (a read-most workload)."""
        ...

    def blob_data_path(self, blob_index: int, verify: bool = False) -> str | None:
        """The complete uncompressed data file of a blob, if there is one yet and its content is
        known good (``verify``: check it now, which may read the whole file)."""
        ...

    def set_chunk_source(self, source: "Callable[[], Iterable[ChunkInfo]]") -> None:
        """Where chunk digests not given with a read are found (the bootstrap's chunk table)."""
        ...

    def set_chunk_lookup(self, lookup: "Callable[[int, int], ChunkInfo | None]") -> None:
        """One entry of that table by (blob index, chunk index), None when it has none."""
        ...

    def set_file_map(self, same_file: "FileMap | None") -> None:
        """Which chunks continue which within one image file: read-ahead stays inside a file."""
        ...

    def close(self) -> None: ...


def _runs(iovec: "Sequence[BlobIoDesc]") -> "Iterator[tuple[BlobInfo | None, Sequence[BlobIoDesc]]]":
    """Split ``iovec`` into runs of consecutive descriptors in one blob; a hole is a run of its
    own with blob None."""
    i, n = 0, len(iovec)
    while i < n:
        desc = iovec[i]
        if desc.is_hole or desc.blob is None:
            yield None, iovec[i:i + 1]
            i += 1
            continue
        j = i + 1
        while j < n and iovec[j].blob is not None and not iovec[j].is_hole \
                and iovec[j].blob.blob_id == desc.blob.blob_id:
            j += 1
        yield desc.blob, iovec[i:j]
        i = j


#: the first read-ahead window (bytes); doubled per further sequential step up to ``readahead``
READAHEAD_MIN = 128 << 10
#: reads moving on to the next chunk of a blob, in a row, before read-ahead starts
READAHEAD_TRIGGER = 2


@dataclass(slots=True)
class _ReadAhead:
    """Sequential-read state of one blob: last chunk read, end of what read-ahead queued
    (exclusive chunk index, -1 = nothing), consecutive next-chunk steps."""

    last: int = -2
    end: int = -1
    streak: int = 0

class CompleteFiles:
    """The open complete cache files of a device's blobs (``blob_data_path``): reads from them
    skip the chunk maps. A blob without one is asked again at most every
    :data:`COMPLETE_RECHECK_SECONDS`. Thread-safe."""

    def __init__(self, data_path: "Callable[[int], str | None]") -> None:
        self._data_path = data_path
        self._fds: dict[int, int] = {}  #: blob index -> fd of its complete cache file
        self._next_check: dict[int, float] = {}
        self._lock = threading.Lock()

    def read(self, iovec: "BlobIoVec | Sequence[BlobIoDesc]", open_new: bool = True) -> bytes | None:
        """See :meth:`BlobReadDevice.read_complete`."""
        fds = self._fds
        if not open_new and not fds:
            return None
        ranges: list[tuple[int, int, int]] = []  # (fd, offset, size); fd -1 = hole
        for d in iovec:
            if d.chunk is None:
                ranges.append((-1, 0, d.size))
                continue
            fd = fds.get(d.blob.blob_index, -1) if not open_new else self._fd(d.blob.blob_index)  # type: ignore[union-attr]
            if fd < 0:
                return None
            off = d.chunk.uncompressed_offset + d.offset
            if ranges and ranges[-1][0] == fd and ranges[-1][1] + ranges[-1][2] == off:
                ranges[-1] = (fd, ranges[-1][1], ranges[-1][2] + d.size)
            else:
                ranges.append((fd, off, d.size))
        parts = []
        for fd, off, n in ranges:
            part = bytes(n) if fd < 0 else os.pread(fd, n, off)
            if len(part) != n:
                return None  # unexpected short cache file: let the caches decide
            parts.append(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fd(self, blob_index: int) -> int:
        fd = self._fds.get(blob_index)
        if fd is not None:
            return fd
        now = time.monotonic()
        if now < self._next_check.get(blob_index, 0.0):
            return -1
        self._next_check[blob_index] = now + COMPLETE_RECHECK_SECONDS
        path = self._data_path(blob_index)
        if not path:
            return -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1
        with self._lock:
            if blob_index in self._fds:
                os.close(fd)
                return self._fds[blob_index]
            self._fds[blob_index] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class BlobDevice:
    """Reads :class:`BlobIoVec` ranges spanning several blobs through their caches. Thread-safe.

    Each run of consecutive descriptors in one blob is one cache request (the cache merges
    adjacent missing chunks into backend requests); holes read as zeros. Prefetch runs in the
    background below on-demand reads.
    """

    def __init__(self, blobs: "Sequence[BlobInfo]", factory: "BlobCacheManager", *,
                 prefetch_config: "PrefetchConfig | None" = None) -> None:
        self.blobs = {b.blob_index: b for b in blobs}
        self.factory = factory
        self.metrics = factory.metrics
        self._caches: dict[str, "BlobCache"] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._readahead: dict[str, _ReadAhead] = {}  # blob id -> sequential-read state
        #: on the first read, load every blob's CI table in the background (load_chunk_tables),
        #: unless the owner did before; the device itself touches the backend only for a read
        self.preload_on_first_read = False
        self._chunk_source: "Callable[[], Iterable[ChunkInfo]] | None" = None
        self._chunk_lookup: "Callable[[int, int], ChunkInfo | None] | None" = None
        self._same_file: "FileMap | None" = None
        config = prefetch_config or PrefetchConfig()
        #: demand reads in flight and when the last ended: polite prefetch starts only when quiet
        self.demand = DemandGate(config.settle, config.start_delay, burst_cap=config.burst_cap,
                                 burst_fraction=config.burst_fraction,
                                 total_bytes=sum(b.uncompressed_size or b.compressed_size for b in blobs))
        self.prefetcher = Prefetcher(config, self.metrics, busy=lambda: not self.demand.quiet(),
                                     demand_inflight=lambda: self.demand.inflight > 0,
                                     sustained=self.demand.sustained)
        self.complete_files = CompleteFiles(self.blob_data_path)

    def _cache(self, blob: BlobInfo) -> "BlobCache":
        with self._lock:
            if self._closed:
                raise StorageError("blob device is closed")
            cache = self._caches.get(blob.blob_id)
            if cache is None:
                cache = self._caches[blob.blob_id] = self.factory.get_blob_cache(blob)
                source = self._chunk_source
                if source is not None and cache.chunk_source is None:
                    index = blob.blob_index
                    cache.chunk_source = lambda: (c for c in source() if c.blob_index == index)
                lookup = self._chunk_lookup
                if lookup is not None and cache.chunk_lookup is None:
                    cache.chunk_lookup = lambda i, b=blob.blob_index: lookup(b, i)
            return cache

    def set_chunk_source(self, source: "Callable[[], Iterable[ChunkInfo]]") -> None:
        """Where caches find chunk digests they were not given (read amplification, whole-blob
        prefetch, checking a complete cache file): the bootstrap's chunk table, read on first need."""
        self._chunk_source = source

    def set_chunk_lookup(self, lookup: "Callable[[int, int], ChunkInfo | None]") -> None:
        """One entry of the bootstrap's chunk table by (blob index, chunk index), None when it
        has none: a cache needing one digest (read amplification) asks for that one instead of
        loading the whole table on a demand read's path."""
        self._chunk_lookup = lookup

    def set_file_map(self, same_file: "FileMap | None") -> None:
        """Bound sequential read-ahead by image files: ``same_file(blob_index, i, j)`` says whether
        chunk ``j`` continues the file of chunk ``i``. For readers of raw blob ranges (the kernel
        EROFS blob files), whose reads carry no file: without it read-ahead ramps up over the blob
        and a sequential read of one file pulls in the files laid out behind it. ``None``: the
        blob's chunk order alone (callers reading files, where a stream through neighbouring
        files benefits)."""
        self._same_file = same_file

    def _blob(self, blob_index: int) -> BlobInfo:
        try:
            return self.blobs[blob_index]
        except KeyError:
            raise StorageError(f"blob index {blob_index} not in this device ({sorted(self.blobs)})") from None

    def read(self, iovec: "BlobIoVec | Sequence[BlobIoDesc]", ahead: "Sequence[BlobIoDesc] | None" = None) -> bytes:
        """The bytes of ``iovec``, in order (holes as zeros).

        ``ahead``: the caller's bound on read amplification — the descriptors that follow
        ``iovec`` in the same file (rafs knows them); missing chunks are extended only with
        those (up to ``amplify_io``), never with neighbouring chunks of other files. ``None``
        leaves the cache's own rule (following chunks of the blob).
        """
        start = time.monotonic()
        with self._lock:
            preload, self.preload_on_first_read = self.preload_on_first_read, False
        self.demand.begin()
        if preload:
            self.load_chunk_tables()
        try:
            allowed = None
            if ahead is not None:
                allowed = {}
                for d in ahead:
                    if d.blob is not None and d.chunk is not None:
                        allowed.setdefault(d.blob.blob_id, set()).add(d.chunk.index)
            parts: list[bytes] = []
            for blob, run in _runs(iovec):
                if blob is None:
                    parts.append(bytes(run[0].size))
                    continue
                cache = self._cache(blob)
                if allowed is None:
                    parts.append(cache.read_descs(run))
                else:
                    parts.append(cache.read_descs(run, amplify_into=allowed.get(blob.blob_id, set())))
                self._after_read(cache, run)
            data = b"".join(parts)
            self.demand.add_bytes(len(data))
            return data
        finally:
            self.demand.end()
            self.metrics.read_latency.observe(time.monotonic() - start)

    @property
    def amplify_window(self) -> int:
        """Bytes of a file a demand read may fetch beyond what it asked for (``amplify_io``):
        callers size their ``ahead`` hint with it."""
        return self.factory.config.amplify_io

    def read_ready(self, iovec: "BlobIoVec | Sequence[BlobIoDesc]") -> bytes | None:
        """The bytes of ``iovec`` if every chunk is already in the local cache, else None.

        Never fetches, never waits for another reader's fetch and never opens a cache: a caller
        on an event loop can try this first and fall back to :meth:`read` in a worker thread.
        """
        if self._closed:
            return None
        start = time.monotonic()
        runs = []
        for blob, run in _runs(iovec):
            cache = self._caches.get(blob.blob_id) if blob is not None else None
            if blob is not None and (cache is None or not cache.descs_ready(run)):
                return None
            runs.append((cache, run))
        parts: list[bytes] = []
        for cache, run in runs:
            if cache is None:  # a hole
                parts.append(bytes(run[0].size))
                continue
            data = cache.read_ready_descs(run)
            if data is None:  # defensive: ready bits of an open cache are only ever set
                return None
            parts.append(data)
            self._after_read(cache, run)
        self.metrics.read_latency.observe(time.monotonic() - start)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_complete(self, iovec: "BlobIoVec | Sequence[BlobIoDesc]", open_new: bool = True) -> bytes | None:
        """The bytes of ``iovec`` straight from complete cache files (:class:`CompleteFiles`),
        else None: then :meth:`read` or :meth:`read_ready`."""
        if self._closed:
            return None
        return self.complete_files.read(iovec, open_new)

    def _after_read(self, cache: "BlobCache", run: "Sequence[BlobIoDesc]") -> None:
        if self.prefetcher.config.readahead > 0:
            self._read_ahead(cache, run[0].chunk.index, run[-1].chunk.index)  # type: ignore[union-attr]

    def _read_ahead(self, cache: "BlobCache", first: int, last: int) -> None:
        """Sequential on-demand reads keep chunks ahead of the reader in flight as high-priority
        prefetch, so a reader streaming through neighbouring files finds them fetched or arriving
        instead of waiting for one request after another.

        The window adapts like the kernel's: nothing until the reader has moved on to the next
        chunk ``READAHEAD_TRIGGER`` times in a row, then ``READAHEAD_MIN`` bytes, doubling with
        every further step up to ``readahead``; refilled when less than half of it is left; any
        jump resets it. A start-up reading two neighbouring files pays nothing, a stream reaches
        the full window within a few files.

        With a file map (:meth:`set_file_map`), a step counts as sequential only within one
        image file (moving on into the next file is a jump) and the window ends at the file's
        last chunk: read-ahead never fetches a file nobody has started reading.
        """
        blob_id = cache.blob.blob_id
        same_file = self._same_file
        blob_index = cache.blob.blob_index
        todo: list[ChunkInfo] = []
        with self._lock:
            st = self._readahead.get(blob_id)
            if st is None:
                st = self._readahead[blob_id] = _ReadAhead()
            if same_file is not None and any(not same_file(blob_index, i, i + 1) for i in range(first, last)):
                st.streak, st.end = 0, -1  # the read ran into the next file: that one starts now
            elif first == st.last + 1 and (same_file is None or same_file(blob_index, st.last, first)):
                st.streak += 1
            elif first != st.last:  # a jump: start over (re-reads of the same chunk keep the state)
                st.streak, st.end = 0, -1
            st.last = last
            if st.streak < READAHEAD_TRIGGER:
                return
        # offsets and sizes from the CI table; the digests only of the chunks read ahead (every
        # digest of the blob is one pass over the bootstrap's whole chunk table: 0.04-0.11 s of
        # GIL per blob on a 500 MB image, which a start-up's first stream used to pay)
        table = cache.chunk_list()
        if not table or last >= len(table):
            return
        with self._lock:
            if st.streak >= READAHEAD_TRIGGER and st.last == last:
                window = min(self.prefetcher.config.readahead, READAHEAD_MIN << (st.streak - READAHEAD_TRIGGER))
                end_of = lambda c: c.compressed_offset + c.compressed_size  # noqa: E731
                ahead = end_of(table[st.end - 1]) - end_of(table[last]) if st.end > last + 1 else 0
                if ahead < window // 2:  # the reader passed the middle of what is in flight
                    start = max(st.end, last + 1)
                    k, size = start, ahead
                    while k < len(table) and size < window and (
                            same_file is None or same_file(blob_index, k - 1, k)):
                        size += table[k].compressed_size
                        k += 1
                    todo = list(table[start:k])
                    st.end = max(st.end, k)
        todo = [c for c in map(cache.checkable_chunk, todo) if c is not None]
        if todo:
            # with a file map the window is exactly what may be fetched: no amplification past it
            self.prefetcher.submit(cache, todo, yield_to_demand=False, readahead=True, exact=same_file is not None)

    def prefetch(self, iovecs: "Iterable[Sequence[BlobIoDesc]]", *, priority: str = "low",
                 exact: bool = False) -> None:
        """Make the chunks of ``iovecs`` ready in the background: one unit per blob, its chunks
        (of all ``iovecs``) merged into runs in blob layout order, so neighbouring small files
        come in one backend request and several runs are fetched at once.

        ``priority="low"`` (default) waits while on-demand reads are in flight; ``"high"`` does not.
        ``exact``: these chunks only — the cache does not amplify the runs into the chunks
        laid out behind them (``amplify_io``).
        """
        if priority not in ("low", "high"):
            raise StorageError(f"prefetch priority must be 'low' or 'high', got {priority!r}")
        by_blob: dict[str, tuple[BlobInfo, list[ChunkInfo]]] = {}
        for iovec in iovecs:
            for desc in iovec:
                if desc.is_hole or desc.blob is None:
                    continue
                by_blob.setdefault(desc.blob.blob_id, (desc.blob, []))[1].append(desc.chunk)  # type: ignore[arg-type]
        for blob, chunks in by_blob.values():
            self.prefetcher.submit(self._cache(blob), chunks, yield_to_demand=priority == "low", exact=exact)

    def prefetch_blob(self, blob_index: int, chunks: "Sequence[ChunkInfo] | None" = None) -> bool:
        """Prefetch a whole blob: ``chunks`` (its chunk list) or the cache's own chunk table.

        Returns False when the blob's chunk list is unknown (nothing queued).
        """
        cache = self._cache(self._blob(blob_index))
        if chunks is None:
            table = cache.whole_blob_chunks()
            if table is None:
                return False
            chunks = table
        self.prefetcher.submit(cache, chunks)
        return True

    def wait_demand_settled(self, or_sustained: bool = False) -> bool:
        """Block until the demand gate is quiet (True) or the device is closed (False): for
        callers preparing speculative work with CPU, e.g. walking an image for its prefetch list.
        ``or_sustained``: also True once demand is sustained (:meth:`DemandGate.sustained`), so
        the prefetch of a read-most workload is queued at all and can share the link."""
        return self.demand.wait_quiet(lambda: self.prefetcher.cancelled, or_sustained=or_sustained)

    def load_chunk_tables(self) -> list[threading.Thread]:
        """Load every blob's CI table now, in background threads (one per blob), so the first
        on-demand read of each blob does not wait for that extra backend round trip (the
        first read then starts none: ``preload_on_first_read`` is cleared)."""
        with self._lock:
            self.preload_on_first_read = False

        def load(blob: BlobInfo) -> None:
            try:
                self._cache(blob).blob_meta()
            except Exception as exc:  # the read that needs it reports (and retries) the failure
                log.debug("preloading the CI table of blob %s: %s", blob.blob_id, exc)

        threads = [threading.Thread(target=load, args=(b,), name=f"ci-{b.blob_index}", daemon=True)
                   for b in self.blobs.values()]
        for t in threads:
            t.start()
        return threads

    def blob_data_path(self, blob_index: int, verify: bool = False) -> str | None:
        """The complete uncompressed cache file of a blob (all chunks ready and checked against
        their digests by this process), else ``None``. ``verify``: check the chunks not yet
        checked now (reads the whole file once; a wrong chunk is reset and the answer is None)."""
        return self._cache(self._blob(blob_index)).data_path(verify)

    def cache_report(self) -> dict:
        """What upstream nydusd's ``BlobcacheMetrics`` reports that the caches know: the cache
        files of the blobs opened so far (``underlying_files``), the cache directory
        (``store_path``, "" without a file cache), chunks ready in them (``entries_count``), every
        blob of the device complete (``data_all_ready``), and the prefetcher's worker threads,
        chunks submitted before merging, summed unit time and first-submit / last-idle times."""
        with self._lock:
            caches = list(self._caches.values())
        files = sorted(p for p in (getattr(c, "path", None) for c in caches) if p)
        entries, all_ready = 0, len(caches) == len(self.blobs)
        for c in caches:
            chunk_map = getattr(c, "chunk_map", None)
            if chunk_map is None:
                all_ready = False
                continue
            entries += chunk_map.ready_count()
            all_ready = all_ready and chunk_map.all_ready()
        return {"underlying_files": files, "store_path": getattr(self.factory, "work_dir", None) or "",
                "entries_count": entries, "data_all_ready": bool(all_ready and self.blobs),
                "prefetch_workers": self.prefetcher.workers,
                "prefetch_unmerged_chunks": self.prefetcher.unmerged_chunks,
                "prefetch_cumulative_time_millis": self.prefetcher.cumulative_millis,
                "prefetch_begin_ns": self.prefetcher.begin_ns, "prefetch_end_ns": self.prefetcher.end_ns}

    def close(self) -> None:
        """Cancel prefetch and release the blob caches (idempotent)."""
        self.prefetcher.cancel()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            caches = list(self._caches)
            self._caches.clear()
        self.complete_files.close()
        for blob_id in caches:
            self.factory.release(blob_id)

    def __enter__(self) -> "BlobDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
