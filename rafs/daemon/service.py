"""The nydusd daemon core: one FUSE mount, RAFS instances, kernel EROFS mounts, lifecycle.

fs drivers:

* ``fusedev`` — the FUSE mount at ``mountpoint`` serves the image tree (dedicated: at the
  root; shared: one ``/<id>`` subdirectory per instance).
* ``erofs`` — kernel EROFS mounts each v6 bootstrap at ``mountpoint`` (dedicated) or
  ``mountpoint/<id>`` (shared) with ``device=`` files; the daemon's FUSE mount (at
  ``blob_dir``) serves one file per blob whose reads fill the cache lazily, unless the
  cache already holds the blob's complete uncompressed data file.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import pyfuse3
import trio

from rafs import erofs
from rafs.daemon.config import DaemonConfig, check_instance_name
from rafs.errors import (ConfigError, FormatError, MountError, NotFound, NotServed, RafsError, StateError,
                         UnsupportedError)
from rafs.fs import session
from rafs.fs.fuse_ll import FuseSession
from rafs.fs.instance import BlobFiles, FileAccess, Instance
from rafs.fs.ops import RafsFs, no_open_unsupported_reason
from storage.device import BlobReadDevice

log = logging.getLogger(__name__)

VERSION = "0.1.0-py"
FS_DRIVERS = ("fusedev", "erofs")
#: FUSE session implementations (docs/mounts.md says when to use which)
FUSE_IMPLS = ("ll", "pyfuse3")
DEFAULT_FUSE_IMPL = "ll"
#: worker threads of the own FUSE loop (each with a cloned /dev/fuse fd) unless --thread-num
DEFAULT_LL_THREADS = 2


class DaemonState(str, enum.Enum):
    """Upstream nydusd states reported by ``GET /api/v1/daemon``."""

    INIT = "INIT"
    READY = "READY"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


class Opener(Protocol):
    """How the daemon opens a bootstrap and builds a blob device (tests inject fakes)."""

    def open_tree(self, bootstrap: str) -> Any: ...

    def open_device(self, blobs: list[Any], config: DaemonConfig) -> BlobReadDevice: ...


def _give_chunk_source(device: Any, tree: Any) -> None:
    """Let the device find chunk digests in the bootstrap (whole-blob prefetch, amplification,
    checking a complete cache file)."""
    source = getattr(tree, "chunk_table", None)  # test trees may have none
    if source is not None:
        device.set_chunk_source(source)
    if getattr(tree, "chunk_table_count", 0) > 0 and hasattr(device, "set_chunk_lookup"):
        chunk_info = tree.chunk_info

        def lookup(blob_index: int, index: int) -> Any:
            try:
                return chunk_info(blob_index, index)
            except FormatError:  # not in the table, or a bad entry: the digest is unknown
                return None

        device.set_chunk_lookup(lookup)


class StorageOpener:
    """The real opener: :class:`rafs.metadata.Rafs` + the storage layer's ``BlobDevice``."""

    def open_tree(self, bootstrap: str) -> Any:
        from rafs.metadata import Rafs

        return Rafs.open(bootstrap)

    def open_device(self, blobs: list[Any], config: DaemonConfig) -> BlobReadDevice:
        from rafs.daemon.device import build_device

        return build_device(blobs, config)


@dataclass(frozen=True, slots=True)
class MountRecord:
    """One mounted instance as reported by the API."""

    name: str
    bootstrap: str
    fs_driver: str
    mountpoint: str
    blob_files: tuple[str, ...] = ()


