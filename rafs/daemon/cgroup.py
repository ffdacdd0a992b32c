"""The cgroup nydusd daemons are moved into (``[daemon] cgroup``), outside the snapshotter's.

A container runtime stopping the snapshotter's container kills every process in the
container's cgroup (runc's kill-all when the container shares the host's PID namespace, as the
DaemonSet's ``hostPID`` pod does). Daemons moved to a cgroup of their own at the top of each
hierarchy survive that, keep serving running containers, and the next snapshotter reattaches
to them through their API sockets under the state root (as after a host restart).

``path`` is relative to each hierarchy's root: cgroup v1 mounts every controller hierarchy
under ``fs_root`` (``/sys/fs/cgroup/<controller>``), v2 one unified tree at ``fs_root``. In a
container ``fs_root`` must be the host's cgroup filesystem (the DaemonSet mounts the host's
``/sys/fs/cgroup`` there); a container's own cgroup mount shows only its own cgroup.
"""

from __future__ import annotations

import errno
import logging
import os

from rafs.errors import ConfigError, MountError

log = logging.getLogger(__name__)


class DaemonCgroup:
    """Creates ``path`` in every hierarchy under ``fs_root`` and moves daemon pids into it."""

    def __init__(self, path: str, fs_root: str = "/sys/fs/cgroup") -> None:
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ConfigError(f"daemon.cgroup: expected a cgroup path such as 'pynydus-daemons', got {path!r}")
        self.path = "/".join(parts)
        self.fs_root = fs_root
        self.v2 = os.path.exists(os.path.join(fs_root, "cgroup.controllers"))
        self.hierarchies = self._hierarchies()
        if not self.hierarchies:
            raise ConfigError(f"daemon.cgroup = {path!r}: no cgroup hierarchy under {fs_root} "
                              "(in a container, mount the host's /sys/fs/cgroup there)")

    def _hierarchies(self) -> list[str]:
        if self.v2:
            return [self.fs_root]  # cgroup v2 (unified)
        try:
            names = sorted(os.listdir(self.fs_root))
        except OSError:
            return []
        out = []
        for name in names:
            d = os.path.join(self.fs_root, name)
            # v1: one directory per hierarchy; "cpu" -> "cpu,cpuacct" style links are the same one
            if not os.path.islink(d) and os.path.isfile(os.path.join(d, "cgroup.procs")):
                out.append(d)
        return out

    def dirs(self) -> list[str]:
        return [os.path.join(h, self.path) for h in self.hierarchies]

    def attach(self, pid: int) -> None:
        """Move ``pid`` (a whole process) into the cgroup in every hierarchy, creating it."""
        for h in self.hierarchies:
            d = os.path.join(h, self.path)
            try:
                os.makedirs(d, exist_ok=True)
                if not self.v2 and os.path.exists(os.path.join(d, "cpuset.cpus")):
                    self._init_cpuset(h)
                with open(os.path.join(d, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except OSError as exc:
                raise MountError(f"cannot move nydusd pid {pid} into cgroup {d}: {exc}") from exc

    def _init_cpuset(self, hierarchy: str) -> None:
        # v1 cpuset: a new cgroup has empty cpus/mems and refuses tasks until they are set
        parts = self.path.split("/")
        for i in range(1, len(parts) + 1):
            d = os.path.join(hierarchy, *parts[:i])
            for name in ("cpuset.cpus", "cpuset.mems"):
                with open(os.path.join(d, name)) as f:
                    if f.read().strip():
                        continue
                with open(os.path.join(os.path.dirname(d), name)) as f:
                    value = f.read().strip()
                with open(os.path.join(d, name), "w") as f:
                    f.write(value)

    def remove(self) -> list[str]:
        """Remove the cgroup where it is empty (deepest part first); returns the dirs left."""
        left = []
        for h in self.hierarchies:
            parts = self.path.split("/")
            for i in range(len(parts), 0, -1):
                d = os.path.join(h, *parts[:i])
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                        left.append(d)
                        break
                    log.warning("cannot remove cgroup %s: %s", d, exc)
                    left.append(d)
                    break
        return left

    @staticmethod
    def of(pid: int) -> list[str]:
        """``/proc/<pid>/cgroup`` lines (hierarchy id:controllers:path)."""
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read().splitlines()
