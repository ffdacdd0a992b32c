"""``FileCacheManager``: chunks cached uncompressed on local disk, fetched lazily and once.

Per blob, in ``work_dir``:

* ``<blob_id>.blob.data`` — uncompressed chunk data at each chunk's ``uncompressed_offset``
  (a sparse file of the blob's uncompressed size);
* ``<blob_id>.chunk_map`` — an :class:`~storage.cache.state.IndexedChunkMap`;
* ``<blob_id>.blob.meta`` — the blob's chunk-info (CI) table: loaded from this file when present
  (the snapshotter copies it there), else fetched once from the blob (the blob-table
  ``ci_offset``/``ci_compressed_size`` or the TOC's ``blob.meta`` section) and cached. When a
  blob has a CI table, its compressed offsets/sizes are authoritative over the bootstrap's chunk
  info; without one (v5, or no CI fields) the bootstrap's ``ChunkInfo`` is used as is.

Other files of a blob (upstream naming, all in :data:`BLOB_FILE_SUFFIXES`, the one list GC,
eviction and usage go by): ``<blob_id>`` (the raw blob), ``.blob.data.chunk_map``,
``.image.disk``, ``.layer.disk``, ``.blob.digest``, ``.blob.toc``, ``.image.boot``.

**Blob locks.** Every open :class:`FileBlobCache` holds a shared ``flock`` on its
``.blob.data`` file, in whatever process it lives. Deleting a blob's files (:func:`drop_blob`:
GC, eviction, :func:`gc_cache_dir` for the snapshotter's Cleanup) takes an exclusive lock on that
file without waiting and skips the blob when someone holds it; an opener that raced with a delete
finds its locked file unlinked and opens the new one.

A chunk is marked ready only after its data matched its digest and is written. It is not
``fdatasync``-ed first (``syncs_data``: only when ``sync_data`` asks, or when the cache checks
nothing it reuses): a crash may leave a ready bit over a lost or torn write, and a restarted
process reuses every ready chunk only after checking it once against its digest (before its
first byte is served; a wrong one is reset and fetched again). A corrupt chunk map, or a data
file truncated behind our back, discards that blob's ready bits (counted in
``cache_corrupt_resets``). A full cache disk serves reads without caching
(``cache_write_failures``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from storage.backend.base import BlobBackend, BlobReader, shared_fetch, speculation
from storage.cache.base import BlobCache, BlobCacheManager, CacheConfig, merge_runs
from storage.cache.nocache import NoCacheBlobCache
from storage.cache.state import ChunkState, IndexedChunkMap
from storage.digest import digest
from storage.errors import BlobRangeError, CacheError, MetaFormatError, StorageError
from storage.meta.blob_meta import BlobMeta, load_blob_meta_file, load_from_blob, write_blob_meta_file
from storage.meta.chunk_info import MadeOnUse
from storage.meta.header import BLOB_CCT_HEADER_SIZE
from storage.metrics import StorageMetrics
from storage.records import BlobFeatures, BlobInfo, BlobIoDesc, ChunkFlags, ChunkInfo

log = logging.getLogger(__name__)

DATA_SUFFIX = ".blob.data"
CHUNK_MAP_SUFFIX = ".chunk_map"
META_SUFFIX = ".blob.meta"
#: every file one blob may have in a cache dir (upstream naming; "" is the raw blob)
BLOB_FILE_SUFFIXES = ("", DATA_SUFFIX, CHUNK_MAP_SUFFIX, DATA_SUFFIX + CHUNK_MAP_SUFFIX, META_SUFFIX,
                      ".image.disk", ".layer.disk", ".blob.digest", ".blob.toc", ".image.boot")
_BY_LENGTH = sorted((x for x in BLOB_FILE_SUFFIXES if x), key=len, reverse=True)
_HEX = frozenset("0123456789abcdef")


def cache_blob_id(name: str) -> str | None:
    """The blob a cache dir entry belongs to (``<blob_id><suffix>``), or None for any other file.

    A name without a suffix counts only as a 64-hex blob id (a raw blob)."""
    for suffix in _BY_LENGTH:
        if name.endswith(suffix):
            blob_id = name[: -len(suffix)]
            return blob_id if blob_id and "/" not in blob_id else None
    return name if len(name) == 64 and set(name) <= _HEX else None


class FileBlobCache(BlobCache):
    """The file cache of one blob."""

    def __init__(self, work_dir: str, blob: BlobInfo, reader: BlobReader, config: CacheConfig,
                 metrics: StorageMetrics) -> None:
        super().__init__(blob, reader, config, metrics)
        self.work_dir = work_dir
        self.path = os.path.join(work_dir, blob.blob_id + DATA_SUFFIX)
        self.map_path = os.path.join(work_dir, blob.blob_id + CHUNK_MAP_SUFFIX)
        if not os.path.exists(self.path) and os.path.exists(self.map_path):
            os.unlink(self.map_path)  # a map without its data describes nothing
        self._fd = _open_locked(self.path)
        try:
            self.chunk_map = IndexedChunkMap(self.map_path, blob.chunk_count)
            if blob.uncompressed_size and os.fstat(self._fd).st_size < blob.uncompressed_size:
                # created at full size, so a shorter file was truncated behind our back: the
                # ready bits no longer describe it (extending it would serve zeros)
                if self.chunk_map.ready_count():
                    cleared = self.chunk_map.reset(range(blob.chunk_count))
                    log.warning("blob %s: cache file %s is shorter than the blob; %d ready chunks reset",
                                blob.blob_id, self.path, len(cleared))
                    metrics.cache_corrupt_resets.inc()
                os.ftruncate(self._fd, blob.uncompressed_size)
        except BaseException:
            os.close(self._fd)
            raise
        #: chunks whose cached data this process has checked against their digest (ready chunks
        #: from an earlier run are checked once, on first use, before any byte is served)
        self._verified = bytearray((blob.chunk_count + 7) // 8)
        self._verified_count = 0
        self._digests: dict[int, bytes] = {}
        #: the bootstrap's chunks of this blob (with digests), loaded on first need; set by the device
        self.chunk_source: Callable[[], Iterable[ChunkInfo]] | None = None
        self._digests_loaded = False
        self._digest_lock = threading.Lock()
        self._verified_lock = threading.Lock()
        self._chunk_table: Sequence[ChunkInfo] | None = None
        #: (chunk table, its checkable chunks): whole_blob_chunks without an O(chunks) pass per call
        self._checkable_memo: tuple[list[ChunkInfo], list[ChunkInfo]] | None = None
        self.after_fetch: Callable[[], None] | None = None  #: set by the manager (size limit)
        self.fetch_pool: ThreadPoolExecutor | None = None  #: set by the manager (parallel runs)
        self.meta_path = os.path.join(work_dir, blob.blob_id + META_SUFFIX)
        self._meta: BlobMeta | None = None
        self._meta_state = "unloaded"  # unloaded | loaded | absent
        self._meta_lock = threading.Lock()
        #: chunk index → :meth:`resolve`'s answer (dict get/set are atomic: no lock)
        self._resolved: dict[int, ChunkInfo] = {}
        self.last_access = time.monotonic()
        #: chunk index → readers waiting for it while another thread fetches it
        self._waited: dict[int, int] = {}
        #: chunk index → speculative (prefetch) transfers of it running now
        self._speculating: dict[int, int] = {}
        self._waiters_lock = threading.Lock()
        self._last_full_warning = 0.0

    def has_waiters(self) -> bool:
        """True while a reader waits for a chunk that a speculative fetch is transferring: that
        fetch then must not pause for demand reads, it is the one they wait for. A reader waiting
        for another demand read's chunk does not count (two kernel reads of one chunk are common:
        kernel EROFS sends 64 KiB pieces in parallel), or it would lift the pause for every
        prefetch of the blob."""
        with self._waiters_lock:
            waited, running = self._waited, self._speculating
            if len(waited) > len(running):
                waited, running = running, waited
            return any(i in running for i in waited)

    # -- CI table ---------------------------------------------------------------------------------
    def _has_ci_table(self) -> bool:
        b = self.blob
        return b.ci_compressed_size > 0 or b.has(BlobFeatures.HAS_TOC)

    def blob_meta(self) -> BlobMeta | None:
        """The blob's CI table (cached file, else fetched from the blob once), or None."""
        if self._meta_state != "unloaded":
            return self._meta
        with self._meta_lock, shared_fetch():
            if self._meta_state != "unloaded":
                return self._meta
            meta = None
            if os.path.exists(self.meta_path):
                try:
                    meta = load_blob_meta_file(self.meta_path)
                    self._check_meta(meta)
                except (MetaFormatError, OSError) as exc:
                    log.warning("discarding %s: %s", self.meta_path, exc)
                    meta = None
                    os.unlink(self.meta_path)
            if meta is None and self.blob.blob_meta_id is not None:
                # SEPARATE (OCI-ref): the CI table is in the ref blob, fetched by range once
                try:
                    meta = self.load_separate_meta()
                    if meta is not None:
                        self._check_meta(meta)
                except MetaFormatError as exc:
                    log.warning("blob %s: unusable blob.meta in ref blob %s: %s", self.blob.blob_id,
                                self.blob.blob_meta_id, exc)
                    meta = None
                if meta is not None:
                    try:
                        write_blob_meta_file(self.meta_path, meta)
                    except OSError as exc:
                        log.warning("blob %s: cannot store the CI table in %s: %s", self.blob.blob_id,
                                    self.meta_path, exc)
            elif meta is None and self._has_ci_table() and not self.blob.has(BlobFeatures.ZRAN):
                # a ZRAN blob of the older layout is the original gzip layer: its blob.meta only
                # comes as a file
                b = self.blob
                try:
                    if b.ci_compressed_size:
                        # the blob table gives the CI table's extent: no blob-size request (a HEAD
                        # round trip on registries) first; a blob too short fails the range read
                        extent = b.ci_offset + b.ci_compressed_size + BLOB_CCT_HEADER_SIZE
                        try:
                            meta = load_from_blob(self.reader.read, extent, ci_offset=b.ci_offset,
                                                  ci_compressed_size=b.ci_compressed_size,
                                                  ci_uncompressed_size=b.ci_uncompressed_size or None,
                                                  ci_compressor=int(b.ci_compressor), chunk_count=b.chunk_count)
                        except BlobRangeError as exc:
                            raise MetaFormatError(f"CI table {b.ci_offset}+{b.ci_compressed_size} "
                                                  f"beyond the blob: {exc}") from exc
                    else:
                        meta = load_from_blob(self.reader.read, self.reader.blob_size())
                    self._check_meta(meta)
                except MetaFormatError as exc:
                    log.warning("blob %s: unusable CI table, using bootstrap chunk info: %s", b.blob_id, exc)
                    meta = None
                if meta is not None:
                    try:
                        write_blob_meta_file(self.meta_path, meta)
                    except OSError as exc:  # e.g. a full cache disk: keep it in memory only
                        log.warning("blob %s: cannot store the CI table in %s: %s", b.blob_id, self.meta_path, exc)
            self._meta = meta
            self._meta_state = "loaded" if meta is not None else "absent"
            if meta is not None and self._chunk_table is None:
                # the blob's chunks as the CI table gives them (no digests), each made on use:
                # the first read of a blob of thousands of chunks does not pay an object per chunk
                self._chunk_table = MadeOnUse(lambda i: self._from_ci(i, b""), meta.chunk_count)
            return meta

    def _check_meta(self, meta: BlobMeta) -> None:
        if meta.chunk_count < self.blob.chunk_count:
            raise MetaFormatError(f"CI table has {meta.chunk_count} entries, blob table says {self.blob.chunk_count}")
        if meta.header.s_features & (BlobFeatures.BATCH | BlobFeatures.ENCRYPTED):
            raise MetaFormatError(f"CI features {meta.header.s_features:#x} (batch/encrypted) not supported")
        if bool(meta.header.s_features & BlobFeatures.ZRAN) != self.blob.has(BlobFeatures.ZRAN):
            raise MetaFormatError(f"blob.meta ZRAN feature ({meta.header.s_features:#x}) differs from the "
                                  f"blob table's ({self.blob.features:#x})")

    def _from_ci(self, index: int, digest: bytes) -> ChunkInfo:
        assert self._meta is not None
        ci = self._meta.chunks[index]
        return ChunkInfo(self.blob.blob_index, index, digest, int(ChunkFlags.COMPRESSED) if ci.is_compressed else 0,
                         ci.compressed_offset, ci.compressed_size, ci.uncompressed_offset, ci.uncompressed_size)

    def zran_meta(self) -> BlobMeta | None:
        return self.blob_meta()

    def resolve(self, chunk: ChunkInfo) -> ChunkInfo:
        """``chunk`` with the CI table's authoritative offsets and sizes (when the blob has one).

        Made once per chunk (the CI table does not change once loaded): every read of a ready
        chunk asks, and making it from the table each time was ~15 % of the cached-read samples
        in a profile of the daemon. A chunk that names another digest than the one remembered is
        made afresh (never mixed up)."""
        done = self._resolved.get(chunk.index)
        if done is not None and (done.digest == chunk.digest or not chunk.digest):
            return done
        meta = self.blob_meta()
        if meta is None:
            return chunk
        if not 0 <= chunk.index < meta.chunk_count:
            raise MetaFormatError(f"blob {self.blob.blob_id}: chunk index {chunk.index} beyond CI table "
                                  f"({meta.chunk_count} entries)")
        made = self._from_ci(chunk.index, chunk.digest or self.digest_of(chunk.index))
        if done is None:
            self._resolved[chunk.index] = made
        return made

    def set_chunk_table(self, chunks: Sequence[ChunkInfo]) -> None:
        """The blob's full chunk list by index (enables read amplification, whole-blob prefetch)."""
        self._chunk_table = sorted(chunks, key=lambda c: c.index)
        self._digests.update((c.index, c.digest) for c in chunks if c.digest)

    def digest_of(self, index: int) -> bytes:
        """Chunk ``index``'s digest as the bootstrap records it (b"" when unknown)."""
        d = self._digests.get(index)
        if d is not None:
            return d
        if not self._digests_loaded and self.chunk_lookup is not None:  # just this one
            c = self.chunk_lookup(index)
            d = c.digest if c is not None and c.index == index else b""
            if d:
                self._digests[index] = d
            return d
        self._load_digests()
        return self._digests.get(index, b"")

    def _load_digests(self) -> None:
        """Every digest of this blob from the bootstrap's chunk table, once."""
        if not self._digests_loaded and self.chunk_source is not None:
            with self._digest_lock:
                if not self._digests_loaded:
                    for c in self.chunk_source():
                        if c.digest:
                            self._digests.setdefault(c.index, c.digest)
                    self._digests_loaded = True

    def _with_digest(self, chunk: ChunkInfo) -> ChunkInfo:
        if chunk.digest:
            return chunk
        d = self.digest_of(chunk.index)
        return chunk if not d else ChunkInfo(chunk.blob_index, chunk.index, d, chunk.flags,
                                             chunk.compressed_offset, chunk.compressed_size,
                                             chunk.uncompressed_offset, chunk.uncompressed_size)

    def chunk_list(self) -> Sequence[ChunkInfo] | None:
        self.blob_meta()
        table = self._chunk_table   # the CI table's rows made on use: no pass over the blob
        return table if table is not None else self.whole_blob_chunks()

    def checkable_chunk(self, chunk: ChunkInfo) -> ChunkInfo | None:
        chunk = self._with_digest(chunk)   # one lookup, not every digest of the blob
        return chunk if self._checkable(chunk) else None

    def _checkable(self, chunk: ChunkInfo) -> bool:
        """False for a chunk that would enter the cache unchecked (validation on, digest unknown):
        read amplification and whole-blob prefetch leave such chunks to on-demand reads."""
        return bool(chunk.digest) or not self.config.validate_digest

    # -- fetch ------------------------------------------------------------------------------------
    def _amplify(self, run: list[ChunkInfo], allowed: "set[int] | None" = None) -> None:
        """Extend ``run`` with following chunks (claimed here) up to ``amplify_io`` bytes;
        with ``allowed``, only with chunks listed there (the rest of the file being read), and
        with others (neighbouring files) only while the run stays within ``amplify_neighbours``."""
        if allowed is not None and not allowed and not self.config.amplify_neighbours:
            return
        self.blob_meta()
        table = self._chunk_table
        if not self.config.amplify_io or table is None:
            return
        start = run[0].compressed_offset
        while True:
            last = run[-1]
            end = last.compressed_offset + last.compressed_size
            if end - start >= self.config.amplify_io or last.index + 1 >= len(table):
                return
            nxt = self._with_digest(table[last.index + 1])
            if (allowed is not None and nxt.index not in allowed
                    and nxt.compressed_offset + nxt.compressed_size - start > self.config.amplify_neighbours):
                return
            if not self._checkable(nxt) or nxt.compressed_offset != end or nxt.compressed_offset + nxt.compressed_size - start > max(
                    self.config.amplify_io, self.config.merging_size):
                return
            if self.chunk_map.try_mark_pending(nxt.index) is not ChunkState.OWNED:
                return
            run.append(nxt)

    def _zran_runs(self, owned: list[ChunkInfo]) -> list[list[ChunkInfo]]:
        """ZRAN: a context is inflated from its live stream's position (or its checkpoint, see
        :class:`~storage.zran.ZranReader`) up to the end of its last owned chunk, so the other
        chunks on the way that nobody else is fetching (and whose digest is known when
        validating) are claimed and cached too; chunks after it are left for a later read, which
        continues the stream. Runs are groups of consecutive contexts up to ``merging_size``
        compressed bytes."""
        meta = self.blob_meta()
        table = self._chunk_table
        if meta is None or table is None:
            return [[c] for c in owned]
        reader = self.zran_reader()
        groups = reader.groups()
        by_ctx: dict[int, list[ChunkInfo]] = {}
        for c in owned:
            by_ctx.setdefault(meta.chunks[c.index].context_index if c.index < meta.chunk_count else -1, []).append(c)
        taken = {c.index for c in owned}
        for k, chunks in by_ctx.items():
            placed = [meta.chunks[c.index] for c in chunks if c.index < meta.chunk_count]
            if k < 0 or not placed:
                continue
            lo = min(ci.context_offset for ci in placed)
            end = max(ci.context_offset + ci.uncompressed_size for ci in placed)
            pos = reader.position(k)
            start = pos if pos is not None and pos <= lo else 0
            for off, size, i in groups.get(k, ()):
                if off < start or i in taken or i >= len(table):
                    continue
                if off + size > end:
                    break
                sibling = self._with_digest(table[i])
                if self._checkable(sibling) and self.chunk_map.try_mark_pending(i) is ChunkState.OWNED:
                    taken.add(i)
                    chunks.append(sibling)
        runs: list[list[ChunkInfo]] = []
        size = 0
        last = None
        for k in sorted(by_ctx):
            span = sum(c.compressed_size for c in by_ctx[k])
            if runs and last is not None and k == last + 1 and size + span <= self.config.merging_size:
                runs[-1].extend(by_ctx[k])
                size += span
            else:
                runs.append(list(by_ctx[k]))
                size = span
            last = k
        return runs

    def ensure_ready(self, chunks: Sequence[ChunkInfo], fresh: dict[int, bytes | memoryview] | None = None,
                     amplify_into: "set[int] | None" = None, exact: bool = False) -> int:
        """Fetch the chunks not yet cached (merged, once across threads); returns bytes fetched.

        Chunks this call fetched are also put in ``fresh`` (index → data) when given;
        ``amplify_into`` bounds read amplification (see :meth:`BlobCache.read_descs`);
        ``exact``: no amplification.
        """
        self.last_access = time.monotonic()
        if self.chunk_map.all_ready():  # fast path: a complete blob
            self.metrics.cache_hits.inc(len(chunks))
            return 0
        needed = {c.index: c for c in map(self.resolve, chunks)}
        fetched = 0
        first = True
        while needed:
            owned: list[ChunkInfo] = []
            inflight: list[ChunkInfo] = []
            for c in needed.values():
                state = self.chunk_map.try_mark_pending(c.index)
                if state is ChunkState.OWNED:
                    owned.append(c)
                elif state is ChunkState.INFLIGHT:
                    inflight.append(c)
                elif first:
                    self.metrics.cache_hits.inc()
            first = False
            if owned:
                fetched += self._fetch_owned(owned, fresh, amplify_into, exact)
            if inflight:
                waited = [c.index for c in inflight]
                _count(self._waiters_lock, self._waited, waited, 1)
                try:
                    for i in waited:
                        self.chunk_map.wait_pending(i)
                finally:
                    _count(self._waiters_lock, self._waited, waited, -1)
            needed = {c.index: c for c in inflight if not self.chunk_map.is_ready(c.index)}
        return fetched

    def _fetch_owned(self, owned: list[ChunkInfo], fresh: dict[int, bytes | memoryview] | None = None,
                     amplify_into: "set[int] | None" = None, exact: bool = False) -> int:
        """Fetch chunks this thread owns (runs in parallel on the manager's fetch pool);
        every owned chunk is released on every path."""
        owned_ids = {c.index for c in owned}
        if self.blob.has(BlobFeatures.ZRAN):
            runs = self._zran_runs(owned)
        else:
            runs = merge_runs(owned, self.config.merging_size)
        results: list[tuple[int, StorageError | None]] = []
        pending = set(owned_ids)
        try:
            if len(runs) > 1 and self.fetch_pool is not None:
                results = list(self.fetch_pool.map(lambda r: self._complete_run(r, owned_ids, fresh), runs))
            else:
                for run in runs:
                    if not exact:
                        self._amplify(run, amplify_into)
                    results.append(self._complete_run(run, owned_ids, fresh))
            pending.clear()
        finally:
            if pending:  # interrupted (e.g. KeyboardInterrupt): release what we still own
                self.chunk_map.clear_pending([i for i in pending if not self.chunk_map.is_ready(i)])
        fetched = sum(n for n, _ in results)
        if fetched and self.after_fetch is not None:
            self.after_fetch()
        for _, err in results:
            if err is not None:
                raise err
        return fetched

    def _complete_run(self, run: list[ChunkInfo], wanted: set[int],
                      fresh: dict[int, bytes | memoryview] | None) -> tuple[int, StorageError | None]:
        """Fetch, process, write, sync and mark one run; returns (bytes fetched, error for ``wanted``)."""
        indices = [c.index for c in run]
        spec = speculation.pause is not None  # a prefetch transfer (it may pause, see has_waiters)
        if spec:
            _count(self._waiters_lock, self._speculating, indices, 1)
        try:
            good, bad = self.fetch_run(run, {c.index for c in run if c.index not in wanted})
        except StorageError as exc:
            self.chunk_map.clear_pending(indices)
            return 0, exc
        except BaseException:
            self.chunk_map.clear_pending(indices)
            raise
        finally:
            if spec:
                _count(self._waiters_lock, self._speculating, indices, -1)
        try:
            for c in run:
                if c.index in good:
                    n = os.pwrite(self._fd, good[c.index], c.uncompressed_offset)
                    if n != len(good[c.index]):  # a short write: the disk filled up
                        raise OSError(errno.ENOSPC, f"short write {n} of {len(good[c.index])}")
            if good and self.syncs_data:
                os.fdatasync(self._fd)
        except OSError as exc:
            self.chunk_map.clear_pending(indices)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return 0, CacheError(f"{self.path}: write: {exc}")
            # cache disk full: serve the checked data to this read without caching it
            self.metrics.cache_write_failures.inc(len(good))
            now = time.monotonic()
            if now - self._last_full_warning > 60:
                self._last_full_warning = now
                log.warning("cache disk full (%s): blob %s served from the backend without caching",
                            exc, self.blob.blob_id)
            if fresh is not None:
                fresh.update(good)
            error = next((bad[i] for i in bad if i in wanted), None)
            return run[-1].compressed_offset + run[-1].compressed_size - run[0].compressed_offset, error
        except BaseException:
            self.chunk_map.clear_pending(indices)
            raise
        for i in good:
            self._set_verified(i)
        self.chunk_map.set_ready_and_clear_pending(good)
        self.chunk_map.clear_pending(bad)
        self.metrics.cache_misses.inc(len(run))
        if fresh is not None:
            fresh.update(good)
        error = next((bad[i] for i in bad if i in wanted), None)
        return run[-1].compressed_offset + run[-1].compressed_size - run[0].compressed_offset, error

    # -- reads ------------------------------------------------------------------------------------
    def read_descs(self, descs: Sequence[BlobIoDesc], amplify_into: "set[int] | None" = None) -> bytes:
        fresh: dict[int, bytes | memoryview] = {}
        self.ensure_ready([d.chunk for d in descs], fresh, amplify_into)  # type: ignore[misc]
        self._verify_cached([d.chunk for d in descs], fresh)  # type: ignore[misc]
        return self._assemble(descs, fresh)

    def _is_verified(self, index: int) -> bool:
        byte = index >> 3
        return byte < len(self._verified) and bool(self._verified[byte] & (0x80 >> (index & 7)))

    def _set_verified(self, index: int) -> None:
        byte, mask = index >> 3, 0x80 >> (index & 7)
        with self._verified_lock:
            if byte >= len(self._verified):
                self._verified.extend(bytes(byte + 1 - len(self._verified)))
            if not self._verified[byte] & mask:
                self._verified[byte] |= mask
                self._verified_count += 1

    def _checks_cache(self) -> bool:
        return self.config.validate_digest or self.config.verify_every_read

    @property
    def syncs_data(self) -> bool:
        """Whether fetched data is ``fdatasync``-ed before its chunks are marked ready: when
        ``sync_data`` asks for it, and always when ready chunks are reused unchecked (neither
        ``validate_digest`` nor ``verify_every_read``): then a ready bit is all that vouches for
        the bytes after a crash. A checking cache catches a lost or torn write on the next
        process's first use of the chunk (:meth:`_verify_cached`) and fetches it again."""
        return self.config.sync_data or not self._checks_cache()

    def _verify_cached(self, chunks: Sequence[ChunkInfo], fresh: dict[int, bytes | memoryview]) -> None:
        """Check ready chunks not yet checked by this process (every time with
        ``verify_every_read``) against their digests before any of their bytes is served. A chunk
        whose cached data is short or wrong is logged, counted, reset and fetched again; its good
        data goes to ``fresh``. Checked data also goes to ``fresh`` (no second read)."""
        if not self._checks_cache():
            return
        bad: list[ChunkInfo] = []
        every = self.config.verify_every_read
        seen: set[int] = set()
        for c in chunks:
            if c.index in fresh or c.index in seen or (not every and self._is_verified(c.index)):
                continue
            seen.add(c.index)
            c = self.resolve(c)
            if not c.digest:  # nothing to check against
                self._set_verified(c.index)
                continue
            data = os.pread(self._fd, c.uncompressed_size, c.uncompressed_offset)
            if len(data) == c.uncompressed_size and digest(self.blob.digester, data) == c.digest:
                self._set_verified(c.index)
                fresh[c.index] = data
                continue
            bad.append(c)
        if not bad:
            return
        self.chunk_map.reset(c.index for c in bad)
        self.metrics.cache_verify_failures.inc(len(bad))
        log.warning("blob %s: cached data of chunk(s) %s does not match the digest (changed on disk); "
                    "fetching again", self.blob.blob_id, ",".join(str(c.index) for c in bad))
        self.ensure_ready(bad, fresh)
        missing = [c.index for c in bad if c.index not in fresh]
        if missing:  # another reader refetched them meanwhile: check what it wrote
            self._verify_cached([c for c in bad if c.index in missing], fresh)

    def verify_all(self) -> bool:
        """Check every ready chunk not yet checked by this process; wrong ones are reset (not
        refetched). True when the blob is complete and every chunk is known good."""
        if not self.chunk_map.all_ready():
            return False
        if not self._checks_cache():
            return True
        table = self.whole_blob_chunks()
        if table is None:
            return False
        bad = []
        for c in table:
            if self._is_verified(c.index):
                continue
            if not c.digest:
                self._set_verified(c.index)
                continue
            data = os.pread(self._fd, c.uncompressed_size, c.uncompressed_offset)
            if len(data) == c.uncompressed_size and digest(self.blob.digester, data) == c.digest:
                self._set_verified(c.index)
            else:
                bad.append(c.index)
        if bad:
            self.chunk_map.reset(bad)
            self.metrics.cache_verify_failures.inc(len(bad))
            log.warning("blob %s: cached data of %d chunk(s) does not match the digest (first %d); "
                        "they will be fetched again", self.blob.blob_id, len(bad), bad[0])
            return False
        return self._verified_count >= self.blob.chunk_count  # chunks without a known digest stay unchecked

    def descs_ready(self, descs: Sequence[BlobIoDesc]) -> bool:
        if self._meta_state == "unloaded" and self._has_ci_table():
            return False  # offsets come from the CI table, which may still have to be fetched
        if self.config.verify_every_read:
            return False  # every read checks digests: not on the event loop
        is_ready = self.chunk_map.is_ready
        if not self.config.validate_digest:
            return all(is_ready(d.chunk.index) for d in descs)  # type: ignore[union-attr]
        checked = self._is_verified
        return all(is_ready(d.chunk.index) and checked(d.chunk.index) for d in descs)  # type: ignore[union-attr]

    def read_ready_descs(self, descs: Sequence[BlobIoDesc]) -> bytes | None:
        if not self.descs_ready(descs):
            return None
        self.last_access = time.monotonic()
        self.metrics.cache_hits.inc(len(descs))
        return self._assemble(descs, {})

    def _assemble(self, descs: Sequence[BlobIoDesc], fresh: dict[int, bytes | memoryview]) -> bytes:
        """The bytes of ready ``descs``: from ``fresh`` (chunks just fetched) or one ``pread`` of
        the cache file per contiguous range."""
        parts: list[bytes | memoryview] = []
        pos = length = 0
        for d in descs:
            c = self.resolve(d.chunk)  # type: ignore[arg-type]
            data = fresh.get(c.index)
            if data is not None:  # fetched by this call: no need to read it back
                if length:
                    parts.append(self._pread(pos, length))
                    length = 0
                parts.append(memoryview(data)[d.offset : d.offset + d.size])
                continue
            off = c.uncompressed_offset + d.offset
            if length and off == pos + length:
                length += d.size
                continue
            if length:
                parts.append(self._pread(pos, length))
            pos, length = off, d.size
        if length:
            parts.append(self._pread(pos, length))
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def _pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise CacheError(f"{self.path}: short read {len(data)} of {size} at {offset}")
        return data

    def prefetch_chunks(self, chunks: Sequence[ChunkInfo], amplify_into: "set[int] | None" = None,
                        exact: bool = False) -> int:
        return self.ensure_ready(chunks, amplify_into=amplify_into, exact=exact)

    def whole_blob_chunks(self) -> list[ChunkInfo] | None:
        """The blob's chunks by index, with their digests; chunks that could not be checked
        (digest unknown while validating) are left out. The list is shared between calls (it is
        built once per chunk table): callers must not change it."""
        self.blob_meta()
        table = self._chunk_table
        if table is None and self.chunk_source is not None:  # no CI table: the bootstrap's chunks
            by_index = {c.index: c for c in self.chunk_source()}
            if self.blob.chunk_count and len(by_index) == self.blob.chunk_count:
                table = self._chunk_table = [by_index[i] for i in sorted(by_index)]
        if table is None:
            return None
        if table and not table[-1].digest:
            self._load_digests()  # all of them: one pass over the table, not a lookup per chunk
            table = [self._with_digest(c) for c in table]
            if all(c.digest for c in table):
                self._chunk_table = table
        memo = self._checkable_memo
        if memo is not None and memo[0] is table:
            return memo[1]  # the same table: on-demand read-ahead asks on every read
        checkable = [c for c in table if self._checkable(c)]
        if table is self._chunk_table:  # settled (digests known): keep the filtered list
            self._checkable_memo = (table, checkable)
        return checkable

    def data_path(self, verify: bool = False) -> str | None:
        """The complete cache file once every chunk is ready and checked by this process;
        ``verify``: check the chunks not yet checked now (reads the whole blob once)."""
        if not self.chunk_map.all_ready():
            return None
        if verify:
            return self.path if self.verify_all() else None
        if self.config.verify_every_read or (self._checks_cache() and self._verified_count < self.blob.chunk_count):
            return None
        return self.path

    def disk_usage(self) -> int:
        return blob_disk_usage(self.work_dir, self.blob.blob_id)

    def close(self) -> None:
        super().close()
        self.chunk_map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_locked(path: str) -> int:
    """Open (creating) a blob's data file holding the shared "in use" lock (module docstring)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # deleted by a GC between our open and our lock: open the new file


def blob_usage(work_dir: str, blob_id: str) -> tuple[int, int]:
    """``(allocated bytes, file count)`` of one blob's regular files in ``work_dir``."""
    size = files = 0
    for suffix in BLOB_FILE_SUFFIXES:
        try:
            st = os.stat(os.path.join(work_dir, blob_id + suffix))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            size += st.st_blocks * 512
            files += 1
    return size, files


