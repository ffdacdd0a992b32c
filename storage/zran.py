"""Random access into gzip streams: the decoder and checkpoint scanner behind ZRAN (targz-ref) blobs.

A ZRAN blob is an unchanged gzip layer. Its ``blob.meta`` holds checkpoints ("ZRAN contexts",
``storage.meta.blob_meta.ZranContext``): where a deflate block starts in the compressed stream
(``in_offset`` = first whole byte, plus ``ctx_bits`` bits at the top of the byte before it,
``ctx_byte``), the uncompressed position there and the 32 KiB window that precedes it. Reading a
chunk inflates from the checkpoint (a context covers ``in_len`` compressed bytes, ``out_len``
of output) as far as the chunk; :class:`ZranReader` keeps that stream live, so a later chunk of
the same context continues it instead of starting at the checkpoint again.

API::

    data = inflate_at(compressed, bits=ctx_bits, prev_byte=ctx_byte, window=dict, out_len=n)
    s = ZranStream(in_offset=..., bits=..., prev_byte=..., window=...); s.feed(b); s.inflate(n)
    reader = ZranReader(blob_meta, read)        # one per blob: live streams between reads
    chunks = reader.read_chunks(chunk_infos)    # index -> bytes | error
    for p in scan_gzip(pieces, spacing=1 << 20, on_data=...): ...   # Checkpoint records

Python's ``zlib`` module cannot start inflating in the middle of a byte (it has no
``inflatePrime``) nor hand out the sliding window (``inflateGetDictionary``). Re-aligning the bit
stream by prefixing crafted empty blocks would need a different crafted block for every bit count
and is easy to get subtly wrong, so this module drives the system zlib itself through ``ctypes``
(``libz.so.1``, the library Python's own ``zlib`` links) exactly as upstream nydus and zlib's
``zran.c`` example do: raw inflate (-15), ``inflatePrime`` with the pending bits,
``inflateSetDictionary`` with the window. Gzip members that follow one another (multi-member
files, bgzip) are crossed by skipping the 8-byte trailer and the next member's header.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from storage.errors import DecompressError, MetaFormatError, StorageError
from storage.meta.blob_meta import BlobMeta, ZranContext
from storage.records import ChunkInfo

WINDOW_SIZE = 32 * 1024  #: deflate's sliding window; every checkpoint carries at most this much

Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR = 0, 1, 2, -5
Z_NO_FLUSH, Z_BLOCK = 0, 5
_RAW, _GZIP = -15, 31  # windowBits: raw deflate / gzip wrapper only


class ZranError(DecompressError):
    """A gzip stream cannot be inflated from a checkpoint (or scanned for checkpoints)."""


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


_lib_lock = threading.Lock()
_libz: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libz
    with _lib_lock:
        if _libz is None:
            name = ctypes.util.find_library("z") or "libz.so.1"
            try:
                lib = ctypes.CDLL(name)
            except OSError as exc:
                raise ZranError(f"zlib shared library {name} not loadable: {exc}") from exc
            p = ctypes.POINTER(_ZStream)
            lib.zlibVersion.restype = ctypes.c_char_p
            lib.inflateInit2_.argtypes = [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.inflate.argtypes = [p, ctypes.c_int]
            lib.inflateEnd.argtypes = [p]
            lib.inflateReset2.argtypes = [p, ctypes.c_int]
            lib.inflatePrime.argtypes = [p, ctypes.c_int, ctypes.c_int]
            lib.inflateSetDictionary.argtypes = [p, ctypes.c_char_p, ctypes.c_uint]
            lib.inflateGetDictionary.argtypes = [p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint)]
            _libz = lib
        return _libz


class _Inflater:
    """One zlib inflate stream (``with`` closes it)."""

    def __init__(self, wbits: int) -> None:
        self.lib = _lib()
        self.z = _ZStream()
        self.zp = ctypes.byref(self.z)
        rc = self.lib.inflateInit2_(self.zp, wbits, self.lib.zlibVersion(), ctypes.sizeof(_ZStream))
        if rc != Z_OK:
            raise ZranError(f"inflateInit2 failed: {rc}")

    def __enter__(self) -> "_Inflater":
        return self

    def __exit__(self, *exc: object) -> None:
        self.lib.inflateEnd(self.zp)

    def check(self, rc: int, what: str) -> None:
        if rc != Z_OK:
            msg = self.z.msg.decode(errors="replace") if self.z.msg else f"error {rc}"
            raise ZranError(f"{what}: {msg}")

    def reset(self, wbits: int) -> None:
        self.check(self.lib.inflateReset2(self.zp, wbits), "inflateReset2")

    def inflate(self, flush: int) -> int:
        return self.lib.inflate(self.zp, flush)

    def window(self) -> bytes:
        buf = ctypes.create_string_buffer(WINDOW_SIZE)
        n = ctypes.c_uint(0)
        self.check(self.lib.inflateGetDictionary(self.zp, buf, ctypes.byref(n)), "inflateGetDictionary")
        return buf.raw[: n.value]

    def msg(self, rc: int) -> str:
        return self.z.msg.decode(errors="replace") if self.z.msg else f"zlib error {rc}"


class ZranStream:
    """A live inflate from one checkpoint that can be fed its compressed input piece by piece.

    ``feed`` appends the next compressed bytes (``in_pos`` = blob offset of the end of what was
    fed); ``inflate(n)`` makes up to ``n`` more bytes of output and returns fewer only when the
    input fed so far runs out (feed more, then call it again). Gzip member trailers and headers
    are crossed wherever the input is cut. ``out_pos``: output made since the checkpoint. A
    :class:`ZranError` leaves the stream unusable; ``close`` frees the zlib state.
    """

    def __init__(self, *, in_offset: int, bits: int, prev_byte: int, window: bytes) -> None:
        self._z: _Inflater | None = _Inflater(_RAW)
        z = self._z
        try:
            bits &= 7
            if bits:
                z.check(z.lib.inflatePrime(z.zp, bits, (prev_byte & 0xFF) >> (8 - bits)), "inflatePrime")
            if window:
                z.check(z.lib.inflateSetDictionary(z.zp, window, len(window)), "inflateSetDictionary")
        except BaseException:
            self.close()
            raise
        self.in_pos = in_offset  #: blob offset just past the compressed bytes fed so far
        self.out_pos = 0  #: uncompressed bytes made since the checkpoint
        self._pending = b""  # fed, not yet consumed by zlib: blob bytes [in_pos - len, in_pos)
        self._trailer = 0  # bytes of a member's trailer still to skip
        self._header = False  # parsing the next member's gzip header

    def feed(self, data: bytes | memoryview) -> None:
        self._pending = self._pending + bytes(data) if self._pending else bytes(data)
        self.in_pos += len(data)

    def inflate(self, n: int) -> bytes:
        z = self._z
        if z is None:
            raise ZranError("inflate stream closed")
        out = ctypes.create_string_buffer(n)
        src = self._pending
        inbuf = ctypes.create_string_buffer(src, len(src))
        z.z.next_in = ctypes.addressof(inbuf)
        z.z.avail_in = len(src)
        produced = 0
        try:
            while produced < n:
                if self._trailer:
                    k = min(self._trailer, z.z.avail_in)
                    z.z.next_in += k
                    z.z.avail_in -= k
                    self._trailer -= k
                    if self._trailer:
                        break  # more input needed
                    z.reset(_GZIP)
                    self._header = True
                if self._header:
                    if not z.z.avail_in:
                        break
                    scratch = ctypes.create_string_buffer(64)
                    z.z.next_out = ctypes.addressof(scratch)
                    z.z.avail_out = len(scratch)
                    before = z.z.avail_in
                    rc = z.inflate(Z_BLOCK)  # gzip mode with Z_BLOCK stops right after the header
                    if rc not in (Z_OK, Z_BUF_ERROR) or z.z.avail_out != len(scratch):
                        raise ZranError(f"gzip member header: {z.msg(rc)}")
                    if z.z.data_type & 0x80:
                        z.reset(_RAW)
                        self._header = False
                    elif z.z.avail_in == before:
                        raise ZranError("gzip member header: inflate made no progress")
                    continue
                z.z.next_out = ctypes.addressof(out) + produced
                z.z.avail_out = n - produced
                avail_in = z.z.avail_in
                rc = z.inflate(Z_NO_FLUSH)
                made = (n - produced) - z.z.avail_out
                produced += made
                if rc == Z_STREAM_END:  # end of a gzip member: its trailer, then the next member
                    self._trailer = 8
                elif rc == Z_BUF_ERROR or (rc == Z_OK and not made and z.z.avail_in == avail_in):
                    break  # the input fed so far is used up
                elif rc != Z_OK:
                    raise ZranError(f"inflate from checkpoint: {z.msg(rc)}")
        except BaseException:
            self.close()
            raise
        self._pending = src[len(src) - z.z.avail_in :] if z.z.avail_in else b""
        self.out_pos += produced
        return out.raw[:produced]

    def close(self) -> None:
        z, self._z = self._z, None
        if z is not None:
            z.lib.inflateEnd(z.zp)
            self._pending = b""

    def __del__(self) -> None:
        self.close()


def inflate_at(compressed: bytes | memoryview, *, bits: int, prev_byte: int, window: bytes,
               out_len: int) -> bytes:
    """``out_len`` bytes inflated from a checkpoint.

    ``compressed`` starts at the checkpoint's ``in_offset``; ``bits`` (0-7) bits at the top of
    ``prev_byte`` (the byte before it) come first; ``window`` is the output that preceded the
    checkpoint (≤ 32 KiB). Crosses gzip member boundaries. Raises :class:`ZranError` when the
    data does not inflate to ``out_len`` bytes.
    """
    s = ZranStream(in_offset=0, bits=bits, prev_byte=prev_byte, window=window)
    try:
        s.feed(compressed)
        out = s.inflate(out_len)
    finally:
        s.close()
    if len(out) < out_len:
        raise ZranError(f"compressed data ended after {len(out)} of {out_len} bytes")
    return out


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A deflate block boundary where inflating can resume (zlib's ``zran.c`` access point)."""

    in_offset: int  #: first whole compressed byte after the boundary
    out_offset: int  #: uncompressed bytes before the boundary
    bits: int  #: bits (0-7) of the byte before ``in_offset`` still to be read
    prev_byte: int  #: that byte (0 when ``bits`` is 0)
    window: bytes  #: up to 32 KiB of output before the boundary


