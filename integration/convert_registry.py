"""A throwaway docker-registry for converter tests (until the shared harness lands)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_registry(root: str) -> Iterator[str]:
    """Start ``docker-registry serve`` with filesystem storage under ``root``; yield host:port."""
    binary = shutil.which("docker-registry")
    if binary is None:
        import pytest

        pytest.skip("docker-registry is not installed")
    os.makedirs(root, exist_ok=True)
    for attempt in range(5):
        port = _free_port()
        cfg = os.path.join(root, "config.yml")
        with open(cfg, "w") as fh:
            fh.write(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
""")
        log = open(os.path.join(root, "registry.log"), "wb")
        proc = subprocess.Popen([binary, "serve", cfg], stdout=log, stderr=subprocess.STDOUT)
        host = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if requests.get(f"http://{host}/v2/", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.1)
            if proc.poll() is not None:
                continue   # port race: try another
            yield host
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
    raise RuntimeError("docker-registry did not start")
