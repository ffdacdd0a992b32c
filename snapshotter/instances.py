"""RAFS instances: one per image bootstrap (instance id = meta snapshot id), shared by every
container of that image, started and stopped through a ``DaemonManager`` (``rafs.daemon.manager``,
contract in docs/contracts.md).

:class:`Instances` owns their lifetime and locks: one lock per instance serialises its mount and
unmount; :meth:`Instances.release` re-checks, under that lock, that nothing needs the instance any
more (a Prepare that committed its snapshot after the caller looked keeps it). What "needed" means
is the snapshotter's business: it passes a ``needed()`` callback reading its metastore.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from snapshotter.config import Config, nydusd_config
from snapshotter.errors import ConfigError, SnapshotterError, Unavailable
from snapshotter.mounts import snapshot_dir

log = logging.getLogger("snapshotter")


class InstanceManager(Protocol):
    """What the snapshotter needs of ``rafs.daemon.manager.DaemonManager`` (docs/contracts.md)."""

    def mount(self, instance_id: str, bootstrap: str, mountpoint_hint: str | None,
              backend_config: dict) -> str: ...

    def umount(self, instance_id: str) -> None: ...

    def instances(self) -> dict[str, Any]: ...

    def update_auth(self, instance_id: str, auth: str) -> bool: ...

    def recover(self) -> None: ...

    def shutdown(self) -> None: ...


def default_manager_factory(config: Config) -> InstanceManager:
    """A ``rafs.daemon.manager.DaemonManager`` for this config (contract in docs/contracts.md)."""
    from rafs.daemon.manager import DaemonManager  # noqa: PLC0415 - plain-image nodes never load it

    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    # same root as upstream: <root>/{daemons,socket,config,logs,mnt}; shared instances land at
    # <root>/mnt/<instance id>, which is also the snapshotter's mountpoint hint
    return DaemonManager(config.root, mode=config.daemon.daemon_mode,  # type: ignore[arg-type]
                         fs_driver=config.daemon.fs_driver,  # type: ignore[arg-type]
                         nydusd_config=nydusd_config(config),
                         nydusd_cmd=[config.daemon.nydusd_path] if config.daemon.nydusd_path else None,
                         log_level=level if level in ("debug", "info", "warning", "error") else "info",
                         recover_policy=config.daemon.recover_policy,
                         failover_policy=config.daemon.failover_policy,
                         thread_num=config.daemon.threads_number,
                         cgroup=config.daemon.cgroup,
                         # failover: a dead daemon's readers wait in the kernel until the successor
                         # serves, so notice deaths sooner than the restart policy does
                         monitor_interval=0.5 if config.daemon.recover_policy == "failover" else 2.0)


def check_fs_driver(config: Config, cachefiles_dev: str = "/dev/cachefiles") -> None:
    """Refuse to start with an ``fs_driver`` this host cannot serve (clear message, no surprise later)."""
    if config.daemon.fs_driver == "fscache" and not os.path.exists(cachefiles_dev):
        raise ConfigError(
            "daemon.fs_driver = \"fscache\" needs the kernel's on-demand cachefiles mode "
            f"(CONFIG_CACHEFILES_ONDEMAND, CONFIG_EROFS_FS_ONDEMAND) and {cachefiles_dev}, which this host "
            "lacks; use fs_driver = \"fusedev\" or \"erofs\"")


class Instances:
    """The mounted RAFS instances of one snapshotter: instance id → mountpoint."""

    def __init__(self, config: Config, needed: Callable[[], set[str]], *,
                 manager: InstanceManager | None = None,
                 manager_factory: Callable[[Config], InstanceManager] | None = None) -> None:
        self.config = config
        self.root = os.path.abspath(config.root)
        self._needed = needed
        self._manager = manager
        self._manager_factory = manager_factory
        self._mounted: dict[str, str] = {}
        self._prestarted = False                    # shared daemon start requested (startup or first pull)
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def manager(self) -> InstanceManager:
        """The RAFS instance manager, created on first use."""
        with self._lock:
            if self._manager is None:
                factory = self._manager_factory or default_manager_factory
                self._manager = factory(self.config)
            return self._manager

    @property
    def manager_if_started(self) -> InstanceManager | None:
        return self._manager

    def recover(self) -> None:
        """Reattach to instances left by a previous run (running containers keep their mounts)."""
        records = os.path.join(self.root, "daemons")
        has_records = os.path.isdir(records) and any(n.endswith(".json") for n in os.listdir(records))
        if self._manager is None and self._manager_factory is None and not has_records and not self._needed():
            return  # no nydus image in use and no daemons left: don't even import the manager
        mgr = self.manager
        if self.config.daemon.recover_policy != "none":
            mgr.recover()
        for iid, state in mgr.instances().items():
            mp = getattr(state, "mountpoint", None)
            if getattr(state, "state", "RUNNING") == "DEAD":
                log.warning("RAFS instance %s: daemon is dead; it is remounted on next use", iid)
                continue
            if isinstance(mp, str) and mp:
                self._mounted[str(iid)] = mp

    def close(self) -> None:
        """Unmount every instance and stop the manager (``cleanup_on_close``)."""
        if self._manager is None:
            return
        for iid in list(self._mounted):
            self.umount(iid, only_if_unneeded=False)
        self._manager.shutdown()

    def mounted(self) -> dict[str, str]:
        """Mounted RAFS instances: instance id → mountpoint."""
        return dict(self._mounted)

    def __contains__(self, iid: str) -> bool:
        return iid in self._mounted

    def _instance_lock(self, iid: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(iid, threading.Lock())

    def mountpoint_hint(self, iid: str) -> str:
        if self.config.daemon.daemon_mode == "dedicated":
            return os.path.join(snapshot_dir(self.root, iid), "mnt")
        return os.path.join(self.root, "mnt", iid)

    def ensure(self, iid: str, name: str, prepare: Callable[[], tuple[str, dict[str, Any], str, Any]]) -> str:
        """The mountpoint of instance ``iid`` (snapshot ``name``), mounting it when needed.

        ``prepare()`` (called under the instance lock, only when a mount is needed) returns
        ``(bootstrap path, nydusd backend config, image ref, probe)``; it raises the caller's
        errors. ``probe`` (or None) is a check running meanwhile (the registry's reachability):
        ``probe.check()`` is called after the mount, and when it raises, the fresh mount is undone
        and its error raised — before the mount's own error when both failed, as when it ran first.
        """
        with self._instance_lock(iid):
            mp = self._mounted.get(iid)
            if mp is not None:
                try:
                    os.stat(mp)
                    return mp
                except OSError as exc:  # ENOTCONN: its daemon died; the manager recovers it
                    log.warning("RAFS instance %s at %s is broken (%s); remounting", iid, mp, exc)
                    del self._mounted[iid]
            bootstrap, backend, ref, probe = prepare()
            t0 = time.monotonic()
            try:
                mp = self.manager.mount(iid, bootstrap, self.mountpoint_hint(iid), backend)
            except SnapshotterError:
                if probe is not None:
                    probe.check()
                raise
            except Exception as exc:  # the manager's own errors (rafs/storage) → UNAVAILABLE
                if probe is not None:
                    probe.check()
                raise Unavailable(f"failed to mount RAFS instance for {name}: {exc}") from exc
            if probe is not None:
                try:
                    probe.check()
                except BaseException:
                    try:
                        self.manager.umount(iid)
                    except Exception:  # noqa: BLE001 - Cleanup retries what is left
                        log.exception("failed to unmount RAFS instance %s after a failed registry probe", iid)
                    raise
            log.info("RAFS instance %s for %s mounted at %s in %.3fs", iid, ref, mp, time.monotonic() - t0)
            self._mounted[iid] = mp
            return mp

    def release_unneeded(self) -> None:
        """Unmount every instance no snapshot needs any more."""
        if not self._mounted:
            return
        needed = self._needed()
        for iid in list(self._mounted):
            if iid not in needed:
                self.umount(iid)

    def umount(self, iid: str, *, only_if_unneeded: bool = True) -> None:
        with self._instance_lock(iid):
            if iid not in self._mounted:
                return
            # re-check under the instance lock: a Prepare that committed its snapshot after our
            # caller looked must keep the instance (its ensure() waits for this lock)
            if only_if_unneeded and iid in self._needed():
                return
            try:
                self.manager.umount(iid)
                self._mounted.pop(iid, None)
                log.info("RAFS instance %s unmounted", iid)
            except FileNotFoundError:  # the manager does not know it (rafs NotFound): gone already
                self._mounted.pop(iid, None)
            except Exception:  # keep it listed; Cleanup retries
                log.exception("failed to unmount RAFS instance %s", iid)

    def prestart(self) -> None:
        """Start the shared daemon in the background, once, so the container's Prepare does not
        wait for the daemon process to come up: at the served snapshotter's start (shared mode, as
        upstream), else when the first nydus image is being pulled."""
        with self._lock:
            if self._prestarted:
                return
            self._prestarted = True

        def work() -> None:
            try:
                prestart = getattr(self.manager, "prestart", None)
                if prestart is not None:
                    prestart()
            except Exception as exc:  # the mount itself reports (and retries) a failed start
                log.warning("starting the shared nydusd early failed: %s", exc)

        threading.Thread(target=work, name="nydusd-prestart", daemon=True).start()