class Nydusd:
    """A nydusd process: ``run()`` mounts, serves the API and FUSE until ``shutdown()``."""

    def __init__(self, *, mountpoint: str, apisock: str | None = None, fs_driver: str = "fusedev",
                 daemon_id: str = "", blob_dir: str | None = None, thread_num: int = 0,
                 opener: Opener | None = None, fuse_no_open: bool | None = None,
                 fuse_impl: str = DEFAULT_FUSE_IMPL, supervisor: str | None = None,
                 takeover: tuple[list[int], Any] | None = None, failover_policy: str = "resend",
                 upgrade: bool = False) -> None:
        if fs_driver not in FS_DRIVERS:
            raise ConfigError(f"--fs-driver: expected one of {FS_DRIVERS}, got {fs_driver!r}")
        if fuse_impl not in FUSE_IMPLS:
            raise ConfigError(f"--fuse-impl: expected one of {FUSE_IMPLS}, got {fuse_impl!r}")
        #: "ll": this project's own FUSE loop (rafs/fs/fuse_ll.py); "pyfuse3": libfuse via pyfuse3
        self.fuse_impl = fuse_impl
        self._ll: FuseSession | None = None
        #: unix socket of the fd holder (send_handover); takeover: (fds, state) fetched from it
        self.supervisor = supervisor
        self._takeover = takeover
        self.failover_policy = failover_policy
        self._handing_over = False
        self._restored = trio.Event()
        #: --upgrade: wait in INIT for the API's takeover + start (upstream's successor sequence)
        self.upgrade = upgrade
        self._bootstrap: str | None = None
        self._taking_over = False
        self._start_requested = trio.Event()
        self._running = trio.Event()
        if (takeover is not None or upgrade) and fuse_impl != "ll":
            raise ConfigError("taking over a FUSE session needs --fuse-impl ll")
        if upgrade and not supervisor:
            raise ConfigError("--upgrade needs --supervisor (where the FUSE session is held)")
        self.mountpoint = os.path.abspath(mountpoint)
        self.apisock = apisock
        self.fs_driver = fs_driver
        self.daemon_id = daemon_id or os.path.basename(self.mountpoint)
        self.blob_dir = os.path.abspath(blob_dir) if blob_dir else None
        self.thread_num = thread_num
        #: None = use FUSE no_open where pyfuse3 and the kernel allow it (see RafsFs)
        self.fuse_no_open = fuse_no_open
        self.opener = opener or StorageOpener()
        self.state = DaemonState.INIT
        self.shared = True
        self.fs: RafsFs | None = None
        self.records: dict[str, MountRecord] = {}
        self.started = time.time()
        self._fuse_mountpoint: str | None = None
        self._cancel: trio.CancelScope | None = None
        self._lock = trio.Lock()
        self._prefetch_threads: list[threading.Thread] = []
        #: instances a remount replaced, closed by _retire (or at teardown, whichever comes first)
        self._retiring: set[Instance] = set()
        self._retiring_lock = threading.Lock()
        #: upstream's runtime config (PUT /api/v1/config) per instance name: applied to the
        #: instance's backend, kept over a remount and handed to a successor; dropped at umount
        self._runtime_config: dict[str, dict[str, str]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def run(self, bootstrap: str | None = None, config: dict | None = None,
                  *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Mount, then serve until SIGTERM/SIGINT, ``PUT /api/v1/daemon/exit`` or shutdown().

        ``upgrade`` (``nydusd --upgrade``) without a ``takeover`` given: upstream's successor
        sequence — only the API is served, in state INIT, until ``PUT
        /api/v1/daemon/fuse/takeover`` (:meth:`takeover`: the FUSE session and instances are
        adopted from the supervisor, READY, nothing served yet) and ``PUT /api/v1/daemon/start``
        (:meth:`start_service`: RUNNING); ``task_status`` is started once the API answers."""
        import signal

        from rafs.daemon import api

        if self.thread_num:
            trio.to_thread.current_default_thread_limiter().total_tokens = self.thread_num
        self._bootstrap = bootstrap
        waiting = self.upgrade and self._takeover is None
        if waiting and not self.apisock:
            raise ConfigError("--upgrade needs --apisock: the takeover is driven through the API")
        if not waiting:
            self._prepare(bootstrap)
        # SIGTERM/SIGINT are caught from before the mount until after the teardown, so a
        # signal can never kill the process half-way and leave a stale mount behind
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            if not waiting:
                self._mount_fuse()
            try:
                async with trio.open_nursery() as nursery:
                    self._cancel = nursery.cancel_scope
                    nursery.start_soon(self._signals, signals)
                    if self.apisock:
                        await nursery.start(api.serve, self, self.apisock)
                    if waiting:
                        log.info("nydusd %s INIT: waiting for PUT /api/v1/daemon/fuse/takeover and "
                                 "/api/v1/daemon/start (supervisor %s)", self.daemon_id, self.supervisor)
                        task_status.started()
                        await self._start_requested.wait()  # takeover() has made it READY
                    nursery.start_soon(self._fuse_main)
                    if self.fs_driver == "fusedev":
                        # (under erofs the blob files are read with direct I/O: kernel EROFS
                        # reads ahead within the image files, see _mount_erofs_instance)
                        nursery.start_soon(trio.to_thread.run_sync, session.tune_after_init,
                                           self._fuse_mountpoint)
                    if self._takeover is not None and not self._restored.is_set():
                        await self._restore_instances(self._takeover[1])
                        self._restored.set()
                    elif bootstrap is not None and self._takeover is None:
                        await self.mount_instance("/", bootstrap, config or {})
                    self.state = DaemonState.RUNNING
                    self._running.set()
                    await self.resend_handover()
                    log.info("nydusd %s RUNNING (%s, %s) at %s; FUSE no_open %s", self.daemon_id,
                             self.fs_driver, "shared" if self.shared else "dedicated", self.mountpoint,
                             self._no_open_state())
                    if not waiting:
                        task_status.started()
            finally:
                with trio.CancelScope(shield=True):
                    await self._teardown()

    def _no_open_state(self) -> str:
        """FUSE no_open for the RUNNING log line: on, or off and why."""
        if self.fs.no_open:
            return "on"
        if self.fs_driver == "erofs":
            return "off (erofs blob files: direct I/O)"
        return f"off ({no_open_unsupported_reason(self.fuse_impl == 'll') or 'disabled'})"

    def _prepare(self, bootstrap: str | None) -> None:
        """Check an adopted session's state, build the filesystem and its directories."""
        self.shared = bootstrap is None
        if self._takeover is not None:
            self.shared = self._check_takeover(bootstrap)
        if self.fs_driver == "erofs":
            erofs.require_file_backed(os.path.dirname(self.mountpoint.rstrip("/")))
            # no no_open: the blob files are opened once per mount, and their open answers
            # FOPEN_DIRECT_IO (BlobFiles.direct_io)
            self.fs = RafsFs(shared=True, no_open=False, read_gets_ino=self.fuse_impl == "ll")
            if self.blob_dir is None:
                self.blob_dir = self.mountpoint.rstrip("/") + ".blobs"
            if self._takeover is None:  # (adopting: it is the held FUSE mount; a stat would wait for us)
                os.makedirs(self.blob_dir, exist_ok=True)
            self._fuse_mountpoint = self.blob_dir
        else:
            self.fs = RafsFs(shared=self.shared, no_open=self.fuse_no_open,
                             read_gets_ino=self.fuse_impl == "ll")
            self._fuse_mountpoint = self.mountpoint
        if self._takeover is None or self.fs_driver == "erofs":  # (see above; erofs: mountpoint is a plain dir)
            os.makedirs(self.mountpoint, exist_ok=True)

    async def takeover(self) -> None:
        """``PUT /api/v1/daemon/fuse/takeover`` (upstream's Takeover event, INIT -> READY): fetch
        the FUSE fds and handover state from the supervisor, adopt the session and re-create its
        instances (same inode numbers, the erofs mounts as they are) — without serving yet: the
        previous daemon may still be serving, until ``exit``; :meth:`start_service` serves."""
        if not (self.upgrade and self.state == DaemonState.INIT and self._takeover is None):
            raise StateError(f'Upgrade(DaemonAbnormal(UnexpectedEvent("Takeover"))): daemon is {self.state.value}; '
                             "takeover is for a daemon started with --upgrade, once, in INIT")
        if self._taking_over:
            raise StateError('Upgrade(DaemonAbnormal(UnexpectedEvent("Takeover"))): a takeover is under way')
        self._taking_over = True
        from rafs.fs.takeover import fetch_handover

        try:
            fds, state = await trio.to_thread.run_sync(fetch_handover, self.supervisor)
            self._takeover = (fds, state)
            try:
                self._prepare(self._bootstrap)
                self._mount_fuse()
                await self._restore_instances(state)
            except BaseException:
                await self._undo_takeover()
                raise
            self._restored.set()
            self.state = DaemonState.READY
            log.info("nydusd %s READY: FUSE session on %s adopted from %s with %d instance(s)",
                     self.daemon_id, self._fuse_mountpoint, self.supervisor, len(self.records))
        finally:
            self._taking_over = False

    async def _undo_takeover(self) -> None:
        """A takeover failed half-way: close what it opened (nothing is unmounted: the
        session and its mounts belong to the previous daemon and the supervisor), back to INIT."""
        for name in list(self.records):
            inst = self.fs.remove_instance(("root" if name == "/" else name) if self.records[name].fs_driver == "erofs"
                                           else (name if name != "/" else ""))
            del self.records[name]
            await trio.to_thread.run_sync(inst.close)
        fds = self._takeover[0] if self._takeover else []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._takeover, self._ll, self.fs = None, None, None

    async def start_service(self) -> None:
        """``PUT /api/v1/daemon/start`` (upstream's Start event, READY -> RUNNING): serve the
        adopted FUSE session (the kernel resends what the previous daemon had taken)."""
        if self.state != DaemonState.READY or self._start_requested.is_set():
            raise StateError(f'Configure(DaemonAbnormal(UnexpectedEvent("Start"))): daemon is {self.state.value}; '
                             "start needs READY (after PUT /api/v1/daemon/fuse/takeover)")
        self._start_requested.set()
        await self._running.wait()

    def keeps_connection_on_exit(self) -> bool:
        """Whether ``PUT /api/v1/daemon/exit`` leaves the FUSE connection and the erofs mounts
        (upstream's exit, which never unmounts): when a supervisor holds the session for a
        successor; a daemon without one unmounts (nothing could serve its mounts any more)."""
        return bool(self.supervisor) and self._ll is not None and bool(self._ll.init_state)

    def _mount_fuse(self) -> None:
        assert self.fs is not None and self._fuse_mountpoint is not None
        fsname = f"nydusd-{self.daemon_id}"
        if self._takeover is not None:
            fds, state = self._takeover
            self._ll = FuseSession(self.fs, threads=len(fds))
            self._ll.adopt(fds, state.get("session") if isinstance(state, dict) else state,
                           self.failover_policy)
            log.info("adopting the FUSE session on %s (%d fds, failover policy %s)",
                     self._fuse_mountpoint, len(fds), self.failover_policy)
            return
        if self.fuse_impl == "pyfuse3":
            session.mount(self.fs, self._fuse_mountpoint, fsname=fsname)
            return
        self._ll = FuseSession(self.fs, threads=self.thread_num or DEFAULT_LL_THREADS)
        self._ll.mount(self._fuse_mountpoint, fsname=fsname, allow_other=os.geteuid() == 0)

    async def _fuse_main(self) -> None:
        if self._ll is not None:
            if self._takeover is not None:  # serve only once every instance has its old slot
                await self._restored.wait()
            # INIT is answered on a worker thread (it arrives right after mount(2)), then the
            # session's own threads serve; this task only waits for the connection to end
            await trio.to_thread.run_sync(self._ll.start)
            # the fd holder gets the session once INIT is answered and every worker's fd exists
            # (a handover at RUNNING before that is skipped): a clone it does not hold takes its
            # requests down with a dying daemon (ECONNABORTED)
            await self.resend_handover()
            await trio.to_thread.run_sync(self._ll.wait, abandon_on_cancel=True)
        else:
            await pyfuse3.main()
        # the FUSE session ended (umount from outside): nothing left to serve
        log.info("FUSE session on %s ended", self._fuse_mountpoint)
        self.shutdown()

    async def _signals(self, receiver: Any) -> None:
        async for signum in receiver:
            log.info("signal %d: unmounting and exiting", signum)
            self.shutdown()
            return

    def shutdown(self) -> None:
        """Stop serving (callable from the trio loop). A daemon that took a session over but was
        never started (READY) leaves it as it is: it is still the previous daemon's (or the
        supervisor's), not this one's to unmount."""
        if self.state == DaemonState.READY:
            self._handing_over = True
        self.state = DaemonState.STOPPED
        if self._cancel is not None:
            self._cancel.cancel()

    async def _teardown(self) -> None:
        if self.state == DaemonState.READY:
            self._handing_over = True  # (see shutdown)
        self.state = DaemonState.STOPPED
        if self._handing_over:  # the successor serves the FUSE connection and the erofs mounts
            if self._ll is not None:
                self._ll.stop(unmount=False)
            log.info("exiting for a handover; the FUSE connection stays with the supervisor")
            return
        for name in list(self.records):
            try:
                await self._umount(name, lazy=True)
            except RafsError as exc:
                log.error("umount %s: %s", name, exc)
        with self._retiring_lock:
            retiring, self._retiring = list(self._retiring), set()
        for inst in retiring:
            await trio.to_thread.run_sync(_close_replaced, inst)
        try:
            if self._ll is not None:
                await trio.to_thread.run_sync(lambda: self._ll.stop(unmount=not self._handing_over))
            elif self.fs is not None:  # (None: an --upgrade daemon that never took over mounted nothing)
                pyfuse3.close(unmount=True)
        except Exception as exc:  # already unmounted from outside
            log.warning("closing FUSE session: %s", exc)
        if self.fs_driver == "erofs" and self.blob_dir:
            try:
                os.rmdir(self.blob_dir)  # only when empty (it is once unmounted)
            except OSError:
                pass
        if self.apisock:
            try:
                os.unlink(self.apisock)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ instances

    # ------------------------------------------------------------------ failover / hot upgrade

    def handover_state(self) -> dict:
        """JSON-able state a successor needs with the FUSE fds (``--upgrade``)."""
        if self._ll is None or self.fs is None:
            raise UnsupportedError("handover needs the own FUSE loop (--fuse-impl ll)")
        instances = []
        for name, rec in self.records.items():
            key = ("root" if name == "/" else name) if rec.fs_driver == "erofs" else (name if name != "/" else "")
            inst = self.fs.instances()[key]
            instances.append({"name": name, "bootstrap": rec.bootstrap, "config": inst.config,
                              "slot": self.fs.slot_of(key), "blob_files": list(rec.blob_files),
                              "runtime_config": self._runtime_config.get(name, {})})
        return {"version": 1, "daemon_id": self.daemon_id, "fs_driver": self.fs_driver,
                "shared": self.shared, "mountpoint": self.mountpoint,
                "session": self._ll.handover_state(),
                "instances": sorted(instances, key=lambda i: i["slot"])}

    async def send_handover(self) -> None:
        """Give the supervisor the FUSE fds and the current handover state."""
        if not self.supervisor:
            raise ConfigError("no --supervisor socket to send the FUSE session to")
        from rafs.fs.takeover import send_handover

        state = self.handover_state()
        await trio.to_thread.run_sync(send_handover, self.supervisor, state, self._ll.fds)

    async def resend_handover(self) -> None:
        """Keep the supervisor's copy of the state current (instances come and go); from RUNNING
        and the FUSE session serving on, whichever comes last (both call this)."""
        if self.supervisor and self._ll is not None and self._ll.serving and self.state == DaemonState.RUNNING:
            try:
                await self.send_handover()
            except (RafsError, OSError) as exc:  # the holder's copy is best effort: keep serving
                log.warning("sending the FUSE session to %s: %s", self.supervisor, exc)

    def prepare_handover_exit(self) -> None:
        """The next shutdown leaves the FUSE connection and erofs mounts in place."""
        if self._ll is None:
            raise UnsupportedError("handover needs the own FUSE loop (--fuse-impl ll)")
        self._handing_over = True

    def exit_for_handover(self) -> None:
        self.prepare_handover_exit()
        self.shutdown()

    @property
    def replayed_requests(self) -> int:
        return self._ll.replayed if self._ll is not None else 0

    def _check_takeover(self, bootstrap: str | None) -> bool:
        """Validate the daemon part of the takeover state; whether the daemon is shared."""
        state = self._takeover[1] if self._takeover else None
        if not isinstance(state, dict) or state.get("version") != 1:
            raise MountError(f"cannot adopt the FUSE session: bad handover state {str(state)[:200]!r}")
        if state.get("fs_driver") != self.fs_driver or state.get("mountpoint") != self.mountpoint:
            raise MountError(f"cannot adopt the FUSE session: it belongs to a {state.get('fs_driver')} "
                             f"daemon at {state.get('mountpoint')}, not {self.fs_driver} at {self.mountpoint}")
        instances = state.get("instances")
        if not isinstance(instances, list) or not all(
                isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("bootstrap"), str)
                and isinstance(i.get("slot"), int) for i in instances):
            raise MountError("cannot adopt the FUSE session: bad instance list in the handover state")
        if bootstrap is not None and [i["bootstrap"] for i in instances] != [bootstrap]:
            raise MountError("cannot adopt the FUSE session: it serves another bootstrap")
        return bool(state.get("shared"))

    async def _restore_instances(self, state: dict) -> None:
        for i in state["instances"]:
            mountpoint = "/" if i["name"] == "/" else "/" + i["name"]
            await self.mount_instance(mountpoint, i["bootstrap"], i.get("config") or {},
                                      adopt_slot=i["slot"], adopt_devices=tuple(i.get("blob_files") or ()))
            runtime = i.get("runtime_config")
            if runtime:
                self.update_config(mountpoint, runtime)

    def _instance_name(self, mountpoint: str) -> str:
        if not self.shared:
            if mountpoint != "/":
                raise MountError("a dedicated daemon serves only mountpoint '/'")
            return "/"
        if not mountpoint.startswith("/"):
            raise ConfigError(f"mountpoint must be '/<name>', got {mountpoint[:64]!r}")
        return check_instance_name(mountpoint[1:].rstrip("/"), "mountpoint name")

    def _target(self, name: str) -> str:
        return self.mountpoint if name == "/" else os.path.join(self.mountpoint, name)

    async def mount_instance(self, mountpoint: str, bootstrap: str, config: dict | str, *,
                             adopt_slot: int | None = None, adopt_devices: tuple[str, ...] = ()) -> MountRecord:
        """Mount one RAFS instance (``POST /api/v1/mount``); ``adopt_slot``: re-create an
        instance of an adopted FUSE session (same inode numbers; its erofs mount exists)."""
        name = self._instance_name(mountpoint)
        async with self._lock:
            if name in self.records:
                raise MountError(f"instance {mountpoint} is already mounted")
            cfg, tree = await self._open_source(bootstrap, config)
            device = None
            from rafs.daemon.device import seed_blob_metas

            await trio.to_thread.run_sync(seed_blob_metas, bootstrap, list(tree.blobs), cfg)
            try:
                if self.fs_driver == "erofs":
                    record = await self._mount_erofs(name, bootstrap, tree, cfg, adopt_slot, adopt_devices)
                else:
                    device = await trio.to_thread.run_sync(self.opener.open_device, list(tree.blobs), cfg)
                    _give_chunk_source(device, tree)
                    inst = Instance(name if name != "/" else "", tree, device, bootstrap=bootstrap,
                                    config=cfg.raw, enable_xattr=cfg.enable_xattr)
                    _start_trace(inst, cfg)
                    if cfg.access_pattern or cfg.latest_read_files or cfg.iostats_files:
                        inst.access = FileAccess(pattern=cfg.access_pattern, latest=cfg.latest_read_files,
                                                 files=cfg.iostats_files)
                    self.fs.add_instance(inst, adopt_slot)
                    record = MountRecord(name, bootstrap, "fusedev", self._target(name))
                    if self.shared and adopt_slot is None:
                        await self._invalidate_root_entry(name)
                    self._start_prefetch(inst, cfg)
                    if adopt_slot is None:  # after the mount: its few ms need no company on the GIL;
                        _warm_backend(device)  # the container's first read is tens of ms away
                        _load_chunk_tables(device)
            except BaseException:
                if device is not None:
                    device.close()
                tree.close()
                raise
            self.records[name] = record
            log.info("mounted %s (%s) at %s", bootstrap, record.fs_driver, record.mountpoint)
            await self.resend_handover()
            return record

    async def _open_source(self, bootstrap: str, config: dict | str) -> tuple[DaemonConfig, Any]:
        """The instance config and the opened tree of a mount/remount request's bootstrap;
        :class:`ConfigError` when the caller's source is not a usable bootstrap."""
        cfg = DaemonConfig.parse(config)
        if self.fs_driver == "erofs":
            _warn_not_collected(cfg)
        if not os.path.isfile(bootstrap):
            raise ConfigError(f"source {bootstrap[:256]!r} is not a regular file")
        try:
            tree = await trio.to_thread.run_sync(self.opener.open_tree, bootstrap)
        except (FormatError, OSError) as exc:
            raise ConfigError(f"source {bootstrap[:256]!r} is not a RAFS bootstrap: {exc}") from exc
        return cfg, tree

    async def remount_instance(self, mountpoint: str, bootstrap: str, config: dict | str) -> MountRecord:
        """Serve a mounted instance from a new bootstrap and config in place (``PUT
        /api/v1/mount``, upstream's remount): the instance keeps its slot, so its inode numbers,
        and every request from now on resolves in the new image; reads already running finish
        on the old one, closed after :data:`REMOUNT_GRACE` seconds and once its demand reads
        settled. ``fusedev`` instances only (an erofs mount is the kernel's: 501)."""
        name = self._instance_name(mountpoint)
        async with self._lock:
            record = self.records.get(name)
            if record is None:
                raise NotFound(f"no instance mounted at {mountpoint}")
            if record.fs_driver != "fusedev":
                # upstream's erofs mode (fscache) has no remount either: 501, its Unsupported
                raise NotServed(f"Remount(MountFilesystem(Unsupported)): instance {mountpoint} is a kernel "
                                "EROFS mount (fs driver erofs), which cannot change its image in place; "
                                "remount serves fusedev instances only: unmount (DELETE) and mount (POST) it again")
            cfg, tree = await self._open_source(bootstrap, config)
            from rafs.daemon.device import seed_blob_metas

            key = name if name != "/" else ""
            try:
                await trio.to_thread.run_sync(seed_blob_metas, bootstrap, list(tree.blobs), cfg)
                device = await trio.to_thread.run_sync(self.opener.open_device, list(tree.blobs), cfg)
            except BaseException:
                tree.close()
                raise
            _give_chunk_source(device, tree)
            inst = Instance(key, tree, device, bootstrap=bootstrap, config=cfg.raw, enable_xattr=cfg.enable_xattr)
            _start_trace(inst, cfg)
            if cfg.access_pattern or cfg.latest_read_files or cfg.iostats_files:
                inst.access = FileAccess(pattern=cfg.access_pattern, latest=cfg.latest_read_files,
                                         files=cfg.iostats_files)
            try:
                _apply_runtime_config(inst, self._runtime_config.get(name, {}))
            except BaseException:
                inst.close()
                raise
            old = self.fs.replace_instance(key, inst)
            self.records[name] = record = MountRecord(name, bootstrap, "fusedev", record.mountpoint)
            if self.shared:
                await self._invalidate_root_entry(name)
            self._start_prefetch(inst, cfg)
            _load_chunk_tables(device)
            with self._retiring_lock:
                self._retiring.add(old)
            threading.Thread(target=self._retire, args=(old,), name=f"retire-{key}", daemon=True).start()
            log.info("remounted %s from %s", record.mountpoint, bootstrap)
            await self.resend_handover()
            return record

    def _retire(self, old: Instance) -> None:
        """Close the instance a remount replaced once the reads that resolved in it are done
        (:data:`REMOUNT_GRACE`, then its demand reads settled); teardown may come first."""
        time.sleep(REMOUNT_GRACE)
        try:
            old.device.wait_demand_settled()
        except Exception as exc:
            log.debug("waiting for the reads of the replaced image: %s", exc)
        with self._retiring_lock:
            if old not in self._retiring:
                return  # teardown closed it
            self._retiring.discard(old)
        _close_replaced(old)

    async def _mount_erofs(self, name: str, bootstrap: str, tree: Any, cfg: DaemonConfig,
                           adopt_slot: int | None = None, adopt_devices: tuple[str, ...] = ()) -> MountRecord:
        # the device first, so that its backend warms (connection, token) during the walk below
        device = await trio.to_thread.run_sync(self.opener.open_device, list(tree.blobs), cfg)
        if adopt_slot is None:
            _warm_backend(device)
        try:
            blob_files = await trio.to_thread.run_sync(BlobFiles, tree)  # UnsupportedError if unaligned
        except BaseException:
            device.close()
            raise
        _give_chunk_source(device, tree)
        # blob file reads carry no file: read-ahead follows the image files, not the blob
        set_file_map = getattr(device, "set_file_map", None)  # test devices may have none
        if set_file_map is not None:
            set_file_map(blob_files.same_file)
        key = "root" if name == "/" else name
        inst = Instance(key, blob_files, device, bootstrap=bootstrap, config=cfg.raw, enable_xattr=False)
        _start_trace(inst, cfg)
        if adopt_slot is not None:  # the erofs mount outlived the previous daemon: serve it as is
            self.fs.add_instance(inst, adopt_slot)
            self._start_prefetch(inst, cfg)
            return MountRecord(name, bootstrap, "erofs", self._target(name), adopt_devices)
        devices = []
        for blob in blob_files.blobs:
            # the kernel reads a complete cache file directly: every chunk is checked against its
            # digest first (once per daemon); a wrong one is reset and the FUSE blob file is used
            complete = await trio.to_thread.run_sync(lambda i=blob.blob_index: device.blob_data_path(i, True))
            if complete and _pad_to_blocks(complete, blob_files.data_end(blob.blob_index),
                                           blob_files.data_size(blob.blob_index)):
                devices.append(complete)
            else:
                devices.append(os.path.join(self.blob_dir, key, blob.blob_id))
        self.fs.add_instance(inst)
        # the kernel may still hold the entry of <blob_dir>/<key> of an earlier instance with the
        # same id (unmounted < 1 s ago): drop it before mount(2) resolves device= through it
        await self._invalidate_root_entry(key, wait=True)
        target = self._target(name)
        try:
            os.makedirs(target, exist_ok=True)
            await trio.to_thread.run_sync(_mount_erofs_instance, bootstrap, target, devices)
        except BaseException:
            self.fs.remove_instance(key)
            inst.device.close()
            raise
        _load_chunk_tables(device)  # after the walk and mount(2): no company for them on the GIL
        self._start_prefetch(inst, cfg)
        return MountRecord(name, bootstrap, "erofs", target, tuple(devices))

    async def umount_instance(self, mountpoint: str) -> None:
        """Unmount one instance (``DELETE /api/v1/mount``); other instances are untouched."""
        name = self._instance_name(mountpoint)
        async with self._lock:
            if name not in self.records:
                raise NotFound(f"no instance mounted at {mountpoint}")
            await self._umount(name, lazy=False)

    async def _umount(self, name: str, *, lazy: bool) -> None:
        record = self.records[name]
        if record.fs_driver == "erofs":
            try:
                await trio.to_thread.run_sync(lambda: erofs.umount(record.mountpoint, lazy=lazy))
            except MountError:
                if not lazy:
                    raise
            inst = self.fs.remove_instance("root" if name == "/" else name)
            await self._invalidate_root_entry("root" if name == "/" else name)
        else:
            inst = self.fs.remove_instance(name if name != "/" else "")
            if self.shared:
                await self._invalidate_root_entry(name)
        del self.records[name]
        self._runtime_config.pop(name, None)
        await trio.to_thread.run_sync(_save_trace, inst)
        await trio.to_thread.run_sync(inst.close)
        log.info("unmounted %s", record.mountpoint)
        await self.resend_handover()

    async def _invalidate_root_entry(self, name: str, *, wait: bool = False) -> None:
        """Drop the kernel's entry of ``/<name>`` in the FUSE mount; ``wait``: done on return."""
        try:
            if self._ll is not None:
                await trio.to_thread.run_sync(self._ll.invalidate_entry, pyfuse3.ROOT_INODE, name.encode())
            elif wait:  # from a worker thread: the trio loop keeps answering the kernel meanwhile
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, pyfuse3.ROOT_INODE, name.encode())
            else:
                pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name.encode(), ignore_enoent=True)
        except FileNotFoundError:
            pass  # the kernel holds no such entry
        except Exception as exc:  # best effort: entries time out within a second anyway
            log.debug("invalidate %s: %s", name, exc)

    # ------------------------------------------------------------------ prefetch

    def _start_prefetch(self, inst: Instance, cfg: DaemonConfig, paths: list[str] | None = None,
                        force: bool = False) -> None:
        if not (force or cfg.fs_prefetch.enable):
            return
        tree = getattr(inst.tree, "rafs", inst.tree)  # erofs blob files: the RAFS image they present
        # a prefetch table naming files (not just the root: "everything") is an image's start-up
        # set, e.g. from a recorded trace: the container is about to read exactly these chunks,
        # in this order, so they go out at once instead of yielding to the reads that need them
        table = list(getattr(tree, "prefetch_inos", None) or [])
        startup_set = not paths and bool(table) and table != [getattr(tree, "root_ino", None)]
        # without one, the files nearly every start reads first (user db, loader, libc) go out
        # at once: the link is idle while runc sets the container up
        runtime = not paths and not startup_set and cfg.fs_prefetch.runtime_files
        listed = force or cfg.fs_prefetch.prefetch_all or bool(table)
        if not (runtime or listed):
            return

        def work() -> None:
            if runtime:
                try:
                    iovecs = inst.runtime_iovecs()
                    if iovecs:
                        inst.metrics.prefetch_requests += len(iovecs)
                        # exactly these files: amplification would pull in 1 MiB of their
                        # neighbours each (measured: 1.8 MB more per start on Debian)
                        inst.device.prefetch(iovecs, priority="high", exact=True)
                except Exception as exc:  # the listed prefetch below still runs
                    log.warning("prefetch of the runtime files of %s failed: %s: %s", inst.name or "/",
                                type(exc).__name__, exc)
            if not listed:
                return
            try:
                # walking a whole image for its iovecs takes seconds of CPU (and the GIL): not
                # while the container's first reads are being served; a start-up set is what
                # those reads are about to ask for, so it does not wait. Sustained demand (a
                # workload reading most of the image) never settles: the prefetch is queued then
                # too, or it would never share the link (demand_share)
                if not startup_set and not inst.device.wait_demand_settled(or_sustained=True):
                    return
                if not paths and self._prefetch_whole_blobs(inst, tree, cfg):
                    return
                iovecs = inst.prefetch_iovecs(paths)
                inst.metrics.prefetch_requests += len(iovecs)
                if startup_set:
                    inst.device.prefetch(iovecs, priority="high")
                else:
                    inst.device.prefetch(iovecs)
            except Exception as exc:
                log.warning("prefetch of %s failed: %s: %s", inst.name or "/", type(exc).__name__, exc)

        t = threading.Thread(target=work, name=f"prefetch-{inst.name}", daemon=True)
        t.start()
        self._prefetch_threads.append(t)

    @staticmethod
    def _prefetch_whole_blobs(inst: Instance, tree: Any, cfg: DaemonConfig) -> bool:
        """The whole image (prefetch list ``/``, nydusify's default, or none with
        ``prefetch_all``): queue every blob in layout order from its CI table instead of walking
        every file (seconds of CPU on a large image; the chunks' digests come from the device's
        chunk source); False when a blob has no CI table."""
        inos = list(getattr(tree, "prefetch_inos", None) or [])
        whole = inos == [getattr(tree, "root_ino", None)] or (not inos and cfg.fs_prefetch.prefetch_all)
        if not whole:
            return False
        for blob in tree.blobs:
            if not inst.device.prefetch_blob(blob.blob_index):
                return False  # the walk below queues what is left (ready chunks are skipped)
            inst.metrics.prefetch_requests += 1
        return True

    async def prefetch(self, mountpoint: str, paths: list[str] | None) -> None:
        inst = self._instance(mountpoint)
        self._start_prefetch(inst, DaemonConfig.parse(inst.config), paths, force=True)

    def trace_text(self, mountpoint: str) -> str:
        """The prefetch trace recorded for one instance (``GET /api/v1/trace``)."""
        inst = self._instance(mountpoint)
        if inst.recorder is None:
            raise NotFound(f"instance {mountpoint} does not record a trace (fs_prefetch.record_trace)")
        return inst.recorder.text()

    def update_config(self, mountpoint: str | None, values: Any) -> None:
        """``PUT /api/v1/config[?id=/<name>]``, upstream's runtime config of an instance's backend:
        ``registry_auth`` (docker's base64 ``user:password``; ``""`` anonymous) takes effect from
        the next backend request on, cached registry tokens dropped; ``proxy_url`` (``""``:
        none) routes the origin's requests through an HTTP(S) proxy. Without ``mountpoint``
        every instance. The whole request is checked before anything changes."""
        if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in values.items()):
            raise ConfigError('body: expected a JSON object of strings, e.g. {"registry_auth": "<base64 user:password>"}')
        for key in values:
            if key == "dragonfly_scheduler_endpoint":
                raise NotServed("dragonfly_scheduler_endpoint: this nydusd has no Dragonfly SDK routing; "
                                "route through a Dragonfly proxy with device.backend.config.proxy instead")
            if key not in RUNTIME_CONFIG_KEYS:
                raise ConfigError(f"unknown config key {key[:64]!r}: expected one of {', '.join(RUNTIME_CONFIG_KEYS)}")
        if mountpoint:
            names = [self._instance_name(mountpoint)]
            if names[0] not in self.records:
                raise NotFound(f"no instance mounted at {mountpoint}")
        else:
            names = list(self.records)
        targets = [(name, self._instance("/" if name == "/" else "/" + name)) for name in names]
        for name, inst in targets:
            _check_runtime_config(name, inst, values)
        for name, inst in targets:
            _apply_runtime_config(inst, values)
            self._runtime_config.setdefault(name, {}).update(values)

    def runtime_config(self, mountpoint: str | None) -> dict[str, str]:
        """``GET /api/v1/config[?id=/<name>]``: the keys set for that instance (without ``id``:
        every instance's, as ``"<id>:<key>"``, upstream's map). Credentials are never answered in
        clear: ``registry_auth`` reads ``sha256:<first 16 hex digits>`` of the value (``""``
        stays ``""``), enough to tell which credential an instance holds."""
        if mountpoint:
            name = self._instance_name(mountpoint)
            if name not in self.records:
                raise NotFound(f"no instance mounted at {mountpoint}")
            return {k: _masked(k, v) for k, v in self._runtime_config.get(name, {}).items()}
        return {f"{'/' if name == '/' else '/' + name}:{k}": _masked(k, v)
                for name, values in self._runtime_config.items() for k, v in values.items()}

    def inflight(self) -> list[dict[str, int]] | None:
        """FUSE requests being served now (``GET /api/v1/metrics/inflight``); None when the
        FUSE loop is libfuse's (``--fuse-impl pyfuse3``), which does not say."""
        return self._ll.inflight() if self._ll is not None else None

    def _instance(self, mountpoint: str) -> Instance:
        name = self._instance_name(mountpoint)
        record = self.records.get(name)
        if record is None:
            raise NotFound(f"no instance mounted at {mountpoint}")
        key = ("root" if name == "/" else name) if record.fs_driver == "erofs" else (name if name != "/" else "")
        return self.fs.instances()[key]

    # ------------------------------------------------------------------ reporting

    def info(self) -> dict:
        """The body of ``GET /api/v1/daemon``."""
        return {
            "id": self.daemon_id,
            "version": {"package_ver": VERSION, "git_commit": "", "profile": "python"},
            "state": self.state.value,
            "fs_driver": self.fs_driver,
            "mode": "shared" if self.shared else "dedicated",
            "pid": os.getpid(),
            "mountpoint": self.mountpoint,
            "blob_dir": self.blob_dir,
            "fuse_no_open": self.fs.no_open if self.fs else None,
            "fuse_impl": self.fuse_impl,
            "instances": {
                ("/" if n == "/" else "/" + n): {
                    "bootstrap": r.bootstrap, "fs_driver": r.fs_driver,
                    "mountpoint": r.mountpoint, "blob_files": list(r.blob_files),
                } for n, r in self.records.items()
            },
            "backend_collection": {},
        }

    def metrics_text(self, only: str | None = None, kind: str = "fs") -> str:
        """Prometheus text of the daemon and per-instance counters.

        ``kind``: ``fs`` (everything), ``backend`` / ``blobcache`` (only those storage families).
        """
        if kind != "fs":
            insts = self.fs.instances() if self.fs else {}
            words = ("backend",) if kind == "backend" else ("cache", "prefetch")
            lines = _labelled_storage_metrics(insts, only)
            keep, out = False, []
            for line in lines:
                name = line.split(" ", 3)[2] if line.startswith("# ") else line.split("{", 1)[0]
                keep = any(w in name for w in words)
                if keep:
                    out.append(line)
            return "\n".join(out) + "\n"
        lines = [
            "# HELP nydusd_up 1 while the daemon is RUNNING.",
            "# TYPE nydusd_up gauge",
            f'nydusd_up{{daemon="{self.daemon_id}"}} {int(self.state == DaemonState.RUNNING)}',
            "# HELP nydusd_instances Mounted RAFS instances.",
            "# TYPE nydusd_instances gauge",
            f'nydusd_instances{{daemon="{self.daemon_id}"}} {len(self.records)}',
        ]
        if self.fs is not None:
            lines += ["# HELP nydusd_fuse_requests_total FUSE requests that reached the daemon, by operation.",
                      "# TYPE nydusd_fuse_requests_total counter"]
            lines += [f'nydusd_fuse_requests_total{{daemon="{self.daemon_id}",op="{op}"}} {n}'
                      for op, n in self.fs.requests.items()]
            lines += ["# HELP nydusd_fuse_requests_replayed_total Requests the kernel resent after "
                      "this daemon took the FUSE session over (FUSE_NOTIFY_RESEND).",
                      "# TYPE nydusd_fuse_requests_replayed_total counter",
                      f'nydusd_fuse_requests_replayed_total{{daemon="{self.daemon_id}"}} {self.replayed_requests}']
        series = [
            ("nydusd_read_count", "counter", "FUSE reads that reached the daemon.", "read_count"),
            ("nydusd_total_read_bytes", "counter", "Bytes returned by FUSE reads.", "read_bytes"),
            ("nydusd_read_errors", "counter", "FUSE reads answered with EIO.", "read_errors"),
            ("nydusd_read_seconds_total", "counter", "Time spent in reads.", "read_seconds"),
            ("nydusd_prefetch_requests_count", "counter", "Prefetched file ranges.", "prefetch_requests"),
        ]
        insts = self.fs.instances() if self.fs else {}
        for metric, kind, help_text, attr in series:
            lines.append(f"# HELP {metric} {help_text}")
            lines.append(f"# TYPE {metric} {kind}")
            for key, inst in sorted(insts.items()):
                label = "/" + key if key not in ("", "root") else "/"
                if only and only != label:
                    continue
                value = getattr(inst.metrics, attr)
                lines.append(f'{metric}{{id="{label}"}} {value}')
        lines += _labelled_storage_metrics(insts, only)
        return "\n".join(lines) + "\n"


