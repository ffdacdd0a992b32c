"""DaemonManager: starts, tracks, recovers nydusd processes for the snapshotter.

* shared mode — one daemon per fs driver, one mount (``<root>/mnt``); each image is an
  instance in its own subdirectory ``<root>/mnt/<instance_id>``, mounted and unmounted at
  runtime through the daemon's control API.
* dedicated mode — one daemon process per image, mounted at the caller's mountpoint hint
  (or ``<root>/instances/<instance_id>/mnt``).

With ``fs_driver="erofs"`` images that kernel EROFS can mount (v6, 4 KiB aligned chunks, and
a kernel with file-backed EROFS) use it; everything else falls back to ``fusedev`` with a log
line naming why. Daemon records are JSON files under ``<root>/daemons`` (temp + rename), so
a restarted manager reattaches to live daemons (``recover()``); a dead daemon's vestiges
(stale FUSE mount → lazy unmount, socket) are cleaned and it is restarted with its instances.

``recover_policy``: ``restart`` (and ``none``, whose difference is the caller's: it skips
:meth:`DaemonManager.recover` at start) — a dead daemon's mounts are cleaned and it is restarted,
its instances remounted (running containers lose them). ``failover`` — the manager is the
daemons' *supervisor*: it keeps an fd keeper (:class:`rafs.fs.takeover.FdKeeper`, a small
process of its own session) per daemon on ``supervisor/<id>.sock``, starts nydusd with ``--supervisor`` and
asks it for its ``/dev/fuse`` fds and handover state (``PUT /api/v1/daemon/fuse/sendfd``) once
RUNNING and after each mount change; a dead daemon is replaced by ``nydusd --upgrade`` adopting
the held FUSE connection (no unmount, no remount: running containers keep reading; requests the
dead daemon had taken are replayed, ``failover_policy = resend``, or answered EIO, ``flush``).
When that is impossible (nothing held: the daemon died before its first handover, or this
process restarted since and could not re-attach), it falls back to ``restart``. The keepers outlive
this process: a successor manager attaches to them by socket path, so a daemon that died together
with the snapshotter is still failed over (:meth:`recover`); a keeper stops with its daemon.

Files under ``root``: ``daemons/<id>.json``, ``socket/<id>/api.sock``, ``traces/<instance>.trace``,
``config/<id>[/<instance>]/config.json``, ``logs/<id>/nydusd.log``, ``mnt``/``mnt-erofs``,
``supervisor/<id>.sock`` (failover), ``logs/<id>/keeper.log``.

``cgroup`` (``[daemon] cgroup``): each daemon is moved, right after it is spawned, into that
cgroup at the top of every hierarchy under ``cgroup_fs`` (:mod:`rafs.daemon.cgroup`), so a
runtime killing the snapshotter's container (its cgroup) leaves the daemons serving; the next
snapshotter reattaches to them (``recover()``). "" leaves them in the snapshotter's cgroup.
The fd keepers are moved there too (failover).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from rafs import erofs
from rafs.daemon.client import ApiError, DaemonClient
from rafs.daemon.cgroup import DaemonCgroup
from rafs.daemon.config import check_instance_name
from rafs.errors import ConfigError, MountError, NotFound, RafsError, UnsupportedError
from rafs.fs.takeover import FdKeeper, holder_status
from storage.atomic import atomic_open

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECOVER_POLICIES = ("none", "restart", "failover")
FAILOVER_POLICIES = ("resend", "flush")
#: how often a starting daemon is asked for its state: a container's first mount waits for it
#: (0.05 s cost 25 ms on average between RUNNING and the mount; a refused connect is cheap)
START_POLL = 0.01


@dataclass(frozen=True, slots=True)
class FailoverEvent:
    """One failover of a dead daemon (``outcome``: ``ok``, or ``restarted`` when the successor
    could not adopt the session and the daemon was restarted instead), or one hot upgrade
    (``upgraded``; ``restarted`` likewise)."""

    daemon_id: str
    old_pid: int
    new_pid: int
    seconds: float      #: from noticing the death to the successor RUNNING
    outcome: str
    at: float           #: time.time() when it ended


class FailoverStats:
    """Failovers so far (the snapshotter's metrics read them): counts by outcome, durations."""

    MAX_EVENTS = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.seconds_sum = 0.0
        self.durations: list[float] = []       #: every ``ok`` duration (for histogram buckets)
        self.events: list[FailoverEvent] = []  #: the newest MAX_EVENTS

    def record(self, event: FailoverEvent) -> None:
        with self._lock:
            self.counts[event.outcome] = self.counts.get(event.outcome, 0) + 1
            if event.outcome == "ok":
                self.seconds_sum += event.seconds
                self.durations.append(event.seconds)
            self.events = (self.events + [event])[-self.MAX_EVENTS:]

    def snapshot(self) -> tuple[dict[str, int], list[float], float, list[FailoverEvent]]:
        with self._lock:
            return dict(self.counts), list(self.durations), self.seconds_sum, list(self.events)


@dataclass(frozen=True, slots=True)
class InstanceState:
    """One RAFS instance as the manager knows it."""

    instance_id: str
    daemon_id: str
    bootstrap: str
    mountpoint: str
    fs_driver: str
    state: str  #: the daemon's state ("RUNNING"), or "DEAD" when its daemon does not answer


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    instance_id: str
    bootstrap: str
    config_path: str
    mountpoint: str


@dataclass(frozen=True, slots=True)
class DaemonRecord:
    """A daemon as persisted in ``<root>/daemons/<daemon_id>.json``."""

    daemon_id: str
    fs_driver: str
    shared: bool
    mountpoint: str
    apisock: str
    log_file: str
    pid: int = 0
    blob_dir: str | None = None
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    supervisor: str = ""  #: the --supervisor socket it was started with ("" = none)

    def to_json(self) -> dict:
        d = asdict(self)
        d["instances"] = {k: asdict(v) for k, v in self.instances.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DaemonRecord":
        inst = {k: InstanceRecord(**v) for k, v in d.get("instances", {}).items()}
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known}, "instances": inst})


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # 0600: a nydusd config holds registry credentials
    with atomic_open(path, "w", encoding="utf-8", perms=0o600) as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _pid_is_nydusd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"rafs.daemon.cli" in cmd or b"nydusd" in cmd