def scan_gzip(pieces: Iterable[bytes], *, spacing: int, on_data: Callable[[bytes], None] | None = None,
              boundaries: list[tuple[int, int]] | None = None) -> Iterator[Checkpoint]:
    """Inflate a gzip stream (one or more members) and yield checkpoints.

    The first checkpoint is the start of the first member's deflate data; after that one is
    yielded at the first block boundary at least ``spacing`` uncompressed bytes after the previous
    one. ``on_data`` receives the whole uncompressed stream in order. A checkpoint is yielded
    before any output that follows it is passed to ``on_data``. ``boundaries`` gets
    ``(in_offset, out_offset)`` of every block boundary (checkpoint or not) and of the end.
    """
    out = ctypes.create_string_buffer(WINDOW_SIZE)
    total_in = total_out = 0
    last: int | None = None
    prev_tail = 0  # last byte of the previous input piece
    ended = False  # a member ended: the next input must be a new member (or nothing)
    with _Inflater(_GZIP) as z:
        for piece in pieces:
            if not piece:
                continue
            piece = bytes(piece)
            buf = ctypes.create_string_buffer(piece, len(piece))
            base = ctypes.addressof(buf)
            z.z.next_in = base
            z.z.avail_in = len(piece)
            while z.z.avail_in:
                if ended:
                    z.reset(_GZIP)
                    ended = False
                z.z.next_out = ctypes.addressof(out)
                z.z.avail_out = WINDOW_SIZE
                avail_in = z.z.avail_in
                rc = z.inflate(Z_BLOCK)
                used = avail_in - z.z.avail_in
                made = WINDOW_SIZE - z.z.avail_out
                total_in += used
                total_out += made
                if made and on_data is not None:
                    on_data(out.raw[:made])
                if rc == Z_STREAM_END:
                    ended = True
                    continue
                if rc == Z_BUF_ERROR and not used and not made:
                    break  # needs more input
                if rc != Z_OK:
                    raise ZranError(f"gzip stream at byte {total_in}: {z.msg(rc)}")
                dt = z.z.data_type
                if dt & 0x80 and not dt & 0x40 and boundaries is not None:
                    boundaries.append((total_in, total_out))
                if dt & 0x80 and not dt & 0x40 and (last is None or total_out - last >= spacing):
                    bits = dt & 7
                    pos = z.z.next_in - base
                    prev = (piece[pos - 1] if pos else prev_tail) if bits else 0
                    last = total_out
                    yield Checkpoint(total_in, total_out, bits, prev, z.window())
            prev_tail = piece[-1]
        if not ended:
            raise ZranError(f"gzip stream truncated after {total_in} bytes")
        if boundaries is not None:
            boundaries.append((total_in, total_out))



