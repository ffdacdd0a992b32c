"""The erofs driver prefetches in the background too (the RAFS image's files behind its blob files)."""

from __future__ import annotations

import os
import time

import pytest

from rafs.fs.instance import BlobFiles, Instance
from tests.fs_fakes import FakeOpener, FakeRafs
from tests.fs_harness import require_fuse, running_daemon
from tests.test_fs_erofs import _vector_tree, require_erofs, v6  # noqa: F401  (fixture)

pytestmark = [pytest.mark.erofs, pytest.mark.root]


def test_blob_files_prefetch_iovecs_are_the_image_files(v6):  # noqa: F811
    _, data, _ = v6
    tree = FakeRafs(_vector_tree(data))
    inst = Instance("x", BlobFiles(tree), device=None)
    vecs = inst.prefetch_iovecs(["/sync_io.rs"])
    assert [[d.chunk.index for d in v] for v in vecs] == [[5]]
    assert sorted(d.chunk.index for v in inst.prefetch_iovecs() for d in v) == [0, 5]


class _PrefetchListOpener(FakeOpener):
    """Images whose prefetch table lists ``/sync_io.rs`` (as nydusify writes one)."""

    def open_tree(self, bootstrap: str) -> FakeRafs:
        tree = super().open_tree(bootstrap)
        tree.prefetch_inos = [tree.lookup_path("/sync_io.rs").ino]
        return tree


def test_erofs_driver_prefetches_the_prefetch_list_after_mount(v6, tmp_path):  # noqa: F811
    """The snapshotter's config: prefetch on, not prefetch_all; only the listed file is fetched."""
    require_erofs()
    require_fuse()
    boot, data, contents = v6
    opener = _PrefetchListOpener({boot: _vector_tree(data)})
    reads = data + ".reads"
    config = {"fs_prefetch": {"enable": True, "prefetch_all": False}}
    with running_daemon(tmp_path, fs_driver="erofs", opener=opener, name="p") as (client, mnt, _):
        client.mount("/img", boot, config)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if os.path.exists(reads) and "5" in open(reads).read().split():
                break
            time.sleep(0.05)
        assert set(open(reads).read().split()) == {"5"}  # no file was opened: prefetch did it
        target = os.path.join(mnt, "img")
        assert open(os.path.join(target, "lib.rs"), "rb").read() == contents["lib.rs"]
        client.umount("/img")