class DaemonManager:
    """Runs nydusd daemons for the snapshotter (see the module docstring)."""

    def __init__(self, root: str, *, mode: Literal["shared", "dedicated"] = "shared",
                 fs_driver: Literal["fusedev", "erofs"] = "fusedev", nydusd_config: dict | None = None,
                 nydusd_cmd: list[str] | None = None, log_level: str = "info",
                 start_timeout: float = 30.0, monitor_interval: float | None = 2.0,
                 recover_policy: str = "restart", failover_policy: str = "resend",
                 cgroup: str = "", cgroup_fs: str = "/sys/fs/cgroup", thread_num: int = 0) -> None:
        if mode not in ("shared", "dedicated"):
            raise ConfigError(f"daemon mode: expected 'shared' or 'dedicated', got {mode!r}")
        if fs_driver not in ("fusedev", "erofs"):
            raise ConfigError(f"fs_driver: expected 'fusedev' or 'erofs', got {fs_driver!r}")
        if recover_policy not in RECOVER_POLICIES:
            raise ConfigError(f"recover_policy: expected one of {RECOVER_POLICIES}, got {recover_policy!r}")
        if failover_policy not in FAILOVER_POLICIES:
            raise ConfigError(f"failover_policy: expected one of {FAILOVER_POLICIES}, got {failover_policy!r}")
        if not 0 <= thread_num <= 1024:
            raise ConfigError(f"thread_num: expected 0..1024 (0 = nydusd's default), got {thread_num!r}")
        #: nydusd ``--thread-num`` (upstream's ``[daemon] threads_number``); 0 = nydusd's default
        self.thread_num = thread_num
        self.root = os.path.abspath(root)
        self.cgroup = DaemonCgroup(cgroup, cgroup_fs) if cgroup else None
        self.mode = mode
        self.recover_policy = recover_policy
        self.failover_policy = failover_policy
        self.failovers = FailoverStats()
        #: upstream's daemon lifetime events (``nydusd_lifetime_event_counts``): RUNNING (a daemon
        #: started or a successor took over), DIED (found dead), DESTROYED (stopped by us)
        self.events: dict[str, int] = {"RUNNING": 0, "DIED": 0, "DESTROYED": 0}
        self._events_lock = threading.Lock()
        self._holders: dict[str, FdKeeper] = {}
        self.fs_driver = fs_driver
        self.nydusd_config = copy.deepcopy(nydusd_config or {})
        self.nydusd_cmd = nydusd_cmd or [sys.executable, "-m", "rafs.daemon.cli"]
        self.log_level = log_level
        self.start_timeout = start_timeout
        self._lock = threading.RLock()
        self._records: dict[str, DaemonRecord] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._erofs_support: erofs.ErofsSupport | None = None
        os.makedirs(os.path.join(self.root, "daemons"), exist_ok=True)
        self._load_records()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        if monitor_interval:
            self._monitor = threading.Thread(target=self._watch, args=(monitor_interval,),
                                             name="nydusd-liveness", daemon=True)
            self._monitor.start()

    def _watch(self, interval: float) -> None:
        """Liveness monitor: a daemon that died is cleaned up and restarted with its instances."""
        while not self._stop.wait(interval):
            with self._lock:
                if self._stop.is_set():
                    return
                self._records.clear()
                self._load_records()  # the files are the truth (another manager may have acted)
                for rec in list(self._records.values()):
                    if rec.pid > 0 and not self._pid_alive(rec) and not self._alive(rec):
                        try:
                            self._recover_daemon(rec)
                        except RafsError as exc:
                            log.error("liveness monitor: cannot restart daemon %s: %s", rec.daemon_id, exc)

    # ------------------------------------------------------------------ records

    def _record_path(self, daemon_id: str) -> str:
        return os.path.join(self.root, "daemons", f"{daemon_id}.json")

    def _save(self, rec: DaemonRecord) -> None:
        self._records[rec.daemon_id] = rec
        _write_json(self._record_path(rec.daemon_id), rec.to_json())

    def _drop(self, daemon_id: str) -> None:
        self._records.pop(daemon_id, None)
        try:
            os.unlink(self._record_path(daemon_id))
        except FileNotFoundError:
            pass

    def _load_records(self) -> None:
        d = os.path.join(self.root, "daemons")
        for name in sorted(os.listdir(d)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(d, name), encoding="utf-8") as f:
                    rec = DaemonRecord.from_json(json.load(f))
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable daemon record %s: %s", name, exc)
                continue
            self._records[rec.daemon_id] = rec

    # ------------------------------------------------------------------ public API

    def mount(self, instance_id: str, bootstrap: str, mountpoint_hint: str | None,
              backend_config: dict | None) -> str:
        """Mount ``bootstrap`` as instance ``instance_id``; return the ready RAFS mountpoint.

        ``backend_config`` is merged into the nydusd config's ``device.backend``: a dict with a
        ``type`` key replaces it, otherwise it is merged into ``device.backend.config``.
        """
        check_instance_name(instance_id, "instance id")
        if not os.path.isfile(bootstrap):
            raise MountError(f"bootstrap {bootstrap} is not a regular file")
        with self._lock:
            existing = self._find_instance(instance_id)
            if existing is not None:
                rec, inst = existing
                if self._alive(rec):
                    return inst.mountpoint
                self._recover_daemon(rec)
                return self._find_instance(instance_id)[1].mountpoint
            config = self._instance_config(backend_config)
            prefetch = config.get("fs_prefetch")
            if isinstance(prefetch, dict) and prefetch.get("record_trace") and not prefetch.get("trace_file"):
                config["fs_prefetch"] = {**prefetch, "trace_file": self.trace_path(instance_id)}
            driver = self._choose_driver(bootstrap, check_image=self.mode != "shared")
            if self.mode == "shared":
                return self._mount_shared(instance_id, bootstrap, config, driver)
            return self._mount_dedicated(instance_id, bootstrap, config, driver, mountpoint_hint)

    def daemons(self) -> list[DaemonRecord]:
        """The daemons as recorded (pid, driver, mountpoint, instances)."""
        with self._lock:
            return list(self._records.values())

    def trace_path(self, instance_id: str) -> str:
        """Where an instance's prefetch trace is written when it is unmounted (``record_trace``)."""
        return os.path.join(self.root, "traces", f"{instance_id}.trace")

    def prestart(self) -> str | None:
        """Shared mode: start the shared daemon of the configured driver now (idempotent), so a
        later :meth:`mount` only sends the mount request; returns its daemon id, else None.

        The snapshotter calls this when a nydus image starts being pulled, overlapping the
        daemon's start (interpreter + imports, ~0.5 s) with the rest of the pull.
        """
        if self.mode != "shared":
            return None
        driver = self.fs_driver
        with self._lock:
            if driver == "erofs":
                if self._erofs_support is None:
                    self._erofs_support = erofs.detect_support(self.root)
                if not self._erofs_support.usable:
                    driver = "fusedev"
            daemon_id = f"shared-{driver}"
            rec = self._records.get(daemon_id)
            if rec is None:
                mnt = os.path.join(self.root, "mnt" if driver == "fusedev" else "mnt-erofs")
                self._start_daemon(self._new_record(daemon_id, driver, True, mnt))
            elif not self._alive(rec):
                self._recover_daemon(rec)
            return daemon_id

    def umount(self, instance_id: str) -> None:
        """Unmount one instance; other instances (shared mode) keep serving."""
        with self._lock:
            found = self._find_instance(instance_id)
            if found is None:
                raise NotFound(f"no RAFS instance {instance_id!r}")
            rec, inst = found
            if rec.shared:
                if self._alive(rec):
                    DaemonClient(rec.apisock).umount("/" + instance_id)
                else:
                    self._lazy_umount(inst.mountpoint)
                instances = dict(rec.instances)
                del instances[instance_id]
                rec = replace(rec, instances=instances)
                self._save(rec)
                if rec.supervisor and self.recover_policy == "failover" and self._alive(rec):
                    self._send_fd(rec)
            else:
                self._stop_daemon(rec)
                self._drop(rec.daemon_id)

    def update_auth(self, instance_id: str, auth: str) -> bool:
        """Give instance ``instance_id`` new registry credentials (docker's base64 ``user:password``;
        ``""`` anonymous): its config file (what a restart or failover mounts with) is rewritten
        and its running daemon told through upstream's ``PUT /api/v1/config``, with no remount.
        False when the instance already has them; :class:`NotFound` for an unknown instance,
        :class:`ConfigError` when its backend is not a registry, :class:`MountError` when its
        daemon is not running (nothing changed: call again once it is)."""
        with self._lock:
            found = self._find_instance(instance_id)
            if found is None:
                raise NotFound(f"no RAFS instance {instance_id!r}")
            rec, inst = found
            try:
                with open(inst.config_path, encoding="utf-8") as f:
                    cfg = json.load(f)
                backend = cfg["device"]["backend"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"instance {instance_id}: unreadable config {inst.config_path}: {exc}") from exc
            if not isinstance(backend, dict) or backend.get("type") != "registry":
                raise ConfigError(f"instance {instance_id}: its backend is not a registry")
            settings = backend.setdefault("config", {})
            if settings.get("auth", "") == auth:
                return False
            if not self._alive(rec):  # (its successor must be told too: the caller tries again)
                raise MountError(f"instance {instance_id}: its daemon {rec.daemon_id} is not running")
            # the daemon first: the file records what the daemon has (a failure leaves both as
            # they were, and the next call finds them different again)
            DaemonClient(rec.apisock).update_config("/" + instance_id if rec.shared else "/",
                                                    {"registry_auth": auth})
            settings["auth"] = auth
            _write_json(inst.config_path, cfg)
            return True

    def instances(self) -> dict[str, InstanceState]:
        with self._lock:
            out = {}
            for rec in self._records.values():
                state = DaemonClient(rec.apisock, timeout=5).state() or "DEAD"
                for iid, inst in rec.instances.items():
                    out[iid] = InstanceState(iid, rec.daemon_id, inst.bootstrap, inst.mountpoint,
                                             rec.fs_driver, state)
            return out

    def recover(self) -> None:
        """Reattach to live daemons; clean up and restart dead ones with their instances."""
        with self._lock:
            for rec in list(self._records.values()):
                if self._alive(rec):
                    log.info("daemon %s (pid %d) is alive, reattached", rec.daemon_id, rec.pid)
                    if self.recover_policy == "failover":
                        self._reattach_supervisor(rec)
                    continue
                try:
                    self._recover_daemon(rec)
                except RafsError as exc:
                    log.error("cannot recover daemon %s: %s", rec.daemon_id, exc)

    def shutdown(self, *, keep_records: bool = True) -> None:
        """Stop every daemon (unmounting its instances); records stay for a later ``recover()``."""
        self._stop.set()
        with self._lock:
            for rec in list(self._records.values()):
                self._stop_daemon(rec)
                if keep_records:
                    self._save(replace(rec, pid=0))
                else:
                    self._drop(rec.daemon_id)
            if self.cgroup is not None:
                self.cgroup.remove()

    def daemon_client(self, instance_id: str) -> DaemonClient:
        """The API client of the daemon serving ``instance_id`` (metrics, prefetch)."""
        found = self._find_instance(instance_id)
        if found is None:
            raise NotFound(f"no RAFS instance {instance_id!r}")
        return DaemonClient(found[0].apisock)

    # ------------------------------------------------------------------ internals

    def _find_instance(self, instance_id: str) -> tuple[DaemonRecord, InstanceRecord] | None:
        for rec in self._records.values():
            if instance_id in rec.instances:
                return rec, rec.instances[instance_id]
        return None

    def _instance_config(self, backend_config: dict | None) -> dict:
        cfg = copy.deepcopy(self.nydusd_config)
        if backend_config:
            device = cfg.setdefault("device", {})
            if "type" in backend_config:
                device["backend"] = copy.deepcopy(backend_config)
            else:
                backend = device.setdefault("backend", {})
                backend["config"] = _deep_merge(backend.get("config", {}), backend_config)
        from rafs.daemon.config import DaemonConfig

        DaemonConfig.parse(cfg)  # precise ConfigError before any process starts
        return cfg

    def _choose_driver(self, bootstrap: str, *, check_image: bool = True) -> str:
        """The driver for ``bootstrap``: fusedev unless erofs is configured and the kernel has it.

        ``check_image``: also walk the image for what kernel EROFS cannot serve (v5, unaligned
        chunks) — the dedicated daemon needs it before it starts. A shared erofs daemon checks the
        image itself on the mount request (the same walk, answered 422, then the fallback in
        :meth:`_mount_shared`), so doing it here too only doubled that walk on the container's
        critical path (70 ms on a 13,000-file image on an idle machine)."""
        if self.fs_driver != "erofs":
            return "fusedev"
        if self._erofs_support is None:
            self._erofs_support = erofs.detect_support(self.root)
        if not self._erofs_support.usable:
            log.warning("fs_driver erofs unavailable, using fusedev: %s", self._erofs_support.reason)
            return "fusedev"
        reason = erofs_image_problem(bootstrap) if check_image else None
        if reason:
            log.warning("image %s cannot use kernel EROFS, using fusedev: %s", bootstrap, reason)
            return "fusedev"
        return "erofs"

    def _write_config(self, daemon_id: str, instance_id: str | None, config: dict) -> str:
        parts = [self.root, "config", daemon_id] + ([instance_id] if instance_id else [])
        path = os.path.join(*parts, "config.json")
        _write_json(path, config)
        return path

    def _new_record(self, daemon_id: str, driver: str, shared: bool, mountpoint: str) -> DaemonRecord:
        sock = os.path.join(self.root, "socket", daemon_id, "api.sock")
        logf = os.path.join(self.root, "logs", daemon_id, "nydusd.log")
        blob_dir = os.path.join(self.root, "blobfs", daemon_id) if driver == "erofs" else None
        return DaemonRecord(daemon_id, driver, shared, mountpoint, sock, logf, 0, blob_dir)

    def _mount_shared(self, instance_id: str, bootstrap: str, config: dict, driver: str) -> str:
        daemon_id = f"shared-{driver}"
        rec = self._records.get(daemon_id)
        if rec is None:
            mnt = os.path.join(self.root, "mnt" if driver == "fusedev" else "mnt-erofs")
            rec = self._new_record(daemon_id, driver, True, mnt)
            rec = self._start_daemon(rec)
        elif not self._alive(rec):
            rec = self._recover_daemon(rec)
        cfg_path = self._write_config(daemon_id, instance_id, config)
        try:
            DaemonClient(rec.apisock).mount("/" + instance_id, bootstrap, config)
        except ApiError as exc:
            if exc.status == 422 and driver == "erofs":
                log.warning("kernel EROFS cannot serve %s, using fusedev: %s", bootstrap, exc.message)
                return self._mount_shared(instance_id, bootstrap, config, "fusedev")
            raise MountError(f"mounting {instance_id} in daemon {daemon_id}: {exc.message}") from exc
        mountpoint = os.path.join(rec.mountpoint, instance_id)
        instances = {**rec.instances, instance_id: InstanceRecord(instance_id, bootstrap, cfg_path, mountpoint)}
        rec = replace(rec, instances=instances)
        self._save(rec)
        if rec.supervisor and self.recover_policy == "failover":
            self._send_fd_soon(rec)  # the holder's state has the new mount table (the daemon sends too)
        return mountpoint

    def _mount_dedicated(self, instance_id: str, bootstrap: str, config: dict, driver: str,
                         hint: str | None) -> str:
        daemon_id = instance_id
        mountpoint = os.path.abspath(hint) if hint else os.path.join(self.root, "instances", instance_id, "mnt")
        cfg_path = self._write_config(daemon_id, None, config)
        rec = self._new_record(daemon_id, driver, False, mountpoint)
        rec = replace(rec, instances={instance_id: InstanceRecord(instance_id, bootstrap, cfg_path, mountpoint)})
        rec = self._start_daemon(rec)
        self._save(rec)
        return mountpoint

    def _alive(self, rec: DaemonRecord) -> bool:
        return DaemonClient(rec.apisock, timeout=5).state() == "RUNNING"

    def _start_daemon(self, rec: DaemonRecord, *, upgrade: bool = False) -> DaemonRecord:
        """Spawn nydusd for ``rec`` and wait until it is RUNNING; clears vestiges first.

        ``upgrade``: the successor of a dead daemon adopting the FUSE session its fd holder
        keeps (``--upgrade``): nothing is unmounted, only the dead daemon's API socket removed."""
        if upgrade:
            try:
                os.unlink(rec.apisock)
            except FileNotFoundError:
                pass
        else:
            self._clear_vestiges(rec)
        os.makedirs(os.path.dirname(rec.apisock), exist_ok=True)
        os.makedirs(os.path.dirname(rec.log_file), exist_ok=True)
        if not upgrade:  # (upgrade: it is the held FUSE mount; a stat would wait for the successor)
            os.makedirs(rec.mountpoint, exist_ok=True)
        cmd = [*self.nydusd_cmd, "fuse", "--mountpoint", rec.mountpoint, "--apisock", rec.apisock,
               "--id", rec.daemon_id, "--fs-driver", rec.fs_driver, "--log-level", self.log_level]
        if rec.blob_dir:
            cmd += ["--blob-dir", rec.blob_dir]
        if self.thread_num:
            cmd += ["--thread-num", str(self.thread_num)]
        if not rec.shared:
            inst = next(iter(rec.instances.values()))
            cmd += ["--bootstrap", inst.bootstrap, "--config", inst.config_path]
        supervisor = ""
        if self.recover_policy == "failover":
            supervisor = self._holder(rec.daemon_id).path
            cmd += ["--supervisor", supervisor]
            if upgrade:
                cmd += ["--upgrade", "--failover-policy", self.failover_policy]
        elif rec.daemon_id in self._holders:  # the policy changed: nothing to hold any more
            self._close_holder(rec.daemon_id)
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(rec.log_file, "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    env=env, start_new_session=True)
        self._procs[rec.daemon_id] = proc
        if self.cgroup is not None:  # before it serves: nothing it starts stays behind
            try:
                self.cgroup.attach(proc.pid)
            except MountError as exc:
                log.error("%s: daemon %s stays in the snapshotter's cgroup (stopping the snapshotter's "
                          "container stops it)", exc, rec.daemon_id)
        rec = replace(rec, pid=proc.pid, supervisor=supervisor)
        deadline = time.monotonic() + self.start_timeout
        client = DaemonClient(rec.apisock, timeout=5)
        while (state := client.state()) != "RUNNING":
            if upgrade and state == "INIT":  # upstream's successor sequence: takeover, then start
                try:
                    client.takeover()
                    client.start()
                except (OSError, ApiError) as exc:
                    self._reap(rec)
                    raise MountError(f"nydusd {rec.daemon_id} could not take the FUSE session over: {exc}") from exc
                continue
            if proc.poll() is not None:
                raise MountError(f"nydusd {rec.daemon_id} exited with {proc.returncode}: {self._log_tail(rec)}")
            if time.monotonic() > deadline:
                if upgrade:  # leave the mounts alone: the caller decides (restart clears them)
                    self._reap(rec)
                else:
                    self._kill(rec)
                raise MountError(f"nydusd {rec.daemon_id} not RUNNING after {self.start_timeout:.0f} s: "
                                 f"{self._log_tail(rec)}")
            time.sleep(START_POLL)
        self._save(rec)
        self._event("RUNNING")
        if supervisor:
            self._send_fd_soon(rec)
        log.info("%s nydusd %s (pid %d, %s) at %s", "upgraded" if upgrade else "started", rec.daemon_id,
                 rec.pid, rec.fs_driver, rec.mountpoint)
        return rec

    def _recover_daemon(self, rec: DaemonRecord) -> DaemonRecord:
        """A dead (or unresponsive) daemon: fail it over when its FUSE session is held
        (``recover_policy = failover``), else clean its mounts, restart it, remount its instances."""
        self._event("DIED")
        holder = self._holders.get(rec.daemon_id)
        if (holder is None and self.recover_policy == "failover" and rec.supervisor
                and rec.supervisor == self.supervisor_path(rec.daemon_id) and holder_status(rec.supervisor)):
            holder = self._holder(rec.daemon_id)  # its keeper outlived the process that started it
        if self.recover_policy == "failover" and holder is not None and holder.held and rec.supervisor:
            t0 = time.monotonic()
            try:
                return self._failover_daemon(rec, t0)
            except RafsError as exc:
                log.error("failover of daemon %s failed (%s); restarting it instead (its running "
                          "containers lose their mounts)", rec.daemon_id, exc)
                new = self._restart_daemon(rec)
                self.failovers.record(FailoverEvent(rec.daemon_id, rec.pid, new.pid, time.monotonic() - t0,
                                                    "restarted", time.time()))
                return new
        if self.recover_policy == "failover":
            log.warning("daemon %s: no FUSE session held for it (it died before handing it over, or "
                        "its keeper is gone); restarting instead of failing over", rec.daemon_id)
        return self._restart_daemon(rec)

    def upgrade(self, daemon_id: str | None = None, *, nydusd_cmd: list[str] | None = None) -> list[FailoverEvent]:
        """Hot upgrade of every live daemon (or ``daemon_id``) to the nydusd installed now
        (``nydusd_cmd``, if given, replaces the command for this and later starts): the daemon
        sends its FUSE session to its keeper and exits leaving the connection
        (``PUT /api/v1/daemon/exit?handover=1``), a successor adopts it (``--upgrade``); readers
        wait in the kernel meanwhile. Needs ``recover_policy = "failover"``. One event per daemon
        (outcome ``upgraded``, or ``restarted`` when the successor could not adopt the session)."""
        if self.recover_policy != "failover":
            raise UnsupportedError("hot upgrade needs recover_policy = \"failover\" (a keeper holds the FUSE "
                                   f"session across the exchange); it is {self.recover_policy!r}")
        events = []
        with self._lock:
            if nydusd_cmd:
                self.nydusd_cmd = list(nydusd_cmd)
            recs = [r for r in self._records.values() if daemon_id in (None, r.daemon_id)]
            if daemon_id is not None and not recs:
                raise NotFound(f"no daemon {daemon_id!r}")
            for rec in recs:
                if not self._alive(rec):
                    log.warning("upgrade: daemon %s is not RUNNING; left to the liveness monitor", rec.daemon_id)
                    continue
                if not rec.supervisor or not self._send_fd(rec) or not self._holder(rec.daemon_id).held:
                    raise MountError(f"upgrade: daemon {rec.daemon_id}'s FUSE session is not held (started "
                                     "without --supervisor, or its keeper is gone): not upgraded")
                t0 = time.monotonic()
                try:
                    DaemonClient(rec.apisock, timeout=10).exit(handover=True)
                except (OSError, ApiError) as exc:
                    raise MountError(f"upgrade: daemon {rec.daemon_id} refused to hand over: {exc}") from exc
                deadline = time.monotonic() + 10
                while self._pid_alive(rec) and time.monotonic() < deadline:
                    time.sleep(0.01)
                try:
                    new = self._failover_daemon(rec, t0, kind="upgraded")
                except RafsError as exc:
                    log.error("upgrade of daemon %s failed (%s); restarting it instead (its running "
                              "containers lose their mounts)", rec.daemon_id, exc)
                    new = self._restart_daemon(rec)
                    self.failovers.record(FailoverEvent(rec.daemon_id, rec.pid, new.pid, time.monotonic() - t0,
                                                        "restarted", time.time()))
                events.append(self.failovers.snapshot()[3][-1])
        return events

    def _failover_daemon(self, rec: DaemonRecord, t0: float, *, kind: str = "ok") -> DaemonRecord:
        if kind == "upgraded":
            log.warning("daemon %s (pid %d) handed over: upgrading to a successor (--upgrade, %s)",
                        rec.daemon_id, rec.pid, self.failover_policy)
        else:
            log.warning("daemon %s (pid %d) is dead: failing over to a successor (--upgrade, %s)",
                        rec.daemon_id, rec.pid, self.failover_policy)
        self._reap(rec)
        new = self._start_daemon(replace(rec, pid=0), upgrade=True)
        if rec.shared:  # instances the handover state missed (its last send failed): mount them now
            try:
                have = set((DaemonClient(new.apisock).info().get("instances") or {}))
            except (OSError, ApiError, ValueError):
                have = set()
            missing = [iid for iid in rec.instances if "/" + iid not in have and iid not in have]
            if missing:
                log.warning("daemon %s: successor lacks instances %s; mounting them", rec.daemon_id, missing)
                self._mount_records(new, {iid: rec.instances[iid] for iid in missing})
        seconds = time.monotonic() - t0
        self.failovers.record(FailoverEvent(rec.daemon_id, rec.pid, new.pid, seconds, kind, time.time()))
        log.warning("%s of daemon %s done in %.3f s (pid %d -> %d)", "upgrade" if kind == "upgraded" else "failover",
                    rec.daemon_id, seconds, rec.pid, new.pid)
        return new

    def _restart_daemon(self, rec: DaemonRecord) -> DaemonRecord:
        """Clean a dead daemon's mounts and socket, restart it, remount its instances."""
        log.warning("daemon %s (pid %d) is dead: cleaning up and restarting", rec.daemon_id, rec.pid)
        holder = self._holders.get(rec.daemon_id)
        if holder is not None:  # end the held connection: blocked readers fail instead of hanging
            holder.drop()
        self._kill(rec)
        new = self._start_daemon(replace(rec, pid=0))
        if rec.shared:
            kept = self._mount_records(new, rec.instances)
            new = replace(new, instances=kept)
            self._save(new)
        return new

    def _mount_records(self, rec: DaemonRecord, instances: dict[str, InstanceRecord]) -> dict[str, InstanceRecord]:
        client = DaemonClient(rec.apisock)
        kept = {}
        for iid, inst in instances.items():
            try:
                with open(inst.config_path, encoding="utf-8") as f:
                    cfg = json.load(f)
                client.mount("/" + iid, inst.bootstrap, cfg)
                kept[iid] = inst
            except (OSError, ValueError, ApiError) as exc:
                log.error("cannot remount %s: %s", iid, exc)
        return kept

    # ------------------------------------------------------------------ fd holders (failover)

    def supervisor_path(self, daemon_id: str) -> str:
        return os.path.join(self.root, "supervisor", f"{daemon_id}.sock")

    def _holder(self, daemon_id: str) -> FdKeeper:
        """The fd keeper of ``daemon_id``: the one already serving its socket (it outlived a
        previous manager), else a new one (started here, ready by the first handover)."""
        holder = self._holders.get(daemon_id)
        if holder is None:
            path = self.supervisor_path(daemon_id)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            logf = os.path.join(self.root, "logs", daemon_id, "keeper.log")
            os.makedirs(os.path.dirname(logf), exist_ok=True)
            env = dict(os.environ)  # (the keeper imports rafs from this checkout, as nydusd does)
            env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            holder = FdKeeper.attach(path, log_file=logf, env=env)
            if self.cgroup is not None and holder.started:  # it must outlive the snapshotter's cgroup too
                try:
                    self.cgroup.attach(holder.pid)
                except MountError as exc:
                    log.error("%s: the fd keeper of daemon %s stays in the snapshotter's cgroup (stopping "
                              "the snapshotter's container stops it)", exc, daemon_id)
            self._holders[daemon_id] = holder
        return holder

    def _close_holder(self, daemon_id: str) -> None:
        holder = self._holders.pop(daemon_id, None)
        if holder is not None:
            holder.close()

    def _send_fd_soon(self, rec: DaemonRecord) -> None:
        """:meth:`_send_fd` in the background: off the path of the container waiting for its
        mount (the kernel's INIT may still be under way; measured ≈ 0.1 s on a first start)."""
        threading.Thread(target=self._send_fd, args=(rec,), name=f"sendfd-{rec.daemon_id}",
                         daemon=True).start()

    def _send_fd(self, rec: DaemonRecord) -> bool:
        """Ask the daemon to (re)send its FUSE fds and handover state to its holder."""
        holder = self._holders.get(rec.daemon_id)
        if holder is not None and not holder.wait_ready():
            log.warning("daemon %s: its fd keeper at %s did not start (see its keeper.log): if it dies "
                        "it is restarted, not failed over", rec.daemon_id, holder.path)
            return False
        deadline = time.monotonic() + 5
        while True:
            try:
                DaemonClient(rec.apisock, timeout=10).send_fd()
                break
            except ApiError as exc:  # right after RUNNING the kernel's INIT may still be under way
                if "not initialised" in exc.message and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                err: Exception = exc
            except (OSError, ValueError) as exc:
                err = exc
            log.warning("daemon %s did not hand its FUSE session to %s (%s): if it dies it is "
                        "restarted, not failed over", rec.daemon_id, rec.supervisor or "(no supervisor)", err)
            return False
        return True

    def _reattach_supervisor(self, rec: DaemonRecord) -> None:
        """A live daemon found at start: hold its FUSE session again (our fds died with the
        previous process); a daemon started without ``--supervisor`` cannot be held."""
        if not rec.supervisor:
            log.warning("daemon %s was started without --supervisor (recover_policy was not failover): "
                        "it is restarted, not failed over, if it dies", rec.daemon_id)
            return
        if rec.supervisor != self.supervisor_path(rec.daemon_id):
            log.warning("daemon %s hands its session to %s, not %s: not held", rec.daemon_id,
                        rec.supervisor, self.supervisor_path(rec.daemon_id))
            return
        self._holder(rec.daemon_id)
        if self._send_fd(rec):
            log.info("daemon %s: FUSE session held again (%s)", rec.daemon_id, rec.supervisor)

    def _reap(self, rec: DaemonRecord) -> None:
        """SIGKILL the daemon if its pid still runs and wait for it; unlike :meth:`_kill` its
        mounts stay (the FUSE connection is held for a successor)."""
        if rec.pid > 0 and self._pid_alive(rec):
            try:
                os.kill(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc = self._procs.pop(rec.daemon_id, None)
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                log.error("nydusd %s (pid %d) did not exit after SIGKILL", rec.daemon_id, proc.pid)
        elif rec.pid > 0:
            deadline = time.monotonic() + 10
            while _pid_is_nydusd(rec.pid) and time.monotonic() < deadline:
                time.sleep(0.02)

    def _event(self, name: str) -> None:
        with self._events_lock:
            self.events[name] = self.events.get(name, 0) + 1

    def _stop_daemon(self, rec: DaemonRecord) -> None:
        self._event("DESTROYED")
        client = DaemonClient(rec.apisock, timeout=10)
        try:
            client.exit()
        except (OSError, ApiError):
            pass
        deadline = time.monotonic() + 10
        while self._pid_alive(rec) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._kill(rec)
        self._close_holder(rec.daemon_id)

    def _pid_alive(self, rec: DaemonRecord) -> bool:
        proc = self._procs.get(rec.daemon_id)
        if proc is not None and proc.pid == rec.pid:
            return proc.poll() is None
        return rec.pid > 0 and _pid_is_nydusd(rec.pid)

    def _kill(self, rec: DaemonRecord) -> None:
        """SIGKILL an unresponsive daemon (by its recorded pid) and clear its vestiges."""
        self._reap(rec)
        self._clear_vestiges(rec)

    def _clear_vestiges(self, rec: DaemonRecord) -> None:
        """Lazy-unmount stale mounts (instances, blob files, the FUSE mount) and remove the socket."""
        paths = [inst.mountpoint for inst in rec.instances.values()] + [rec.mountpoint]
        if rec.blob_dir:
            paths.append(rec.blob_dir)
        for path in paths:
            self._lazy_umount(path)
        try:
            os.unlink(rec.apisock)
        except FileNotFoundError:
            pass

    @staticmethod
    def _lazy_umount(path: str) -> None:
        while erofs.mountinfo(path) is not None:
            # only for a mount that is there: the FUSE stack (trio, pyfuse3, the storage
            # stack) is ~0.1 s of imports on the way to spawning the first nydusd
            from rafs.fs.session import is_stale_mount  # noqa: PLC0415

            stale = is_stale_mount(path)
            try:
                erofs.umount(path, lazy=True)
                log.info("unmounted %s%s", "stale " if stale else "", path)
            except MountError as exc:
                log.error("%s", exc)
                return

    @staticmethod
    def _log_tail(rec: DaemonRecord) -> str:
        try:
            with open(rec.log_file, "rb") as f:
                f.seek(max(0, os.path.getsize(rec.log_file) - 2000))
                lines = f.read().decode(errors="replace").strip().splitlines()
            return " | ".join(lines[-5:]) or "(empty log)"
        except OSError:
            return "(no log)"


def erofs_image_problem(bootstrap: str) -> str | None:
    """Why kernel EROFS cannot mount this image (None when it can)."""
    from rafs.fs.instance import BlobFiles
    from rafs.metadata import Rafs

    try:
        with Rafs.open(bootstrap) as rafs:
            BlobFiles(rafs)
    except UnsupportedError as exc:
        return str(exc)
    except RafsError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
