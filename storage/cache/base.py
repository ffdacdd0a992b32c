"""What every cache driver shares: the manager/blob-cache interfaces, request merging and the
one ``process_raw_chunk`` hook (decompress, check size, check digest) run after a backend read.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from storage.backend.base import BlobBackend, BlobReader, shared_fetch
from storage.compress import decompress
from storage.digest import digest
from storage.errors import BlobRangeError, ChunkDigestMismatch, DecompressError, MetaFormatError, StorageError
from storage.meta.blob_meta import BlobMeta, load_from_blob
from storage.meta.header import BLOB_CCT_HEADER_SIZE
from storage.metrics import StorageMetrics
from storage.records import BlobFeatures, BlobInfo, BlobIoDesc, ChunkFlags, ChunkInfo
from storage.zran import ZranReader

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Cache tuning; the defaults are the documented ones (a test asserts them)."""

    validate_digest: bool = True  #: check each chunk's digest when it enters the cache from the backend
    verify_every_read: bool = False  #: re-check a cached chunk's digest on every read (nydusd ``digest_validate``)
    merging_size: int = 1 << 20  #: max compressed bytes merged into one backend request
    amplify_io: int = 0  #: extend small requests with following chunks up to this size (0 = off)
    #: (a reader's ``amplify_into`` hint limits those chunks to the file being read, and to
    #: ``amplify_neighbours`` bytes of run in total for chunks of other files)
    amplify_neighbours: int = 0
    limit_size: int = 0  #: cache size limit in bytes; 0 = unlimited (LRU eviction of unused blobs)
    #: fdatasync chunk data before marking it ready. Off: with ``validate_digest`` (or
    #: ``verify_every_read``) a ready chunk from an earlier run is checked against its digest
    #: before its first byte is served, so a write a crash lost is fetched again, and a sync per
    #: fetch would put a disk flush in front of every demand miss. A cache that checks nothing
    #: it reuses syncs anyway (``FileBlobCache.syncs_data``).
    sync_data: bool = False
    fetch_threads: int = 4  #: runs of one request fetched in parallel (1 = sequential)


def merge_runs(chunks: Sequence[ChunkInfo], merging_size: int) -> list[list[ChunkInfo]]:
    """Group chunks (any order) into runs contiguous in the compressed blob, each ≤ ``merging_size``
    (a single larger chunk is a run of its own). Duplicate chunk indexes are dropped.

    Runs come in the order their first chunk appears in ``chunks`` (for chunks given in blob
    order: blob order), so a prefetch list in access order is fetched in access order."""
    first: dict[int, int] = {}
    for pos, c in enumerate(chunks):
        first.setdefault(c.index, pos)
    ordered = sorted((chunks[pos] for pos in first.values()), key=lambda c: (c.compressed_offset, c.index))
    runs: list[list[ChunkInfo]] = []
    for c in ordered:
        if runs:
            run = runs[-1]
            start = run[0].compressed_offset
            end = run[-1].compressed_offset + run[-1].compressed_size
            if c.compressed_offset == end and c.compressed_offset + c.compressed_size - start <= merging_size:
                run.append(c)
                continue
        runs.append([c])
    runs.sort(key=lambda run: min(first[c.index] for c in run))
    return runs


def process_raw_chunk(blob: BlobInfo, chunk: ChunkInfo, raw: bytes | memoryview, validate: bool,
                      metrics: StorageMetrics) -> bytes | memoryview:
    """Decompress one chunk, check its size and (if ``validate``) its digest."""
    if chunk.is_compressed:
        data = decompress(blob.compressor, raw, chunk.uncompressed_size)
    else:
        if len(raw) != chunk.uncompressed_size:
            raise DecompressError(
                f"blob {blob.blob_id} chunk {chunk.index}: raw chunk is {len(raw)} bytes, "
                f"expected {chunk.uncompressed_size}"
            )
        data = raw  # a view of the backend buffer: no copy
    if validate and chunk.digest:
        actual = digest(blob.digester, data)
        if actual != chunk.digest:
            metrics.cache_digest_mismatches.inc()
            raise ChunkDigestMismatch(blob.blob_id, chunk.index, chunk.digest, actual)
    return data


