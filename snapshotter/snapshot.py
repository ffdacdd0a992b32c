"""The Snapshotter: containerd overlayfs semantics plus nydus (RAFS) layers.

One call, one transaction (``metastore``). Directories are made as ``snapshots/new-*`` temp dirs
and renamed to ``snapshots/<id>`` inside the transaction; removed directories are deleted only
after the transaction committed. RAFS instances (one per image bootstrap, shared by every
container of that image) are started through a ``DaemonManager`` (``rafs.daemon.manager``)
outside the transaction, and stopped when the last active/view snapshot above them goes.

Nydus flow (labels in :mod:`snapshotter.labels`):

* extract Prepare with ``snapshot.ref`` + ``nydus-blob=true`` → commit an (empty) remote
  snapshot under the ref name, keeping the labels, and answer ALREADY_EXISTS;
* extract Prepare with ``nydus-bootstrap=true`` → native mounts; containerd unpacks the layer and
  the bootstrap lands in ``fs/image/image.boot`` (legacy ``fs/image.boot``), checked on Commit;
* Prepare/View above a meta layer → mount its RAFS instance, return overlay with
  ``lowerdir=<RAFS mountpoint>``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Protocol

from snapshotter import labels as L
from snapshotter.credentials import CredentialStore
from snapshotter import metastore as store
from snapshotter.config import Config, nydusd_config
from snapshotter.errors import (AlreadyExists, BootstrapError, ConfigError, FailedPrecondition, InvalidArgument, NotFound,
                                SnapshotterError, Unavailable)
from snapshotter.filters import compile_filters
from snapshotter.metastore import Info, Kind, MetaStore, Snapshot, Usage
from snapshotter.mounts import Mount, OverlayOptions, native_mounts, remote_mounts, snapshot_dir, upper_path

log = logging.getLogger("snapshotter")

#: where containerd's unpack of the bootstrap layer leaves the bootstrap (new, legacy)
BOOTSTRAP_PATHS = (os.path.join("image", "image.boot"), "image.boot")
#: cache file suffixes of one blob (upstream naming)
CACHE_SUFFIXES = ("", ".blob.data", ".chunk_map", ".blob.data.chunk_map", ".blob.meta", ".image.disk",
                  ".layer.disk", ".blob.digest", ".blob.toc", ".image.boot")
MAX_LABEL_SIZE = 4096


class InstanceManager(Protocol):
    """What the snapshotter needs of ``rafs.daemon.manager.DaemonManager`` (docs/contracts.md)."""

    def mount(self, instance_id: str, bootstrap: str, mountpoint_hint: str | None,
              backend_config: dict) -> str: ...

    def umount(self, instance_id: str) -> None: ...

    def instances(self) -> dict[str, Any]: ...

    def recover(self) -> None: ...

    def shutdown(self) -> None: ...


# ----------------------------------------------------------------------------- validation


def validate_key(key: str, what: str = "key") -> None:
    """Keys are opaque names, but never empty, NUL-containing or with ``..`` components.

    Absolute keys are allowed: containerd's own conformance suite uses them (keys never become
    paths here — directories are named by sequence id).
    """
    if not key:
        raise InvalidArgument(f"snapshot {what} must not be empty")
    if "\0" in key:
        raise InvalidArgument(f"snapshot {what} {key!r} contains a NUL byte")
    if ".." in key.split("/"):
        raise InvalidArgument(f"snapshot {what} {key!r} contains a '..' path component")
    if len(key.encode()) > 4096:
        raise InvalidArgument(f"snapshot {what} is longer than 4096 bytes")


def validate_labels(labels: Mapping[str, str]) -> None:
    """containerd's label limits plus sane values for the nydus labels we act on."""
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {k[:64]}")
        if "\0" in k or "\0" in v:
            raise InvalidArgument(f"label {k[:64]!r} contains a NUL byte")
    for flag in (L.NYDUS_DATA_LAYER, L.NYDUS_META_LAYER):
        if flag in labels and labels[flag].strip().lower() not in ("true", "false", "1", "0", "yes", "no", ""):
            raise InvalidArgument(f"label {flag}={labels[flag]!r}: expected true or false")
    if L.is_nydus_data_layer(labels) and L.is_nydus_meta_layer(labels):
        raise InvalidArgument(f"labels {L.NYDUS_DATA_LAYER} and {L.NYDUS_META_LAYER} are exclusive")
    if L.is_nydus_data_layer(labels):
        L.layer_blob_id(labels)  # raises on a malformed digest
    if L.CRI_IMAGE_REF in labels:
        L.parse_image_ref(labels[L.CRI_IMAGE_REF])
    L.label_credentials(labels)