def _warn_not_collected(cfg: DaemonConfig) -> None:
    if cfg.iostats_files:
        log.warning("nydusd config key iostats_files: per-file counters are not collected under the erofs "
                    "driver (the kernel reads the image; /api/v1/metrics/files answers {})")


#: seconds a remounted instance's old image stays open for the reads that resolved in it
REMOUNT_GRACE = 5.0


#: upstream's ``/api/v1/config`` keys this daemon applies (``nydus_utils::config::Keys``; the
#: third, ``dragonfly_scheduler_endpoint``, answers 501)
RUNTIME_CONFIG_KEYS = ("registry_auth", "proxy_url")


def _check_runtime_config(name: str, inst: Instance, values: dict[str, str]) -> None:
    """:class:`ConfigError` unless every value can be applied to ``inst``'s backend (the
    backend's own checks, run before any instance changes)."""
    from storage.backend.registry import check_proxy_url, runtime_credentials
    from storage.errors import StorageError

    backend = getattr(inst.device, "backend", None)
    where = f"instance {'/' if name == '/' else '/' + name}"
    if backend is None:
        raise ConfigError(f"{where} has no storage backend to configure")
    if backend.kind != "registry":
        raise ConfigError(f"{where}: its {backend.kind} backend takes neither registry_auth nor proxy_url")
    try:
        runtime_credentials(values.get("registry_auth", ""))
        check_proxy_url(values.get("proxy_url", ""))
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc


