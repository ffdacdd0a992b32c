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


def _reads(tmp_path) -> list[str]:
    path = tmp_path / "image.blob.reads"
    return path.read_text().split() if path.exists() else []


def test_complete_blob_reads_on_the_event_loop(tmp_path, monkeypatch):
    fs, inst, ino = _fs(tmp_path, complete=True)
    hops = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):
        hops.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(ops.trio.to_thread, "run_sync", counting)

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
        good = dict(inst._complete)
        bad = os.open(os.devnull, os.O_WRONLY)  # pread fails: the cache file went bad
        inst._complete.update({k: bad for k in good})
        try:
            with pytest.raises(ops.pyfuse3.FUSEError) as err:
                await fs.read(ino, 0, 10)
        finally:
            inst._complete.update(good)
            os.close(bad)
        assert err.value.errno == errno.EIO

    trio.run(main)
    assert inst.metrics.read_errors == 1
    inst.close()
