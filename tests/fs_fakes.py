"""Small fakes for the fs tests: a Rafs-like tree built from a JSON spec and a blob device.

The "bootstrap" of the fake world is a JSON file::

    {"blob_file": "<path>", "chunk_size": 4096, "entries": [
        {"path": "/a", "type": "dir", "mode": 493, "uid": 0, "gid": 0},
        {"path": "/a/f", "type": "reg", "mode": 420, "data_off": 0, "size": 10, "xattrs": {...}},
        {"path": "/l", "type": "symlink", "target": "a/f"},
        {"path": "/h", "type": "link", "target": "/a/f"}]}

Regular file data lives in ``blob_file`` (uncompressed, chunks 4 KiB aligned).
The device counts reads in ``<blob_file>.reads``, fails while ``<blob_file>.down`` exists and
sleeps on the chunk named in ``<blob_file>.slow`` ("<index> <seconds>").
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time

from rafs.base import Rafs
from rafs.errors import NotADirectory, NotFound
from rafs.metadata import InodeAttr
from storage.device import CompleteFiles
from storage.errors import BackendError
from storage.metrics import StorageMetrics
from storage.records import BlobInfo, BlobIoDesc, BlobIoVec, ChunkInfo, Compressor, Digester

KIND = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK}


class FakeInode:
    def __init__(self, tree: "FakeRafs", ino: int, spec: dict) -> None:
        self.tree = tree
        self.ino = ino
        self.spec = spec
        self.children: list[tuple[bytes, "FakeInode"]] = []
        self.nlink = 1

    def attr(self) -> InodeAttr:
        s = self.spec
        size = s.get("size", 0) if s["type"] == "reg" else len(s.get("target", "")) if s["type"] == "symlink" else 4096
        nlink = 2 + sum(c.is_dir() for _, c in self.children) if self.is_dir() else self.nlink
        return InodeAttr(self.ino, KIND[s["type"]] | s.get("mode", 0o644), s.get("uid", 0), s.get("gid", 0),
                         size, nlink, 0, s.get("mtime", 1_700_000_000), 0, (size + 511) // 512)

    def is_dir(self) -> bool:
        return self.spec["type"] == "dir"

    def is_reg(self) -> bool:
        return self.spec["type"] == "reg"

    def is_symlink(self) -> bool:
        return self.spec["type"] == "symlink"

    def lookup(self, name: bytes) -> "FakeInode":
        if not self.is_dir():
            raise NotADirectory(self.spec["path"])
        for n, c in self.children:
            if n == name:
                return c
        raise NotFound(name)

    def readdir(self, offset: int = 0):
        if not self.is_dir():
            raise NotADirectory(self.spec["path"])
        for i in range(offset, len(self.children)):
            yield i + 1, self.children[i][0], self.children[i][1]

    def readlink(self) -> bytes:
        return self.spec["target"].encode()

    def xattrs(self) -> dict[bytes, bytes]:
        return {k.encode(): v.encode() for k, v in self.spec.get("xattrs", {}).items()}

    def chunks(self, offset: int, size: int) -> BlobIoVec:
        fsize = self.spec.get("size", 0)
        end = min(offset + size, fsize)
        out = BlobIoVec()
        cs = self.tree.chunk_size
        base = self.spec.get("data_off", 0)
        pos = offset
        while pos < end:
            idx = pos // cs
            chunk_len = min(cs, fsize - idx * cs)
            u_off = base + idx * cs
            chunk = ChunkInfo(0, u_off // 4096, b"", 0, u_off, chunk_len, u_off, chunk_len)
            n = min(end, idx * cs + chunk_len) - pos
            out.append(BlobIoDesc(self.tree.blobs[0], chunk, pos - idx * cs, n))
            pos += n
        return out


class FakeRafs:
    version = 6

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.chunk_size = spec.get("chunk_size", 4096)
        self.blob_file = spec["blob_file"]
        bsize = os.path.getsize(self.blob_file)
        self.blobs = [BlobInfo(0, spec.get("blob_id", "b" * 64), -(-bsize // self.chunk_size), self.chunk_size,
                               Compressor.NONE, Digester.SHA256, 0, bsize, bsize)]
        self.prefetch_inos: list[int] = []
        self.root_ino = 1
        self.nodes: dict[int, FakeInode] = {1: FakeInode(self, 1, {"path": "/", "type": "dir", "mode": 0o755})}
        by_path = {"/": self.nodes[1]}
        for e in spec["entries"]:
            parent = by_path[os.path.dirname(e["path"])]
            name = os.path.basename(e["path"]).encode()
            if e["type"] == "link":
                node = by_path[e["target"]]
                node.nlink += 1
            else:
                node = FakeInode(self, len(self.nodes) + 1, e)
                self.nodes[node.ino] = node
            parent.children.append((name, node))
            by_path[e["path"]] = node
        self.inode_count = len(self.nodes)

    @classmethod
    def open(cls, path: str) -> "FakeRafs":
        with open(path) as f:
            return cls(json.load(f))

    def inode(self, ino: int) -> FakeInode:
        try:
            return self.nodes[ino]
        except KeyError:
            raise NotFound(f"ino {ino}") from None

    def lookup_path(self, path: str) -> FakeInode:
        node = self.nodes[1]
        for part in path.strip("/").split("/"):
            if part:
                node = node.lookup(part.encode())
        return node

    @property
    def root(self) -> FakeInode:
        return self.nodes[1]

    # symlink resolution over the same narrow API as the real image's
    resolve, realpath, resolve_path, _follow = Rafs.resolve, Rafs.realpath, Rafs.resolve_path, Rafs._follow

    def walk(self):
        stack = [("/", self.nodes[1])]
        while stack:
            path, node = stack.pop()
            yield path, node
            for name, child in node.children:
                stack.append((os.path.join(path, name.decode()), child))

    def close(self) -> None:
        pass


class FakeDevice:
    """A ``storage.device.BlobReadDevice`` reading chunks from the uncompressed blob file; counts
    chunk reads; fails when 'down'; nothing is ever local (``read_ready`` answers None) and
    prefetch reads synchronously."""

    def __init__(self, blob_file: str, complete: bool = False) -> None:
        self.blob_file = blob_file
        self.complete = complete
        self.fd = os.open(blob_file, os.O_RDONLY)
        self.metrics = StorageMetrics()
        self.amplify_window = 0  # reads fetch exactly what they ask for
        self.complete_files = CompleteFiles(self.blob_data_path)  # as BlobDevice: storage's own

    def read(self, iovec: BlobIoVec, ahead=None) -> bytes:
        if os.path.exists(self.blob_file + ".down"):
            raise BackendError("backend unreachable (test: .down exists)")
        if os.path.exists(self.blob_file + ".slow"):  # "<chunk index> <seconds>": a slow chunk
            index, seconds = open(self.blob_file + ".slow").read().split()
            if any(d.chunk is not None and d.chunk.index == int(index) for d in iovec):
                time.sleep(float(seconds))
        out = []
        for d in iovec:
            if d.chunk is None:
                out.append(b"\0" * d.size)
                continue
            out.append(os.pread(self.fd, d.size, d.chunk.uncompressed_offset + d.offset))
            with open(self.blob_file + ".reads", "a") as f:
                f.write(f"{d.chunk.index}\n")
        return b"".join(out)

    def read_ready(self, iovec: BlobIoVec) -> bytes | None:
        return None

    def read_complete(self, iovec: BlobIoVec, open_new: bool = True) -> bytes | None:
        return self.complete_files.read(iovec, open_new)

    def prefetch(self, iovecs, *, priority: str = "low", exact: bool = False) -> None:
        for iovec in iovecs:
            self.read(iovec)

    def prefetch_blob(self, blob_index: int) -> bool:
        return False  # no chunk list: callers fall back to per-file prefetch

    def wait_demand_settled(self, or_sustained: bool = False) -> bool:
        return True

    def blob_data_path(self, blob_index: int, verify: bool = False) -> str | None:
        return self.blob_file if self.complete else None

    def set_chunk_source(self, source) -> None:
        pass

    def close(self) -> None:
        self.complete_files.close()
        os.close(self.fd)


class FakeOpener:
    """Opens fake bootstraps; ``trees`` maps a real bootstrap path to a spec to use instead."""

    def __init__(self, trees: dict[str, dict] | None = None) -> None:
        self.trees = trees or {}
        self.blob_files: dict[str, str] = {}

    def open_tree(self, bootstrap: str) -> FakeRafs:
        tree = FakeRafs(self.trees[bootstrap]) if bootstrap in self.trees else FakeRafs.open(bootstrap)
        self.blob_files[tree.blobs[0].blob_id] = (tree.blob_file, tree.spec.get("complete", False))
        return tree

    def open_device(self, blobs, config) -> FakeDevice:
        return FakeDevice(*self.blob_files[blobs[0].blob_id])


def make_image(dirpath: str, files: dict[str, bytes | str | dict], *, name: str = "image") -> str:
    """Write a fake bootstrap + blob under ``dirpath``; returns the bootstrap path.

    ``files``: path -> bytes (regular file), "->target" (symlink), "=>/hardlink/target",
    None/dict for a directory (dict may carry mode/uid/gid/xattrs).
    """
    blob_file = os.path.join(dirpath, name + ".blob")
    entries = []
    blob = bytearray()
    for path, value in files.items():
        if isinstance(value, bytes):
            off = len(blob)
            blob += value
            blob += b"\0" * (-len(blob) % 4096)
            entries.append({"path": path, "type": "reg", "mode": 0o644, "data_off": off, "size": len(value)})
        elif isinstance(value, str) and value.startswith("->"):
            entries.append({"path": path, "type": "symlink", "mode": 0o777, "target": value[2:]})
        elif isinstance(value, str) and value.startswith("=>"):
            entries.append({"path": path, "type": "link", "target": value[2:]})
        elif isinstance(value, dict) and "data" in value:
            off = len(blob)
            data = value["data"]
            blob += data
            blob += b"\0" * (-len(blob) % 4096)
            e = {k: v for k, v in value.items() if k != "data"}
            entries.append({"path": path, "type": "reg", "mode": 0o644, "data_off": off, "size": len(data), **e})
        else:
            entries.append({"path": path, "type": "dir", "mode": 0o755, **(value or {})})
    with open(blob_file, "wb") as f:
        f.write(blob or b"\0" * 4096)
    boot = os.path.join(dirpath, name + ".boot")
    with open(boot, "w") as f:
        json.dump({"blob_file": blob_file, "blob_id": hashlib.sha256(blob_file.encode()).hexdigest(),
                   "entries": entries}, f)
    return boot