def _apply_runtime_config(inst: Instance, values: dict[str, str]) -> None:
    from storage.errors import StorageError

    if not values:
        return
    backend = getattr(inst.device, "backend", None)
    try:
        if "registry_auth" in values:
            backend.update_auth(values["registry_auth"])
        if "proxy_url" in values:
            backend.update_proxy(values["proxy_url"])
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc


def _masked(key: str, value: str) -> str:
    if key != "registry_auth" or not value:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


def _warm_backend(device: Any) -> None:
    """Open the backend's connection and auth (TLS, registry token) in the background while the
    mount and the container's start go on, so the first read does not wait for them; a failure
    is only logged: the read connects and authenticates itself and reports its own error."""
    warm = getattr(device, "warm", None)  # test devices may have none
    if warm is None:
        return

    def work() -> None:
        t0 = time.monotonic()
        try:
            warm()
        except Exception as exc:  # noqa: BLE001 - best effort by design
            log.info("warming the backend failed after %.3fs (the first read connects itself): %s",
                     time.monotonic() - t0, exc)
            return
        log.debug("backend warmed in %.3fs", time.monotonic() - t0)

    threading.Thread(target=work, name="backend-warm", daemon=True).start()


def _load_chunk_tables(device: Any) -> None:
    """Fetch every blob's CI table in the background now that the instance is mounted, as
    upstream nydusd loads a blob's blob.meta when the mount sets the blob up: the container's
    first read of a blob (from a few ms later on) then waits for one round trip, its data,
    instead of two (without this, the first read starts them all and waits for its own)."""
    load = getattr(device, "load_chunk_tables", None)  # test devices may have none
    if load is not None:
        load()