def blob_disk_usage(work_dir: str, blob_id: str) -> int:
    return blob_usage(work_dir, blob_id)[0]


def cache_dir_usage(work_dir: str) -> int:
    """Allocated bytes of every regular file in a cache dir (0 when it does not exist)."""
    total = 0
    try:
        with os.scandir(work_dir) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                except FileNotFoundError:
                    continue
    except OSError:
        pass
    return total


def cached_blob_ids(work_dir: str) -> set[str]:
    """Blobs with at least one file in ``work_dir``."""
    try:
        names = os.listdir(work_dir)
    except FileNotFoundError:
        return set()
    return {b for b in map(cache_blob_id, names) if b is not None}


def _remove_blob_files(work_dir: str, blob_id: str) -> None:
    for suffix in BLOB_FILE_SUFFIXES:
        try:
            os.unlink(os.path.join(work_dir, blob_id + suffix))
        except FileNotFoundError:
            pass


def drop_blob(work_dir: str, blob_id: str) -> bool:
    """Delete every file of ``blob_id`` unless some cache (any process) holds the blob open;
    True when deleted. The exclusive lock is held while unlinking."""
    try:
        fd = os.open(os.path.join(work_dir, blob_id + DATA_SUFFIX), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        _remove_blob_files(work_dir, blob_id)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


def gc_cache_dir(work_dir: str, in_use_blob_ids: Iterable[str]) -> list[str]:
    """Delete the files of every blob in ``work_dir`` that is neither in ``in_use_blob_ids`` nor
    held open by a cache in any process; returns the deleted blob ids (sorted)."""
    keep = set(in_use_blob_ids)
    removed = []
    for blob_id in sorted(cached_blob_ids(work_dir) - keep):
        if drop_blob(work_dir, blob_id):
            removed.append(blob_id)
        else:
            log.info("cache GC: blob %s is in use by a daemon; kept", blob_id)
    if removed:
        log.info("cache GC deleted %d blobs from %s", len(removed), work_dir)
    return removed


class FileCacheManager(BlobCacheManager):
    """Creates :class:`FileBlobCache` objects in ``work_dir``; usage, GC and LRU eviction."""

    def __init__(self, work_dir: str, backend: BlobBackend, config: CacheConfig | None = None,
                 metrics: StorageMetrics | None = None) -> None:
        super().__init__(backend, config, metrics)
        self.work_dir = work_dir
        os.makedirs(work_dir, exist_ok=True)
        self._caches: dict[str, FileBlobCache] = {}
        self._refs: dict[str, int] = {}
        self._last_evict_check = 0.0
        self._pool: ThreadPoolExecutor | None = None

    def _fetch_pool(self) -> ThreadPoolExecutor | None:
        if self.config.fetch_threads <= 1:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.fetch_threads, thread_name_prefix="blob-fetch")
        return self._pool

    def get_blob_cache(self, blob: BlobInfo) -> FileBlobCache:
        with self._lock:
            cache = self._caches.get(blob.blob_id)
            if cache is None:
                reader = self.backend.reader(blob.blob_id)
                try:
                    try:
                        cache = FileBlobCache(self.work_dir, blob, reader, self.config, self.metrics)
                    except CacheError as exc:
                        log.warning("discarding cache of blob %s: %s", blob.blob_id, exc)
                        self.metrics.cache_corrupt_resets.inc()
                        self._remove_files(blob.blob_id)
                        cache = FileBlobCache(self.work_dir, blob, reader, self.config, self.metrics)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise CacheError(f"cache of blob {blob.blob_id} in {self.work_dir}: {exc}") from exc
                    # cache disk full: this blob is read from the backend without caching
                    log.warning("cache disk full (%s): blob %s is read without caching", exc, blob.blob_id)
                    self.metrics.cache_write_failures.inc()
                    self._refs[blob.blob_id] = self._refs.get(blob.blob_id, 0) + 1
                    nc = NoCacheBlobCache(blob, reader, self.config, self.metrics)
                    nc.meta_reader = self.backend.reader
                    return nc  # type: ignore[return-value]
                cache.meta_reader = self.backend.reader
                cache.after_fetch = self.maybe_enforce_limit
                cache.fetch_pool = self._fetch_pool()
                self._caches[blob.blob_id] = cache
            self._refs[blob.blob_id] = self._refs.get(blob.blob_id, 0) + 1
            return cache

    def release(self, blob_id: str) -> None:
        with self._lock:
            n = self._refs.get(blob_id, 0) - 1
            if n > 0:
                self._refs[blob_id] = n
                return
            self._refs.pop(blob_id, None)
        self.enforce_limit()

    def _remove_files(self, blob_id: str) -> None:
        _remove_blob_files(self.work_dir, blob_id)

    def _drop(self, blob_id: str) -> bool:
        """Close our unreferenced cache of ``blob_id`` and delete its files, unless another cache
        (another instance or daemon) holds the blob open; True when the files were deleted."""
        cache = self._caches.pop(blob_id, None)
        if cache is not None:
            cache.close()
        return drop_blob(self.work_dir, blob_id)

    def cached_blob_ids(self) -> set[str]:
        return cached_blob_ids(self.work_dir)

    def usage(self) -> dict[str, int]:
        return {b: blob_disk_usage(self.work_dir, b) for b in sorted(self.cached_blob_ids())}

    def gc(self, in_use_blob_ids: Iterable[str]) -> list[str]:
        keep = set(in_use_blob_ids)
        removed = []
        with self._lock:
            for blob_id in sorted(self.cached_blob_ids()):
                if blob_id in keep or self._refs.get(blob_id):
                    continue
                if self._drop(blob_id):
                    removed.append(blob_id)
        return removed

    def _last_access(self, blob_id: str) -> float:
        cache = self._caches.get(blob_id)
        if cache is not None:
            return cache.last_access
        try:  # from a previous run: order by the data file's mtime, older than anything open
            st = os.stat(os.path.join(self.work_dir, blob_id + DATA_SUFFIX))
            return st.st_mtime - time.time() + time.monotonic() - 1e9
        except FileNotFoundError:
            return float("-inf")

    def enforce_limit(self) -> list[str]:
        """Evict whole blobs not in use, least recently used first, until under ``limit_size``."""
        limit = self.config.limit_size
        if not limit:
            return []
        evicted = []
        with self._lock:
            usage = self.usage()
            total = sum(usage.values())
            self.metrics.cache_usage_bytes.set(total)
            if total <= limit:
                return []
            candidates = sorted((b for b in usage if not self._refs.get(b)), key=self._last_access)
            for blob_id in candidates:
                if total <= limit:
                    break
                if not self._drop(blob_id):
                    continue  # open in another instance or daemon
                total -= usage[blob_id]
                evicted.append(blob_id)
                self.metrics.cache_evictions.inc()
            self.metrics.cache_usage_bytes.set(total)
        if evicted:
            log.info("cache over limit %d: evicted %s", limit, evicted)
        return evicted

    def maybe_enforce_limit(self) -> None:
        now = time.monotonic()
        if self.config.limit_size and now - self._last_evict_check > 1.0:
            self._last_evict_check = now
            self.enforce_limit()

    def close(self) -> None:
        with self._lock:
            for cache in self._caches.values():
                cache.close()
            self._caches.clear()
            self._refs.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _count(lock: threading.Lock, counts: dict[int, int], keys: Iterable[int], delta: int) -> None:
    """Add ``delta`` to the count of each key (a key at zero is removed), under ``lock``."""
    with lock:
        for k in keys:
            n = counts.get(k, 0) + delta
            if n:
                counts[k] = n
            else:
                del counts[k]
