"""Helpers for the mount integration tests: a real nydusd process, a toggleable blob server."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from rafs import erofs
from rafs.daemon.client import DaemonClient

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_stack() -> None:
    """Skip unless root and /dev/fuse are available."""
    if os.geteuid() != 0:
        pytest.skip("mount tests need root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse missing")


class BlobServer(http.server.ThreadingHTTPServer):
    """A minimal OCI distribution blob endpoint on 127.0.0.1:<ephemeral> with Range support.

    ``down = True`` makes every blob request fail with 503 (a backend outage).
    """

    daemon_threads = True

    def __init__(self, blob_dir: str) -> None:
        self.blob_dir = blob_dir
        self.down = False
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _BlobHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _BlobHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv: BlobServer = self.server  # type: ignore[assignment]
        if self.path.rstrip("/") == "/v2":
            self._reply(200, b"{}")
            return
        m = re.match(r"^/v2/.+/blobs/sha256:([0-9a-f]{64})$", self.path)
        if not m:
            self._reply(404, b"{}")
            return
        srv.requests.append(f"{m.group(1)} {self.headers.get('Range', '')}")
        if srv.down:
            self._reply(503, b'{"errors":[{"code":"UNAVAILABLE"}]}')
            return
        path = os.path.join(srv.blob_dir, m.group(1))
        try:
            data = open(path, "rb").read()
        except OSError:
            self._reply(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            return
        rng = self.headers.get("Range")
        if rng:
            a, b = rng.split("=", 1)[1].split("-")
            start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            self._reply(206, data[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        else:
            self._reply(200, data)

    do_HEAD = do_GET

    def _reply(self, code: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def cached_chunks(cache_dir, blob) -> set[int]:
    """Indexes of ``blob``'s chunks that the cache in ``cache_dir`` holds (its chunk map; none
    before the cache has made one)."""
    from storage.cache.state import IndexedChunkMap

    path = os.path.join(str(cache_dir), blob.blob_id + ".chunk_map")
    if not os.path.exists(path):
        return set()
    chunk_map = IndexedChunkMap(path, blob.chunk_count)
    try:
        return set(chunk_map.ready_indices())
    finally:
        chunk_map.close()


def localfs_config(blob_dir: str, cache_dir: str, **extra) -> dict:
    return {"device": {"backend": {"type": "localfs", "config": {"dir": blob_dir}},
                       "cache": {"type": "blobcache", "config": {"work_dir": cache_dir}}}, **extra}


def registry_config(host: str, cache_dir: str, **extra) -> dict:
    return {"device": {"backend": {"type": "registry",
                                   "config": {"scheme": "http", "host": host, "repo": "test/image",
                                              "retry_limit": 0, "timeout": 5}},
                       "cache": {"type": "blobcache", "config": {"work_dir": cache_dir}}}, **extra}


@contextlib.contextmanager
def nydusd(tmp_path, *, bootstrap: str | None, config: dict | None, fs_driver: str = "fusedev",
           name: str = "n"):
    """Run the real ``nydusd`` CLI; yield ``(client, mountpoint, Popen)``; always clean up."""
    mnt = str(tmp_path / f"{name}-mnt")
    sock = str(tmp_path / f"{name}.sock")
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "rafs.daemon.cli", "fuse", "--mountpoint", mnt, "--apisock", sock,
           "--fs-driver", fs_driver, "--log-level", "info", "--id", name]
    if bootstrap:
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps(config or {}))
        cmd += ["--bootstrap", bootstrap, "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env, start_new_session=True)
    client = DaemonClient(sock, timeout=20)
    try:
        deadline = time.monotonic() + 30
        while client.state() != "RUNNING":
            if proc.poll() is not None:
                raise AssertionError(f"nydusd exited {proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"nydusd not RUNNING: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield client, mnt, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        left = [p for p in _mounts() if p.startswith(mnt)]
        for p in sorted(left, key=len, reverse=True):
            with contextlib.suppress(Exception):
                erofs.umount(p, lazy=True)
    assert not left, f"nydusd left mounts behind after SIGTERM: {left}"


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [erofs._unescape(line.split()[4]) for line in f]


def metric(text: str, name: str) -> float:
    """Sum of every sample of ``name`` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def settled_metric(client, name: str, quiet: float = 0.3, timeout: float = 10.0) -> float:
    """``name`` once it has not changed for ``quiet`` seconds: what a daemon's background work
    (the CI tables it fetches after a mount) left it at."""
    import time

    value, since = metric(client.metrics(), name), time.monotonic()
    deadline = since + timeout
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"{name} still changing after {timeout} s"
        time.sleep(0.05)
        now = metric(client.metrics(), name)
        if now != value:
            value, since = now, time.monotonic()
    return value


def md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def result_oracle(result_file: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``(path -> type, path -> md5, symlink -> target)`` from an upstream ``*.result`` file."""
    text = open(result_file).read()
    depth, end = 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if depth == 0 and ch == "]":
            end = i + 1
            break
    tree = json.loads(text[:end])
    types: dict[str, str] = {}
    targets: dict[str, str] = {}

    def visit(node: dict, prefix: str) -> None:
        path = prefix + "/" + node["name"] if node["name"] else ""
        if path:
            types[path] = node["type"]
            if node["type"] == "link":
                targets[path] = node["target"]
        for child in node.get("contents", []):
            visit(child, path)

    visit(tree[0], "")
    sums = {}
    for line in text[end:].splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{32}", parts[0]):
            sums[parts[1].strip()] = parts[0]
    return types, sums, targets


def walk_types(root: str) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = p[len(root):]
            out[rel] = "link" if os.path.islink(p) else "directory" if os.path.isdir(p) else "file"
    return out