def _close_replaced(old: Instance) -> None:
    try:
        _save_trace(old)
        old.close()
    except Exception as exc:
        log.warning("closing the replaced image of %s: %s", old.name or "/", exc)


def _start_trace(inst: Instance, cfg: DaemonConfig) -> None:
    if cfg.fs_prefetch.record_trace:
        from rafs.trace import TraceRecorder

        inst.recorder = TraceRecorder(inst.tree)


def _mount_erofs_instance(bootstrap: str, target: str, devices: list[str]) -> None:
    """mount(2) an erofs instance, then set the read-ahead of its files
    (``session.EROFS_READ_AHEAD_KB`` instead of the kernel's 128 KiB): the blob files under it are
    read with direct I/O (``BlobFiles.direct_io``), so EROFS's own read-ahead, which stays within
    the image file being read, is the only one."""
    erofs.mount_erofs(bootstrap, target, devices)
    erofs.set_read_ahead(target, session.EROFS_READ_AHEAD_KB)


def _save_trace(inst: Instance) -> None:
    """Write the instance's trace to ``fs_prefetch.trace_file`` (temp + rename); never raises.

    The first start of an image is what a trace is for: an existing file is kept, and a trace
    without a file (everything came from the page cache or a complete cache file) is not written.
    """
    if inst.recorder is None:
        return
    try:
        path = DaemonConfig.parse(inst.config).fs_prefetch.trace_file
        if not path or os.path.exists(path):
            return
        entries = inst.recorder.entries()
        if not entries:
            return
        from rafs.trace import format_trace

        from storage.atomic import atomic_write

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, format_trace(entries).encode("utf-8", "surrogateescape"))
        log.info("prefetch trace of %s written to %s", inst.name or "/", path)
    except Exception as exc:  # unmounting must go on
        log.warning("writing the prefetch trace of %s failed: %s", inst.name or "/", exc)


