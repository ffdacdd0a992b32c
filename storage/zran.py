"""Random access into gzip streams: the decoder and checkpoint scanner behind ZRAN (targz-ref) blobs.

A ZRAN blob is an unchanged gzip layer. Its ``blob.meta`` holds checkpoints ("ZRAN contexts",
``storage.meta.blob_meta.ZranContext``): where a deflate block starts in the compressed stream
(``in_offset`` = first whole byte, plus ``ctx_bits`` bits at the top of the byte before it,
``ctx_byte``), the uncompressed position there and the 32 KiB window that precedes it. Reading a
chunk inflates ``in_len`` bytes from the checkpoint into ``out_len`` bytes of output.

API::

    data = inflate_at(compressed, bits=ctx_bits, prev_byte=ctx_byte, window=dict, out_len=n)
    chunks = inflate_zran_chunks(blob_meta, chunk_infos, read)          # index -> bytes | error
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


def _skip_gzip_header(z: _Inflater) -> None:
    """After a member's trailer: parse the next member's gzip header, leave ``z`` in raw mode."""
    scratch = ctypes.create_string_buffer(64)
    z.reset(_GZIP)
    while True:
        z.z.next_out = ctypes.addressof(scratch)
        z.z.avail_out = len(scratch)
        before = z.z.avail_in
        rc = z.inflate(Z_BLOCK)  # gzip mode with Z_BLOCK stops right after the header
        if rc != Z_OK:
            raise ZranError(f"gzip member header: {z.msg(rc)}")
        if z.z.data_type & 0x80:
            break
        if z.z.avail_in == 0 or z.z.avail_in == before:
            raise ZranError("gzip member header truncated")
    z.reset(_RAW)


def inflate_at(compressed: bytes | memoryview, *, bits: int, prev_byte: int, window: bytes,
               out_len: int) -> bytes:
    """``out_len`` bytes inflated from a checkpoint.

    ``compressed`` starts at the checkpoint's ``in_offset``; ``bits`` (0-7) bits at the top of
    ``prev_byte`` (the byte before it) come first; ``window`` is the output that preceded the
    checkpoint (≤ 32 KiB). Crosses gzip member boundaries. Raises :class:`ZranError` when the
    data does not inflate to ``out_len`` bytes.
    """
    bits &= 7
    src = bytes(compressed)
    inbuf = ctypes.create_string_buffer(src, len(src))
    out = ctypes.create_string_buffer(out_len)
    with _Inflater(_RAW) as z:
        if bits:
            z.check(z.lib.inflatePrime(z.zp, bits, (prev_byte & 0xFF) >> (8 - bits)), "inflatePrime")
        if window:
            z.check(z.lib.inflateSetDictionary(z.zp, window, len(window)), "inflateSetDictionary")
        z.z.next_in = ctypes.addressof(inbuf)
        z.z.avail_in = len(src)
        produced = 0
        while produced < out_len:
            z.z.next_out = ctypes.addressof(out) + produced
            z.z.avail_out = out_len - produced
            avail_in = z.z.avail_in
            rc = z.inflate(Z_NO_FLUSH)
            progress = (out_len - z.z.avail_out) - produced
            produced += progress
            if produced >= out_len:
                break
            if rc == Z_STREAM_END:  # end of a gzip member: its trailer, then the next member
                if z.z.avail_in < 8:
                    raise ZranError(f"gzip member ended after {produced} of {out_len} bytes")
                z.z.next_in += 8
                z.z.avail_in -= 8
                _skip_gzip_header(z)
            elif rc == Z_OK:
                if not progress and z.z.avail_in == avail_in:
                    raise ZranError("inflate made no progress")
            elif rc == Z_BUF_ERROR:
                raise ZranError(f"compressed data ended after {produced} of {out_len} bytes")
            else:
                raise ZranError(f"inflate from checkpoint: {z.msg(rc)}")
    return out.raw


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


def inflate_zran_chunks(meta: BlobMeta, chunks: Sequence[ChunkInfo],
                        read: Callable[[int, int], bytes]) -> dict[int, bytes | StorageError]:
    """The uncompressed data of ZRAN ``chunks`` (by CI index) or, per chunk, why not.

    One ``read(offset, size)`` of the gzip blob covers every context the chunks need; each
    context is inflated once and its chunks are cut out of its output.
    """
    h = meta.header
    by_ctx: dict[int, list[tuple[ChunkInfo, int]]] = {}
    result: dict[int, bytes | StorageError] = {}
    for c in chunks:
        if not 0 <= c.index < meta.chunk_count or not meta.chunks[c.index].is_zran:
            result[c.index] = MetaFormatError(f"chunk {c.index} is not a ZRAN chunk of this blob.meta")
            continue
        ci = meta.chunks[c.index]
        if ci.context_index >= h.s_ci_zran_count:
            result[c.index] = MetaFormatError(f"chunk {c.index}: ZRAN context {ci.context_index} "
                                              f"beyond {h.s_ci_zran_count}")
            continue
        by_ctx.setdefault(ci.context_index, []).append((c, ci.context_offset))
    if not by_ctx:
        return result
    contexts = {i: ZranContext.parse(meta.ci_data, h.s_ci_zran_offset + i * ZranContext.SIZE) for i in by_ctx}
    lo = min(x.in_offset for x in contexts.values())
    hi = max(x.in_offset + x.in_len for x in contexts.values())
    raw = memoryview(read(lo, hi - lo))
    for i, items in by_ctx.items():
        x = contexts[i]
        try:
            out = inflate_at(raw[x.in_offset - lo : x.in_offset - lo + x.in_len], bits=x.ctx_bits,
                             prev_byte=x.ctx_byte, window=meta.zran_dictionary(x), out_len=x.out_len)
        except StorageError as exc:
            for c, _ in items:
                result[c.index] = exc
            continue
        for c, off in items:
            if off + c.uncompressed_size > len(out):
                result[c.index] = MetaFormatError(
                    f"chunk {c.index}: {off}+{c.uncompressed_size} beyond ZRAN context {i} ({len(out)} bytes)")
            else:
                result[c.index] = out[off : off + c.uncompressed_size]
    return result


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