def find_bootstrap(fs_dir: str) -> str | None:
    """The bootstrap file in an unpacked meta layer, or None."""
    for rel in BOOTSTRAP_PATHS:
        path = os.path.join(fs_dir, rel)
        if os.path.isfile(path):
            return path
    return None


def check_bootstrap(path: str) -> int:
    """Check that ``path`` is a RAFS bootstrap; returns its version (5 or 6).

    Opens it with ``rafs.metadata.Rafs.open`` (full superblock validation).
    """
    from rafs.metadata import Rafs  # noqa: PLC0415

    try:
        with Rafs.open(path) as rafs:
            return int(rafs.version)
    except Exception as exc:  # rafs errors of any kind mean "not a usable bootstrap"
        raise BootstrapError(f"{path} is not a valid RAFS bootstrap: {exc}") from exc


def disk_usage(path: str) -> Usage:
    """containerd's ``fs.DiskUsage``: allocated bytes and inodes, hard links counted once."""
    size = inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, ""]:
            p = os.path.join(dirpath, name) if name else dirpath
            if name == "" and dirpath != path:
                continue
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            inodes += 1
            size += st.st_blocks * 512
    return Usage(size=size, inodes=inodes)


def _host_overlay_options(volatile: bool) -> OverlayOptions:
    index_off = False
    try:
        with open("/sys/module/overlay/parameters/index") as f:
            index_off = f.read().strip() == "Y"
    except OSError:
        pass
    userxattr = False
    try:
        with open("/proc/self/uid_map") as f:
            userxattr = f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        pass
    return OverlayOptions(index_off=index_off, userxattr=userxattr, volatile=volatile)


# ----------------------------------------------------------------------------- registry side


def _docker_config_auth(host: str, path: str) -> str | None:
    candidates = [path] if path else []
    if not path:
        base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
        candidates.append(os.path.join(base, "config.json"))
    for cand in candidates:
        try:
            with open(cand, encoding="utf-8") as f:
                auths = json.load(f).get("auths", {})
        except (OSError, ValueError, AttributeError):
            continue
        keys = [host, f"https://{host}", f"http://{host}"]
        if host in ("docker.io", "index.docker.io"):
            keys.insert(0, "https://index.docker.io/v1/")
        for key in keys:
            entry = auths.get(key) if isinstance(auths, dict) else None
            if isinstance(entry, dict):
                if entry.get("auth"):
                    return str(entry["auth"])
                if entry.get("username"):
                    return base64.b64encode(f"{entry['username']}:{entry.get('password', '')}".encode()).decode()
    return None


def registry_auth(host: str, labels: Mapping[str, str], cfg: Config) -> str | None:
    """Credentials for ``host``: labels, then ``[remote.auths]``, then docker config.json."""
    auth = L.label_credentials(labels)
    if auth:
        return auth
    static = cfg.remote.auths.get(host)
    if static is not None:
        if static.auth:
            return static.auth
        if static.username:
            return base64.b64encode(f"{static.username}:{static.password}".encode()).decode()
    return _docker_config_auth(host, cfg.remote.docker_config)