def _inflate_prefix(compressed: bytes | memoryview, p: Checkpoint, window: bytes, n: int) -> bytes:
    """Up to ``n`` bytes inflated from checkpoint ``p`` with ``window`` (fewer at the stream's end)."""
    s = ZranStream(in_offset=0, bits=p.bits, prev_byte=p.prev_byte, window=window)
    try:
        out: list[bytes] = []
        made = pos = 0
        while made < n and pos < len(compressed):
            s.feed(compressed[pos : pos + (64 << 10)])
            pos += 64 << 10
            piece = s.inflate(n - made)
            out.append(piece)
            made += len(piece)
        return b"".join(out)
    finally:
        s.close()


def trim_window(compressed: bytes | memoryview, p: Checkpoint) -> bytes:
    """``p.window`` with every byte the stream after ``p`` never copies set to zero.

    ``compressed`` starts at ``p.in_offset`` (enough of it for 32 KiB of output; more is not
    read). Deflate distances are at most 32 KiB, so only the first 32 KiB of output can copy from
    the window, and every window byte that reaches later output does so through them. Which
    window bytes they copy is read off four inflates of that prefix: with the window and with it
    inverted (the output bytes that differ came from the window), and with windows holding each
    position's low and high byte (those output bytes then name their source). Zeroed bytes make
    the ``blob.meta`` windows compress several times smaller (≈ 11 % of window bytes are copied
    on a Debian image); the length is kept, so readers (``inflateSetDictionary``) see the same
    layout. The result is checked against the real window over 64 KiB of output; when it
    differs (it cannot, for a valid stream) the whole window is kept.
    """
    w = p.window
    if not w:
        return w
    n = len(w)
    real = _inflate_prefix(compressed, p, w, WINDOW_SIZE)
    inverted = _inflate_prefix(compressed, p, w.translate(_INVERT), WINDOW_SIZE)
    low = _inflate_prefix(compressed, p, bytes(range(256)) * (n // 256) + bytes(range(n % 256)), WINDOW_SIZE)
    high = _inflate_prefix(compressed, p, b"".join(bytes([i]) * 256 for i in range(n // 256))
                           + bytes([n // 256]) * (n % 256), WINDOW_SIZE)
    kept = bytearray(n)
    for r, v, lo, hi in zip(real, inverted, low, high):
        if r != v:
            i = hi << 8 | lo
            kept[i] = w[i]
    trimmed = bytes(kept)
    if _inflate_prefix(compressed, p, trimmed, 2 * WINDOW_SIZE) != _inflate_prefix(compressed, p, w, 2 * WINDOW_SIZE):
        return w
    return trimmed


_INVERT = bytes(255 - i for i in range(256))


#: live inflate streams a :class:`ZranReader` keeps per blob (each ~40 KiB of zlib state plus
#: the unread rest of one deflate block); a context whose stream was closed starts again at its
#: checkpoint
LIVE_STREAMS_PER_BLOB = 16
#: planned reads of neighbouring contexts at most this far apart are one backend request
READ_GAP = 16 << 10


class SkippedChunk(StorageError):
    """An optional chunk a :class:`ZranReader` did not inflate (it lies behind the live stream)."""


class _Context:
    """One ZRAN context's live stream and the readers waiting for its chunks."""

    __slots__ = ("lock", "stream", "waiting", "handoff")

    def __init__(self) -> None:
        self.lock = threading.Lock()  #: held by the one reader advancing this context
        self.stream: ZranStream | None = None
        self.waiting: dict[int, int] = {}  #: chunk index -> readers that want it from here
        self.handoff: dict[int, bytes] = {}  #: chunk index -> its data, made by another reader


@dataclass(slots=True)
class _Plan:
    index: int
    ctx: _Context
    x: ZranContext
    stream: ZranStream
    need: list[tuple[ChunkInfo, int]]
    out_end: int  #: context output offset to inflate to
    in_end: int  #: blob offset to fetch to (first try)


class ZranReader:
    """Reads ZRAN chunks of one gzip blob, keeping a few inflate streams live between reads.

    The first read in a context fetches and inflates from its checkpoint only as far as the
    wanted chunks (to the compressed end of their CI entries); the stream stays live, so a later
    read further into the same context fetches only the compressed bytes after those fetched
    before and inflates on from where the last read stopped — never from the checkpoint again
    while the stream lives. A read behind a stream's position starts a new stream at the
    checkpoint (the file cache has most such chunks already: it claims every chunk on the way).
    Should a CI entry's compressed extent fall short, the rest of the context is fetched. At
    most ``max_streams`` streams live (least recently used closed first).

    Thread-safe: one reader advances a context at a time (others wait for its lock); a reader
    registers the chunks it wants before waiting, and the advancing reader hands it every such
    chunk it inflates on the way, so the waiter continues from where that reader stopped.
    """

    def __init__(self, meta: BlobMeta, read: Callable[[int, int], bytes],
                 max_streams: int = LIVE_STREAMS_PER_BLOB) -> None:
        self.meta = meta
        self._read = read
        self.max_streams = max(0, max_streams)
        self._mutex = threading.Lock()  # contexts, waiting/handoff, the LRU (never waits for a context lock)
        self._contexts: dict[int, _Context] = {}
        self._live: OrderedDict[int, None] = OrderedDict()  # contexts with a stream, least recent first
        self._groups: dict[int, list[tuple[int, int, int]]] | None = None

    def groups(self) -> dict[int, list[tuple[int, int, int]]]:
        """Context -> its chunks as ``(context offset, uncompressed size, index)``, by offset."""
        if self._groups is None:
            groups: dict[int, list[tuple[int, int, int]]] = {}
            for ci in self.meta.chunks:
                if ci.is_zran:
                    groups.setdefault(ci.context_index, []).append((ci.context_offset, ci.uncompressed_size, ci.index))
            for g in groups.values():
                g.sort()
            self._groups = groups
        return self._groups

    def position(self, k: int) -> int | None:
        """How far (context output offset) context ``k``'s live stream has inflated; None without one."""
        c = self._contexts.get(k)
        s = c.stream if c is not None else None
        return s.out_pos if s is not None else None

    def live_streams(self) -> int:
        with self._mutex:
            return len(self._live)

    def drop(self, k: int) -> None:
        """Close context ``k``'s stream (its data turned out wrong): its next read starts at the checkpoint."""
        c = self._contexts.get(k)
        if c is None:
            return
        with c.lock:
            self._forget(k, c)

    def close(self) -> None:
        for k, c in list(self._contexts.items()):
            with c.lock:
                self._forget(k, c)

    def _forget(self, k: int, c: _Context) -> None:  # caller holds c.lock
        if c.stream is not None:
            c.stream.close()
            c.stream = None
        with self._mutex:
            self._live.pop(k, None)

    def _keep(self, k: int, c: _Context, s: ZranStream) -> None:
        """Make ``s`` context ``k``'s live stream (caller holds ``c.lock``); close the least
        recently used streams over the limit whose context nobody is reading."""
        if c.stream is not None and c.stream is not s:
            c.stream.close()
        c.stream = s
        with self._mutex:
            self._live[k] = None
            self._live.move_to_end(k)
            for old in list(self._live):
                if len(self._live) <= self.max_streams:
                    break
                oc = self._contexts[old]
                if old == k:
                    continue
                if oc.lock.acquire(blocking=False):  # never wait here: its reader may want _mutex
                    try:
                        if oc.stream is not None:
                            oc.stream.close()
                            oc.stream = None
                    finally:
                        oc.lock.release()
                    del self._live[old]
            if len(self._live) > self.max_streams and k in self._live:  # max_streams 0: keep none
                s.close()
                c.stream = None
                del self._live[k]

    def read_chunks(self, chunks: Sequence[ChunkInfo], optional: "set[int] | frozenset[int]" = frozenset()
                    ) -> dict[int, bytes | memoryview | StorageError]:
        """The uncompressed data of ZRAN ``chunks`` (by CI index) or, per chunk, why not.
        ``optional`` chunks (wanted only because they come for free) that lie behind a
        context's live stream get a :class:`SkippedChunk` error instead of restarting it."""
        meta = self.meta
        h = meta.header
        by_ctx: dict[int, list[tuple[ChunkInfo, int]]] = {}
        result: dict[int, bytes | memoryview | StorageError] = {}
        contexts: dict[int, ZranContext] = {}
        for c in chunks:
            if not 0 <= c.index < meta.chunk_count or not meta.chunks[c.index].is_zran:
                result[c.index] = MetaFormatError(f"chunk {c.index} is not a ZRAN chunk of this blob.meta")
                continue
            ci = meta.chunks[c.index]
            k = ci.context_index
            if k >= h.s_ci_zran_count:
                result[c.index] = MetaFormatError(f"chunk {c.index}: ZRAN context {k} beyond {h.s_ci_zran_count}")
                continue
            x = contexts.get(k)
            if x is None:
                x = contexts[k] = ZranContext.parse(meta.ci_data, h.s_ci_zran_offset + k * ZranContext.SIZE)
            if ci.context_offset + c.uncompressed_size > x.out_len:
                result[c.index] = MetaFormatError(f"chunk {c.index}: {ci.context_offset}+{c.uncompressed_size} "
                                                  f"beyond ZRAN context {k} ({x.out_len} bytes)")
                continue
            by_ctx.setdefault(k, []).append((c, ci.context_offset))
        if not by_ctx:
            return result
        ks = sorted(by_ctx)
        with self._mutex:
            ctxs = [self._contexts.setdefault(k, _Context()) for k in ks]
            for k, c in zip(ks, ctxs):
                for ch, _ in by_ctx[k]:
                    c.waiting[ch.index] = c.waiting.get(ch.index, 0) + 1
        locked: list[_Context] = []
        try:
            for c in ctxs:  # ascending context order: no deadlock between readers
                c.lock.acquire()
                locked.append(c)
            self._read_locked(ks, ctxs, contexts, by_ctx, result, optional)
        finally:
            for c in reversed(locked):
                c.lock.release()
            with self._mutex:
                for k, c in zip(ks, ctxs):
                    for ch, _ in by_ctx[k]:
                        n = c.waiting.get(ch.index, 0) - 1
                        if n > 0:
                            c.waiting[ch.index] = n
                        else:
                            c.waiting.pop(ch.index, None)
                            c.handoff.pop(ch.index, None)
        return result

    def _read_locked(self, ks: list[int], ctxs: list[_Context], contexts: dict[int, ZranContext],
                     by_ctx: dict[int, list[tuple[ChunkInfo, int]]],
                     result: dict[int, bytes | memoryview | StorageError],
                     optional: "set[int] | frozenset[int]") -> None:
        plans: list[_Plan] = []
        for k, c in zip(ks, ctxs):
            x = contexts[k]
            need: list[tuple[ChunkInfo, int]] = []
            with self._mutex:
                for ch, off in by_ctx[k]:
                    data = c.handoff.get(ch.index)
                    if data is not None:  # another reader inflated it for us
                        result[ch.index] = data
                    else:
                        need.append((ch, off))
            s = c.stream
            if s is not None and optional:  # free chunks behind the live stream: not worth a restart
                behind = [ch for ch, off in need if ch.index in optional and off < s.out_pos]
                if behind:
                    for ch in behind:
                        result[ch.index] = SkippedChunk(f"chunk {ch.index}: behind ZRAN context {k}'s stream")
                    need = [(ch, off) for ch, off in need if ch.index not in result]
            if not need:
                continue
            lo = min(off for _, off in need)
            out_end = max(off + ch.uncompressed_size for ch, off in need)
            if s is None or s.out_pos > lo:  # none, or already past a wanted chunk: from the checkpoint
                try:
                    s = ZranStream(in_offset=x.in_offset, bits=x.ctx_bits, prev_byte=x.ctx_byte,
                                   window=self.meta.zran_dictionary(x))
                except StorageError as exc:
                    for ch, _ in need:
                        result[ch.index] = exc
                    continue
            ctx_end = x.in_offset + x.in_len
            in_end = min(ctx_end, max(self.meta.chunks[ch.index].compressed_offset
                                      + self.meta.chunks[ch.index].compressed_size for ch, _ in need))
            plans.append(_Plan(k, c, x, s, need, out_end, max(in_end, s.in_pos)))
        # one backend request per group of neighbouring spans, each span from where its stream stopped
        spans = sorted((p for p in plans if p.in_end > p.stream.in_pos), key=lambda p: p.stream.in_pos)
        groups: list[list[_Plan]] = []
        for p in spans:
            if groups and p.stream.in_pos <= max(q.in_end for q in groups[-1]) + READ_GAP:
                groups[-1].append(p)
            else:
                groups.append([p])
        failed: dict[int, StorageError] = {}
        for g in groups:
            lo = g[0].stream.in_pos
            hi = max(p.in_end for p in g)
            try:
                raw = memoryview(self._read(lo, hi - lo))
            except StorageError as exc:
                for p in g:
                    failed[p.index] = exc
                continue
            for p in g:
                p.stream.feed(raw[p.stream.in_pos - lo : p.in_end - lo])
        for p in plans:
            self._inflate(p, failed.get(p.index), result)

    def _inflate(self, p: _Plan, error: StorageError | None,
                 result: dict[int, bytes | memoryview | StorageError]) -> None:
        s, c, x = p.stream, p.ctx, p.x
        start = s.out_pos
        if error is not None:  # the fetch failed: the live stream (if that is ``s``) is still good
            if c.stream is not s:
                s.close()
            for ch, _ in p.need:
                result[ch.index] = error
            return
        try:
            parts = [s.inflate(p.out_end - s.out_pos)]
            ctx_end = x.in_offset + x.in_len
            while s.out_pos < p.out_end:
                if s.in_pos >= ctx_end:
                    raise ZranError(f"ZRAN context {p.index}: compressed data ended after {s.out_pos} "
                                    f"of {p.out_end} bytes")
                s.feed(self._read(s.in_pos, ctx_end - s.in_pos))  # the CI extent fell short: the rest
                parts.append(s.inflate(p.out_end - s.out_pos))
        except StorageError as exc:
            if c.stream is s:
                self._forget(p.index, c)
            else:
                s.close()
            for ch, _ in p.need:
                result[ch.index] = exc
            return
        out = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
        mine = {ch.index for ch, _ in p.need}
        for ch, off in p.need:
            result[ch.index] = out[off - start : off - start + ch.uncompressed_size]
        with self._mutex:  # chunks other readers wait for, made on the way
            for off, size, i in self.groups().get(p.index, ()):
                if off >= start and off + size <= p.out_end and c.waiting.get(i, 0) > (i in mine):
                    c.handoff[i] = bytes(out[off - start : off - start + size])
        if s.out_pos >= x.out_len:  # the whole context is inflated: nothing left to continue
            if c.stream is s:
                self._forget(p.index, c)
            else:
                s.close()
        elif c.stream is s or c.stream is None or c.stream.out_pos <= s.out_pos:
            self._keep(p.index, c, s)
        else:  # a stream from the checkpoint for chunks behind the live one: keep the live one
            s.close()
            with self._mutex:
                if p.index in self._live:
                    self._live.move_to_end(p.index)


#: the most uncompressed data one context may cover (upstream's decoder refuses more)
MAX_CONTEXT_OUT = 16 << 20


@dataclass(frozen=True, slots=True)
class ZranChunkPlace:
    """Where one chunk of a ZRAN blob is: its context and its compressed extent."""

    context_index: int
    context_offset: int  #: offset of the chunk in the context's output
    in_offset: int  #: compressed bytes that hold the chunk (block-boundary granularity)
    in_len: int


def plan_contexts(points: Sequence[Checkpoint], boundaries: Sequence[tuple[int, int]],
                  extents: Sequence[tuple[int, int]]) -> tuple[list[tuple[ZranContext, bytes]], list[ZranChunkPlace]]:
    """Contexts (with windows) for chunks at uncompressed ``extents`` ``(offset, size)`` (in
    stream order) of a gzip stream scanned by :func:`scan_gzip`.

    Each chunk uses the last checkpoint at or before its start; chunks sharing a checkpoint share a
    context, whose ``in_len``/``out_len`` reach the block boundary at or after its last chunk's end.
    """
    p_out = [p.out_offset for p in points]
    b_out = [b[1] for b in boundaries]
    contexts: list[tuple[ZranContext, bytes]] = []
    places: list[ZranChunkPlace] = []
    current = -1  # checkpoint index of the last context
    for start, size in extents:
        end = start + size
        k = bisect.bisect_right(p_out, start) - 1
        if k < 0:
            raise ZranError(f"chunk at {start}: no checkpoint before it")
        j = bisect.bisect_left(b_out, end)
        if j >= len(boundaries):
            raise ZranError(f"chunk {start}+{size} beyond the gzip stream ({b_out[-1] if b_out else 0} bytes)")
        in_end = boundaries[j][0]
        p = points[k]
        if k != current:
            contexts.append((ZranContext(in_offset=p.in_offset, out_offset=p.out_offset, dict_offset=0, in_len=0,
                                         out_len=0, dict_size=len(p.window), ctx_byte=p.prev_byte if p.bits else 0,
                                         ctx_bits=p.bits, reserved=b"\0\0"), p.window))
            current = k
        ctx = contexts[-1][0]
        ctx.in_len = max(ctx.in_len, in_end - p.in_offset)
        ctx.out_len = max(ctx.out_len, end - p.out_offset)
        if ctx.out_len > MAX_CONTEXT_OUT:
            raise ZranError(f"chunk {start}+{size}: its context would cover {ctx.out_len} bytes "
                            f"(gzip blocks too large for random access)")
        i = bisect.bisect_right(b_out, start) - 1  # the block holding the chunk's first byte
        c_start = max(boundaries[i][0] - 1, p.in_offset - 1, 0)  # - 1: the boundary may be mid-byte
        places.append(ZranChunkPlace(len(contexts) - 1, start - p.out_offset, c_start, in_end - c_start))
    return contexts, places