def _pad_to_blocks(path: str, data_end: int, size: int) -> bool:
    """Make a complete cache file usable as an EROFS device: kernel EROFS fails (EIO) reading
    a last block that ends past EOF, so extend the file with a zero tail to whole blocks.
    False when the file does not hold all the data."""
    try:
        have = os.path.getsize(path)
        if have < data_end:
            return False
        if have < size:
            os.truncate(path, size)  # sparse zero tail after the last chunk; data unchanged
        return True
    except OSError as exc:
        log.warning("cannot use cache file %s as EROFS device: %s", path, exc)
        return False


def _labelled_storage_metrics(insts: dict[str, Instance], only: str | None) -> list[str]:
    """Each device's storage metrics (``metrics.render()``), merged per family with an id label."""
    families: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for key, inst in sorted(insts.items()):
        label = "/" + key if key not in ("", "root") else "/"
        if only and only != label:
            continue
        text = inst.device.metrics.render()
        family = ""
        for line in (text if isinstance(text, str) else "\n".join(text)).splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                family = parts[2] if len(parts) > 2 else family
                families.setdefault(family, [])
                if line not in families[family]:
                    families[family].append(line)
                continue
            if not line.strip():
                continue
            name, _, rest = line.partition(" ")
            if "{" in name:
                name = name.replace("{", f'{{id="{label}",', 1)
            else:
                name = f'{name}{{id="{label}"}}'
            samples.setdefault(family, []).append(f"{name} {rest}")
    out = []
    for family, head in families.items():
        out += head + samples.get(family, [])
    return out