class BlobCache(ABC):
    """The per-blob cache: all IO for one :class:`BlobInfo` goes through it. Thread-safe."""

    #: where chunk digests not given with a read are found (set by ``BlobDevice`` from the
    #: bootstrap's chunk table); None until set
    chunk_source: "Callable[[], Iterable[ChunkInfo]] | None" = None
    #: one chunk of that table by index (None when it has none): a digest without loading them all
    chunk_lookup: "Callable[[int], ChunkInfo | None] | None" = None

    def __init__(self, blob: BlobInfo, reader: BlobReader, config: CacheConfig, metrics: StorageMetrics) -> None:
        self.blob = blob
        self.reader = reader
        self.config = config
        self.metrics = metrics
        #: readers of other blobs by id (the manager's backend): a SEPARATE blob's CI table is in
        #: its ref blob (``BlobInfo.blob_meta_id``)
        self.meta_reader: Callable[[str], BlobReader] | None = None
        self._separate_meta: BlobMeta | None = None
        self._separate_lock = threading.Lock()
        self._zran_reader: ZranReader | None = None
        self._zran_lock = threading.Lock()

    def load_separate_meta(self) -> BlobMeta | None:
        """A SEPARATE (OCI-ref) blob's CI table: one range read of ``ci_offset``,
        ``ci_compressed_size`` + the 4096-byte header from its ref blob; None when the blob has
        no ref blob or this cache no ``meta_reader``. Checked against the blob table."""
        b = self.blob
        ref = b.blob_meta_id
        if ref is None or self.meta_reader is None or not b.ci_compressed_size:
            return None
        extent = b.ci_offset + b.ci_compressed_size + BLOB_CCT_HEADER_SIZE
        if b.blob_meta_size and extent > b.blob_meta_size:
            raise MetaFormatError(f"blob {b.blob_id}: CI table {b.ci_offset}+{b.ci_compressed_size} beyond "
                                  f"its ref blob {ref} ({b.blob_meta_size} bytes)")
        try:
            meta = load_from_blob(self.meta_reader(ref).read, extent, ci_offset=b.ci_offset,
                                  ci_compressed_size=b.ci_compressed_size,
                                  ci_uncompressed_size=b.ci_uncompressed_size or None,
                                  ci_compressor=int(b.ci_compressor), chunk_count=b.chunk_count)
        except BlobRangeError as exc:
            raise MetaFormatError(f"blob {b.blob_id}: CI table beyond its ref blob {ref}: {exc}") from exc
        if not meta.header.s_features & BlobFeatures.ZRAN:
            raise MetaFormatError(f"blob {b.blob_id}: ref blob {ref} holds a blob.meta without ZRAN")
        return meta

    def fetch_run(self, run: Sequence[ChunkInfo], optional: "set[int] | frozenset[int]" = frozenset()
                  ) -> tuple[dict[int, bytes | memoryview], dict[int, StorageError]]:
        """One backend request for a contiguous run; per chunk either its data or its error.
        ``optional``: chunks fetched only because they come for free (a ZRAN reader may leave
        them out, with an error, rather than start a context again from its checkpoint).

        A chunk whose data is wrong (digest mismatch, or it does not decompress) is logged once
        naming blob, chunk and source, and read once more from the next source (mirror, then
        origin); if that is wrong too, its error is returned and it must not be cached."""
        if self.blob.has(BlobFeatures.ZRAN):
            return self._fetch_zran_run(run, optional)
        start = run[0].compressed_offset
        end = run[-1].compressed_offset + run[-1].compressed_size
        raw = memoryview(self.reader.read(start, end - start))
        source = self.reader.last_source
        good: dict[int, bytes | memoryview] = {}
        bad: dict[int, StorageError] = {}
        for c in run:
            piece = raw[c.compressed_offset - start : c.compressed_offset - start + c.compressed_size]
            try:
                good[c.index] = process_raw_chunk(self.blob, c, piece, self.config.validate_digest, self.metrics)
            except StorageError as exc:
                bad[c.index] = exc
        for c in run:
            exc = bad.get(c.index)
            if not isinstance(exc, (ChunkDigestMismatch, DecompressError)):
                continue
            log.warning("blob %s chunk %d: wrong data from %s (%s); reading it again from the next source",
                        self.blob.blob_id, c.index, source or "backend", exc)
            try:
                again = self.reader.reread(c.compressed_offset, c.compressed_size)
                good[c.index] = process_raw_chunk(self.blob, c, again, self.config.validate_digest, self.metrics)
                del bad[c.index]
            except StorageError as exc2:
                bad[c.index] = exc2
        return good, bad

    def zran_reader(self) -> ZranReader:
        """The ZRAN blob's reader (created once: it keeps inflate streams live between reads)."""
        r = self._zran_reader
        if r is None:
            with self._zran_lock:  # (zran_meta loads under shared_fetch itself)
                r = self._zran_reader
                if r is None:
                    meta = self.zran_meta()
                    if meta is None:
                        raise MetaFormatError(f"blob {self.blob.blob_id}: ZRAN blob without its blob.meta")
                    r = self._zran_reader = ZranReader(meta, self.reader.read)
        return r

    def _fetch_zran_run(self, run: Sequence[ChunkInfo], optional: "set[int] | frozenset[int]" = frozenset()
                        ) -> tuple[dict[int, bytes | memoryview], dict[int, StorageError]]:
        """A ZRAN blob is an original gzip layer: inflate the chunks from their contexts
        (:class:`~storage.zran.ZranReader`), then check each like an uncompressed chunk (size,
        digest). A context whose data is wrong loses its live stream."""
        reader = self.zran_reader()
        good: dict[int, bytes | memoryview] = {}
        bad: dict[int, StorageError] = {}
        by_index = {c.index: c for c in run}
        for index, data in reader.read_chunks(run, optional).items():
            if isinstance(data, StorageError):
                bad[index] = data
                continue
            c = by_index[index]
            try:
                plain = replace(c, flags=c.flags & ~ChunkFlags.COMPRESSED)
                good[index] = process_raw_chunk(self.blob, plain, data, self.config.validate_digest, self.metrics)
            except StorageError as exc:
                bad[index] = exc
                reader.drop(reader.meta.chunks[index].context_index)
        return good, bad

    def blob_meta(self) -> BlobMeta | None:
        """The blob's CI table (loaded once); None when this cache has none."""
        return None

    def whole_blob_chunks(self) -> list[ChunkInfo] | None:
        """The blob's chunks by index, with their digests; None when unknown to this cache."""
        return None

    def chunk_list(self) -> Sequence[ChunkInfo] | None:
        """The blob's chunks by index for their offsets and sizes, digests possibly missing
        (:meth:`checkable_chunk` adds one): cheaper than :meth:`whole_blob_chunks`, which loads
        every digest of the blob. None when unknown to this cache."""
        return self.whole_blob_chunks()

    def checkable_chunk(self, chunk: ChunkInfo) -> ChunkInfo | None:
        """``chunk`` with its digest, or None when it would enter the cache unchecked (digest
        checks on, digest unknown): speculative reads leave such chunks to on-demand reads."""
        return chunk

    def has_waiters(self) -> bool:
        """True when a demand read waits for a chunk a speculative fetch owns (prefetch then
        does not pause); a cache that cannot tell answers True."""
        return True

    def zran_meta(self) -> BlobMeta | None:
        """The blob.meta of a ZRAN blob (its checkpoints); None when this cache has none.
        Here: the ref blob's, loaded once (a file cache keeps it on disk instead)."""
        if self._separate_meta is None:
            with self._separate_lock, shared_fetch():
                if self._separate_meta is None:
                    self._separate_meta = self.load_separate_meta()
        return self._separate_meta

    @abstractmethod
    def read_descs(self, descs: Sequence[BlobIoDesc], amplify_into: "set[int] | None" = None) -> bytes:
        """The bytes of ``descs`` (all in this blob, none a hole), concatenated in order.

        ``amplify_into``: chunk indexes a fetch may be extended with (``amplify_io``), e.g. the
        rest of the file being read; ``None`` = any following chunk of the blob.
        """

    def descs_ready(self, descs: Sequence[BlobIoDesc]) -> bool:
        """True when every chunk of ``descs`` is in the local cache and can be read without
        fetching anything (chunk data or CI table); answers at once, never waits."""
        return False

    def read_ready_descs(self, descs: Sequence[BlobIoDesc]) -> bytes | None:
        """The bytes of ``descs`` if :meth:`descs_ready`, read from the local file only; else None."""
        return None

    @abstractmethod
    def prefetch_chunks(self, chunks: Sequence[ChunkInfo], amplify_into: "set[int] | None" = None,
                        exact: bool = False) -> int:
        """Make ``chunks`` ready without reading them back; returns bytes fetched.
        ``amplify_into`` bounds read amplification as for :meth:`read_descs` (``set()``: no
        chunk of the file, neighbours within ``amplify_neighbours``); ``exact``: none at all."""

    def data_path(self, verify: bool = False) -> str | None:
        """The complete uncompressed blob file, when every chunk is cached and checked against
        its digest by this process (``verify``: check now those not yet checked)."""
        return None

    def close(self) -> None:
        """Release files (and a ZRAN blob's inflate streams)."""
        if self._zran_reader is not None:
            self._zran_reader.close()


class BlobCacheManager(ABC):
    """Creates and owns the per-blob caches (``FileCacheManager``, ``NoCacheManager``)."""

    def __init__(self, backend: BlobBackend, config: CacheConfig | None = None,
                 metrics: StorageMetrics | None = None) -> None:
        self.backend = backend
        self.config = config or CacheConfig()
        self.metrics = metrics if metrics is not None else backend.metrics
        self._lock = threading.RLock()

    @abstractmethod
    def get_blob_cache(self, blob: BlobInfo) -> BlobCache:
        """The cache of ``blob`` (shared; counted as in use until :meth:`release`)."""

    def release(self, blob_id: str) -> None:
        """One user of ``blob_id`` is done with it."""

    def gc(self, in_use_blob_ids: Iterable[str]) -> list[str]:
        """Delete cached blobs not in ``in_use_blob_ids`` and not open; returns their ids."""
        return []

    def usage(self) -> dict[str, int]:
        """Disk bytes used, per blob id."""
        return {}

    def close(self) -> None:
        """Close every blob cache."""