def _ping(scheme: str, host: str, timeout: float) -> str | None:
    """None if ``scheme://host/v2/`` answers HTTP at all, else the error text."""
    import requests  # noqa: PLC0415 - only needed for nydus images

    try:
        requests.get(f"{scheme}://{host}/v2/", timeout=timeout, verify=False, allow_redirects=False)
        return None
    except requests.RequestException as exc:
        return str(exc)


def backend_config(image_ref: str, labels: Mapping[str, str], cfg: Config,
                   ping: Callable[[str, str, float], str | None] | None = None) -> dict[str, Any]:
    """The nydusd ``device.backend`` for an image (registry host/repo, auth, mirror choice)."""
    ref = L.parse_image_ref(image_ref)
    host = ref.backend_host
    endpoints: list[tuple[str, str]] = []
    for mirror in cfg.remote.mirrors.get(ref.host, ()) or cfg.remote.mirrors.get(host, ()):
        scheme, _, rest = mirror.partition("://")
        endpoints.append((scheme, rest.rstrip("/")))
    insecure = ref.host in cfg.remote.insecure_registries or host in cfg.remote.insecure_registries
    endpoints.append(("http" if insecure else "https", host))
    chosen = endpoints[-1]
    if cfg.remote.check_registry:
        ping = ping or _ping
        errors = []
        for scheme, ep_host in endpoints:
            err = ping(scheme, ep_host, float(cfg.remote.connect_timeout or 5))
            if err is None:
                chosen = (scheme, ep_host)
                break
            errors.append(f"{scheme}://{ep_host}: {err}")
        else:
            raise Unavailable(f"registry for image {image_ref} unreachable: " + "; ".join(errors))
    auth = registry_auth(ref.host, labels, cfg) or ""
    return {"type": "registry",
            "config": {"scheme": chosen[0], "host": chosen[1], "repo": ref.repo, "auth": auth,
                       "skip_verify": cfg.remote.skip_ssl_verify, "timeout": cfg.remote.timeout,
                       "connect_timeout": cfg.remote.connect_timeout, "retry_limit": cfg.remote.retry_limit}}


# ----------------------------------------------------------------------------- the snapshotter


