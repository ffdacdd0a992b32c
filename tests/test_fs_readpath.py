"""The fusedev read path without FUSE: reads of a complete cached blob skip the worker thread."""

from __future__ import annotations

import errno
import os

import pytest
import trio

import rafs.fs.ops as ops
from rafs.fs.instance import Instance
from rafs.fs.ops import RafsFs
from tests.fs_fakes import FakeDevice, FakeRafs, make_image

DATA = bytes(range(256)) * 40 + b"end"  # 3 chunks of 4 KiB, the last one partial


def _fs(tmp_path, complete: bool) -> tuple[RafsFs, Instance, int]:
    boot = make_image(str(tmp_path), {"/f": DATA, "/g": b"small\n"})
    tree = FakeRafs.open(boot)
    inst = Instance("/", tree, FakeDevice(tree.blob_file, complete=complete))
    fs = RafsFs(shared=False)
    fs.add_instance(inst)
    return fs, inst, fs._gino(1, inst, tree.lookup_path("/f").ino)


@pytest.fixture
def hops(monkeypatch) -> list:
    """The functions the filesystem sent to a worker thread (trio.to_thread.run_sync calls)."""
    calls: list = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):
        calls.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(ops.trio.to_thread, "run_sync", counting)
    return calls


def _reads(tmp_path) -> list[str]:
    path = tmp_path / "image.blob.reads"
    return path.read_text().split() if path.exists() else []


def test_complete_blob_reads_on_the_event_loop(tmp_path, hops):
    fs, inst, ino = _fs(tmp_path, complete=True)

    async def main() -> None:
        # the first read discovers the complete cache file in a worker thread
        assert await fs.read(ino, 0, 100) == DATA[:100]
        assert len(hops) == 1
        for off, size in ((0, len(DATA)), (4000, 200), (8190, 4096), (len(DATA) + 5, 10)):
            assert await fs.read(ino, off, size) == DATA[off:off + size]
        assert len(hops) == 1  # later reads never left the event loop

    trio.run(main)
    assert _reads(tmp_path) == []  # never went through the device
    assert inst.metrics.read_count == 4 and inst.metrics.read_errors == 0  # (past EOF: not a read)
    inst.close()


def test_incomplete_blob_reads_go_through_the_device(tmp_path):
    fs, inst, ino = _fs(tmp_path, complete=False)
    node = inst.tree.lookup_path("/f")
    assert inst.read_ready(node, 0, 10) is None

    async def main() -> None:
        assert await fs.read(ino, 4096, 4096) == DATA[4096:8192]

    trio.run(main)
    assert inst.read_ready(node, 0, 10) is None
    assert _reads(tmp_path) == ["1"]
    inst.close()


def test_complete_blob_read_error_is_eio(tmp_path):
    fs, inst, ino = _fs(tmp_path, complete=True)

    async def main() -> None:
        assert await fs.read(ino, 0, 10) == DATA[:10]
        fds = inst.device.complete_files._fds
        good = dict(fds)
        assert good  # the first read opened the complete cache file
        bad = os.open(os.devnull, os.O_WRONLY)  # pread fails: the cache file went bad
        fds.update({k: bad for k in good})
        try:
            with pytest.raises(ops.pyfuse3.FUSEError) as err:
                await fs.read(ino, 0, 10)
        finally:
            fds.update(good)
            os.close(bad)
        assert err.value.errno == errno.EIO

    trio.run(main)
    assert inst.metrics.read_errors == 1
    inst.close()


class _CachingDevice(FakeDevice):
    """Like BlobDevice: chunks read once are local, and read_ready serves them (else None)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cached: set[int] = set()

    def read(self, iovec):
        data = super().read(iovec)
        self.cached.update(d.chunk.index for d in iovec if d.chunk is not None)
        return data

    def read_ready(self, iovec):
        if any(d.chunk is not None and d.chunk.index not in self.cached for d in iovec):
            return None
        return b"".join(b"\0" * d.size if d.chunk is None else
                        os.pread(self.fd, d.size, d.chunk.uncompressed_offset + d.offset) for d in iovec)


def test_partly_cached_blob_reads_cached_chunks_on_the_event_loop(tmp_path, hops):
    boot = make_image(str(tmp_path), {"/f": DATA, "/g": b"small\n"})
    tree = FakeRafs.open(boot)
    inst = Instance("/", tree, _CachingDevice(tree.blob_file))
    fs = RafsFs(shared=False)
    fs.add_instance(inst)
    ino = fs._gino(1, inst, tree.lookup_path("/f").ino)

    async def main() -> None:
        assert await fs.read(ino, 0, 4096) == DATA[:4096]  # chunk 0: fetched in a worker thread
        assert len(hops) == 1
        assert await fs.read(ino, 100, 200) == DATA[100:300]  # cached now: answered inline
        assert len(hops) == 1
        assert await fs.read(ino, 4000, 200) == DATA[4000:4200]  # touches chunk 1: a hop again
        assert len(hops) == 2
        assert await fs.read(ino, 0, 8192) == DATA[:8192]
        assert len(hops) == 2

    trio.run(main)
    assert _reads(tmp_path) == ["0", "0", "1"]  # the device saw only the two thread reads
    assert inst.metrics.read_count == 4 and inst.metrics.read_errors == 0
    inst.close()
