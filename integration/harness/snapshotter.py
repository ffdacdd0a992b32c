"""Our snapshotter as a real process: ``python3 -m snapshotter serve --root R --address S``.

    with SnapshotterProcess() as snap:             # root/socket in a private temp dir
        Containerd(snapshotters={"nydus": snap.address}, cri_snapshotter="nydus", ...)
        snap.kill9(); snap.restart()               # crash/restart tests (same root and socket)

stop() stops the process by PID, unmounts whatever is left mounted under its temp dir and
removes it (unless ``keep_dir``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any, Mapping, Sequence

from integration.harness.util import (kill_pids, log_tail, pids_mentioning, with_pdeathsig,
                                      short_tempdir, stop_process, unmount_all, wait_until)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _socket_accepts(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        s.connect(path)
    return True


class SnapshotterProcess:
    """One snapshotter process with its own root dir and socket."""

    def __init__(self, *, config: Mapping[str, Any] | str | None = None,
                 extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, base_dir: str | None = None,
                 start_timeout: float = 30.0, keep_dir: bool = False) -> None:
        """``config``: a dict (written as TOML), a TOML string, or None (no ``--config``)."""
        self._config = config
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self._base_dir = base_dir
        self.start_timeout = start_timeout
        self.keep_dir = keep_dir
        self.dir = ""
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return os.path.join(self.dir, "root")

    @property
    def address(self) -> str:
        return os.path.join(self.dir, "snapshotter.sock")

    @property
    def config_path(self) -> str | None:
        return os.path.join(self.dir, "config.toml") if self._config is not None else None

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "snapshotter.log")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "snapshotter", "serve", "--root", self.root,
                "--address", self.address]
        if self.config_path:
            argv += ["--config", self.config_path]
        return argv + self.extra_args

    def start(self) -> "SnapshotterProcess":
        if not self.dir:
            self.dir = short_tempdir("pyn-snap-", self._base_dir)
            os.makedirs(self.root, exist_ok=True)
            if self._config is not None:
                import toml

                text = self._config if isinstance(self._config, str) else toml.dumps(dict(self._config))
                with open(self.config_path, "w") as f:   # type: ignore[arg-type]
                    f.write(text)
        try:
            self._spawn()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(self.env)
        if os.path.exists(self.address):
            os.unlink(self.address)   # a stale socket from a killed process
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(with_pdeathsig(self.command()), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
                                         start_new_session=True)
        wait_until(lambda: _socket_accepts(self.address), self.start_timeout, "snapshotter",
                   self.proc, self.log_path)

    def kill9(self) -> None:
        """SIGKILL the process (no cleanup: mounts and daemons it made stay as they are)."""
        if self.proc is not None:
            stop_process(self.proc, sig=signal.SIGKILL)
            self.proc = None

    def terminate(self) -> None:
        """SIGTERM and wait (graceful stop), keeping the root dir."""
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
            self.proc = None

    def restart(self, *, kill: bool = False) -> "SnapshotterProcess":
        """Stop (SIGTERM, or SIGKILL if ``kill``) and start again on the same root and socket."""
        if kill:
            self.kill9()
        else:
            self.terminate()
        self._spawn()
        return self

    def log(self) -> str:
        return log_tail(self.log_path, 200)

    def daemon_pids(self) -> list[int]:
        """Processes (e.g. nydusd) still running with our dir on their command line."""
        return pids_mentioning(self.dir) if self.dir else []

    def stop(self) -> None:
        """Stop the snapshotter, then the daemons it left running (they outlive it by design),
        unmount what is left under its dir and remove the dir."""
        self.terminate()
        if self.dir and os.path.isdir(self.dir):
            kill_pids(self.daemon_pids())
            unmount_all(self.dir)
            if not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SnapshotterProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

