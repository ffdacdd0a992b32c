"""Format fuzzing: mutated bootstraps may only ever raise RafsError subclasses.

Every vector bootstrap is truncated, bit-flipped, byte-splatted and field-smashed (seeded, so
failures reproduce), then opened and exercised: full walk (bounded for big images), attrs,
xattrs, symlinks, chunk lists, lookups, readdir from offsets, inspect-style summaries.
Default: >= 10,000 random cases plus an exhaustive byte smash of the small images' metadata;
``NYDUS_SLOW=1`` runs 10x more random cases plus hypothesis.
"""

from __future__ import annotations

import itertools
import os
import random
import time

import pytest

from rafs.errors import RafsError
from rafs.metadata import Rafs
from tests._rafs_util import TEXTURE, build_rich_image, extract_boot

SLOW = os.environ.get("NYDUS_SLOW") == "1"
#: max walked entries per case for the big images (keeps a case in the ms range)
WALK_LIMIT = 120


def exercise(path: str, walk_limit: int = WALK_LIMIT) -> int:
    """Open and touch everything reachable; return the number of entries walked."""
    n = 0
    with Rafs.open(path) as fs:
        fs.info()
        for b in fs.blobs:
            assert b.chunk_size > 0
        for ino in fs.prefetch_inos[:4]:
            try:
                fs.inode(ino).attr()
            except RafsError:
                pass
        for p, node in fs.walk():
            n += 1
            a = node.attr()
            assert a.size >= 0
            node.xattrs()
            if node.is_symlink():
                node.readlink()
            elif node.is_reg():
                vec = node.chunks(0, a.size)
                assert vec.size == a.size
                if a.size > 3:
                    assert node.chunks(a.size // 2, 3).size == min(3, a.size - a.size // 2)
            elif node.is_dir():
                entries = list(itertools.islice(node.readdir(0), 64))
                if entries:
                    off, name, child = entries[len(entries) // 2]
                    node.lookup(name)
                    list(node.readdir(off))
            if n >= walk_limit:
                break
        if fs.version == 6:
            for _i, _c in zip(range(50), fs.chunk_table()):
                pass
    return n


def _vectors(vectors_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzsrc")
    return {
        "builder-rich": build_rich_image(d).read_bytes(),  # xattrs, devices, multi-block dirs
        "v6-2.2": (vectors_dir / TEXTURE / "bootstrap/rafs-v6-2.2.boot").read_bytes(),
        "v5-sha256": (vectors_dir / TEXTURE / "repeatable/sha256-nocompress-repeatable").read_bytes(),
        "v5-blake3": (vectors_dir / TEXTURE / "repeatable/blake3-lz4_block-non_repeatable").read_bytes(),
        "v6-large": extract_boot(vectors_dir, "v6-bootstrap-chunk-pos-438272", d).read_bytes(),
        "v5-large": extract_boot(vectors_dir, "v5-bootstrap-file-size-736032", d).read_bytes(),
    }


@pytest.fixture(scope="module")
def sources(vectors_dir, tmp_path_factory):
    return _vectors(vectors_dir, tmp_path_factory)


def _hot_regions(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges where mutations matter most (superblocks, tables, first inodes)."""
    if data[:4] == b"SFAR":
        return [(0, 96), (8192, min(len(data), 8192 + 4096))]
    return [(1024, 1408), (1408, 1408 + 256), (4096, 4096 + 512), (8192, min(len(data), 8192 + 8192))]


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    buf = bytearray(data)
    if kind == 0:  # truncation (keep it block aligned half the time)
        cut = rng.randrange(0, len(buf))
        if rng.random() < 0.5:
            cut -= cut % 4096
        return bytes(buf[:cut])
    if kind == 1:  # random bit flips anywhere
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf)
    start, end = rng.choice(_hot_regions(data))
    end = min(end, len(buf))
    if end <= start:
        start, end = 0, len(buf)
    if kind == 2:  # bit flips in hot regions
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(start, end)
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == 3:  # random bytes splat
        i = rng.randrange(start, end)
        n = rng.randint(1, 16)
        buf[i : i + n] = bytes(rng.getrandbits(8) for _ in range(n))[: len(buf) - i]
    elif kind == 4:  # smash an aligned integer field with an extreme value
        width = rng.choice((1, 2, 4, 8))
        i = rng.randrange(start, end)
        i -= i % width
        val = rng.choice((0, 1, 0xFF, 0x7F, 0x80, (1 << (8 * width)) - 1, 1 << (8 * width - 1), rng.getrandbits(8 * width)))
        buf[i : i + width] = val.to_bytes(width, "little")[: len(buf) - i]
    else:  # copy a random chunk of the image onto another place (plausible-looking garbage)
        n = rng.randint(4, 128)
        a = rng.randrange(len(buf))
        b = rng.randrange(start, end)
        piece = bytes(buf[a : a + n])
        buf[b : b + len(piece)] = piece
        del buf[len(data):]
    return bytes(buf)


def _run_cases(sources, tmp_path, count: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    names = sorted(sources)
    # weight the small images: they walk completely in a millisecond
    weights = [12 if len(sources[n]) < 100_000 else 1 for n in names]
    stats = {"ok": 0, "rafs_error": 0}
    path = str(tmp_path / "case.boot")
    for case in range(count):
        name = rng.choices(names, weights)[0]
        data = mutate(sources[name], rng)
        with open(path, "wb") as f:
            f.write(data)
        t0 = time.monotonic()
        try:
            exercise(path)
            stats["ok"] += 1
        except RafsError:
            stats["rafs_error"] += 1
        except Exception as exc:  # pragma: no cover - this is the failure being hunted
            keep = tmp_path / f"crash-{seed}-{case}.boot"
            keep.write_bytes(data)
            raise AssertionError(f"case {case} ({name}, seed {seed}): {type(exc).__name__}: {exc}; saved {keep}") from exc
        # a hang guard, not a timing test: generous so a loaded CI machine never trips it
        assert time.monotonic() - t0 < 30, f"case {case} ({name}) took too long (hang?)"
    return stats


def test_unmodified_vectors_exercise(sources, tmp_path):
    for name, data in sources.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert exercise(str(p), walk_limit=10**9) > 0


@pytest.mark.timeout(3600 if SLOW else 600)
def test_fuzz_mutations(sources, tmp_path):
    count = 100_000 if SLOW else 10_000
    stats = _run_cases(sources, tmp_path, count, seed=int(os.environ.get("NYDUS_FUZZ_SEED", "1234")))
    assert stats["ok"] + stats["rafs_error"] == count
    # both outcomes must occur, otherwise the mutator is not reaching the reader
    assert stats["ok"] > count // 20 and stats["rafs_error"] > count // 20, stats


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not SLOW, reason="set NYDUS_SLOW=1 for hypothesis-driven fuzzing")
def test_fuzz_hypothesis(sources, tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    small = {k: v for k, v in sources.items() if len(v) < 100_000}
    path = str(tmp_path / "h.boot")

    @settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(small)), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12), st.integers(0, 1 << 20))
    def run(name, edits, cut):
        buf = bytearray(small[name])
        for off, val in edits:
            buf[off % len(buf)] = val
        if cut < len(buf) and cut % 3 == 0:
            del buf[cut:]
        with open(path, "wb") as f:
            f.write(buf)
        try:
            exercise(path)
        except RafsError:
            pass

    run()


@pytest.mark.parametrize("name,regions", [
    # v6: superblock, ext SB, device slot, blob table, inodes + dirents + tails, chunk table
    ("bootstrap/rafs-v6-2.2.boot", [(1024, 1408), (1408, 1536), (4096, 4352), (12288, 12672), (16384, 16544)]),
    # v5: superblock fields, inode/blob/ext-blob tables, root and first child inodes
    ("repeatable/sha256-nocompress-repeatable", [(0, 80), (8192, 8824)]),
])
def test_exhaustive_byte_smash(vectors_dir, tmp_path, name, regions):
    """Every metadata byte of a small image set to 0xff and flipped in its low bit."""
    data = (vectors_dir / TEXTURE / name).read_bytes()
    path = str(tmp_path / "smash.boot")
    outcomes = {"ok": 0, "rafs_error": 0}
    for start, end in regions:
        for off in range(start, end):
            for val in {0xFF, data[off] ^ 1}:
                buf = bytearray(data)
                buf[off] = val
                with open(path, "wb") as f:
                    f.write(buf)
                try:
                    exercise(path)
                    outcomes["ok"] += 1
                except RafsError:
                    outcomes["rafs_error"] += 1
                except Exception as exc:  # pragma: no cover
                    raise AssertionError(f"offset {off} value {val:#x}: {type(exc).__name__}: {exc}") from exc
    assert outcomes["rafs_error"] > 200 and outcomes["ok"] > 200, outcomes