class Snapshotter:
    """containerd snapshotter semantics over :mod:`snapshotter.metastore` plus RAFS instances."""

    def __init__(self, config: Config, *, manager: InstanceManager | None = None,
                 manager_factory: Callable[[Config], InstanceManager] | None = None,
                 ping: Callable[[str, str, float], str | None] | None = None) -> None:
        self.config = config
        self.root = os.path.abspath(config.root)
        os.makedirs(os.path.join(self.root, "snapshots"), mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.ms = MetaStore(os.path.join(self.root, "metadata.db"))
        self.credentials = CredentialStore(self.root)
        self.overlay = _host_overlay_options(config.snapshot.enable_overlayfs_volatile)
        self._manager = manager
        self._manager_factory = manager_factory
        self._ping = ping
        self._mounted: dict[str, str] = {}          # instance id (meta snapshot id) -> mountpoint
        self._prestarted = False                    # shared daemon start requested (first nydus pull)
        self._instance_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def manager(self) -> InstanceManager:
        """The RAFS instance manager, created on first use (needs ``rafs.daemon.manager``)."""
        with self._lock:
            if self._manager is None:
                factory = self._manager_factory or default_manager_factory
                self._manager = factory(self.config)
            return self._manager

    def start(self) -> None:
        """Recover RAFS instances left by a previous run (running containers keep their mounts)."""
        records = os.path.join(self.root, "daemons")
        has_records = os.path.isdir(records) and any(n.endswith(".json") for n in os.listdir(records))
        if self._manager is None and self._manager_factory is None and not has_records \
                and not self._needed_instances():
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
        """Stop serving; RAFS instances stay mounted unless ``cleanup_on_close``."""
        if self.config.cleanup_on_close and self._manager is not None:
            for iid in list(self._mounted):
                self._umount_instance(iid, only_if_unneeded=False)
            self._manager.shutdown()
        self.ms.close()

    # -- containerd calls -----------------------------------------------------------------

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        labels = dict(labels or {})
        self._validate(key, parent, labels)
        target = L.target_ref(labels)
        if target is not None and L.is_nydus_data_layer(labels):
            self._commit_remote_layer(key, parent, target, labels)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        labels = dict(labels or {})
        self._validate(key, parent, labels)
        return self._create(Kind.VIEW, key, parent, labels)

    def mounts(self, key: str) -> list[Mount]:
        validate_key(key)
        with self.ms.transaction(writable=False) as tx:
            try:
                snap, chain = store.get_snapshot_chain(tx, key)
            except SnapshotterError as exc:
                raise type(exc)(f"failed to get active mount: {exc}") from exc
        info = chain[0][1]
        meta = self._find_meta(chain[1:])
        if meta is None:
            return native_mounts(self.root, snap, self.overlay)
        meta_id, meta_info, between = meta
        mp = self._ensure_instance(meta_id, meta_info, info.labels)
        return remote_mounts(self.root, snap, mp, between=between, opts=self.overlay)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        labels = dict(labels or {})
        validate_key(name, "name")
        validate_key(key)
        validate_labels(labels)
        self.credentials.remember(labels)
        with self.ms.transaction(writable=True) as tx:
            sid, info, _ = store.get_info(tx, key)
            fs_dir = upper_path(self.root, sid)
            if info.kind == Kind.ACTIVE and (L.is_nydus_meta_layer(labels) or L.is_nydus_meta_layer(info.labels)):
                boot = find_bootstrap(fs_dir)
                if boot is None:
                    raise BootstrapError(
                        f"nydus bootstrap layer {key}: no {' or '.join(BOOTSTRAP_PATHS)} in the unpacked layer")
                check_bootstrap(boot)
            usage = disk_usage(fs_dir) if info.kind == Kind.ACTIVE else Usage()
            try:
                store.commit_active(tx, key, name, usage, labels)
            except SnapshotterError as exc:
                raise type(exc)(f"failed to commit snapshot {key}: {exc}") from exc

    def remove(self, key: str) -> None:
        validate_key(key)
        with self.ms.transaction(writable=True) as tx:
            try:
                sid, _kind = store.remove(tx, key)
            except SnapshotterError as exc:
                raise type(exc)(f"failed to remove: {exc}") from exc
        # after commit: the metadata already says it is gone; failures are only logged
        self._release_instances()
        if self.config.snapshot.sync_remove:
            self._remove_dir(sid)

    def stat(self, key: str) -> Info:
        validate_key(key)
        with self.ms.transaction(writable=False) as tx:
            return store.get_info(tx, key)[1]

    def update(self, info: Info, fieldpaths: Iterable[str] = ()) -> Info:
        validate_key(info.name)
        validate_labels(info.labels)
        with self.ms.transaction(writable=True) as tx:
            return store.update_info(tx, info, list(fieldpaths))

    def usage(self, key: str) -> Usage:
        validate_key(key)
        with self.ms.transaction(writable=False) as tx:
            sid, info, usage = store.get_info(tx, key)
            if info.kind == Kind.ACTIVE:
                return disk_usage(upper_path(self.root, sid))
        if info.kind == Kind.COMMITTED and L.is_nydus_data_layer(info.labels):
            blob_id = L.layer_blob_id(info.labels)
            if blob_id:
                return self._cache_usage(blob_id)
        return usage

    def walk(self, filters: Iterable[str] = ()) -> list[Info]:
        match = compile_filters(list(filters))
        with self.ms.transaction(writable=False) as tx:
            return store.walk_info(tx, match)

    def cleanup(self) -> list[str]:
        """Delete directories no snapshot owns, stop unneeded RAFS instances, GC the blob cache.

        Returns the removed directories.
        """
        self._release_instances()
        removed: list[str] = []
        snapdir = os.path.join(self.root, "snapshots")
        with self.ms.transaction(writable=True) as tx:  # writers hold the lock: no temp dir in flight
            ids = store.id_map(tx)
            stale = [d for d in os.listdir(snapdir) if d not in ids]
        for d in stale:
            if d in self._mounted:
                self._umount_instance(d, only_if_unneeded=False)
            if self._remove_dir(d):
                removed.append(os.path.join(snapdir, d))
        if self.config.cache_manager.gc_on_cleanup and not self.config.cache_manager.disable:
            self.gc_cache()
        return removed

    # -- nydus helpers --------------------------------------------------------------------

    def _validate(self, key: str, parent: str, labels: Mapping[str, str]) -> None:
        validate_key(key)
        if parent:
            validate_key(parent, "parent")
        validate_labels(labels)
        self.credentials.remember(labels)

    def _commit_remote_layer(self, key: str, parent: str, target: str, labels: dict[str, str]) -> None:
        """Record a committed snapshot ``target`` for a lazily-loaded nydus data layer, then
        answer ALREADY_EXISTS so containerd adopts it and never downloads the blob."""
        validate_key(target, "target")
        labels = {**labels, L.REMOTE: "remote snapshot"}
        with self.ms.transaction(writable=True) as tx:
            try:
                _, existing, _ = store.get_info(tx, target)
            except NotFound:
                existing = None
            if existing is None:
                snap = self._create_in_tx(tx, Kind.ACTIVE, key, parent, labels)
                store.commit_active(tx, key, target, Usage(), labels)
                log.info("nydus data layer %s committed as remote snapshot %s (id %s)", key, target, snap.id)
                self._prestart_daemon()
            elif existing.kind != Kind.COMMITTED or existing.parent != parent:
                raise AlreadyExists(f'target snapshot "{target}" exists with parent "{existing.parent}"')
        raise AlreadyExists(f'target snapshot "{target}"')

    def _prestart_daemon(self) -> None:
        """A nydus image is being pulled: start the shared daemon in the background (once), so
        the container's Prepare does not wait for the daemon process to come up."""
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

    def _create_in_tx(self, tx: store.Transaction, kind: Kind, key: str, parent: str,
                      labels: Mapping[str, str]) -> Snapshot:
        snapdir = os.path.join(self.root, "snapshots")
        td = tempfile.mkdtemp(prefix="new-", dir=snapdir)
        path = ""
        try:
            os.mkdir(os.path.join(td, "fs"), 0o755)
            os.chmod(os.path.join(td, "fs"), 0o755)
            if kind == Kind.ACTIVE:
                os.mkdir(os.path.join(td, "work"), 0o711)
            snap = store.create_snapshot(tx, kind, key, parent, labels)
            if snap.parent_ids:
                st = os.stat(upper_path(self.root, snap.parent_ids[0]))
                os.lchown(os.path.join(td, "fs"), st.st_uid, st.st_gid)
            path = snapshot_dir(self.root, snap.id)
            os.rename(td, path)
            td = ""
            return snap
        except BaseException:
            for d in (td, path):
                if d:
                    shutil.rmtree(d, ignore_errors=True)
            raise

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        target = L.target_ref(labels)
        with self.ms.transaction(writable=True) as tx:
            meta = None
            if parent and target is None:
                meta = self._meta_of_checked(tx, parent)
                if kind == Kind.VIEW and meta is None and self._is_data_layer(tx, parent):
                    raise FailedPrecondition(
                        f"cannot view nydus data layer {parent}: only the topmost (bootstrap) layer can be viewed")
            try:
                snap = self._create_in_tx(tx, kind, key, parent, labels)
            except SnapshotterError as exc:
                raise type(exc)(f"failed to create snapshot: {exc}") from exc
        if meta is None:
            return native_mounts(self.root, snap, self.overlay)
        meta_id, meta_info, between = meta
        try:
            mp = self._ensure_instance(meta_id, meta_info, labels)
        except BaseException:
            # undo: the caller sees an error, so the snapshot must not exist
            try:
                with self.ms.transaction(writable=True) as tx:
                    store.remove(tx, key)
                self._remove_dir(snap.id)
            except SnapshotterError:
                log.exception("failed to undo snapshot %s after a mount failure", key)
            raise
        return remote_mounts(self.root, snap, mp, between=between, opts=self.overlay)

    @staticmethod
    def _is_data_layer(tx: store.Transaction, key: str) -> bool:
        try:
            return L.is_nydus_data_layer(store.get_info(tx, key)[1].labels)
        except NotFound:
            return False

    def _meta_of_checked(self, tx: store.Transaction, parent: str) -> tuple[str, Info, tuple[str, ...]] | None:
        try:
            return self._meta_of(tx, parent)
        except NotFound:
            return None  # create_snapshot reports the missing parent with containerd's words

    def _meta_of(self, tx: store.Transaction, parent: str) -> tuple[str, Info, tuple[str, ...]] | None:
        """The nearest nydus meta layer in ``parent``'s chain: ``(id, info, plain ids above it)``."""
        return self._find_meta(store.parent_chain(tx, parent))

    @staticmethod
    def _find_meta(chain: list[tuple[str, Info]]) -> tuple[str, Info, tuple[str, ...]] | None:
        between: list[str] = []
        for sid, info in chain:
            if L.is_nydus_meta_layer(info.labels):
                return sid, info, tuple(between)
            if L.is_nydus_data_layer(info.labels):
                return None  # data layers without a bootstrap above them: nothing to mount
            between.append(sid)
        return None

    def _instance_lock(self, iid: str) -> threading.Lock:
        with self._lock:
            return self._instance_locks.setdefault(iid, threading.Lock())

    def mountpoint_hint(self, meta_id: str) -> str:
        if self.config.daemon.daemon_mode == "dedicated":
            return os.path.join(snapshot_dir(self.root, meta_id), "mnt")
        return os.path.join(self.root, "mnt", meta_id)

    def _ensure_instance(self, meta_id: str, meta_info: Info, labels: Mapping[str, str]) -> str:
        """Mount (or reuse) the RAFS instance of meta snapshot ``meta_id``; returns its mountpoint."""
        with self._instance_lock(meta_id):
            mp = self._mounted.get(meta_id)
            if mp is not None:
                try:
                    os.stat(mp)
                    return mp
                except OSError as exc:  # ENOTCONN: its daemon died; the manager recovers it
                    log.warning("RAFS instance %s at %s is broken (%s); remounting", meta_id, mp, exc)
                    del self._mounted[meta_id]
            boot = find_bootstrap(upper_path(self.root, meta_id))
            if boot is None:
                raise FailedPrecondition(f"nydus meta layer {meta_info.name} has no bootstrap file")
            try:
                check_bootstrap(boot)  # it may have been damaged since Commit
            except BootstrapError as exc:
                raise FailedPrecondition(f"nydus meta layer {meta_info.name}: {exc}") from exc
            merged = {**meta_info.labels, **{k: v for k, v in labels.items() if k in (L.PULL_USERNAME, L.PULL_SECRET, L.CRI_IMAGE_REF)}}
            ref = L.image_ref(merged)
            if ref is None:
                raise FailedPrecondition(
                    f"failed to find image ref of snapshot {meta_info.name}: label {L.CRI_IMAGE_REF} missing")
            if L.PULL_SECRET not in merged:  # credentials of the pull, kept out of the metastore
                merged.update(self.credentials.labels_for(ref))
            backend = backend_config(ref, merged, self.config, self._ping)
            hint = self.mountpoint_hint(meta_id)
            t0 = time.monotonic()
            try:
                mp = self.manager.mount(meta_id, boot, hint, backend)
            except SnapshotterError:
                raise
            except Exception as exc:  # the manager's own errors (rafs/storage) → UNAVAILABLE
                raise Unavailable(f"failed to mount RAFS instance for {meta_info.name}: {exc}") from exc
            log.info("RAFS instance %s for %s mounted at %s in %.3fs", meta_id, ref, mp, time.monotonic() - t0)
            self._mounted[meta_id] = mp
            return mp

    def _needed_instances(self) -> set[str]:
        """Meta snapshot ids that some active/view snapshot sits on."""
        with self.ms.transaction(writable=False) as tx:
            snaps = store.snapshots_by_id(tx)
        by_key = {info.name: (sid, info) for sid, (info, _) in snaps.items()}
        needed: set[str] = set()
        for sid, (info, _) in snaps.items():
            if info.kind == Kind.COMMITTED:
                continue
            parent = info.parent
            while parent and parent in by_key:
                pid, pinfo = by_key[parent]
                if L.is_nydus_meta_layer(pinfo.labels):
                    needed.add(pid)
                    break
                parent = pinfo.parent
        return needed

    def _release_instances(self) -> None:
        if not self._mounted:
            return
        needed = self._needed_instances()
        for iid in list(self._mounted):
            if iid not in needed:
                self._umount_instance(iid)

    def _umount_instance(self, iid: str, *, only_if_unneeded: bool = True) -> None:
        with self._instance_lock(iid):
            if iid not in self._mounted:
                return
            # re-check under the instance lock: a Prepare that committed its snapshot after our
            # caller looked must keep the instance (its _ensure_instance waits for this lock)
            if only_if_unneeded and iid in self._needed_instances():
                return
            try:
                self.manager.umount(iid)
                self._mounted.pop(iid, None)
                log.info("RAFS instance %s unmounted", iid)
            except FileNotFoundError:  # the manager does not know it (rafs NotFound): gone already
                self._mounted.pop(iid, None)
            except Exception:  # keep it listed; Cleanup retries
                log.exception("failed to unmount RAFS instance %s", iid)

    def instances(self) -> dict[str, str]:
        """Mounted RAFS instances: meta snapshot id → mountpoint."""
        return dict(self._mounted)

    def _remove_dir(self, sid: str) -> bool:
        path = snapshot_dir(self.root, sid)
        if not os.path.lexists(path):
            return False
        for sub in ("mnt", "fs"):  # where a RAFS instance (dedicated mode) or a user could mount
            if os.path.ismount(os.path.join(path, sub)):
                log.warning("not removing %s: %s is still a mountpoint", path, os.path.join(path, sub))
                return False
        try:
            shutil.rmtree(path)
            return True
        except OSError:
            log.warning("failed to remove directory %s", path, exc_info=True)
            return False

    # -- cache ----------------------------------------------------------------------------

    def _cache_usage(self, blob_id: str) -> Usage:
        size = inodes = 0
        for suffix in CACHE_SUFFIXES:
            try:
                st = os.stat(os.path.join(self.config.cache_dir, blob_id + suffix))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                size += st.st_blocks * 512
                inodes += 1
        return Usage(size=size, inodes=inodes)

    def blobs_in_use(self) -> set[str]:
        """Blob ids (layer digest hex) of every nydus data layer and bootstrap the store knows."""
        in_use: set[str] = set()
        with self.ms.transaction(writable=False) as tx:
            snaps = store.snapshots_by_id(tx)
        for sid, (info, _) in snaps.items():
            if L.is_nydus_data_layer(info.labels):
                try:
                    blob = L.layer_blob_id(info.labels)
                except InvalidArgument:
                    blob = None
                if blob:
                    in_use.add(blob)
            elif L.is_nydus_meta_layer(info.labels):
                boot = find_bootstrap(upper_path(self.root, sid))
                in_use |= _bootstrap_blob_ids(boot) if boot else set()
        return in_use

    def cache_size(self) -> int:
        total = 0
        try:
            with os.scandir(self.config.cache_dir) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            pass
        return total

    def gc_cache(self) -> list[str]:
        """Delete cache files of blobs that no snapshot uses; returns the deleted paths.

        Uses storage's ``FileCacheManager.gc(in_use)`` when available, else deletes files named
        ``<64 hex><known suffix>`` itself.
        """
        cache_dir = self.config.cache_dir
        if not os.path.isdir(cache_dir):
            return []
        in_use = self.blobs_in_use()
        before = set(os.listdir(cache_dir))
        try:
            _storage_gc(cache_dir)(in_use)
        except Exception:  # noqa: BLE001 - GC must never fail Cleanup
            log.warning("cache GC through storage failed; falling back", exc_info=True)
        for name in sorted(set(os.listdir(cache_dir))):
            blob_id = _cache_blob_id(name)
            if blob_id is None or blob_id in in_use:
                continue
            try:
                os.unlink(os.path.join(cache_dir, name))
            except OSError:
                log.warning("cache GC: cannot delete %s", name, exc_info=True)
        deleted = sorted(os.path.join(cache_dir, n) for n in before - set(os.listdir(cache_dir)))
        if deleted:
            log.info("cache GC deleted %d files", len(deleted))
        return deleted

    def counts(self) -> dict[str, int]:
        with self.ms.transaction(writable=False) as tx:
            by_kind = store.counts_by_kind(tx)
        return {k.name.lower(): by_kind.get(k, 0) for k in (Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED)}


def _storage_gc(cache_dir: str) -> Callable[[set[str]], list[str]]:
    from storage.backend.memory import MemoryBackend  # noqa: PLC0415
    from storage.cache.filecache import FileCacheManager  # noqa: PLC0415

    return FileCacheManager(cache_dir, MemoryBackend()).gc


def _cache_blob_id(name: str) -> str | None:
    """The blob id a cache file belongs to (``<64 hex>`` + a known suffix), else None."""
    head, suffix = name[:64], name[64:]
    if len(head) == 64 and all(c in "0123456789abcdef" for c in head) and suffix in CACHE_SUFFIXES:
        return head
    return None


def _bootstrap_blob_ids(boot: str) -> set[str]:
    from rafs.metadata import Rafs  # noqa: PLC0415

    try:
        with Rafs.open(boot) as rafs:
            return {b.blob_id for b in rafs.blobs}
    except Exception:  # an unreadable bootstrap protects nothing; labels still do
        log.warning("cannot read blob table of %s", boot, exc_info=True)
        return set()


def check_fs_driver(config: Config, cachefiles_dev: str = "/dev/cachefiles") -> None:
    """Refuse to start with an ``fs_driver`` this host cannot serve (clear message, no surprise later)."""
    if config.daemon.fs_driver == "fscache" and not os.path.exists(cachefiles_dev):
        raise ConfigError(
            "daemon.fs_driver = \"fscache\" needs the kernel's on-demand cachefiles mode "
            f"(CONFIG_CACHEFILES_ONDEMAND, CONFIG_EROFS_FS_ONDEMAND) and {cachefiles_dev}, which this host "
            "lacks; use fs_driver = \"fusedev\" or \"erofs\"")


def default_manager_factory(config: Config) -> InstanceManager:
    """A ``rafs.daemon.manager.DaemonManager`` for this config (contract in docs/contracts.md)."""
    from rafs.daemon.manager import DaemonManager  # noqa: PLC0415

    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    # same root as upstream: <root>/{daemons,socket,config,logs,mnt}; shared instances land at
    # <root>/mnt/<instance id>, which is also the snapshotter's mountpoint hint
    return DaemonManager(config.root, mode=config.daemon.daemon_mode,  # type: ignore[arg-type]
                         fs_driver=config.daemon.fs_driver,  # type: ignore[arg-type]
                         nydusd_config=nydusd_config(config),
                         log_level=level if level in ("debug", "info", "warning", "error") else "info")
